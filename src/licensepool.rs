//! The `LicensePool` resource (DESIGN §7): the account's pool of one
//! product as a cluster-scoped, status-only Kubernetes object, so that
//! `kubectl get licensepools` is the License Management table.
//!
//! The operator keeps one per product of the account it manages
//! ([`crate::operator::pools`]); this module is the type and the pure
//! mapping from a backend snapshot to the objects' names and statuses.

use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::domain::{Allocation, Pool, PoolView, managed_resource};
use crate::resource::DEFAULT_INSTANCE;

/// Label naming the operator instance that keeps a `LicensePool`.
pub const INSTANCE_LABEL: &str = "licensor.dev/instance";
/// Label naming the LicenseAccount a `LicensePool` is a pool of.
pub const ACCOUNT_LABEL: &str = "licensor.dev/account";

/// One product's pool of the license account, kept by the operator.
/// Status only: nothing in it is for people to set.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "licensor.dev",
    version = "v1alpha1",
    kind = "LicensePool",
    plural = "licensepools",
    status = "LicensePoolStatus",
    shortname = "lp",
    category = "licensor",
    doc = "One product's pool of the license account: total, dedicated, shared in use and free seats, and every allocation of it. Kept by the licensor operator; status only.",
    printcolumn = r#"{"name": "Product", "type": "string", "jsonPath": ".status.product"}"#,
    printcolumn = r#"{"name": "Total", "type": "integer", "jsonPath": ".status.total"}"#,
    printcolumn = r#"{"name": "Dedicated", "type": "integer", "jsonPath": ".status.dedicated"}"#,
    printcolumn = r#"{"name": "Shared-In-Use", "type": "integer", "jsonPath": ".status.sharedInUse"}"#,
    printcolumn = r#"{"name": "Free", "type": "integer", "jsonPath": ".status.free"}"#,
    printcolumn = r#"{"name": "OverCommitted", "type": "integer", "jsonPath": ".status.overCommitted"}"#,
    printcolumn = r#"{"name": "Organizations", "type": "integer", "jsonPath": ".status.organizations"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct LicensePoolSpec {}

/// The pool as the backend last showed it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LicensePoolStatus {
    /// The LicenseAccount whose pool this is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// The product's exact name in the account.
    pub product: String,
    /// Seats the account holds of the product.
    pub total: i64,
    /// Seats dedicated to organizations.
    pub dedicated: i64,
    /// Seats in use straight from the account pool.
    pub shared_in_use: i64,
    /// Seats neither dedicated nor in shared use (never below 0).
    pub free: i64,
    /// Seats handed out beyond the total; 0 when none.
    pub over_committed: i64,
    /// How many organizations hold a dedicated allocation of the product.
    pub organizations: i64,
    /// Every allocation of the product, managed or not, by organization.
    pub allocations: Vec<PoolAllocation>,
    /// When the backend last showed this content (RFC 3339); it moves only
    /// when the content does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_time: Option<String>,
}

impl LicensePoolStatus {
    /// The same content, whenever each was observed.
    pub fn same_figures(&self, other: &LicensePoolStatus) -> bool {
        (&self.account, &self.product) == (&other.account, &other.product)
            && self.figures() == other.figures()
            && self.allocations == other.allocations
    }

    fn figures(&self) -> [i64; 6] {
        [
            self.total,
            self.dedicated,
            self.shared_in_use,
            self.free,
            self.over_committed,
            self.organizations,
        ]
    }
}

/// One organization's allocation of the pool's product.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolAllocation {
    pub organization: String,
    pub dedicated: i64,
    pub in_use: i64,
    /// Who manages it (`<instance>/<namespace>/<name>`, or another tool's
    /// name); absent when unmanaged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed_by: Option<String>,
    /// The DedicatedLicense of this instance that manages it; null when
    /// another instance or nobody does.
    pub resource: Option<ResourceRef>,
}

/// A DedicatedLicense, by namespace and name.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct ResourceRef {
    pub namespace: String,
    pub name: String,
}

/// The object name of a product's pool: the product lowercased, characters
/// outside `[a-z0-9-]` as `-`, trimmed of `-` at the ends, prefixed
/// `<instance>-` when the instance is not `default` (so two operators in one
/// cluster keep objects of their own). `TestOps` -> `testops`.
pub fn name_for(instance: &str, product: &str) -> String {
    let mut name: String = product
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    name = name.trim_matches('-').to_string();
    if name.is_empty() {
        name = "product".into();
    }
    if instance != DEFAULT_INSTANCE {
        name = format!("{instance}-{name}");
    }
    // DNS-1123 subdomain: at most 253 characters, alphanumeric at the end.
    name.truncate(253);
    name.trim_end_matches('-').to_string()
}

/// The object name of `account`'s pool of `product`: as [`name_for`] for
/// the account `default`, prefixed `<account>-` for the others.
pub fn name_in(account: &str, instance: &str, product: &str) -> String {
    let name = name_for(instance, product);
    if account == crate::licenseaccount::DEFAULT_ACCOUNT {
        return name;
    }
    let mut name = format!("{account}-{name}");
    name.truncate(253);
    name.trim_end_matches('-').to_string()
}

/// The LicensePool of one pool, as an operator of `instance` shows it: its
/// name and status (without `observedTime`), from the account's
/// allocations (of any product; those of `pool`'s are kept).
pub fn status<'a>(
    instance: &str,
    pool: &Pool,
    allocations: impl Iterator<Item = &'a Allocation>,
) -> (String, LicensePoolStatus) {
    let view = PoolView::from(pool);
    let mut allocations: Vec<PoolAllocation> = allocations
        .filter(|a| a.product == pool.product)
        .map(|a| PoolAllocation {
            organization: a.organization.clone(),
            dedicated: a.dedicated,
            in_use: a.in_use,
            managed_by: a.managed_by.clone(),
            resource: a.managed_by.as_deref().and_then(|m| ours(instance, m)),
        })
        .collect();
    allocations.sort_by(|a, b| a.organization.cmp(&b.organization));
    let status = LicensePoolStatus {
        account: None,
        product: pool.product.clone(),
        total: view.total,
        dedicated: view.dedicated,
        shared_in_use: view.shared_in_use,
        free: view.free_seats(),
        over_committed: view.over_committed(),
        organizations: allocations.iter().filter(|a| a.dedicated > 0).count() as i64,
        allocations,
        observed_time: None,
    };
    (name_for(instance, &pool.product), status)
}

/// The DedicatedLicense a `managedBy` of this instance names.
fn ours(instance: &str, managed_by: &str) -> Option<ResourceRef> {
    let (namespace, name) = managed_resource(instance, managed_by)?.split_once('/')?;
    Some(ResourceRef {
        namespace: namespace.to_string(),
        name: name.to_string(),
    })
}

/// The CRD, as YAML.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&LicensePool::crd())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Snapshot;

    #[test]
    fn names_are_dns_labels_of_the_product() {
        assert_eq!(name_for("default", "TestOps"), "testops");
        assert_eq!(name_for("default", "Runtime Engine 2"), "runtime-engine-2");
        assert_eq!(name_for("prod", "TestOps"), "prod-testops");
        assert_eq!(name_for("default", "Ünïcode_X"), "n-code-x");
        assert_eq!(name_for("default", "__"), "product");
    }

    #[test]
    fn a_pool_shows_every_allocation_and_whose_it_is() {
        let allocation = |org: &str, dedicated, managed_by: Option<&str>| Allocation {
            organization: org.into(),
            product: "TestOps".into(),
            dedicated,
            in_use: 1,
            managed_by: managed_by.map(String::from),
            deletion_policy: Default::default(),
            expiry: None,
            version: 1,
        };
        let snapshot = Snapshot {
            pools: vec![Pool {
                product: "TestOps".into(),
                total: 10,
                dedicated: 12,
                shared_in_use: 1,
                revision: 1,
            }],
            organizations: vec![],
            allocations: vec![
                allocation("b", 5, Some("default/licenses/b")),
                allocation("a", 7, None),
                allocation("c", 0, Some("prod/licenses/c")),
            ],
        };
        let (name, status) = status("default", &snapshot.pools[0], snapshot.allocations.iter());
        assert_eq!(name, "testops");
        assert_eq!((status.free, status.over_committed), (0, 3));
        assert_eq!(status.organizations, 2);
        let orgs: Vec<_> = status
            .allocations
            .iter()
            .map(|a| a.organization.as_str())
            .collect();
        assert_eq!(orgs, ["a", "b", "c"]);
        assert_eq!(status.allocations[0].resource, None);
        assert_eq!(
            status.allocations[1].resource,
            Some(ResourceRef {
                namespace: "licenses".into(),
                name: "b".into()
            })
        );
        assert_eq!(status.allocations[2].resource, None, "another instance's");
    }

    #[test]
    fn a_status_observed_later_has_the_same_figures_and_a_moved_seat_does_not() {
        let shown = LicensePoolStatus {
            product: "TestOps".into(),
            total: 10,
            allocations: vec![PoolAllocation {
                organization: "a".into(),
                dedicated: 3,
                ..Default::default()
            }],
            observed_time: Some("2026-11-28T12:00:00Z".into()),
            ..Default::default()
        };
        let mut later = shown.clone();
        later.observed_time = Some("2026-11-28T12:05:00Z".into());
        assert!(shown.same_figures(&later));
        later.allocations[0].in_use = 1;
        assert!(!shown.same_figures(&later));
        let mut smaller = shown.clone();
        smaller.total = 9;
        assert!(!shown.same_figures(&smaller));
    }
}
