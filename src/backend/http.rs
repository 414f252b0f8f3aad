//! The remote backend: a client of the license platform API (DESIGN §5),
//! such as `licensor serve`.
//!
//! Every call has a timeout. Reads, and writes that are safe to repeat (an
//! allocation write carries its idempotency key, which names the intended
//! change and so stays the same across retries and process restarts; totals
//! and releases are idempotent by nature) are retried on connection errors,
//! timeouts, 5xx and 429, with exponential backoff and full jitter, honouring
//! `Retry-After`. A seat change is only retried when the request never left.
//! Problem details map back to the same refusal reasons exactly; anything
//! else the server says (garbage, an unknown status) is `BackendUnavailable`.
//!
//! Every call of one client goes through one [`Gate`]: an optional rate
//! (a token bucket, `--backend-rate`) shared by all of them, and the pause a
//! platform asks for with `Retry-After` (on a 429 or a 5xx), which holds
//! every call until it ends, not only the refused one: the call that was
//! refused waits it out and tries again, any other is answered at once,
//! without a request, as `BackendUnavailable` saying until when.

use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{AuditEntry, Backend, BackendError, Fixture, Written};
use crate::api::{
    AccountState, Problem, ProblemType, Product, PutAllocation, Release, Seats, TotalBody,
};
use crate::domain::{
    Allocation, AllocationWrite, Pool, PoolView, Reason, Refusal, RefusalDetail, SeatChange,
    Snapshot, Target,
};

/// How calls are retried.
#[derive(Debug, Clone)]
pub struct Retry {
    /// Tries in all, the first included.
    pub attempts: u32,
    pub base: Duration,
    pub cap: Duration,
    /// The longest `Retry-After` that is waited for; a longer one ends the call.
    pub longest_wait: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            attempts: 5,
            base: Duration::from_millis(100),
            cap: Duration::from_secs(2),
            longest_wait: Duration::from_secs(30),
        }
    }
}

/// When a call may be repeated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Repeat {
    /// Idempotent: retry on any transient failure.
    Safe,
    /// Only when the request never reached the server.
    NotSent,
}

/// A license platform account over HTTP.
pub struct HttpBackend {
    base: Url,
    account: String,
    client: reqwest::Client,
    retry: Retry,
    gate: Gate,
}

/// What every call of one client shares: its rate, and a pause the
/// platform asked for.
#[derive(Default)]
struct Gate {
    rate: Option<DefaultDirectRateLimiter>,
    /// Until when (and until when on the wall clock, for messages).
    paused: Mutex<Option<(Instant, chrono::DateTime<chrono::Utc>)>>,
}

impl Gate {
    /// Waits for the rate; refuses at once while a pause lasts.
    async fn admit(&self) -> Result<(), String> {
        let paused = *self.paused.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((until, wall)) = paused
            && Instant::now() < until
        {
            return Err(format!(
                "the platform asked for a pause (Retry-After): no calls to it until {}",
                wall.format("%H:%M:%S UTC")
            ));
        }
        if let Some(rate) = &self.rate {
            rate.until_ready().await;
        }
        Ok(())
    }

    /// Holds every call for `wait` (or longer, if already held longer).
    fn pause(&self, wait: Duration) {
        let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        let until = Instant::now() + wait;
        if paused.is_none_or(|(u, _)| u < until) {
            let wall = chrono::Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default();
            *paused = Some((until, wall));
        }
    }
}

/// CA certificates (PEM) to trust beside the system's, for an `https://`
/// platform whose certificate a private CA signed; named (a file, a Secret
/// key) for messages.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Ca {
    pub name: String,
    pub pem: Vec<u8>,
}

impl Ca {
    /// The certificates in the file at `path`.
    pub fn read(path: &std::path::Path) -> Result<Ca, BackendError> {
        let name = path.display().to_string();
        std::fs::read(path)
            .map(|pem| Ca {
                name: name.clone(),
                pem,
            })
            .map_err(|e| BackendError::Unavailable(format!("backend CA {name}: {e}")))
    }
}

impl HttpBackend {
    /// A client for `account` at `url` (`http(s)://host:port`), authenticated
    /// with `token`, each try limited to `timeout`, trusting `ca` too.
    pub fn new(
        url: &str,
        account: &str,
        token: Option<&str>,
        timeout: Duration,
        retry: Retry,
        ca: Option<Ca>,
    ) -> Result<HttpBackend, BackendError> {
        let shown = super::redact(url);
        let base = Url::parse(url)
            .map_err(|e| BackendError::Unavailable(format!("backend URL {shown:?}: {e}")))?;
        if base.cannot_be_a_base() || !matches!(base.scheme(), "http" | "https") {
            return Err(BackendError::Unavailable(format!(
                "backend URL {shown:?} is not an http(s) URL"
            )));
        }
        let mut headers = HeaderMap::new();
        if let Some(t) = token {
            let mut value = HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| {
                BackendError::Unauthorized("the token has characters a header cannot carry".into())
            })?;
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let mut builder = reqwest::Client::builder();
        if let Some(Ca { name, pem }) = ca {
            let certificates = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| BackendError::Unavailable(format!("backend CA {name}: {e}")))?;
            if certificates.is_empty() {
                return Err(BackendError::Unavailable(format!(
                    "backend CA {name}: no certificate in it"
                )));
            }
            for c in certificates {
                builder = builder.add_root_certificate(c);
            }
        }
        let client = builder
            .default_headers(headers)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .timeout(timeout)
            .user_agent(concat!("licensor/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| BackendError::Unavailable(format!("HTTP client: {e}")))?;
        Ok(HttpBackend {
            base,
            account: account.to_string(),
            client,
            retry,
            gate: Gate::default(),
        })
    }

    /// At most `rate` requests a second over all calls of this client.
    pub fn with_rate(mut self, rate: Option<NonZeroU32>) -> HttpBackend {
        self.gate.rate = rate.map(|n| RateLimiter::direct(Quota::per_second(n)));
        self
    }

    /// `/v1/accounts/<account>/<segments...>`, each segment escaped.
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty()
                .extend(["v1", "accounts", &self.account])
                .extend(segments);
        }
        url
    }

    /// Sends a request, retrying as the module contract says, and decodes
    /// the answer. `None` for 404 `not-found` when `absent_ok`.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        url: Url,
        body: Option<&(impl Serialize + Sync)>,
        headers: HeaderMap,
        repeat: Repeat,
    ) -> Result<Option<T>, BackendError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            if let Err(why) = self.gate.admit().await {
                return Err(unavailable(&method, &url, &why, attempt - 1));
            }
            let mut request = self
                .client
                .request(method.clone(), url.clone())
                .headers(headers.clone());
            if let Some(b) = body {
                request = request.json(b);
            }
            let last = attempt >= self.retry.attempts;
            let wait = match request.send().await {
                Err(e) => {
                    let transient = e.is_connect()
                        || (repeat == Repeat::Safe && (e.is_timeout() || e.is_request()));
                    if last || !transient {
                        return Err(unavailable(
                            &method,
                            &url,
                            &e.without_url().to_string(),
                            attempt,
                        ));
                    }
                    None
                }
                Ok(response) => {
                    let status = response.status();
                    let retry_after = response
                        .headers()
                        .get(RETRY_AFTER)
                        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let is_json = response
                        .headers()
                        .get(CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|v| v.contains("json"));
                    let bytes = match response.bytes().await {
                        Ok(b) => b,
                        Err(e) if !last && repeat == Repeat::Safe => {
                            tracing::debug!(
                                "reading the answer of {method} {}: {}",
                                url.path(),
                                e.without_url()
                            );
                            self.pause(attempt, None).await;
                            continue;
                        }
                        Err(e) => {
                            return Err(unavailable(
                                &method,
                                &url,
                                &e.without_url().to_string(),
                                attempt,
                            ));
                        }
                    };
                    if status.is_success() {
                        if status == StatusCode::NO_CONTENT {
                            return serde_json::from_value(serde_json::Value::Null)
                                .map(Some)
                                .map_err(|e| garbage(&method, &url, e));
                        }
                        return serde_json::from_slice(&bytes)
                            .map(Some)
                            .map_err(|e| garbage(&method, &url, e));
                    }
                    let problem: Option<Problem> = is_json
                        .then(|| serde_json::from_slice(&bytes).ok())
                        .flatten();
                    let transient =
                        status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS;
                    // Asked to wait: every call of this client waits.
                    if transient && let Some(w) = retry_after {
                        self.gate.pause(w);
                    }
                    if !transient || last || repeat == Repeat::NotSent {
                        return match problem {
                            Some(p)
                                if p.kind() == Some(ProblemType::NotFound)
                                    && status == StatusCode::NOT_FOUND =>
                            {
                                Ok(None)
                            }
                            Some(p) if !transient => Err(p.into()),
                            Some(p) => Err(unavailable(
                                &method,
                                &url,
                                &format!("{status}: {}", p.detail),
                                attempt,
                            )),
                            None => Err(unavailable(
                                &method,
                                &url,
                                &format!("answered {status} without problem details"),
                                attempt,
                            )),
                        };
                    }
                    if let Some(w) = retry_after
                        && w > self.retry.longest_wait
                    {
                        return Err(unavailable(
                            &method,
                            &url,
                            &format!("{status}; Retry-After {}s is too long to wait", w.as_secs()),
                            attempt,
                        ));
                    }
                    retry_after
                }
            };
            self.pause(attempt, wait).await;
        }
    }

    /// Waits before try `attempt + 1`: `Retry-After` if the server said,
    /// otherwise a random time up to the exponential delay (full jitter).
    async fn pause(&self, attempt: u32, retry_after: Option<Duration>) {
        let delay = retry_after.unwrap_or_else(|| {
            let ceiling = self
                .retry
                .base
                .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1).min(16)))
                .min(self.retry.cap);
            ceiling.mul_f64(rand::random::<f64>())
        });
        tracing::debug!(attempt, ?delay, "retrying the backend");
        tokio::time::sleep(delay).await;
    }

    async fn get<T: DeserializeOwned>(&self, segments: &[&str]) -> Result<Option<T>, BackendError> {
        self.call(
            Method::GET,
            self.url(segments),
            None::<&()>,
            HeaderMap::new(),
            Repeat::Safe,
        )
        .await
    }

    fn must<T>(answer: Option<T>, what: &str) -> Result<T, BackendError> {
        answer.ok_or_else(|| BackendError::Unavailable(format!("the server has no {what}")))
    }
}

fn unavailable(method: &Method, url: &Url, why: &str, attempts: u32) -> BackendError {
    if attempts == 0 {
        return BackendError::Unavailable(format!("{method} {}: {why}", url.path()));
    }
    BackendError::Unavailable(format!(
        "{method} {}: {why} (after {attempts} {})",
        url.path(),
        if attempts == 1 { "try" } else { "tries" }
    ))
}

fn garbage(method: &Method, url: &Url, e: serde_json::Error) -> BackendError {
    BackendError::Unavailable(format!(
        "{method} {}: the server answered garbage: {e}",
        url.path()
    ))
}

#[async_trait]
impl Backend for HttpBackend {
    fn location(&self) -> String {
        format!(
            "{} (account {})",
            super::redact(self.base.as_str().trim_end_matches('/')),
            self.account
        )
    }

    async fn snapshot(&self) -> Result<Snapshot, BackendError> {
        // One request, one read on the server: the pools agree with the
        // allocations.
        let account: AccountState = Self::must(self.get(&[]).await?, "account")?;
        Ok(Snapshot {
            pools: account.products.into_iter().map(Pool::from).collect(),
            organizations: account.organizations.into_iter().map(|o| o.id).collect(),
            allocations: account.allocations,
        })
    }

    async fn observe(&self, organization: &str, product: &str) -> Result<Snapshot, BackendError> {
        let pools: Vec<Product> = self.get(&["products"]).await?.unwrap_or_default();
        let pools: Vec<Pool> = pools
            .into_iter()
            .filter(|p| p.product == product)
            .map(Pool::from)
            .collect();
        let found: Result<Option<Allocation>, BackendError> = self
            .get(&["organizations", organization, "allocations", product])
            .await;
        let (organizations, allocations) = match found {
            Ok(Some(a)) => (vec![organization.to_string()], vec![a]),
            Ok(None) => (vec![organization.to_string()], vec![]),
            Err(BackendError::Refused(r)) if r.reason == Reason::UnknownOrganization => {
                (vec![], vec![])
            }
            Err(BackendError::Refused(r)) if r.reason == Reason::UnknownProduct => {
                (vec![organization.to_string()], vec![])
            }
            Err(e) => return Err(e),
        };
        Ok(Snapshot {
            pools,
            organizations,
            allocations,
        })
    }

    async fn write(&self, w: &AllocationWrite) -> Result<Written, BackendError> {
        let mut headers = HeaderMap::new();
        match w.expected_version {
            Some(0) => {
                headers.insert("if-none-match", HeaderValue::from_static("*"));
            }
            Some(v) => {
                headers.insert("if-match", header(&format!("\"{v}\""))?);
            }
            None => {}
        }
        if let Some(k) = &w.idempotency_key {
            headers.insert("idempotency-key", header(k)?);
        }
        let segments = ["organizations", &w.organization, "allocations", &w.product];
        let mut url = self.url(&segments);
        let answer = match w.target {
            Target::Count(n) => {
                let body = PutAllocation {
                    dedicated: n,
                    managed_by: w.managed_by.clone(),
                    allow_user_displacement: w.allow_user_displacement,
                    deletion_policy: w.deletion_policy,
                    expiry: w.expiry,
                };
                self.call(Method::PUT, url, Some(&body), headers, Repeat::Safe)
                    .await?
            }
            Target::Remove => {
                {
                    let mut q = url.query_pairs_mut();
                    if let Some(m) = &w.managed_by {
                        q.append_pair("managedBy", m);
                    }
                    q.append_pair(
                        "allowUserDisplacement",
                        &w.allow_user_displacement.to_string(),
                    );
                }
                self.call(Method::DELETE, url, None::<&()>, headers, Repeat::Safe)
                    .await?
            }
        };
        Self::must(answer, "answer to the write")
    }

    async fn release(
        &self,
        organization: &str,
        product: &str,
        manager: &str,
    ) -> Result<(), BackendError> {
        let url = self.url(&[
            "organizations",
            organization,
            "allocations",
            product,
            "release",
        ]);
        let body = Release {
            managed_by: manager.to_string(),
        };
        self.call::<()>(
            Method::POST,
            url,
            Some(&body),
            HeaderMap::new(),
            Repeat::Safe,
        )
        .await
        .map(drop)
    }

    async fn set_total(&self, product: &str, total: i64) -> Result<PoolView, BackendError> {
        let body = TotalBody { total };
        let answer: Option<Product> = self
            .call(
                Method::PUT,
                self.url(&["products", product]),
                Some(&body),
                HeaderMap::new(),
                Repeat::Safe,
            )
            .await?;
        Self::must(answer, "answer to the total").map(|p| PoolView::from(&Pool::from(p)))
    }

    async fn seats(
        &self,
        organization: &str,
        product: &str,
        change: SeatChange,
    ) -> Result<(), BackendError> {
        let body = Seats::from(change);
        let url = self.url(&["organizations", organization, "seats", product]);
        self.call::<()>(
            Method::POST,
            url,
            Some(&body),
            HeaderMap::new(),
            Repeat::NotSent,
        )
        .await
        .map(drop)
    }

    async fn seed(&self, _fixture: &Fixture) -> Result<(), BackendError> {
        Err(Refusal::new(
            Reason::Invalid,
            "the platform API does not replace accounts; seed the server's store with `licensor --backend sqlite:PATH backend seed`",
        )
        .into())
    }

    async fn audit_page(&self, after: i64, limit: i64) -> Result<Vec<AuditEntry>, BackendError> {
        let mut url = self.url(&["audit"]);
        url.query_pairs_mut()
            .append_pair("after", &after.to_string())
            .append_pair("limit", &limit.to_string());
        let answer = self
            .call(
                Method::GET,
                url,
                None::<&()>,
                HeaderMap::new(),
                Repeat::Safe,
            )
            .await?;
        Ok(answer.unwrap_or_default())
    }
}

fn header(v: &str) -> Result<HeaderValue, BackendError> {
    HeaderValue::from_str(v)
        .map_err(|_| BackendError::Unavailable(format!("{v:?} cannot be sent as a header")))
}

/// The backend error a problem of the platform API stands for: the
/// client's side of the problem types.
impl From<Problem> for BackendError {
    fn from(p: Problem) -> BackendError {
        match p.kind() {
            Some(ProblemType::Refused(Reason::BackendUnavailable)) => {
                BackendError::Unavailable(p.detail)
            }
            Some(ProblemType::Refused(reason)) => BackendError::Refused(Refusal {
                reason,
                message: p.detail,
                detail: RefusalDetail {
                    requested: p.requested,
                    free: p.free,
                    in_use: p.in_use,
                    displaced: p.displaced,
                    owner: p.owner,
                },
            }),
            Some(ProblemType::Unauthorized) => BackendError::Unauthorized(p.detail),
            Some(ProblemType::Stale) => BackendError::Stale {
                expected: p.expected_version.unwrap_or(-1),
                actual: p.actual_version.unwrap_or(-1),
            },
            Some(ProblemType::KeyReused) => BackendError::KeyReused(p.detail),
            _ => BackendError::Unavailable(format!(
                "the server answered {} {}: {}",
                p.status, p.title, p.detail
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_survives_the_round_trip() {
        for reason in Reason::all() {
            let refusal = Refusal {
                reason,
                message: "m".into(),
                detail: RefusalDetail {
                    requested: Some(5),
                    free: Some(2),
                    ..Default::default()
                },
            };
            let wire = serde_json::to_string(&Problem::refusal(&refusal)).unwrap();
            let back: Problem = serde_json::from_str(&wire).unwrap();
            let expected = if reason == Reason::BackendUnavailable {
                BackendError::Unavailable("m".into())
            } else {
                BackendError::Refused(refusal)
            };
            assert_eq!(BackendError::from(back), expected, "{wire}");
        }
        assert_eq!(
            crate::api::problem::slug(Reason::WouldDisplaceUsers),
            "would-displace-users"
        );
    }
}
