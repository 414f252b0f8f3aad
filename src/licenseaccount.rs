//! The `LicenseAccount` resource (DESIGN §9): a license account as a
//! cluster-scoped object that the cluster's admins own. It says which
//! backend and credentials the operator uses for it, and which namespaces
//! may manage which of its organizations (its tenants, decided by
//! [`crate::domain::tenants`]). `DedicatedLicense.spec.accountRef` names
//! one; without any, `default` is the operator's own backend with no
//! tenants, as before accounts existed.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::domain::tenants::{Ask, Asker, Tenant, Tenants};
use crate::domain::{Reason, Refusal, did_you_mean};

/// The account an object names when it names none.
pub const DEFAULT_ACCOUNT: &str = "default";

/// A license account, its backend and credentials, and who may manage
/// which of its organizations.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "licensor.dev",
    version = "v1alpha1",
    kind = "LicenseAccount",
    plural = "licenseaccounts",
    status = "LicenseAccountStatus",
    shortname = "la",
    category = "licensor",
    doc = "A license account: the backend and credentials the licensor operator uses for it, and its tenants (which namespaces may manage which organizations). DedicatedLicense spec.accountRef names one.",
    printcolumn = r#"{"name": "Backend", "type": "string", "jsonPath": ".spec.backend.url"}"#,
    printcolumn = r#"{"name": "Account", "type": "string", "jsonPath": ".spec.backend.account"}"#,
    printcolumn = r#"{"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name": "Reason", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LicenseAccountSpec {
    /// Where the account is and how to reach it; absent: the operator's own
    /// --backend and --account (the chart's store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<AccountBackend>,

    /// Which namespaces may manage which organizations. Absent or empty:
    /// every namespace may manage every organization of the account.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = Rule::new("self.all(t, has(t.namespaces) || has(t.namespaceSelector))").message("every tenant names namespaces, a namespaceSelector, or both"))]
    pub tenants: Vec<Tenant>,
}

/// A backend of the license platform and the credentials for it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccountBackend {
    /// The platform API (http:// or https://) or a PostgreSQL store
    /// (postgres://...), without a password in it.
    #[schemars(
        length(min = 1, max = 2048),
        regex(pattern = r"^(https?|postgres|postgresql)://")
    )]
    pub url: String,
    /// The account's id in that backend; absent: the backend's only account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// The Secret key, in the operator's namespace, holding the bearer token
    /// (http) or the password (postgres); read again when it changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretKeyRef>,
    /// The Secret key, in the operator's namespace, holding the CA
    /// certificate (PEM) the backend's certificate must chain to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
}

/// One key of a Secret in the operator's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// What the operator found when it last used the account.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LicenseAccountStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready (the backend answers with these credentials) and Stalled
    /// (why not: unreachable, unauthorized, unknown account, malformed
    /// tenants), following kstatus.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The products the backend's account holds.
    #[serde(default)]
    pub products: Vec<String>,
}

impl LicenseAccount {
    /// The account's tenants, for the one rule that reads them.
    pub fn tenants(&self) -> Tenants<'_> {
        Tenants {
            account: self.metadata.name.as_deref().unwrap_or(DEFAULT_ACCOUNT),
            entries: &self.spec.tenants,
        }
    }
}

/// The accounts a cluster (or a Git repository) holds, by name, and the
/// labels of its Namespaces: what the tenant rule reads. No accounts at
/// all is an install from before accounts: every object is on `default`,
/// with no tenants.
#[derive(Debug, Clone, Default)]
pub struct Directory {
    pub accounts: BTreeMap<String, LicenseAccount>,
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
}

impl Directory {
    /// The refusal for an object naming `account`, which is not there.
    pub fn unknown(&self, account: &str) -> Refusal {
        let known: Vec<&str> = self.accounts.keys().map(String::as_str).collect();
        Refusal::new(
            Reason::UnknownAccount,
            format!(
                "there is no LicenseAccount {account}{} (accounts: {}); check spec.accountRef",
                did_you_mean(account, known.iter().copied()),
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ),
        )
    }

    /// Whether an object in `namespace` that names `account` may ask for
    /// `ask`: `UnknownAccount` when the account is not there (`default`
    /// always is: the operator's own, with no tenants, unless a
    /// LicenseAccount `default` says otherwise), `Forbidden` when its
    /// tenants do not allow it or cannot be read.
    pub fn allow(&self, account: &str, namespace: &str, ask: Ask<'_>) -> Result<(), Refusal> {
        let Some(found) = self.accounts.get(account) else {
            return match account {
                DEFAULT_ACCOUNT => Ok(()),
                _ => Err(self.unknown(account)),
            };
        };
        let tenants = found.tenants();
        tenants.check().map_err(|fault| {
            Refusal::new(
                Reason::Forbidden,
                format!("LicenseAccount {account} has malformed tenants, so it allows nothing until they are fixed: {fault}"),
            )
        })?;
        let none = BTreeMap::new();
        let labels = self.namespaces.get(namespace).unwrap_or(&none);
        tenants.allow(Asker { namespace, labels }, ask)
    }
}

/// The CRD as the YAML committed in `crds/`: a new account reads as not
/// yet observed until the operator checked it.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&crate::resource::unobserved_by_default(
        LicenseAccount::crd(),
    ))
}
