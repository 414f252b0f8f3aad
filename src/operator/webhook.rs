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
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::routing::post;
use axum::{Json, Router};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::admission::{self, Validator};
use super::metrics::Metrics;
use crate::resource::{DedicatedLicenseSpec, FINALIZER, needs_finalizer};

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
                metrics.finalizer_added("webhook");
            }
            r.into_review()
        }
        Err(_) => response.into_review(),
    }
}

/// Serves the webhook (`/mutate` and `/validate`) until `stop` resolves.
pub async fn serve(
    webhook: &Webhook,
    metrics: Arc<Metrics>,
    validator: Validator,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<tokio::task::JoinHandle<std::io::Result<()>>, Error> {
    let certificate = Arc::new(CertificateFiles::load(&webhook.cert_dir)?);
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_cert_resolver(certificate);
    let tcp = TcpListener::bind(webhook.listen)
        .await
        .map_err(|e| Error::Listen(webhook.listen, e))?;
    let listener = TlsListener::start(tcp, TlsAcceptor::from(Arc::new(config)));
    let validator = Arc::new(validator);
    let app = Router::new()
        .route(
            PATH,
            post(
                move |Json(body): Json<AdmissionReview<DynamicObject>>| async move {
                    Json(review(body, &metrics))
                },
            ),
        )
        .route(
            admission::PATH,
            post(
                move |Json(body): Json<AdmissionReview<DynamicObject>>| async move {
                    let request: AdmissionRequest<DynamicObject> = match body.try_into() {
                        Ok(r) => r,
                        Err(e) => return Json(AdmissionResponse::invalid(e).into_review()),
                    };
                    Json(validator.review(&request).await.into_review())
                },
            ),
        );
    tracing::info!(listen = %webhook.listen, "serving the admission webhook");
    Ok(tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
    }))
}

/// `tls.crt` and `tls.key` of a directory, read again when they change.
#[derive(Debug)]
struct CertificateFiles {
    dir: PathBuf,
    current: Mutex<(Option<SystemTime>, Arc<CertifiedKey>)>,
}

impl CertificateFiles {
    fn load(dir: &Path) -> Result<CertificateFiles, Error> {
        let (modified, key) = read(dir).map_err(|message| Error::Certificate {
            dir: dir.display().to_string(),
            message,
        })?;
        Ok(CertificateFiles {
            dir: dir.to_path_buf(),
            current: Mutex::new((modified, key)),
        })
    }
}

fn modified(dir: &Path) -> Option<SystemTime> {
    let crt = std::fs::metadata(dir.join("tls.crt")).and_then(|m| m.modified());
    let key = std::fs::metadata(dir.join("tls.key")).and_then(|m| m.modified());
    Some(crt.ok()?.max(key.ok()?))
}

fn read(dir: &Path) -> Result<(Option<SystemTime>, Arc<CertifiedKey>), String> {
    let modified = modified(dir);
    let chain = CertificateDer::pem_file_iter(dir.join("tls.crt"))
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("tls.crt: {e}"))?;
    if chain.is_empty() {
        return Err("tls.crt holds no certificate".into());
    }
    let key =
        PrivateKeyDer::from_pem_file(dir.join("tls.key")).map_err(|e| format!("tls.key: {e}"))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("tls.key: {e}"))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| format!("tls.crt and tls.key do not belong together: {e}"))?;
    Ok((modified, Arc::new(certified)))
}

impl ResolvesServerCert for CertificateFiles {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl CertificateFiles {
    /// The pair to present now: the files' if they changed and read well.
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        let mut current = self.current.lock().ok()?;
        let now = modified(&self.dir);
        if now.is_some() && now != current.0 {
            match read(&self.dir) {
                Ok(fresh) => {
                    tracing::info!(dir = %self.dir.display(), "webhook certificate reloaded");
                    *current = fresh;
                }
                // Half-written files: keep serving the old pair and try again
                // on the next handshake.
                Err(e) => {
                    tracing::warn!(dir = %self.dir.display(), "webhook certificate not reloaded: {e}")
                }
            }
        }
        Some(current.1.clone())
    }
}

/// Accepts TCP connections and completes each TLS handshake in its own task,
/// so a slow client cannot hold up the others.
struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl TlsListener {
    fn start(tcp: TcpListener, acceptor: TlsAcceptor) -> TlsListener {
        let local = tcp
            .local_addr()
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
        let (tx, ready) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = match tcp.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("webhook accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (acceptor, ready) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = ready.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, "webhook TLS handshake: {e}"),
                        Err(_) => tracing::debug!(%peer, "webhook TLS handshake timed out"),
                    }
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        TlsListener { local, ready }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The accepting task only ends with the listener; wait forever,
            // graceful shutdown ends the server.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
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

    fn write_pair(dir: &Path) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("certificate");
        std::fs::write(dir.join("tls.crt"), cert.pem()).expect("tls.crt");
        std::fs::write(dir.join("tls.key"), key.serialize_pem()).expect("tls.key");
        cert.der().to_vec()
    }

    #[test]
    fn a_renewed_pair_is_presented_and_a_broken_one_is_not() {
        let dir = tempfile::tempdir().expect("dir");
        let first = write_pair(dir.path());
        let files = CertificateFiles::load(dir.path()).expect("load");
        assert_eq!(files.current().expect("a pair").cert[0].as_ref(), first);

        std::thread::sleep(Duration::from_millis(20));
        let second = write_pair(dir.path());
        assert_eq!(files.current().expect("a pair").cert[0].as_ref(), second);

        // A key that does not belong to the certificate: keep the last pair.
        std::thread::sleep(Duration::from_millis(20));
        let key = rcgen::KeyPair::generate().expect("key");
        std::fs::write(dir.path().join("tls.key"), key.serialize_pem()).expect("tls.key");
        assert_eq!(files.current().expect("a pair").cert[0].as_ref(), second);

        let empty = tempfile::tempdir().expect("dir");
        let e = CertificateFiles::load(empty.path()).expect_err("no files");
        assert!(e.to_string().contains("tls.crt"), "{e}");
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
        let body: AdmissionReview<DynamicObject> = serde_json::from_value(json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "licensor.dev", "version": "v1alpha1", "kind": "DedicatedLicense"},
                "resource": {"group": "licensor.dev", "version": "v1alpha1", "resource": "dedicatedlicenses"},
                "name": "qa", "namespace": "default", "operation": "CREATE",
                "userInfo": {"username": "admin"},
                "object": {"apiVersion": "licensor.dev/v1alpha1", "kind": "DedicatedLicense",
                    "metadata": {"name": "qa", "namespace": "default"}, "spec": manage()},
                "dryRun": false
            }
        }))
        .expect("review");
        let metrics = Metrics::new();
        let answer = serde_json::to_value(review(body, &metrics)).expect("json");
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(
            answer["response"]["uid"],
            "705ab4f5-6393-11e8-b7cc-42010a800002"
        );
        assert_eq!(answer["response"]["allowed"], true);
        assert_eq!(answer["response"]["patchType"], "JSONPatch");
    }
}
