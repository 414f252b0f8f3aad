//! The storage interface the write pipeline runs on: the rows it reads and
//! writes inside one transaction, and nothing else. A store implements it
//! with its own SQL ([`super::sqlite`], [`super::postgres`]); the rules and
//! their order live in [`super::pipeline`], and what is done once over the
//! rows (an observation, an import) is written here, once, for both.

use std::collections::HashMap;

use super::audit::AuditRecord;
use crate::backend::{AuditEntry, BackendError};
use crate::domain::{Allocation, Observed, Pool, Role, Snapshot};

/// The result of a storage call; its errors are `Unavailable`.
pub type Result<T> = std::result::Result<T, BackendError>;

/// Everything one account holds, row for row: what `backend copy` moves
/// between stores (tokens stay hashed; audit ids, versions, revisions and
/// the sequence are kept, so nothing handed out before can repeat).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountRows {
    pub id: String,
    /// The account's sequence.
    pub revision: i64,
    pub pools: Vec<Pool>,
    /// Id and display name.
    pub organizations: Vec<(String, Option<String>)>,
    pub allocations: Vec<Allocation>,
    pub audit: Vec<AuditEntry>,
    pub tokens: Vec<TokenRow>,
    pub keys: Vec<KeyRow>,
}

/// An API token as stored: only its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    pub hash: String,
    pub account: String,
    pub role: Role,
    pub name: String,
    /// RFC 3339, UTC.
    pub created: String,
    /// When it stops working (RFC 3339, UTC); `None`: never.
    pub expires: Option<String>,
    /// When it was last used (RFC 3339, UTC; noted at most once a minute).
    pub last_used: Option<String>,
}

impl TokenRow {
    /// Whether the token has expired at `now` (RFC 3339, UTC).
    pub fn expired(&self, now: &str) -> bool {
        self.expires.as_deref().is_some_and(|e| e <= now)
    }
}

/// An idempotency key and the answer remembered for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRow {
    pub key: String,
    pub request_hash: String,
    pub answer: String,
    /// RFC 3339, UTC.
    pub created: String,
}

/// The rows of one account, inside one transaction.
pub trait Storage {
    fn pool(&self, account: &str, product: &str) -> Result<Option<Pool>>;
    fn organization_exists(&self, account: &str, organization: &str) -> Result<bool>;
    fn allocation(
        &self,
        account: &str,
        organization: &str,
        product: &str,
    ) -> Result<Option<Allocation>>;
    /// The next value of the account's sequence: every version and pool
    /// revision is one, so none ever repeats in the account.
    fn next_revision(&self, account: &str) -> Result<i64>;
    /// Writes a pool's total, dedicated, shared-in-use and revision.
    fn save_pool(&self, account: &str, pool: &Pool) -> Result<()>;
    /// Inserts or replaces an allocation.
    fn save_allocation(&self, account: &str, allocation: &Allocation) -> Result<()>;
    fn remove_allocation(&self, account: &str, organization: &str, product: &str) -> Result<()>;
    fn insert_organization(&self, account: &str, id: &str, name: Option<&str>) -> Result<()>;
    fn insert_pool(&self, account: &str, pool: &Pool) -> Result<()>;
    /// Empties an account (its pools, organizations, allocations), creating
    /// it if new; its sequence, tokens, audit log and keys stay.
    fn clear_account(&self, account: &str) -> Result<()>;
    fn insert_audit(&self, account: &str, actor: &str, record: &AuditRecord<'_>) -> Result<()>;
    /// The request hash and stored answer of an idempotency key.
    fn remembered(&self, account: &str, key: &str) -> Result<Option<(String, String)>>;
    fn remember(&self, account: &str, key: &KeyRow) -> Result<()>;

    // Reads and housekeeping.

    /// Account ids, sorted.
    fn accounts(&self) -> Result<Vec<String>>;
    /// A token, by its hash.
    fn token(&self, hash: &str) -> Result<Option<TokenRow>>;
    /// The tokens of one account, by name.
    fn tokens(&self, account: &str) -> Result<Vec<TokenRow>>;
    /// Every token that has expired at `now` (RFC 3339), in any account.
    fn expired_tokens(&self, now: &str) -> Result<Vec<TokenRow>>;
    fn insert_token(&self, token: &TokenRow) -> Result<()>;
    /// Removes a token and ends the sessions opened with it.
    fn delete_token(&self, hash: &str) -> Result<()>;
    /// Notes that a token was used at `now`.
    fn touch_token(&self, hash: &str, now: &str) -> Result<()>;
    /// A page session, by the hash of its cookie, while the token it was
    /// opened with exists and has not expired at `now`.
    fn session(&self, hash: &str, now: &str) -> Result<Option<SessionRow>>;
    fn insert_session(&self, hash: &str, session: &SessionRow) -> Result<()>;
    /// Ends the session `hash`, and every session that expired before
    /// `expired_before` (RFC 3339).
    fn delete_sessions(&self, hash: &str, expired_before: &str) -> Result<()>;
    /// Forgets idempotency keys created before `cutoff` (RFC 3339).
    fn expire_keys(&self, cutoff: &str) -> Result<usize>;
    /// Pools, organizations and allocations of one account, sorted.
    fn snapshot(&self, account: &str) -> Result<Snapshot>;
    /// What one allocation is decided on: its product's pool, whether its
    /// organization exists, and the allocation. In a write transaction a
    /// store that locks rows locks the pool row first, which serializes the
    /// writers of one product.
    fn observation(&self, account: &str, organization: &str, product: &str) -> Result<Observation> {
        Ok(Observation {
            pool: self.pool(account, product)?,
            organization_exists: self.organization_exists(account, organization)?,
            allocation: self.allocation(account, organization, product)?,
        })
    }
    /// What a batch of writes is decided on, read together: an
    /// observation for each (organization, product) and the stored answers
    /// of the keys that are in use. A store that locks rows locks the pool
    /// rows first, in the order of their names.
    fn observations(
        &self,
        account: &str,
        wanted: &[(&str, &str)],
        keys: &[&str],
    ) -> Result<Observations> {
        let mut remembered = HashMap::new();
        for key in keys {
            if let Some(answer) = self.remembered(account, key)? {
                remembered.insert(key.to_string(), answer);
            }
        }
        let seen = wanted
            .iter()
            .map(|(organization, product)| self.observation(account, organization, product))
            .collect::<Result<_>>()?;
        Ok(Observations { seen, remembered })
    }
    /// The part of the account one allocation is decided on, as a snapshot.
    fn observe(&self, account: &str, organization: &str, product: &str) -> Result<Snapshot> {
        let seen = self.observation(account, organization, product)?;
        Ok(Snapshot {
            pools: seen.pool.into_iter().collect(),
            organizations: seen
                .organization_exists
                .then(|| organization.to_string())
                .into_iter()
                .collect(),
            allocations: seen.allocation.into_iter().collect(),
        })
    }
    /// The audit log of one account, oldest first: at most `limit` records
    /// after the record `after` (0: from the first).
    fn audit_entries(&self, account: &str, after: i64, limit: i64) -> Result<Vec<AuditEntry>>;

    /// Every row of one account.
    fn export(&self, account: &str) -> Result<AccountRows>;
    /// Creates an account with its sequence at `revision`.
    fn insert_account(&self, account: &str, revision: i64) -> Result<()>;
    /// Writes audit entries as they were, ids included; later records are
    /// numbered after them.
    fn restore_audit(&self, account: &str, entries: &[AuditEntry]) -> Result<()>;
    /// Writes an exported account into a store that does not hold it.
    fn import(&self, a: &AccountRows) -> Result<()> {
        let id = a.id.as_str();
        self.insert_account(id, a.revision)?;
        for p in &a.pools {
            self.insert_pool(id, p)?;
        }
        for (org, name) in &a.organizations {
            self.insert_organization(id, org, name.as_deref())?;
        }
        for al in &a.allocations {
            self.save_allocation(id, al)?;
        }
        self.restore_audit(id, &a.audit)?;
        for t in &a.tokens {
            self.insert_token(&TokenRow {
                account: a.id.clone(),
                ..t.clone()
            })?;
        }
        for k in &a.keys {
            self.remember(id, k)?;
        }
        Ok(())
    }
    /// Removes an account and everything it holds.
    fn drop_account(&self, account: &str) -> Result<()>;
}

/// What a batch of writes is decided on ([`Storage::observations`]).
pub struct Observations {
    /// One per (organization, product) asked for, in order.
    pub seen: Vec<Observation>,
    /// Request hash and answer of each key asked for that is stored.
    pub remembered: HashMap<String, (String, String)>,
}

/// What one request is decided on, read inside its transaction: the
/// product's pool, whether the organization exists, and the allocation.
pub struct Observation {
    pub pool: Option<Pool>,
    pub organization_exists: bool,
    pub allocation: Option<Allocation>,
}

impl Observation {
    pub fn seen(&self) -> Observed<'_> {
        Observed {
            pool: self.pool.as_ref(),
            organization_exists: self.organization_exists,
            allocation: self.allocation.as_ref(),
        }
    }
}

/// A page session as stored (see `Store::open_session`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    pub account: String,
    pub actor: String,
    pub role: Role,
    /// The secret every form of the session carries.
    pub csrf: String,
    /// RFC 3339, UTC.
    pub expires_at: String,
    /// The hash of the token it was opened with.
    pub token: String,
}

/// Now, as stored in the audit log, the key and token tables and sessions.
pub fn now() -> String {
    rfc3339(chrono::Utc::now())
}

/// A time as the store keeps it: RFC 3339, UTC, milliseconds, so that
/// stored times compare as text.
pub fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A role as the store keeps it; anything else is a damaged store, never
/// quietly some role.
pub fn stored_role(role: &str) -> Result<Role> {
    Role::parse(role).ok_or_else(|| {
        BackendError::Unavailable(format!("the store holds an unknown role {role:?}"))
    })
}
