//! `licensor serve`: the license platform HTTP API (DESIGN §5) over the
//! embedded store.
//!
//! [`routes`] maps each route onto one of the store's transaction functions
//! (the same ones the embedded backend calls, so a rule is decided in one
//! place), with the wire types of [`crate::api`]; [`problem`] makes every
//! error answer RFC 9457 problem details. This module wires access, before
//! anything else a request does: the bearer token is checked for the
//! account (401), and a write needs the Account Admin role (403), before
//! the body, its media type or its idempotency key is looked at. Then a
//! rate limit answering 429 with `Retry-After`, limits (body size, request
//! timeout), `/healthz`, `/readyz`, `/metrics` (label values from fixed
//! sets, so no client can create series), `/openapi.json`, and a clean
//! shutdown on SIGTERM. Tokens are never logged, echoed or stored in clear.

pub mod openapi;
pub mod page;
pub mod problem;
pub mod routes;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::RequestExt;
use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post, put};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use sha2::{Digest, Sha256};

use crate::api::{Problem, ProblemType};
use crate::backend::BackendError;
use crate::backend::store::{Principal, Store, off_thread};
use crate::domain::{Reason, require_admin};

/// How the server runs.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// Requests per second over all clients; `None` for no limit.
    pub rate_limit: Option<NonZeroU32>,
    /// Largest request body in bytes.
    pub max_body: usize,
    /// Longest a request may take.
    pub timeout: Duration,
    /// Certificate chain and key files: serve HTTPS.
    pub tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// How long an authenticated token is remembered before it is checked again.
const TOKEN_CACHE: Duration = Duration::from_secs(10);
/// How long idempotency keys are kept.
const IDEMPOTENCY_KEYS: chrono::TimeDelta = chrono::TimeDelta::hours(24);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    /// One of [`METHODS`], or `other`.
    method: &'static str,
    /// A route template, or `(unmatched)`.
    route: String,
    status: u16,
}

/// The methods counted by name; any other is counted as `other`.
const METHODS: [Method; 7] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::PATCH,
    Method::OPTIONS,
];

fn method_label(m: &Method) -> &'static str {
    METHODS
        .iter()
        .find(|known| *known == m)
        .map_or("other", Method::as_str)
}

struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Histogram,
}

type Authenticated = (String, Principal, Instant);

/// What every request shares.
#[derive(Clone)]
pub struct Shared {
    store: Arc<Store>,
    /// sha256(token) -> (account, caller, when checked).
    tokens: Arc<Mutex<HashMap<String, Authenticated>>>,
    limiter: Option<Arc<DefaultDirectRateLimiter>>,
    metrics: Arc<Metrics>,
    /// Served over TLS (`--tls-cert`): the page's cookies are `Secure`.
    tls: bool,
}

/// The bearer token of a request; the scheme name is case-insensitive
/// (RFC 9110 §11.1).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The caller of a request for `account`, from its bearer token.
pub async fn authorize(
    s: &Shared,
    headers: &HeaderMap,
    account: &str,
) -> Result<Principal, Problem> {
    let unauthorized =
        |m: &str| Problem::new(StatusCode::UNAUTHORIZED, ProblemType::Unauthorized, m);
    let token = bearer(headers)
        .ok_or_else(|| unauthorized("send a bearer token: Authorization: Bearer <token>"))?;
    let key = hex::encode(Sha256::digest(token.as_bytes()));
    if let Some((a, who, at)) = s.tokens.lock().unwrap_or_else(|p| p.into_inner()).get(&key)
        && a == account
        && at.elapsed() < TOKEN_CACHE
    {
        return Ok(who.clone());
    }
    let (store, token, acc) = (s.store.clone(), token.to_string(), account.to_string());
    let who = off_thread(move || store.authenticate(&acc, &token))
        .await
        .map_err(|e| match e {
            BackendError::Unauthorized(_) => {
                unauthorized("the token is unknown or not for this account")
            }
            other => Problem::from(other),
        })?;
    s.tokens
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key, (account.to_string(), who.clone(), Instant::now()));
    Ok(who)
}

/// Checks the caller before anything else a route does: a valid token for
/// the account in the path (401), and the Account Admin role for any
/// method but GET and HEAD (403). The caller is handed to the route.
async fn authenticate(State(s): State<Shared>, mut request: Request, next: Next) -> Response {
    // A path that does not decode names no account a token is for: 401.
    let account = request
        .extract_parts::<Path<HashMap<String, String>>>()
        .await
        .ok()
        .and_then(|Path(mut p)| p.remove("account"))
        .unwrap_or_default();
    let who = match authorize(&s, request.headers(), &account).await {
        Ok(who) => who,
        Err(problem) => return problem.into_response(),
    };
    if !matches!(*request.method(), Method::GET | Method::HEAD)
        && let Err(refusal) = require_admin(who.role, "change the account")
    {
        return Problem::refusal(&refusal).into_response();
    }
    request.extensions_mut().insert(who);
    next.run(request).await
}

/// The application: every route, the limits and the middleware.
pub fn app(store: Arc<Store>, config: &Config) -> Router {
    let mut registry = Registry::with_prefix("licensor_http");
    let metrics = Metrics {
        registry: Registry::default(),
        requests: Family::default(),
        duration: Histogram::new([
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
        ]),
    };
    registry.register(
        "requests",
        "Requests by method, route and status",
        metrics.requests.clone(),
    );
    registry.register(
        "request_duration_seconds",
        "Time to answer a request",
        metrics.duration.clone(),
    );
    let shared = Shared {
        store,
        tokens: Arc::default(),
        limiter: config
            .rate_limit
            .map(|n| Arc::new(RateLimiter::direct(Quota::per_second(n)))),
        metrics: Arc::new(Metrics {
            registry,
            ..metrics
        }),
        tls: config.tls.is_some(),
    };
    let base = "/v1/accounts/{account}";
    // The caller is checked on each route's own methods (route_layer), so a
    // method a route does not have is a 405 with Allow, before any token:
    // the methods are public in /openapi.json anyway.
    let guard = |m: MethodRouter<Shared>| {
        m.route_layer(middleware::from_fn_with_state(shared.clone(), authenticate))
    };
    let api = Router::new()
        .route(base, guard(get(routes::get_account)))
        .route(
            &format!("{base}/products"),
            guard(get(routes::list_products)),
        )
        .route(
            &format!("{base}/products/{{product}}"),
            guard(put(routes::put_product)),
        )
        .route(
            &format!("{base}/organizations"),
            guard(get(routes::list_organizations).post(routes::create_organization)),
        )
        .route(
            &format!("{base}/allocations"),
            guard(get(routes::list_allocations)),
        )
        .route(
            &format!("{base}/organizations/{{organization}}/allocations/{{product}}"),
            guard(
                get(routes::get_allocation)
                    .put(routes::put_allocation)
                    .delete(routes::delete_allocation),
            ),
        )
        .route(
            &format!("{base}/organizations/{{organization}}/allocations/{{product}}/release"),
            guard(post(routes::release_allocation)),
        )
        .route(
            &format!("{base}/organizations/{{organization}}/seats/{{product}}"),
            guard(post(routes::seats)),
        )
        .route(&format!("{base}/audit"), guard(get(routes::audit)))
        .route_layer(middleware::from_fn_with_state(shared.clone(), rate_limit));
    crate::endpoints::with_healthz(Router::new())
        .merge(api)
        .merge(page::routes(shared.clone()))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route(
            "/openapi.json",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    openapi::document(),
                )
            }),
        )
        .fallback(|| async {
            Problem::new(
                StatusCode::NOT_FOUND,
                ProblemType::NotFound,
                "no such route; see /openapi.json",
            )
        })
        .layer(middleware::from_fn(problem::errors_as_problems))
        .layer(middleware::from_fn_with_state(shared.clone(), observe))
        .layer(DefaultBodyLimit::max(config.max_body))
        .layer(
            tower::ServiceBuilder::new()
                .layer(axum::error_handling::HandleErrorLayer::new(timed_out))
                .timeout(config.timeout),
        )
        .with_state(shared)
}

/// Serves until SIGTERM or ctrl-c, then finishes requests in flight.
pub async fn run(store: Arc<Store>, config: Config) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    tracing::info!(address = %listener.local_addr()?, store = %store.location(), "serving the license platform API");
    let expiry = store.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(3600));
        loop {
            every.tick().await;
            let s = expiry.clone();
            match off_thread(move || s.expire_idempotency_keys(IDEMPOTENCY_KEYS)).await {
                Ok(n) if n > 0 => {
                    tracing::info!(expired = n, "forgot idempotency keys older than 24 hours")
                }
                Err(e) => tracing::warn!("expiring idempotency keys: {e}"),
                _ => {}
            }
        }
    });
    let app = app(store, &config);
    if let Some((cert, key)) = &config.tls {
        let files = crate::tls::CertificateFiles::load(cert, key)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let tls = crate::tls::server_config(files).map_err(std::io::Error::other)?;
        let listener = crate::tls::TlsListener::start(listener, tls);
        return axum::serve(listener, app)
            .with_graceful_shutdown(shutdown())
            .await;
    }
    // Answers go out as soon as they are written (no Nagle delay behind a
    // client's delayed acknowledgement).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown())
        .await
}

async fn shutdown() {
    crate::shutdown::requested().await;
    tracing::info!("stopping: finishing requests in flight");
}

/// The answer to a request that took longer than the configured timeout. A
/// write that was already handed to the store may still commit, so it says to
/// retry with the same Idempotency-Key.
async fn timed_out(error: tower::BoxError) -> Problem {
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

async fn rate_limit(State(s): State<Shared>, request: Request, next: Next) -> Response {
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

/// Counts and times every request; logs it at debug (never its headers).
async fn observe(State(s): State<Shared>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("(unmatched)".to_string(), |m| m.as_str().to_string());
    let response = next.run(request).await;
    let status = response.status().as_u16();
    s.metrics.duration.observe(started.elapsed().as_secs_f64());
    s.metrics
        .requests
        .get_or_create(&RequestLabels {
            method,
            route: route.clone(),
            status,
        })
        .inc();
    tracing::debug!(%method, %route, status, took = ?started.elapsed(), "request");
    response
}

async fn readyz(State(s): State<Shared>) -> Response {
    let store = s.store.clone();
    let Err(why) = off_thread(move || store.accounts()).await else {
        return (StatusCode::OK, "ready\n").into_response();
    };
    // Not ready says why (a database not up yet, refusing the password).
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        ProblemType::Refused(Reason::BackendUnavailable),
        format!("not ready: the store cannot be read: {why}"),
    )
    .into_response()
}

async fn metrics_text(State(s): State<Shared>) -> Response {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &s.metrics.registry);
    crate::endpoints::openmetrics(out)
}
