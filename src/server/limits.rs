//! The limits every API request runs under: a rate limit over all clients
//! (429 with `Retry-After`) and a timeout (503 with `Retry-After`, saying to
//! retry a write with the same Idempotency-Key), and the page's failed
//! sign-ins per client address ([`SignInThrottle`]). The body size limit
//! is axum's.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::Shared;
use crate::api::{Problem, ProblemType};

/// The answer to a request that took longer than the configured timeout. A
/// write that was already handed to the store may still commit, so it says to
/// retry with the same Idempotency-Key.
pub async fn timed_out(error: tower::BoxError) -> Problem {
    let detail = if error.is::<tower::timeout::error::Elapsed>() {
        "the request took too long; a write may still complete, so retry it with the same Idempotency-Key".to_string()
    } else {
        format!("the request failed: {error}")
    };
    Problem {
        retry_after: Some(1),
        ..Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ProblemType::Timeout,
            detail,
        )
    }
}

pub async fn rate_limit(State(s): State<Shared>, request: Request, next: Next) -> Response {
    if let Some(limiter) = &s.limiter
        && let Err(not_until) = limiter.check()
    {
        let wait = not_until.wait_time_from(governor::clock::Clock::now(
            &governor::clock::DefaultClock::default(),
        ));
        return Problem {
            retry_after: Some(wait.as_secs().max(1)),
            ..Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                ProblemType::RateLimited,
                "too many requests; retry after the time in Retry-After",
            )
        }
        .into_response();
    }
    next.run(request).await
}

/// Failed sign-ins counted per client address over a sliding minute: past
/// [`SignInThrottle::LIMIT`], the address is answered 429 until its oldest
/// failure is a minute old. At most [`SignInThrottle::ADDRESSES`] addresses
/// are remembered (the stalest forgotten first), so no client can grow it.
/// The address is the peer's as the server sees it (behind a proxy, the
/// proxy's).
#[derive(Default)]
pub struct SignInThrottle(std::sync::Mutex<HashMap<IpAddr, VecDeque<Instant>>>);

impl SignInThrottle {
    pub const LIMIT: usize = 10;
    const WINDOW: Duration = Duration::from_secs(60);
    const ADDRESSES: usize = 10_000;

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, VecDeque<Instant>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long `ip` must wait before it may try again, if it must.
    pub fn wait(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let mut failures = self.lock();
        let recent = failures.get_mut(&ip)?;
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Self::WINDOW)
        {
            recent.pop_front();
        }
        let oldest = *recent.front()?;
        (recent.len() >= Self::LIMIT).then(|| Self::WINDOW - now.duration_since(oldest))
    }

    /// Counts a failed sign-in from `ip`.
    pub fn failed(&self, ip: IpAddr, now: Instant) {
        let mut failures = self.lock();
        if failures.len() >= Self::ADDRESSES && !failures.contains_key(&ip) {
            failures.retain(|_, r| {
                r.back()
                    .is_some_and(|t| now.duration_since(*t) < Self::WINDOW)
            });
            if failures.len() >= Self::ADDRESSES
                && let Some(stalest) = failures
                    .iter()
                    .min_by_key(|(_, r)| r.back().copied())
                    .map(|(ip, _)| *ip)
            {
                failures.remove(&stalest);
            }
        }
        let recent = failures.entry(ip).or_default();
        recent.push_back(now);
        while recent.len() > Self::LIMIT {
            recent.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_eleventh_failure_in_a_minute_waits_for_the_oldest_to_age() {
        let throttle = SignInThrottle::default();
        let (ip, other): (IpAddr, IpAddr) =
            ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let start = Instant::now();
        for i in 0..SignInThrottle::LIMIT {
            assert_eq!(throttle.wait(ip, start), None, "after {i} failures");
            throttle.failed(ip, start + Duration::from_secs(i as u64));
        }
        let now = start + Duration::from_secs(15);
        assert_eq!(throttle.wait(ip, now), Some(Duration::from_secs(45)));
        assert_eq!(throttle.wait(other, now), None, "another address");
        assert_eq!(throttle.wait(ip, start + Duration::from_secs(60)), None);
    }

    #[test]
    fn it_remembers_a_bounded_number_of_addresses() {
        let throttle = SignInThrottle::default();
        let now = Instant::now();
        for i in 0..(SignInThrottle::ADDRESSES as u32 + 50) {
            throttle.failed(IpAddr::from(i.to_be_bytes()), now);
        }
        assert!(throttle.lock().len() <= SignInThrottle::ADDRESSES);
    }
}
