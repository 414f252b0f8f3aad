//! `licensor serve`: the license platform HTTP API (DESIGN §5) over the
//! embedded store.
//!
//! [`routes`] maps each route onto one of the store's transaction functions
//! (the same ones the embedded backend calls, so a rule is decided in one
//! place), with the wire types of [`crate::api`]; [`problem`] makes every
//! error answer RFC 9457 problem details. This module builds the router
//! from the route templates ([`path`], each written once) and wires, in
//! order: access before anything else a request does (`access`: 401 for
//! the token, 403 for the role, before the body, its media type or its
//! idempotency key is looked at), the limits (`limits`: rate, body size,
//! timeout), the metrics (`metrics`), `/healthz`, `/readyz`,
//! `/openapi.json`, the expiry of idempotency keys and a clean shutdown on
//! SIGTERM.

mod access;
mod limits;
mod metrics;
pub mod openapi;
pub mod page;
pub mod problem;
pub mod routes;

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post, put};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::api::{Problem, ProblemType};
use crate::backend::store::{Store, off_thread};
use crate::domain::Reason;
pub use access::authorize;

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
    /// Serve this account only (`--account`): another account's token is
    /// 401 on the API and at sign-in.
    pub account: Option<String>,
}

/// How long idempotency keys are kept.
const IDEMPOTENCY_KEYS: chrono::TimeDelta = chrono::TimeDelta::hours(24);

/// What every request shares: one reference, cloned by each layer a
/// request passes.
#[derive(Clone)]
pub struct Shared(Arc<Sharing>);

impl std::ops::Deref for Shared {
    type Target = Sharing;
    fn deref(&self) -> &Sharing {
        &self.0
    }
}

pub struct Sharing {
    store: Arc<Store>,
    /// Failed sign-ins per client address.
    sign_ins: limits::SignInThrottle,
    limiter: Option<DefaultDirectRateLimiter>,
    metrics: metrics::Metrics,
    /// Served over TLS (`--tls-cert`): the page's cookies are `Secure`.
    tls: bool,
    /// The one account served, if `--account` named one.
    account: Option<Arc<str>>,
}

/// The route templates the server answers on, each written once: the
/// router is built from them and they are the `route` label's values.
pub mod path {
    pub const ACCOUNT: &str = "/v1/accounts/{account}";
    pub const PRODUCTS: &str = "/v1/accounts/{account}/products";
    pub const PRODUCT: &str = "/v1/accounts/{account}/products/{product}";
    pub const ORGANIZATIONS: &str = "/v1/accounts/{account}/organizations";
    pub const ALLOCATIONS: &str = "/v1/accounts/{account}/allocations";
    pub const ALLOCATION: &str =
        "/v1/accounts/{account}/organizations/{organization}/allocations/{product}";
    pub const RELEASE: &str =
        "/v1/accounts/{account}/organizations/{organization}/allocations/{product}/release";
    pub const SEATS: &str = "/v1/accounts/{account}/organizations/{organization}/seats/{product}";
    pub const AUDIT: &str = "/v1/accounts/{account}/audit";
    pub const HEALTHZ: &str = crate::endpoints::HEALTHZ;
    pub const READYZ: &str = "/readyz";
    pub const METRICS: &str = "/metrics";
    pub const OPENAPI: &str = "/openapi.json";
}

/// Every route template: the API's, the page's and the endpoints'.
pub const ROUTES: [&str; 23] = [
    path::ACCOUNT,
    path::PRODUCTS,
    path::PRODUCT,
    path::ORGANIZATIONS,
    path::ALLOCATIONS,
    path::ALLOCATION,
    path::RELEASE,
    path::SEATS,
    path::AUDIT,
    path::HEALTHZ,
    path::READYZ,
    path::METRICS,
    path::OPENAPI,
    page::path::HOME,
    page::path::STYLESHEET,
    page::path::SIGN_IN,
    page::path::SIGN_OUT,
    page::path::CONFIRM_REVOKE,
    page::path::EDIT,
    page::path::REVOKE,
    page::path::GIVE,
    page::path::FAVICON,
    page::path::AUDIT_CSV,
];

/// The application: every route, the limits and the middleware.
pub fn app(store: Arc<Store>, config: &Config) -> Router {
    let shared = Shared(Arc::new(Sharing {
        store,
        sign_ins: Default::default(),
        limiter: config
            .rate_limit
            .map(|n| RateLimiter::direct(Quota::per_second(n))),
        metrics: metrics::Metrics::new(),
        tls: config.tls.is_some(),
        account: config.account.as_deref().map(Arc::from),
    }));
    // The caller is checked on each route's own methods (route_layer), so a
    // method a route does not have is a 405 with Allow, before any token:
    // the methods are public in /openapi.json anyway.
    let guard = |m: MethodRouter<Shared>| {
        m.route_layer(middleware::from_fn_with_state(
            shared.clone(),
            access::authenticate,
        ))
    };
    let api = Router::new()
        .route(path::ACCOUNT, guard(get(routes::get_account)))
        .route(path::PRODUCTS, guard(get(routes::list_products)))
        .route(path::PRODUCT, guard(put(routes::put_product)))
        .route(
            path::ORGANIZATIONS,
            guard(get(routes::list_organizations).post(routes::create_organization)),
        )
        .route(path::ALLOCATIONS, guard(get(routes::list_allocations)))
        .route(
            path::ALLOCATION,
            guard(
                get(routes::get_allocation)
                    .put(routes::put_allocation)
                    .delete(routes::delete_allocation),
            ),
        )
        .route(path::RELEASE, guard(post(routes::release_allocation)))
        .route(path::SEATS, guard(post(routes::seats)))
        .route(path::AUDIT, guard(get(routes::audit)))
        .route_layer(middleware::from_fn_with_state(
            shared.clone(),
            limits::rate_limit,
        ));
    crate::endpoints::with_healthz(Router::new())
        .merge(api)
        .merge(page::routes(shared.clone()))
        .route(path::READYZ, get(readyz))
        .route(
            path::METRICS,
            get(|State(s): State<Shared>| async move { s.metrics.text() }),
        )
        .route(
            path::OPENAPI,
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
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            access::same_origin,
        ))
        .layer(middleware::map_response_with_state(
            shared.clone(),
            every_answer,
        ))
        .layer(middleware::from_fn(problem::errors_as_problems))
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            metrics::observe,
        ))
        .layer(DefaultBodyLimit::max(config.max_body))
        .layer(
            tower::ServiceBuilder::new()
                .layer(axum::error_handling::HandleErrorLayer::new(
                    limits::timed_out,
                ))
                .timeout(config.timeout),
        )
        .with_state(shared)
}

/// What every answer says about itself, unless its route said otherwise:
/// not to be stored by caches (account data, tokens' effects, problems),
/// not to be sniffed as another type, to load nothing and be framed
/// nowhere (the page sets its own policy), and over TLS, to be reached
/// over TLS only (HSTS).
async fn every_answer(State(s): State<Shared>, mut response: Response) -> Response {
    let h = response.headers_mut();
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    h.entry(header::X_CONTENT_TYPE_OPTIONS)
        .or_insert(HeaderValue::from_static("nosniff"));
    h.entry(header::CONTENT_SECURITY_POLICY)
        .or_insert(HeaderValue::from_static(
            "default-src 'none'; frame-ancestors 'none'",
        ));
    if s.tls {
        h.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000"),
        );
    }
    response
}

/// Serves until SIGTERM or ctrl-c, then finishes requests in flight.
pub async fn run(store: Arc<Store>, config: Config) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    tracing::info!(address = %listener.local_addr()?, store = %store.location(), "serving the license platform API");
    tokio::spawn(expire_keys(store.clone()));
    tokio::spawn(expire_tokens(store.clone()));
    let app = app(store, &config);
    if let Some((cert, key)) = &config.tls {
        let files = crate::tls::CertificateFiles::load(cert, key)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let tls = crate::tls::server_config(files).map_err(std::io::Error::other)?;
        // Tapped for nothing but the peer's address (ConnectInfo), which
        // axum gives tapped listeners.
        let listener =
            axum::serve::ListenerExt::tap_io(crate::tls::TlsListener::start(listener, tls), |_| {});
        return axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown())
        .await;
    }
    // Answers go out as soon as they are written (no Nagle delay behind a
    // client's delayed acknowledgement).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown())
    .await
}

/// Forgets idempotency keys older than [`IDEMPOTENCY_KEYS`], every hour.
async fn expire_keys(store: Arc<Store>) {
    let mut every = tokio::time::interval(Duration::from_secs(3600));
    loop {
        every.tick().await;
        let s = store.clone();
        match off_thread(move || s.expire_idempotency_keys(IDEMPOTENCY_KEYS)).await {
            Ok(n) if n > 0 => {
                tracing::info!(expired = n, "forgot idempotency keys older than 24 hours")
            }
            Err(e) => tracing::warn!("expiring idempotency keys: {e}"),
            _ => {}
        }
    }
}

/// Removes and audits the tokens past their expiry, every minute (an
/// expired token is refused before that, at once).
async fn expire_tokens(store: Arc<Store>) {
    let mut every = tokio::time::interval(Duration::from_secs(60));
    loop {
        every.tick().await;
        let s = store.clone();
        match off_thread(move || s.expire_tokens()).await {
            Ok(n) if n > 0 => tracing::info!(expired = n, "removed expired tokens"),
            Err(e) => tracing::warn!("expiring tokens: {e}"),
            _ => {}
        }
    }
}

async fn shutdown() {
    crate::shutdown::requested().await;
    tracing::info!("stopping: finishing requests in flight");
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

#[cfg(test)]
mod tests {
    #[test]
    fn every_documented_path_is_a_route_label() {
        let document: serde_json::Value =
            serde_json::from_str(&super::openapi::document()).unwrap();
        let paths = document["paths"].as_object().unwrap();
        assert!(!paths.is_empty());
        for path in paths.keys() {
            assert!(
                super::ROUTES.contains(&path.as_str()),
                "{path} is counted as (unmatched)"
            );
        }
    }
}
