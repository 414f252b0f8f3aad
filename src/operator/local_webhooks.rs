//! `licensor operator --local-webhooks ADDR`: both admission webhooks
//! against a cluster whose API server can reach this machine (a local
//! control plane, a kind or k3d cluster on this host), in one step.
//!
//! At start it makes a throwaway CA and a serving certificate for ADDR's IP
//! in a fresh directory, serves the webhooks there, and registers a
//! `MutatingWebhookConfiguration` and a `ValidatingWebhookConfiguration`
//! named [`NAME`] whose `clientConfig.url` is `https://ADDR/...`, with the
//! CA as their bundle and `failurePolicy: Ignore`, as the chart registers
//! its own. At exit it removes both configurations and the directory: a
//! cluster is left as it was. In a cluster, use the chart's webhooks
//! (`--webhook-listen`, `--webhook-cert-dir`) instead.

use std::net::SocketAddr;

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use std::fmt::Debug;

use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::core::ClusterResourceScope;
use kube::{Client, Resource};
use serde::de::DeserializeOwned;

use super::admission;
use super::webhook::{self, Webhook};

/// The name of both webhook configurations.
pub const NAME: &str = "licensor-local";

/// Why the local webhooks cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "--local-webhooks {0}: name the address the API server calls (an IP of this machine, such as 127.0.0.1:9443), not an unspecified one"
    )]
    Unspecified(SocketAddr),
    #[error("--local-webhooks: cannot make the certificate: {0}")]
    Certificate(String),
    #[error("--local-webhooks: cannot write the certificate to {0}: {1}")]
    Write(String, std::io::Error),
    #[error("--local-webhooks: cannot register the webhook configurations: {0}")]
    Register(#[from] kube::Error),
}

/// The webhooks served for a local cluster: where, and the CA to trust.
pub struct Local {
    pub webhook: Webhook,
    ca_pem: String,
}

impl Local {
    /// Makes the certificates for `listen` in a new directory.
    pub fn new(listen: SocketAddr) -> Result<Local, Error> {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        if listen.ip().is_unspecified() {
            return Err(Error::Unspecified(listen));
        }
        let failed = |e: rcgen::Error| Error::Certificate(e.to_string());
        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(failed)?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().map_err(failed)?)
            .map_err(failed)?;
        let key = KeyPair::generate().map_err(failed)?;
        let serving = CertificateParams::new(vec![listen.ip().to_string()])
            .map_err(failed)?
            .signed_by(&key, &ca)
            .map_err(failed)?;
        let random =
            crate::backend::store::random_hex().map_err(|e| Error::Certificate(e.to_string()))?;
        let dir = std::env::temp_dir().join(format!("licensor-webhooks-{}", &random[..12]));
        let write = |name: &str, text: String| {
            std::fs::write(dir.join(name), text)
                .map_err(|e| Error::Write(dir.display().to_string(), e))
        };
        std::fs::create_dir_all(&dir).map_err(|e| Error::Write(dir.display().to_string(), e))?;
        write("tls.crt", serving.pem())?;
        write("tls.key", key.serialize_pem())?;
        Ok(Local {
            webhook: Webhook {
                listen,
                cert_dir: dir,
            },
            ca_pem: ca.pem(),
        })
    }

    /// Registers both configurations (replacing earlier ones of [`NAME`]).
    pub async fn register(&self, client: &Client) -> Result<(), Error> {
        let mutating = self.configuration("Mutating", "finalizer", webhook::PATH, &["CREATE"]);
        apply::<MutatingWebhookConfiguration>(client, &mutating).await?;
        let validating = self.configuration(
            "Validating",
            "validate",
            admission::PATH,
            &["CREATE", "UPDATE"],
        );
        apply::<ValidatingWebhookConfiguration>(client, &validating).await?;
        tracing::info!(
            name = NAME,
            url = %format!("https://{}", self.webhook.listen),
            "registered the local admission webhooks; they are removed at exit"
        );
        Ok(())
    }

    fn configuration(
        &self,
        kind: &str,
        name: &str,
        path: &str,
        operations: &[&str],
    ) -> serde_json::Value {
        use base64::Engine;
        serde_json::json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": format!("{kind}WebhookConfiguration"),
            "metadata": {"name": NAME, "labels": {"app.kubernetes.io/managed-by": "licensor-operator"}},
            "webhooks": [{
                "name": format!("{name}.licensor.dev"),
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": "Ignore",
                "timeoutSeconds": 3,
                "matchPolicy": "Equivalent",
                "clientConfig": {
                    "url": format!("https://{}{path}", self.webhook.listen),
                    "caBundle": base64::engine::general_purpose::STANDARD.encode(&self.ca_pem),
                },
                "rules": [{
                    "apiGroups": ["licensor.dev"],
                    "apiVersions": ["*"],
                    "resources": ["dedicatedlicenses"],
                    "operations": operations,
                    "scope": "Namespaced",
                }],
            }],
        })
    }

    /// Removes both configurations and the certificates; what cannot be
    /// removed is logged.
    pub async fn remove(self, client: &Client) {
        for (kind, removed) in [
            (
                "Mutating",
                delete::<MutatingWebhookConfiguration>(client).await,
            ),
            (
                "Validating",
                delete::<ValidatingWebhookConfiguration>(client).await,
            ),
        ] {
            if let Err(e) = removed {
                tracing::warn!("could not remove the {kind}WebhookConfiguration {NAME}: {e}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.webhook.cert_dir);
        tracing::info!(name = NAME, "removed the local admission webhooks");
    }
}

/// A webhook configuration of kind `K`, named [`NAME`], applied server-side
/// as `object` (replacing an earlier one).
async fn apply<K>(client: &Client, object: &serde_json::Value) -> Result<(), kube::Error>
where
    K: Resource<Scope = ClusterResourceScope, DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let params = PatchParams::apply(super::reconcile::MANAGER).force();
    Api::<K>::all(client.clone())
        .patch(NAME, &params, &Patch::Apply(object))
        .await
        .map(drop)
}

/// Deletes the webhook configuration of kind `K` named [`NAME`]; one that
/// is gone already is fine.
async fn delete<K>(client: &Client) -> Result<(), kube::Error>
where
    K: Resource<Scope = ClusterResourceScope, DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    match Api::<K>::all(client.clone())
        .delete(NAME, &DeleteParams::default())
        .await
    {
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        answer => answer.map(drop),
    }
}
