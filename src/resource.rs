//! The `DedicatedLicense` custom resource (DESIGN §3).
//!
//! The Rust type is the source of truth: `licensor crd` prints the CRD
//! generated from it, and a test fails when `crds/` is stale. Doc comments on
//! fields become the schema's descriptions that `kubectl explain` shows.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSON,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::domain::MAX_COUNT;
use crate::domain::tenants::Ask;
use crate::licenseaccount::{DEFAULT_ACCOUNT, Directory};
use crate::plan::Desired;

/// API group of every licensor resource.
pub const GROUP: &str = "licensor.dev";
/// `apiVersion` of the resource.
pub const API_VERSION: &str = "licensor.dev/v1alpha1";
/// Kind of the resource.
pub const KIND: &str = "DedicatedLicense";
pub use crate::domain::PAUSED_ANNOTATION;
/// Finalizer that guarantees a revoke is never lost.
pub const FINALIZER: &str = "licensor.dev/cleanup";
/// Whether an object with this spec and these finalizers still needs the
/// cleanup finalizer: every `Manage` object carries it before its first
/// backend write (paused or not); `Observe` never writes, so never needs it.
/// The operator and the admission webhook both ask here.
pub fn needs_finalizer(spec: &DedicatedLicenseSpec, finalizers: &[String]) -> bool {
    spec.management_policy == ManagementPolicy::Manage && !finalizers.iter().any(|f| f == FINALIZER)
}

/// Instance name used in `managedBy` when none is configured.
pub const DEFAULT_INSTANCE: &str = "default";

/// A fixed number of licenses of one product dedicated to one organization.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "licensor.dev",
    version = "v1alpha1",
    kind = "DedicatedLicense",
    namespaced,
    status = "DedicatedLicenseStatus",
    shortname = "dl",
    category = "licensor",
    doc = "A fixed number of licenses of one product, dedicated to one organization of the license account.",
    printcolumn = r#"{"name": "Org", "type": "string", "jsonPath": ".spec.organization"}"#,
    printcolumn = r#"{"name": "Product", "type": "string", "jsonPath": ".spec.product"}"#,
    printcolumn = r#"{"name": "Desired", "type": "integer", "jsonPath": ".spec.count"}"#,
    printcolumn = r#"{"name": "Allocated", "type": "integer", "jsonPath": ".status.allocated"}"#,
    printcolumn = r#"{"name": "In-Use", "type": "integer", "jsonPath": ".status.inUse"}"#,
    printcolumn = r#"{"name": "Expires", "type": "string", "jsonPath": ".status.expiresAt"}"#,
    printcolumn = r#"{"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name": "Reason", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("has(self.accountRef) == has(oldSelf.accountRef) && (!has(self.accountRef) || self.accountRef == oldSelf.accountRef)").message("accountRef is immutable; create another DedicatedLicense for another account"))]
#[x_kube(validation = Rule::new("!has(self.thenCount) || has(self.until)").message("thenCount needs until: the moment the count becomes thenCount"))]
pub struct DedicatedLicenseSpec {
    /// Organization id in the license account that receives the licenses:
    /// 1 to 253 characters, no control characters, no space at either end.
    /// Must already exist in the account. Immutable: to move licenses to
    /// another organization, create another DedicatedLicense.
    #[x_kube(validation = Rule::new("self == oldSelf").message("organization is immutable; create another DedicatedLicense for another organization"))]
    #[schemars(length(min = 1, max = 253), pattern(crate::domain::IDENTIFIER_PATTERN))]
    pub organization: String,

    /// Product whose pool the licenses come from, for example TestOps (1 to
    /// 253 characters, as organization ids). Pools are per product and never
    /// mix. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("product is immutable; create another DedicatedLicense for another product"))]
    #[schemars(length(min = 1, max = 253), pattern(crate::domain::IDENTIFIER_PATTERN))]
    pub product: String,

    /// The LicenseAccount whose licenses these are: its backend, and its
    /// tenants (which namespaces may manage which organizations). Absent:
    /// default, the operator's own account unless a LicenseAccount named
    /// default says otherwise. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        pattern(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub account_ref: Option<String>,

    /// Desired number of dedicated licenses, 0 to 1000000. Raising takes
    /// seats from the account pool's free seats; lowering may not go below
    /// the seats in use; 0 revokes all of them, in-use seats included.
    #[schemars(range(min = 0, max = 1_000_000))]
    pub count: i64,

    /// When count ends, for licenses given for a while (contractors, a
    /// pilot, seats lent for a release): an RFC 3339 time such as
    /// 2027-01-31T18:00:00Z. From then on the desired count is thenCount,
    /// with the rules of any change: a thenCount below the seats in use is
    /// refused (BelowInUse) and reported. The operator acts at that moment.
    /// Absent: count stands until it is changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<chrono::DateTime<chrono::Utc>>,

    /// The desired count from until on, 0 to 1000000. Absent: 0, which
    /// revokes the licenses. Needs until.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub then_count: Option<i64>,

    /// Consent to a revoke that would leave users without a license, which
    /// only happens when the account pool is over-committed.
    #[serde(default)]
    pub allow_user_displacement: bool,

    /// What deleting this object does to the allocation: Revoke (the
    /// default) gives the licenses back to the pool; Orphan leaves them
    /// with the organization and releases ownership.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,

    /// Manage (the default) writes the allocation; Observe only reports on it
    /// and never writes or adopts.
    #[serde(default)]
    pub management_policy: ManagementPolicy,
}

pub use crate::domain::DeletionPolicy;

/// Whether licensor writes the allocation or only reports on it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ManagementPolicy {
    #[default]
    Manage,
    Observe,
}

/// What the operator observed and did, last time it looked.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DedicatedLicenseStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// The LicenseAccount whose licenses these are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,

    /// Ready, Reconciling and Stalled, following kstatus.
    #[serde(default)]
    pub conditions: Vec<Condition>,

    /// When the count ends (spec.until), for a temporary allocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,

    /// Dedicated licenses the backend holds for this organization now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated: Option<i64>,

    /// Seats of this allocation that users have claimed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_use: Option<i64>,

    /// The product's pool as of this object's last change or refusal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolStatus>,

    /// Unified diff from the backend to the desired state, when they differ
    /// or for the last change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff: Option<String>,

    /// The last change applied to the backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_change: Option<LastChange>,

    /// Failures since the object was last in sync, newest first, at most 5;
    /// a failure that repeats keeps the time it was first seen.
    #[serde(default)]
    pub failures: Vec<Failure>,
}

/// A product's pool.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolStatus {
    /// Licenses purchased.
    pub total: i64,
    /// Sum of all organizations' dedicated licenses.
    pub dedicated: i64,
    /// Seats claimed straight from the account pool.
    pub shared_in_use: i64,
    /// total - dedicated - sharedInUse; negative when over-committed.
    pub free: i64,
}

/// One change applied to the backend.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastChange {
    /// When it was applied (RFC 3339).
    pub time: String,
    /// Dedicated licenses before.
    pub from: i64,
    /// Dedicated licenses after.
    pub to: i64,
    /// In-use seats moved to the account pool by a revoke.
    pub rehomed: i64,
    /// In-use seats left without a license by a revoke.
    pub displaced: i64,
}

/// A failure to reach the desired state.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Failure {
    /// When this failure was first seen (RFC 3339).
    pub since: String,
    /// CamelCase reason, for example InsufficientPool.
    pub reason: String,
    /// What happened and what to do.
    pub message: String,
}

pub use crate::plan::Hold;

impl DedicatedLicenseSpec {
    /// When its count ends and what it becomes then, if it does.
    pub fn expiry(&self) -> Option<crate::domain::Expiry> {
        self.until.map(|until| crate::domain::Expiry {
            until,
            then_count: self.then_count.unwrap_or(0),
        })
    }

    /// The LicenseAccount this object names.
    pub fn account(&self) -> &str {
        self.account_ref.as_deref().unwrap_or(DEFAULT_ACCOUNT)
    }

    /// What a resource with this spec asks for, as the planner sees it: the
    /// one place a manifest (the CLI), an object (the operator) and an
    /// admission request become a [`Desired`]. `scope` is what else makes
    /// the intent unique over time (empty for manifests). Whether its
    /// namespace may ask for it at all is decided here too, from the
    /// accounts and Namespaces of `directory` (DESIGN §9). The spec's
    /// names move into it: a plan of 100,000 manifests copies none.
    pub fn desired(
        self,
        instance: &str,
        namespace: &str,
        name: &str,
        annotations: &std::collections::BTreeMap<String, String>,
        scope: String,
        directory: &Directory,
    ) -> Desired {
        let ask = Ask {
            organization: &self.organization,
            product: &self.product,
            count: self.count,
        };
        let denied = directory
            .allow(self.account(), namespace, ask)
            .err()
            .map(Box::new);
        let hold = Hold::of(annotations, &self);
        let expiry = self.expiry();
        Desired {
            denied,
            resource: [namespace, "/", name].concat(),
            account: self
                .account_ref
                .unwrap_or_else(|| DEFAULT_ACCOUNT.to_string()),
            organization: self.organization,
            product: self.product,
            count: self.count,
            expiry,
            allow_user_displacement: self.allow_user_displacement,
            managed_by: managed_by(instance, namespace, name),
            deletion_policy: self.deletion_policy,
            hold,
            scope,
        }
    }
}

impl Hold {
    /// The hold of a resource with these annotations and spec, if any; the
    /// CLI and the operator both ask here.
    pub fn of(
        annotations: &std::collections::BTreeMap<String, String>,
        spec: &DedicatedLicenseSpec,
    ) -> Option<Hold> {
        if annotations
            .get(PAUSED_ANNOTATION)
            .is_some_and(|v| v == "true")
        {
            Some(Hold::Paused)
        } else if spec.management_policy == ManagementPolicy::Observe {
            Some(Hold::Observe)
        } else {
            None
        }
    }
}

/// The CRD as the YAML committed in `crds/`.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&crd())
}

/// The CRD: what the derive writes, and one default more (see
/// [`unobserved_by_default`]).
pub fn crd() -> CustomResourceDefinition {
    unobserved_by_default(DedicatedLicense::crd())
}

/// An object's status defaults to `{observedGeneration: 0}`, so an object
/// the operator has not looked at yet reads `InProgress` to kstatus
/// (generation 1 not yet observed) and Progressing to the Argo CD check,
/// never `Current` before anything was decided. For every resource whose
/// status the operator decides.
pub fn unobserved_by_default(mut crd: CustomResourceDefinition) -> CustomResourceDefinition {
    for version in &mut crd.spec.versions {
        let status = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
            .and_then(|s| s.properties.as_mut())
            .and_then(|p| p.get_mut("status"));
        if let Some(status) = status {
            status.default = Some(JSON(serde_json::json!({})));
            if let Some(observed) = status
                .properties
                .as_mut()
                .and_then(|p| p.get_mut("observedGeneration"))
            {
                observed.default = Some(JSON(serde_json::json!(0)));
            }
        }
    }
    crd
}

pub use crate::domain::managed_by;

const _: () = assert!(MAX_COUNT == 1_000_000, "keep the schema bound in step");
