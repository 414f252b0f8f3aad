//! Prometheus metrics of the operator and the HTTP endpoints that serve them
//! with the health checks: `/metrics`, `/healthz`, `/readyz`.
//!
//! Labels use the refusal reasons' own spelling ([`Reason::as_str`]), so a
//! reason reads the same in status, events and metrics.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::status;
use crate::domain::{PoolView, Reason};
use crate::resource::DedicatedLicense;

/// How a pass ended, as the `result` label spells it.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum PassResult {
    Ok,
    Refused,
    Retrying,
    Error,
}

/// What a backend read read, as the `read` label spells it.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Read {
    /// The whole account (one request on the HTTP backend).
    Account,
    /// One object's pool and allocation (2 requests).
    Allocation,
}

/// Who added a cleanup finalizer, as the `by` label spells it.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum AddedBy {
    /// The admission webhook, at creation.
    Webhook,
    /// The operator, with a patch (one more API write).
    Operator,
}

/// Label values from fixed enums, spelled once: a metric can never grow a
/// value nobody wrote down.
macro_rules! label_values {
    ($($t:ty => { $($v:path => $s:literal),* $(,)? })*) => {$(
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                use std::fmt::Write;
                encoder.write_str(match self { $($v => $s),* })
            }
        }
    )*};
}

label_values! {
    PassResult => { PassResult::Ok => "ok", PassResult::Refused => "refused", PassResult::Retrying => "retrying", PassResult::Error => "error" }
    Read => { Read::Account => "account", Read::Allocation => "allocation" }
    AddedBy => { AddedBy::Webhook => "webhook", AddedBy::Operator => "operator" }
    WebhookName => { WebhookName::Mutate => "mutate", WebhookName::Validate => "validate" }
    Review => { Review::Allowed => "allowed", Review::Denied => "denied", Review::Error => "error" }
}

impl EncodeLabelValue for Reason {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: PassResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReadLabels {
    pub read: Read,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: Reason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByLabels {
    pub by: AddedBy,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProductLabels {
    /// The LicenseAccount whose pool it is.
    pub account: String,
    pub product: String,
}

/// Which admission webhook answered.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum WebhookName {
    Mutate,
    Validate,
}

/// How an admission webhook answered.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Review {
    /// Admitted (with warnings or not).
    Allowed,
    /// Refused (the validating webhook in Deny mode).
    Denied,
    /// A request it could not read: the API server admits without it
    /// (failurePolicy Ignore), so these are what to alert on.
    Error,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabels {
    pub webhook: WebhookName,
    pub result: Review,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookNameLabels {
    pub webhook: WebhookName,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StalledLabels {
    #[prometheus(flatten)]
    pub object: ObjectLabels,
    /// The Stalled condition's reason (BelowInUse, Conflict, ...).
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObjectLabels {
    pub namespace: String,
    pub name: String,
    pub account: String,
    pub organization: String,
    pub product: String,
}

/// `licensor_allocation_{desired,dedicated,in_use}` per object, read from
/// the controller's cache at each scrape: the object's `spec.count` and what
/// its last pass saw (`status.allocated`, `status.inUse`). Three gauges held
/// per object would be three more copies of its labels (7 MB with 10,000
/// objects); an object that is gone is gone from its gauges at once.
#[derive(Default)]
struct Objects(Mutex<Option<Store<DedicatedLicense>>>);

impl std::fmt::Debug for Objects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Objects")
    }
}

impl Collector for Objects {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let store = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let objects = store.map(|s| s.state()).unwrap_or_default();
        type Value = fn(&DedicatedLicense) -> Option<i64>;
        let gauges: [(&str, &str, Value); 3] = [
            (
                "allocation_desired",
                "Licenses a DedicatedLicense asks for",
                |dl| Some(dl.spec.count),
            ),
            (
                "allocation_dedicated",
                "Licenses the backend holds for a DedicatedLicense",
                |dl| dl.status.as_ref().map(|s| s.allocated.unwrap_or(0)),
            ),
            (
                "allocation_in_use",
                "Seats in use of a DedicatedLicense's allocation",
                |dl| dl.status.as_ref().map(|s| s.in_use.unwrap_or(0)),
            ),
        ];
        for (name, help, value) in gauges {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for dl in &objects {
                let Some(v) = value(dl) else { continue };
                ConstGauge::new(v).encode(family.encode_family(&ObjectLabels::of(dl))?)?;
            }
        }
        // Only the objects that are stalled: an alert per object and
        // reason, without a series for every object in sync.
        let mut family = encoder.encode_descriptor(
            "object_stalled",
            "1 for a DedicatedLicense whose Stalled condition is True, with its reason (absent otherwise)",
            None,
            MetricType::Gauge,
        )?;
        for dl in &objects {
            let stalled = dl.status.as_ref().and_then(|s| {
                s.conditions
                    .iter()
                    .find(|c| c.type_ == status::STALLED && status::Is::True.of(c))
            });
            if let Some(c) = stalled {
                let labels = StalledLabels {
                    object: ObjectLabels::of(dl),
                    reason: c.reason.clone(),
                };
                ConstGauge::new(1).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

impl ObjectLabels {
    fn of(dl: &DedicatedLicense) -> ObjectLabels {
        ObjectLabels {
            namespace: dl.namespace().unwrap_or_default(),
            name: dl.name_any(),
            account: dl.spec.account().to_string(),
            organization: dl.spec.organization.clone(),
            product: dl.spec.product.clone(),
        }
    }
}

/// The operator's metrics.
pub struct Metrics {
    registry: Registry,
    pub reconciles: Family<ResultLabels, Counter>,
    pub errors: Family<ReasonLabels, Counter>,
    pub duration: Histogram,
    pub pool_total: Family<ProductLabels, Gauge>,
    pub pool_dedicated: Family<ProductLabels, Gauge>,
    pub pool_shared_in_use: Family<ProductLabels, Gauge>,
    pub pool_free: Family<ProductLabels, Gauge>,
    /// The per-object gauges, from the cache of the controller running now.
    objects: Arc<Objects>,
    pub leader: Gauge,
    pub finalizers: Family<ByLabels, Counter>,
    /// Creates, status writes and deletes of LicensePool objects.
    pub pool_writes: Counter,
    /// Passes done against the shared snapshot, with no backend call.
    pub quiet_checks: Counter,
    /// Reads of the backend, by what they read.
    pub backend_reads: Family<ReadLabels, Counter>,
    /// 1 while the backend answers the passes, 0 since one found it
    /// unavailable.
    backend_up: Gauge,
    /// Why the backend is unavailable, since the pass that found it so.
    backend_down: std::sync::Mutex<Option<String>>,
    webhook_requests: Family<WebhookLabels, Counter>,
    webhook_duration: Family<WebhookNameLabels, Histogram, fn() -> Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A pass found the backend unavailable.
    pub fn backend_failed(&self, why: &str) {
        self.backend_up.set(0);
        *self.backend_down.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.to_string());
    }

    /// A pass had its answer from the backend (a refusal is an answer).
    pub fn backend_answered(&self) {
        if self.backend_up.get() == 0 {
            self.backend_up.set(1);
            *self.backend_down.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    /// Why the backend is unavailable, if the last pass to call it found so.
    fn backend_down(&self) -> Option<String> {
        self.backend_down
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Counts and times one answer of an admission webhook.
    pub fn webhook_answered(&self, webhook: WebhookName, result: Review, took: Duration) {
        self.webhook_requests
            .get_or_create(&WebhookLabels { webhook, result })
            .inc();
        self.webhook_duration
            .get_or_create(&WebhookNameLabels { webhook })
            .observe(took.as_secs_f64());
    }

    /// Counts a cleanup finalizer added by `by` (webhook or operator).
    pub fn finalizer_added(&self, by: AddedBy) {
        self.finalizers.get_or_create(&ByLabels { by }).inc();
    }

    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("licensor");
        let m = Metrics {
            registry: Registry::default(),
            reconciles: Family::default(),
            errors: Family::default(),
            duration: Histogram::new([
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            pool_total: Family::default(),
            pool_dedicated: Family::default(),
            pool_shared_in_use: Family::default(),
            pool_free: Family::default(),
            objects: Arc::default(),
            leader: Gauge::default(),
            finalizers: Family::default(),
            pool_writes: Counter::default(),
            quiet_checks: Counter::default(),
            backend_reads: Family::default(),
            backend_up: Gauge::default(),
            backend_down: std::sync::Mutex::new(None),
            webhook_requests: Family::default(),
            webhook_duration: Family::new_with_constructor(|| {
                Histogram::new([0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5])
            }),
        };
        m.backend_up.set(1);
        registry.register(
            "backend_up",
            "1 while the license backend answers the operator's passes, 0 since a pass found it unavailable (the reason is on /readyz)",
            m.backend_up.clone(),
        );
        registry.register(
            "backend_reads",
            "Reads of the license backend by the passes and the LicensePool sync: the whole account (read=account) or one object's pool and allocation (read=allocation)",
            m.backend_reads.clone(),
        );
        registry.register(
            "quiet_checks",
            "Passes that found an object in sync on the shared snapshot of the account, without a backend call of their own",
            m.quiet_checks.clone(),
        );
        registry.register(
            "licensepool_writes",
            "LicensePool objects created, updated (status) or deleted; an idle account causes none",
            m.pool_writes.clone(),
        );
        registry.register(
            "finalizers_added",
            "Cleanup finalizers added: by the admission webhook to objects being created (also when the create then fails validation), or by the operator with a patch",
            m.finalizers.clone(),
        );
        registry.register(
            "reconciles",
            "Reconcile passes by result",
            m.reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Passes that did not reach the desired state, by reason",
            m.errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time of one reconcile pass",
            m.duration.clone(),
        );
        registry.register(
            "pool_total",
            "Licenses purchased, per product",
            m.pool_total.clone(),
        );
        registry.register(
            "pool_dedicated",
            "Licenses dedicated to organizations, per product",
            m.pool_dedicated.clone(),
        );
        registry.register(
            "pool_shared_in_use",
            "Seats claimed straight from the account pool, per product",
            m.pool_shared_in_use.clone(),
        );
        registry.register(
            "pool_free",
            "Free licenses per product (negative when over-committed)",
            m.pool_free.clone(),
        );
        registry.register(
            "webhook_requests",
            "Requests to the admission webhooks by webhook (mutate, validate) and result (allowed, denied, error: a request it could not read)",
            m.webhook_requests.clone(),
        );
        registry.register(
            "webhook_duration_seconds",
            "Time to answer an admission review, by webhook",
            m.webhook_duration.clone(),
        );
        registry.register_collector(Box::new(m.objects.clone()));
        registry.register(
            "leader",
            "1 while this process holds the leader lease",
            m.leader.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn result(&self, result: PassResult) {
        self.reconciles
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn backend_read(&self, read: Read) {
        self.backend_reads.get_or_create(&ReadLabels { read }).inc();
    }

    pub fn quiet_check(&self) {
        self.quiet_checks.inc();
    }

    pub fn error(&self, reason: Reason) {
        self.errors.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// The figures of `account`'s pool `p`.
    pub fn pool(&self, account: &str, p: &PoolView) {
        let l = ProductLabels {
            account: account.to_string(),
            product: p.product.clone(),
        };
        self.pool_total.get_or_create(&l).set(p.total);
        self.pool_dedicated.get_or_create(&l).set(p.dedicated);
        self.pool_shared_in_use
            .get_or_create(&l)
            .set(p.shared_in_use);
        self.pool_free.get_or_create(&l).set(p.free);
    }

    /// The per-object gauges come from `store` (the controller's cache)
    /// from now on; `None` when no controller runs (a standby).
    pub fn objects_from(&self, store: Option<Store<DedicatedLicense>>) {
        *self.objects.0.lock().unwrap_or_else(|p| p.into_inner()) = store;
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// What `/readyz` answers.
#[derive(Default)]
pub struct Readiness(AtomicU8);

impl Readiness {
    const STANDBY: u8 = 1;
    const LEADING: u8 = 2;

    pub fn standby(&self) {
        self.0.store(Self::STANDBY, Ordering::Relaxed);
    }

    pub fn leading(&self) {
        self.0.store(Self::LEADING, Ordering::Relaxed);
    }

    fn answer(&self) -> (StatusCode, &'static str) {
        match self.0.load(Ordering::Relaxed) {
            Self::LEADING => (StatusCode::OK, "ready: leading\n"),
            Self::STANDBY => (StatusCode::OK, "ready: standby, waiting for the lease\n"),
            _ => (StatusCode::SERVICE_UNAVAILABLE, "starting\n"),
        }
    }
}

#[derive(Clone)]
struct Shared {
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
}

/// Serves the endpoints on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = crate::endpoints::with_healthz(Router::new())
        .route("/metrics", get(metrics_text))
        .route("/readyz", get(readyz))
        .with_state(Shared { metrics, readiness });
    tracing::info!(address = %listener.local_addr()?, "serving /metrics, /healthz and /readyz");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics_text(State(s): State<Shared>) -> impl IntoResponse {
    crate::endpoints::openmetrics(s.metrics.encode())
}

/// Ready as leader or standby (the webhooks answer, a standby waits for
/// the lease); when the backend is unavailable, the answer says so and why,
/// without taking the replica out of service: its webhooks still admit,
/// with a warning.
async fn readyz(State(s): State<Shared>) -> impl IntoResponse {
    let (status, text) = s.readiness.answer();
    match s.metrics.backend_down() {
        Some(why) if status == StatusCode::OK => (
            status,
            format!(
                "{}; the backend cannot be reached: {why}\n",
                text.trim_end()
            ),
        ),
        _ => (status, text.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::reflector;
    use kube::runtime::watcher::Event;

    #[test]
    fn the_per_object_gauges_come_from_the_cache_while_a_controller_runs() {
        let metrics = Metrics::new();
        let (reader, mut writer) = reflector::store::<DedicatedLicense>();
        let object = |name: &str, status: &str| -> DedicatedLicense {
            serde_yaml::from_str(&format!(
                "apiVersion: licensor.dev/v1alpha1\nkind: DedicatedLicense\n\
                 metadata: {{name: {name}, namespace: licenses}}\n\
                 spec: {{organization: {name}-team, product: Studio, count: 5}}\n{status}"
            ))
            .unwrap()
        };
        writer.apply_watcher_event(&Event::Apply(object(
            "dev",
            "status: {allocated: 3, inUse: 1}\n",
        )));
        writer.apply_watcher_event(&Event::Apply(object("new", "")));
        let line = |name: &str| {
            format!(
                "licensor_allocation_{name}{{namespace=\"licenses\",name=\"dev\",account=\"default\",organization=\"dev-team\",product=\"Studio\"}}"
            )
        };
        assert!(!metrics.encode().contains("licensor_allocation_desired{"));

        metrics.objects_from(Some(reader));
        let text = metrics.encode();
        assert!(text.contains(&format!("{} 5\n", line("desired"))), "{text}");
        assert!(
            text.contains(&format!("{} 3\n", line("dedicated"))),
            "{text}"
        );
        assert!(text.contains(&format!("{} 1\n", line("in_use"))), "{text}");
        // Not looked at yet: what it asks for, nothing it holds.
        assert!(text.contains("licensor_allocation_desired{namespace=\"licenses\",name=\"new\""));
        assert!(
            !text.contains("licensor_allocation_dedicated{namespace=\"licenses\",name=\"new\"")
        );

        // Gone from the cache, gone from the gauges; none on a standby.
        writer.apply_watcher_event(&Event::Delete(object("dev", "")));
        assert!(!metrics.encode().contains("name=\"dev\""));
        metrics.objects_from(None);
        assert!(!metrics.encode().contains("licensor_allocation_desired{"));
    }
}
