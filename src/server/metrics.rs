//! The server's own metrics, `licensor_http_*`: requests by method, route
//! and status, and the time to answer. Every label value comes from a fixed
//! set the compiler knows (a [`Verb`], a route template of [`super::ROUTES`],
//! a status code), so no client can create series.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::Shared;

/// A request's method as counted: the ones HTTP names, or `other`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, strum::IntoStaticStr, strum::EnumIter)]
#[strum(serialize_all = "UPPERCASE")]
pub enum Verb {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Patch,
    Options,
    #[strum(serialize = "other")]
    Other,
}

impl From<&Method> for Verb {
    fn from(m: &Method) -> Verb {
        match *m {
            Method::GET => Verb::Get,
            Method::HEAD => Verb::Head,
            Method::POST => Verb::Post,
            Method::PUT => Verb::Put,
            Method::DELETE => Verb::Delete,
            Method::PATCH => Verb::Patch,
            Method::OPTIONS => Verb::Options,
            _ => Verb::Other,
        }
    }
}

/// A route template the server answers on, or `(unmatched)`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct Route(&'static str);

impl Route {
    const UNMATCHED: Route = Route("(unmatched)");

    /// The template a request matched, as one of [`super::ROUTES`].
    fn of(matched: Option<&MatchedPath>) -> Route {
        matched
            .and_then(|m| super::ROUTES.iter().find(|r| **r == m.as_str()))
            .map_or(Route::UNMATCHED, |r| Route(r))
    }
}

impl EncodeLabelValue for Verb {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(self.into())
    }
}

impl EncodeLabelValue for Route {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(self.0)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: Verb,
    route: Route,
    status: u16,
}

/// The registry and what is counted in it.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Histogram,
    /// Sign-ins refused for their token (unknown, revoked, expired, another
    /// account's), and sign-ins answered 429 for too many of those.
    pub sign_in_failures: Counter,
    pub sign_ins_throttled: Counter,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("licensor_http");
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = Histogram::new([
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
        ]);
        registry.register(
            "requests",
            "Requests by method, route and status",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time to answer a request",
            duration.clone(),
        );
        let sign_in_failures = Counter::default();
        registry.register(
            "sign_in_failures",
            "Sign-ins refused for their token",
            sign_in_failures.clone(),
        );
        let sign_ins_throttled = Counter::default();
        registry.register(
            "sign_ins_throttled",
            "Sign-ins answered 429: too many failures from one address",
            sign_ins_throttled.clone(),
        );
        Metrics {
            registry,
            requests,
            duration,
            sign_in_failures,
            sign_ins_throttled,
        }
    }

    /// The metrics in the OpenMetrics text format.
    pub fn text(&self) -> Response {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        crate::endpoints::openmetrics(out)
    }
}

/// Counts and times every request; logs it at debug (never its headers).
pub async fn observe(State(s): State<Shared>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = Verb::from(request.method());
    let route = Route::of(request.extensions().get::<MatchedPath>());
    let response = next.run(request).await;
    let status = response.status().as_u16();
    s.metrics.duration.observe(started.elapsed().as_secs_f64());
    s.metrics
        .requests
        .get_or_create(&RequestLabels {
            method,
            route,
            status,
        })
        .inc();
    tracing::debug!(method = <&str>::from(method), route = route.0, status, took = ?started.elapsed(), "request");
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use strum::IntoEnumIterator;

    #[test]
    fn methods_are_counted_by_their_http_names() {
        for verb in Verb::iter().filter(|v| *v != Verb::Other) {
            let name: &str = verb.into();
            let method = Method::from_bytes(name.as_bytes()).unwrap();
            assert_eq!(Verb::from(&method), verb);
        }
        let other: &str = Verb::from(&Method::from_bytes(b"PROPFIND").unwrap()).into();
        assert_eq!(other, "other");
    }
}
