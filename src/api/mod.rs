//! The wire types of the license platform API (DESIGN §5): request and
//! response bodies and the problem document. Both `licensor serve`
//! ([`crate::server`]) and its client ([`crate::backend::http`]) use these,
//! so the two cannot disagree on a field, and the OpenAPI document is
//! generated from them.

pub mod audit_csv;
pub mod problem;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::domain::{
    Action, Allocation, DeletionPolicy, Effect, Expiry, MAX_COUNT, MAX_TOTAL, Pool, PoolView,
    SeatChange, whole_number,
};

pub use problem::{Problem, ProblemType};

/// The answer to an accepted allocation write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Written {
    pub effect: Effect,
    /// The allocation afterwards; `None` once removed.
    pub allocation: Option<Allocation>,
    /// The product's pool afterwards.
    pub pool: PoolView,
    /// This answer replays an earlier one for the same idempotency key.
    #[serde(default)]
    pub replayed: bool,
}

/// One audited change (R11).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry {
    pub id: i64,
    pub time: String,
    pub actor: String,
    pub action: AuditAction,
    pub organization: Option<String>,
    pub product: Option<String>,
    pub from: i64,
    pub to: i64,
    pub rehomed: i64,
    pub displaced: i64,
    pub manager: Option<String>,
    pub idempotency_key: Option<String>,
    /// What a token record is about: the token's name and role
    /// (`ci (Viewer)`); absent on allocation and pool records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

/// What an audited change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AuditAction {
    Create,
    Increase,
    Decrease,
    Revoke,
    /// An unmanaged allocation got a manager, its count unchanged.
    Adopt,
    /// A manager gave an allocation up, its count unchanged.
    Orphan,
    /// Seats claimed.
    Claim,
    /// Seats released.
    Release,
    /// A product's total set.
    Total,
    /// The account replaced by a fixture.
    Seed,
    /// An API token created.
    #[serde(rename = "token-create")]
    TokenCreate,
    /// An API token revoked; its sessions end.
    #[serde(rename = "token-revoke")]
    TokenRevoke,
    /// An API token past its expiry, removed.
    #[serde(rename = "token-expire")]
    TokenExpire,
}

impl AuditAction {
    pub const ALL: [AuditAction; 13] = [
        AuditAction::Create,
        AuditAction::Increase,
        AuditAction::Decrease,
        AuditAction::Revoke,
        AuditAction::Adopt,
        AuditAction::Orphan,
        AuditAction::Claim,
        AuditAction::Release,
        AuditAction::Total,
        AuditAction::Seed,
        AuditAction::TokenCreate,
        AuditAction::TokenRevoke,
        AuditAction::TokenExpire,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::Create => "create",
            AuditAction::Increase => "increase",
            AuditAction::Decrease => "decrease",
            AuditAction::Revoke => "revoke",
            AuditAction::Adopt => "adopt",
            AuditAction::Orphan => "orphan",
            AuditAction::Claim => "claim",
            AuditAction::Release => "release",
            AuditAction::Total => "total",
            AuditAction::Seed => "seed",
            AuditAction::TokenCreate => "token-create",
            AuditAction::TokenRevoke => "token-revoke",
            AuditAction::TokenExpire => "token-expire",
        }
    }

    /// The action of an accepted allocation change; `None` for a no-op
    /// (an adoption without a count change is `Adopt`).
    pub fn of(action: Action, adopted: bool) -> Option<AuditAction> {
        match action {
            Action::Create => Some(AuditAction::Create),
            Action::Increase => Some(AuditAction::Increase),
            Action::Decrease => Some(AuditAction::Decrease),
            Action::Revoke => Some(AuditAction::Revoke),
            Action::Orphan => Some(AuditAction::Orphan),
            Action::None if adopted => Some(AuditAction::Adopt),
            Action::None => None,
        }
    }

    pub fn parse(s: &str) -> Option<AuditAction> {
        AuditAction::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

impl std::fmt::Display for AuditAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A product's pool, as `GET /products` answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Product {
    /// The product's exact name.
    pub product: String,
    /// Licenses purchased.
    #[schema(minimum = 0, maximum = 1_000_000_000)]
    pub total: i64,
    /// Sum of the organizations' dedicated counts.
    #[schema(minimum = 0)]
    pub dedicated: i64,
    /// Seats claimed straight from the account pool.
    #[schema(minimum = 0)]
    pub shared_in_use: i64,
    /// `total - dedicated - sharedInUse`; negative when over-committed.
    pub free: i64,
    /// Moves with every change in this pool and never repeats in the
    /// account; a write to an allocation that does not exist yet is keyed
    /// on it.
    #[schema(minimum = 0)]
    pub revision: i64,
}

impl From<&Pool> for Product {
    fn from(p: &Pool) -> Self {
        let v = PoolView::from(p);
        Product {
            product: v.product,
            total: v.total,
            dedicated: v.dedicated,
            shared_in_use: v.shared_in_use,
            free: v.free,
            revision: p.revision,
        }
    }
}

impl From<Product> for Pool {
    fn from(p: Product) -> Self {
        Pool {
            product: p.product,
            total: p.total,
            dedicated: p.dedicated,
            shared_in_use: p.shared_in_use,
            revision: p.revision,
        }
    }
}

/// `PUT /products/{product}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TotalBody {
    /// Licenses purchased; may go below what is handed out (R9).
    #[schema(minimum = 0, maximum = 1_000_000_000)]
    #[serde(deserialize_with = "whole_number")]
    pub total: i64,
}

/// `POST /organizations`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewOrganization {
    /// The organization's id: 1 to 253 characters, no control characters,
    /// no space at either end (the pattern is added to the document from
    /// the domain's one definition).
    #[schema(min_length = 1, max_length = 253)]
    pub id: String,
    /// A display name.
    #[serde(default)]
    pub name: Option<String>,
}

/// An organization of the account.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Organization {
    pub id: String,
}

/// `GET /v1/accounts/{account}`: the account's pools, organizations and
/// allocations read at one moment, so the pools always agree with the
/// allocations (three separate reads can each see another write).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccountState {
    pub products: Vec<Product>,
    pub organizations: Vec<Organization>,
    pub allocations: Vec<Allocation>,
}

/// `PUT /organizations/{organization}/allocations/{product}`: the desired
/// allocation.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PutAllocation {
    /// Dedicated licenses; 0 revokes all, in-use seats included.
    #[schema(minimum = 0, maximum = 1_000_000)]
    #[serde(deserialize_with = "whole_number")]
    pub dedicated: i64,
    /// The manager of the allocation (R8), for example `default/licenses/qa`.
    #[serde(default)]
    pub managed_by: Option<String>,
    /// R6 consent.
    #[serde(default)]
    pub allow_user_displacement: bool,
    /// What deleting the manager's resource will do (Revoke by default),
    /// kept with the allocation so that a prune elsewhere does the same.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// When the manager will lower the count to `thenCount` (a temporary
    /// allocation), kept with the allocation so that the page and
    /// `licensor status` show it; only with `managedBy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry: Option<Expiry>,
}

/// `POST .../allocations/{product}/release`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Release {
    /// The manager giving the allocation up; only its manager may.
    pub managed_by: String,
}

/// `POST /organizations/{organization}/seats/{product}`: exactly one of
/// `{"claim": N}` and `{"release": N}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Seats {
    Claim(SeatClaim),
    Release(SeatRelease),
}

/// Seats users claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SeatClaim {
    #[schema(minimum = 1, maximum = 1_000_000)]
    #[serde(deserialize_with = "whole_number")]
    pub claim: i64,
}

/// Seats users give back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SeatRelease {
    #[schema(minimum = 1, maximum = 1_000_000)]
    #[serde(deserialize_with = "whole_number")]
    pub release: i64,
}

impl From<Seats> for SeatChange {
    fn from(s: Seats) -> Self {
        match s {
            Seats::Claim(SeatClaim { claim }) => SeatChange::Claim(claim),
            Seats::Release(SeatRelease { release }) => SeatChange::Release(release),
        }
    }
}

impl From<SeatChange> for Seats {
    fn from(s: SeatChange) -> Self {
        match s {
            SeatChange::Claim(claim) => Seats::Claim(SeatClaim { claim }),
            SeatChange::Release(release) => Seats::Release(SeatRelease { release }),
        }
    }
}

const _: () = assert!(MAX_COUNT == 1_000_000 && MAX_TOTAL == 1_000_000_000);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seat_changes_are_one_of_claim_and_release() {
        let claim: Seats = serde_json::from_str(r#"{"claim": 3}"#).unwrap();
        assert_eq!(SeatChange::from(claim), SeatChange::Claim(3));
        let release = Seats::from(SeatChange::Release(2));
        assert_eq!(serde_json::to_string(&release).unwrap(), r#"{"release":2}"#);
        let put: PutAllocation = serde_json::from_str(r#"{"dedicated": 5.0}"#).unwrap();
        assert_eq!(put.dedicated, 5);
        for bad in ["5.5", "\"5\"", "1e30", "99999999999999999999"] {
            let body = format!(r#"{{"dedicated": {bad}}}"#);
            assert!(
                serde_json::from_str::<PutAllocation>(&body).is_err(),
                "{bad}"
            );
        }
        // A JSON array is refused before this (routes::Body takes objects only).
        for bad in [r#"{"claim": 1, "release": 1}"#, "{}", r#"{"grab": 1}"#] {
            assert!(serde_json::from_str::<Seats>(bad).is_err(), "{bad}");
        }
    }
}
