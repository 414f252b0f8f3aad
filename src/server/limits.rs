//! The limits every API request runs under: a rate limit over all clients
//! (429 with `Retry-After`) and a timeout (503 with `Retry-After`, saying to
//! retry a write with the same Idempotency-Key). The body size limit is
//! axum's.

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
