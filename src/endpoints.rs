//! What `licensor serve` and the operator answer alike, outside their own
//! routes: `/healthz`, and `/metrics` in the OpenMetrics text format.

use axum::Router;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// Where the process says it answers.
pub const HEALTHZ: &str = "/healthz";

/// Adds [`HEALTHZ`] ("ok": the process answers) to `router`.
pub fn with_healthz<S: Clone + Send + Sync + 'static>(router: Router<S>) -> Router<S> {
    router.route(HEALTHZ, get(|| async { "ok\n" }))
}

/// A `/metrics` answer: `text`, an encoded registry, as OpenMetrics.
pub fn openmetrics(text: String) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
