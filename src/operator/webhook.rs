//! The admission webhooks' TLS server: `/mutate`, here, gives a new managed
//! `DedicatedLicense` the cleanup finalizer as it is created; `/validate`
//! ([`super::admission`]) warns or refuses at `kubectl apply` time.
//!
//! The finalizer must be on an object before its first backend write, so
//! that a revoke is never lost. Written by the operator, that is a second API
//! write per new object; added at admission it rides on the create. The
//! webhook is an optimisation, not a guarantee: it is registered with
//! `failurePolicy: Ignore`, and the operator still adds the finalizer itself
//! when it finds an object without one.
//!
//! Served over TLS (the API server calls webhooks over HTTPS only) from a
//! certificate directory holding `tls.crt` and `tls.key`, the layout of a
//! `kubernetes.io/tls` Secret mounted as a volume. A renewed certificate is
//! picked up on the next handshake.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::routing::post;
use axum::{Json, Router};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use tokio::net::TcpListener;

use super::admission::{self, Validator};
use super::metrics::{Metrics, Review, WebhookName};
use crate::resource::{DedicatedLicenseSpec, FINALIZER, needs_finalizer};
use crate::tls::{self, CertificateFiles, TlsListener};

/// The path the webhook configuration names.
pub const PATH: &str = "/mutate";

/// Where the webhook listens and what it presents.
#[derive(Debug, Clone)]
pub struct Webhook {
    pub listen: SocketAddr,
    /// Holds `tls.crt` (the chain, leaf first) and `tls.key`, PEM.
    pub cert_dir: PathBuf,
}

/// Why the webhook cannot start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("webhook certificate in {dir}: {message}")]
    Certificate { dir: String, message: String },
    #[error("webhook TLS settings: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot listen for the webhook on {0} (--webhook-listen): {1}")]
    Listen(SocketAddr, std::io::Error),
    #[error("the webhook server stopped: {0}")]
    Serve(std::io::Error),
}

/// What admission adds to an object, as a JSON patch; `None` admits it as
/// it is. Only creation adds the finalizer, and only where the operator
/// would add it on its first pass: `managementPolicy: Manage`, paused or not
/// (a paused object's deletion waits for it to be released).
pub fn patch_for(
    operation: &Operation,
    object: Option<&DynamicObject>,
) -> Option<json_patch::Patch> {
    if !matches!(operation, Operation::Create) {
        return None;
    }
    let object = object?;
    // An object the schema will refuse is left to the schema's message.
    let spec: DedicatedLicenseSpec =
        serde_json::from_value(object.data.get("spec")?.clone()).ok()?;
    let finalizers = object.metadata.finalizers.as_deref().unwrap_or_default();
    if !needs_finalizer(&spec, finalizers) {
        return None;
    }
    Some(super::finalizer::add(finalizers, false))
}

/// Answers one AdmissionReview. It never denies: validation is the schema's
/// and CEL's job, and a webhook that refused would block users whenever it
/// misjudged.
pub fn review(
    review: AdmissionReview<DynamicObject>,
    metrics: &Metrics,
) -> AdmissionReview<DynamicObject> {
    let request: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(r) => r,
        Err(e) => return AdmissionResponse::invalid(e).into_review(),
    };
    let response = AdmissionResponse::from(&request);
    let Some(patch) = patch_for(&request.operation, request.object.as_ref()) else {
        return response.into_review();
    };
    tracing::debug!(
        namespace = request.namespace.as_deref().unwrap_or(""),
        name = %request.name,
        "admission: adding the {FINALIZER} finalizer"
    );
    match response.clone().with_patch(patch) {
        Ok(r) => {
            if !request.dry_run {
                metrics.finalizer_added(super::metrics::AddedBy::Webhook);
            }
            r.into_review()
        }
        Err(_) => response.into_review(),
    }
}

/// A review as the API server gets it, with how it answered for
/// [`measured`]: allowed (warnings or not), denied, or a request it could
/// not read.
fn answered(
    review: AdmissionReview<DynamicObject>,
) -> (
    axum::Extension<Review>,
    Json<AdmissionReview<DynamicObject>>,
) {
    let answer = match &review.response {
        Some(r) if r.allowed => Review::Allowed,
        // The reason kube's `AdmissionResponse::invalid` gives: a request
        // that could not be read, not a judgement.
        Some(r) if r.result.reason != "InvalidRequest" => Review::Denied,
        _ => Review::Error,
    };
    (axum::Extension(answer), Json(review))
}

/// Counts and times every request to the webhooks
/// (`licensor_webhook_requests`, `licensor_webhook_duration_seconds`); a
/// request answered without a review (a body that is not one) is an error.
async fn measured(
    axum::extract::State(metrics): axum::extract::State<Arc<Metrics>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let webhook = match request.uri().path() {
        PATH => WebhookName::Mutate,
        _ => WebhookName::Validate,
    };
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    let answer = response
        .extensions()
        .get::<Review>()
        .copied()
        .unwrap_or(Review::Error);
    metrics.webhook_answered(webhook, answer, started.elapsed());
    response
}

/// Serves the webhook (`/mutate` and `/validate`) until `stop` resolves.
pub async fn serve(
    webhook: &Webhook,
    metrics: Arc<Metrics>,
    validator: Validator,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<tokio::task::JoinHandle<std::io::Result<()>>, Error> {
    let certificate = CertificateFiles::load(
        &webhook.cert_dir.join("tls.crt"),
        &webhook.cert_dir.join("tls.key"),
    )
    .map_err(|message| Error::Certificate {
        dir: webhook.cert_dir.display().to_string(),
        message,
    })?;
    let config = tls::server_config(certificate)?;
    let tcp = TcpListener::bind(webhook.listen)
        .await
        .map_err(|e| Error::Listen(webhook.listen, e))?;
    let listener = TlsListener::start(tcp, config);
    let validator = Arc::new(validator);
    let mutating = metrics.clone();
    let app = Router::new()
        .route(
            PATH,
            post(
                move |Json(body): Json<AdmissionReview<DynamicObject>>| async move {
                    answered(review(body, &mutating))
                },
            ),
        )
        .route(
            admission::PATH,
            post(
                move |Json(body): Json<AdmissionReview<DynamicObject>>| async move {
                    let request: AdmissionRequest<DynamicObject> = match body.try_into() {
                        Ok(r) => r,
                        Err(e) => return answered(AdmissionResponse::invalid(e).into_review()),
                    };
                    answered(validator.review(&request).await.into_review())
                },
            ),
        )
        .layer(axum::middleware::from_fn_with_state(metrics, measured));
    tracing::info!(listen = %webhook.listen, "serving the admission webhook");
    Ok(tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(spec: serde_json::Value, meta: serde_json::Value) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "licensor.dev/v1alpha1", "kind": "DedicatedLicense",
            "metadata": meta, "spec": spec,
        }))
        .expect("object")
    }

    fn manage() -> serde_json::Value {
        json!({"organization": "qa", "product": "TestOps", "count": 5})
    }

    fn applied(patch: &json_patch::Patch, o: &DynamicObject) -> Vec<String> {
        let mut doc = serde_json::to_value(o).expect("json");
        json_patch::patch(&mut doc, patch).expect("patch applies");
        serde_json::from_value(doc["metadata"]["finalizers"].clone()).expect("list")
    }

    #[test]
    fn a_new_managed_object_gets_the_finalizer() {
        let o = object(manage(), json!({"name": "qa"}));
        let patch = patch_for(&Operation::Create, Some(&o)).expect("a patch");
        assert_eq!(applied(&patch, &o), vec![FINALIZER]);

        // Paused: its deletion waits for the release, as the operator's does.
        let paused = json!({"name": "qa", "annotations": {"licensor.dev/paused": "true"}});
        let o = object(manage(), paused);
        let patch = patch_for(&Operation::Create, Some(&o)).expect("a patch");
        assert_eq!(applied(&patch, &o), vec![FINALIZER]);

        let o = object(
            manage(),
            json!({"name": "qa", "finalizers": ["example.com/other"]}),
        );
        let patch = patch_for(&Operation::Create, Some(&o)).expect("a patch");
        assert_eq!(applied(&patch, &o), vec!["example.com/other", FINALIZER]);
    }

    #[test]
    fn observed_present_updated_or_malformed_objects_are_left_alone() {
        let observe = json!({"organization": "qa", "product": "TestOps", "count": 5,
            "managementPolicy": "Observe"});
        let cases = [
            (Operation::Create, object(observe, json!({"name": "qa"}))),
            (
                Operation::Create,
                object(manage(), json!({"name": "qa", "finalizers": [FINALIZER]})),
            ),
            (Operation::Update, object(manage(), json!({"name": "qa"}))),
            (
                Operation::Create,
                object(
                    json!({"organization": "qa", "count": "five"}),
                    json!({"name": "qa"}),
                ),
            ),
        ];
        for (operation, o) in &cases {
            assert!(
                patch_for(operation, Some(o)).is_none(),
                "{operation:?} {o:?}"
            );
        }
        assert!(patch_for(&Operation::Create, None).is_none());
    }

    #[test]
    fn the_review_answers_with_the_uid_and_allows() {
        let body = admission::review_of(
            "CREATE",
            json!({"apiVersion": "licensor.dev/v1alpha1", "kind": "DedicatedLicense",
                "metadata": {"name": "qa", "namespace": "licenses"}, "spec": manage()}),
            None,
        );
        let metrics = Metrics::new();
        let answer = serde_json::to_value(review(body, &metrics)).expect("json");
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(answer["response"]["uid"], admission::REVIEW_UID);
        assert_eq!(answer["response"]["allowed"], true);
        assert_eq!(answer["response"]["patchType"], "JSONPatch");
    }
}
