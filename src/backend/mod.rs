//! The license backend: one trait, two implementations.
//!
//! [`local::StoreBackend`] serves a [`store::Store`] this process opens
//! itself (the embedded SQLite file, the default, or PostgreSQL); the HTTP
//! client for a remote license platform implements the same trait. Every
//! write is decided again by the backend, atomically, with the rules of
//! [`crate::domain`]; a refusal leaves the backend exactly as it was.

pub mod http;
pub mod local;
pub mod store;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use crate::api::{AuditEntry, Written};

use crate::domain::{
    AllocationWrite, MAX_COUNT, MAX_TOTAL, PoolView, Reason, Refusal, SeatChange, Snapshot,
    check_identifier,
};

/// A backend location fit to print: credentials in it (the user and
/// password of `scheme://user:password@host`, and query parameters that
/// look like secrets, `?password=`, `?token=`) are masked, whether or not
/// the rest parses. A `sqlite:PATH` is a path and is shown as it is.
pub fn redact(location: &str) -> String {
    let Some((scheme, rest)) = location.split_once("://") else {
        return location.to_string();
    };
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match before_query.find('/') {
        Some(i) => before_query.split_at(i),
        None => (before_query, ""),
    };
    let authority = match authority.rfind('@') {
        Some(i) => format!("***@{}", &authority[i + 1..]),
        None => authority.to_string(),
    };
    let mut out = format!("{scheme}://{authority}{path}");
    if let Some(q) = query {
        let pairs: Vec<String> = q
            .split('&')
            .map(|pair| {
                let key = pair.split('=').next().unwrap_or_default();
                let k = key.to_ascii_lowercase();
                let secret = ["pass", "token", "secret", "key"]
                    .iter()
                    .any(|s| k.contains(s));
                if secret && pair.contains('=') {
                    format!("{key}=***")
                } else {
                    pair.to_string()
                }
            })
            .collect();
        out.push('?');
        out.push_str(&pairs.join("&"));
    }
    out
}

/// Why a backend call did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// The rules refused the change; nothing was written.
    #[error("{0}")]
    Refused(Refusal),
    /// The allocation changed since it was read (If-Match failed).
    #[error(
        "the allocation changed since it was read (version {actual}, expected {expected}); plan again"
    )]
    Stale { expected: i64, actual: i64 },
    /// An idempotency key was reused for a different request.
    #[error("idempotency key {0} was already used for a different request")]
    KeyReused(String),
    /// The credential is missing, unknown or for another account.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// The backend is down, slow, or answered garbage.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
}

impl BackendError {
    /// The reason shown to users for this error, if it has one.
    pub fn reason(&self) -> Option<Reason> {
        match self {
            BackendError::Refused(r) => Some(r.reason),
            BackendError::Unauthorized(_) => Some(Reason::Forbidden),
            BackendError::Unavailable(_) => Some(Reason::BackendUnavailable),
            BackendError::Stale { .. } | BackendError::KeyReused(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn credentials_in_a_location_are_never_shown() {
        for (given, shown) in [
            ("sqlite:licensor.db", "sqlite:licensor.db"),
            (
                "https://platform.example:8443/base",
                "https://platform.example:8443/base",
            ),
            ("http://u:hunter2@host:1/x", "http://***@host:1/x"),
            ("http://hunter2@[bad", "http://***@[bad"),
            (
                "postgres://u:hunter2@db/licenses?sslmode=require&password=hunter2",
                "postgres://***@db/licenses?sslmode=require&password=***",
            ),
            ("http://h/?token=hunter2", "http://h/?token=***"),
            ("http://a@b@hunter2@h/", "http://***@h/"),
        ] {
            assert_eq!(redact(given), shown);
            assert!(!redact(given).contains("hunter2"));
        }
    }
}

impl From<Refusal> for BackendError {
    fn from(r: Refusal) -> Self {
        BackendError::Refused(r)
    }
}

/// An account fixture for `licensor backend seed` (DESIGN §4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fixture {
    pub account: String,
    pub products: Vec<FixtureProduct>,
    #[serde(default)]
    pub organizations: Vec<FixtureOrganization>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FixtureProduct {
    pub name: String,
    pub total: i64,
    #[serde(default)]
    pub shared_in_use: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FixtureOrganization {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub allocations: Vec<FixtureAllocation>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FixtureAllocation {
    pub product: String,
    pub dedicated: i64,
    #[serde(default)]
    pub in_use: i64,
    #[serde(default)]
    pub managed_by: Option<String>,
}

impl Fixture {
    /// Checks a fixture before anything is written. An over-committed pool
    /// is allowed (R9 describes it); impossible numbers are not.
    pub fn validate(&self) -> Result<(), Refusal> {
        let invalid = |m: String| Err(Refusal::new(Reason::Invalid, m));
        if self.account.trim().is_empty() {
            return invalid("account must not be empty".into());
        }
        let mut products = std::collections::HashSet::new();
        for p in &self.products {
            check_identifier("product", &p.name)?;
            if !products.insert(p.name.as_str()) {
                return invalid(format!("product {} is listed twice", p.name));
            }
            if !(0..=MAX_TOTAL).contains(&p.total) || !(0..=MAX_TOTAL).contains(&p.shared_in_use) {
                return invalid(format!(
                    "product {}: total and sharedInUse must be within 0..={MAX_TOTAL}",
                    p.name
                ));
            }
        }
        let mut orgs = std::collections::HashSet::new();
        for o in &self.organizations {
            check_identifier("organization", &o.id)?;
            if !orgs.insert(o.id.as_str()) {
                return invalid(format!("organization id {:?} is listed twice", o.id));
            }
            let mut seen = std::collections::HashSet::new();
            for a in &o.allocations {
                if !products.contains(a.product.as_str()) {
                    return invalid(format!(
                        "organization {}: product {} is not among the account's products",
                        o.id, a.product
                    ));
                }
                if !seen.insert(a.product.as_str()) {
                    return invalid(format!(
                        "organization {}: product {} is listed twice",
                        o.id, a.product
                    ));
                }
                if !(0..=MAX_COUNT).contains(&a.dedicated) || !(0..=a.dedicated).contains(&a.in_use)
                {
                    return invalid(format!(
                        "organization {} {}: need 0 <= inUse <= dedicated <= {MAX_COUNT}",
                        o.id, a.product
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A license backend for one account.
#[async_trait]
pub trait Backend: Send + Sync {
    /// Where this backend is, for messages (`sqlite:licensor.db`).
    fn location(&self) -> String;

    /// Pools, organizations and allocations of the account.
    async fn snapshot(&self) -> Result<Snapshot, BackendError>;

    /// The part of the snapshot one allocation is decided on: its product's
    /// pool, its organization if it exists, and the allocation if any. The
    /// operator reconciles one object at a time and reads only this.
    async fn observe(&self, organization: &str, product: &str) -> Result<Snapshot, BackendError> {
        let mut s = self.snapshot().await?;
        s.pools.retain(|p| p.product == product);
        s.organizations.retain(|o| o == organization);
        s.allocations
            .retain(|a| a.organization == organization && a.product == product);
        Ok(s)
    }

    /// Decides and applies one allocation change in one transaction.
    async fn write(&self, write: &AllocationWrite) -> Result<Written, BackendError>;

    /// Gives up management of an allocation, leaving its count (Orphan).
    async fn release(
        &self,
        organization: &str,
        product: &str,
        manager: &str,
    ) -> Result<(), BackendError>;

    /// Sets a product's total (R9: may go below what is handed out).
    async fn set_total(&self, product: &str, total: i64) -> Result<PoolView, BackendError>;

    /// Changes seats in use (users signing in or out).
    async fn seats(
        &self,
        organization: &str,
        product: &str,
        change: SeatChange,
    ) -> Result<(), BackendError>;

    /// Replaces the account with a fixture.
    async fn seed(&self, fixture: &Fixture) -> Result<(), BackendError>;

    /// Up to `limit` records of the audit log after the record `after` (0:
    /// from the first), oldest first: a long log read a page at a time.
    async fn audit_page(&self, after: i64, limit: i64) -> Result<Vec<AuditEntry>, BackendError>;

    /// The audit log, oldest first.
    async fn audit(&self) -> Result<Vec<AuditEntry>, BackendError> {
        self.audit_page(0, i64::MAX).await
    }
}
