//! The storage interface the write pipeline runs on: the rows it reads and
//! writes inside one transaction, and nothing else. A store implements it
//! with its own SQL; the rules and their order live in
//! [`super::pipeline`]. Implemented here for SQLite (`rusqlite`), where a
//! transaction is `BEGIN IMMEDIATE`, so writers are serialized.

use std::collections::HashMap;

use rusqlite::{Connection, OptionalExtension, params};

use super::audit::{AuditAction, AuditRecord};
use crate::backend::{AuditEntry, BackendError};
use crate::domain::{Allocation, DeletionPolicy, Observed, Pool, Snapshot};

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
    /// Hash, role, name, created.
    pub tokens: Vec<(String, String, String, String)>,
    /// Key, request hash, answer, created.
    pub keys: Vec<(String, String, String, String)>,
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
    fn remember(&self, account: &str, key: &str, request_hash: &str, answer: &str) -> Result<()>;

    // Reads and housekeeping.

    /// Account ids, sorted.
    fn accounts(&self) -> Result<Vec<String>>;
    /// The account, role and name of a token, by its hash.
    fn token(&self, hash: &str) -> Result<Option<(String, String, String)>>;
    fn insert_token(&self, hash: &str, account: &str, role: &str, name: &str) -> Result<()>;
    /// A page session, by the hash of its cookie.
    fn session(&self, hash: &str) -> Result<Option<SessionRow>>;
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
    /// The audit log of one account, oldest first.
    fn audit_entries(&self, account: &str) -> Result<Vec<AuditEntry>>;

    /// Every row of one account.
    fn export(&self, account: &str) -> Result<AccountRows>;
    /// Writes an exported account into a store that does not hold it.
    fn import(&self, rows: &AccountRows) -> Result<()>;
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

fn failed(e: rusqlite::Error) -> BackendError {
    BackendError::Unavailable(format!("the store: {e}"))
}

/// A pool from the columns name, total, dedicated, shared_in_use, revision.
pub fn pool_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Pool> {
    Ok(Pool {
        product: r.get(0)?,
        total: r.get(1)?,
        dedicated: r.get(2)?,
        shared_in_use: r.get(3)?,
        revision: r.get(4)?,
    })
}

/// An allocation from the columns organization, product, dedicated,
/// in_use, managed_by, version, deletion_policy.
pub fn allocation_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Allocation> {
    Ok(Allocation {
        organization: r.get(0)?,
        product: r.get(1)?,
        dedicated: r.get(2)?,
        in_use: r.get(3)?,
        managed_by: r.get(4)?,
        version: r.get(5)?,
        deletion_policy: policy(&r.get::<_, String>(6)?),
    })
}

/// A stored deletion policy; the column's CHECK admits only the two
/// spellings.
fn policy(stored: &str) -> DeletionPolicy {
    DeletionPolicy::parse(stored).unwrap_or_default()
}

/// Now, as stored in the audit log and the key table.
/// A page session as stored (see `Store::open_session`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    pub account: String,
    pub actor: String,
    pub role: String,
    /// The secret every form of the session carries.
    pub csrf: String,
    /// RFC 3339, UTC.
    pub expires_at: String,
}

pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// SQLite: a `Transaction` derefs to its `Connection`, so the write
/// pipeline runs on this inside `BEGIN IMMEDIATE`, and reads outside one.
impl Storage for Connection {
    fn pool(&self, account: &str, product: &str) -> Result<Option<Pool>> {
        self.prepare_cached(
            "SELECT name, total, dedicated, shared_in_use, revision FROM products WHERE account = ?1 AND name = ?2",
        )
        .and_then(|mut s| s.query_row([account, product], pool_row).optional())
        .map_err(failed)
    }

    fn organization_exists(&self, account: &str, organization: &str) -> Result<bool> {
        self.prepare_cached("SELECT 1 FROM organizations WHERE account = ?1 AND id = ?2")
            .and_then(|mut s| s.exists([account, organization]))
            .map_err(failed)
    }

    fn allocation(
        &self,
        account: &str,
        organization: &str,
        product: &str,
    ) -> Result<Option<Allocation>> {
        self.prepare_cached(
            "SELECT organization, product, dedicated, in_use, managed_by, version, deletion_policy FROM allocations
             WHERE account = ?1 AND organization = ?2 AND product = ?3",
        )
        .and_then(|mut s| {
            s.query_row([account, organization, product], allocation_row)
                .optional()
        })
        .map_err(failed)
    }

    fn next_revision(&self, account: &str) -> Result<i64> {
        self.prepare_cached(
            "UPDATE accounts SET revision = revision + 1 WHERE id = ?1 RETURNING revision",
        )
        .and_then(|mut s| s.query_row([account], |r| r.get(0)))
        .map_err(failed)
    }

    fn save_pool(&self, account: &str, p: &Pool) -> Result<()> {
        self.prepare_cached(
            "UPDATE products SET total = ?3, dedicated = ?4, shared_in_use = ?5, revision = ?6
             WHERE account = ?1 AND name = ?2",
        )
        .and_then(|mut s| {
            s.execute(params![
                account,
                p.product,
                p.total,
                p.dedicated,
                p.shared_in_use,
                p.revision
            ])
        })
        .map(drop)
        .map_err(failed)
    }

    fn save_allocation(&self, account: &str, a: &Allocation) -> Result<()> {
        self.prepare_cached(
            "INSERT INTO allocations (account, organization, product, dedicated, in_use, managed_by, version, deletion_policy)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (account, organization, product) DO UPDATE SET
               dedicated = excluded.dedicated, in_use = excluded.in_use,
               managed_by = excluded.managed_by, version = excluded.version,
               deletion_policy = excluded.deletion_policy",
        )
        .and_then(|mut s| {
            s.execute(params![
                account,
                a.organization,
                a.product,
                a.dedicated,
                a.in_use,
                a.managed_by,
                a.version,
                a.deletion_policy.as_str()
            ])
        })
        .map(drop)
        .map_err(failed)
    }

    fn remove_allocation(&self, account: &str, organization: &str, product: &str) -> Result<()> {
        self.prepare_cached(
            "DELETE FROM allocations WHERE account = ?1 AND organization = ?2 AND product = ?3",
        )
        .and_then(|mut s| s.execute(params![account, organization, product]))
        .map(drop)
        .map_err(failed)
    }

    fn insert_organization(&self, account: &str, id: &str, name: Option<&str>) -> Result<()> {
        self.prepare_cached("INSERT INTO organizations (account, id, name) VALUES (?1, ?2, ?3)")
            .and_then(|mut s| s.execute(params![account, id, name]))
            .map(drop)
            .map_err(failed)
    }

    fn insert_pool(&self, account: &str, p: &Pool) -> Result<()> {
        self.prepare_cached(
            "INSERT INTO products (account, name, total, shared_in_use, dedicated, revision)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .and_then(|mut s| {
            s.execute(params![
                account,
                p.product,
                p.total,
                p.shared_in_use,
                p.dedicated,
                p.revision
            ])
        })
        .map(drop)
        .map_err(failed)
    }

    fn clear_account(&self, account: &str) -> Result<()> {
        for table in ["allocations", "organizations", "products"] {
            self.execute(
                &format!("DELETE FROM {table} WHERE account = ?1"),
                [account],
            )
            .map_err(failed)?;
        }
        self.execute("INSERT OR IGNORE INTO accounts (id) VALUES (?1)", [account])
            .map(drop)
            .map_err(failed)
    }

    fn insert_audit(&self, account: &str, actor: &str, r: &AuditRecord<'_>) -> Result<()> {
        self.prepare_cached(
            "INSERT INTO audit (account, time, actor, action, organization, product, from_count, to_count, rehomed, displaced, manager, idempotency_key)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        )
        .and_then(|mut s| {
            s.execute(params![
                account,
                now(),
                actor,
                r.action.as_str(),
                r.organization,
                r.product,
                r.from,
                r.to,
                r.rehomed,
                r.displaced,
                r.manager,
                r.idempotency_key
            ])
        })
        .map(drop)
        .map_err(failed)
    }

    fn remembered(&self, account: &str, key: &str) -> Result<Option<(String, String)>> {
        self.prepare_cached(
            "SELECT request_hash, response FROM idempotency WHERE account = ?1 AND key = ?2",
        )
        .and_then(|mut s| {
            s.query_row([account, key], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
        .map_err(failed)
    }

    fn remember(&self, account: &str, key: &str, request_hash: &str, answer: &str) -> Result<()> {
        self.prepare_cached(
            "INSERT INTO idempotency (account, key, request_hash, response, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .and_then(|mut s| s.execute(params![account, key, request_hash, answer, now()]))
        .map(drop)
        .map_err(failed)
    }

    fn accounts(&self) -> Result<Vec<String>> {
        self.prepare_cached("SELECT id FROM accounts ORDER BY id")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .map_err(failed)
    }

    fn token(&self, hash: &str) -> Result<Option<(String, String, String)>> {
        self.prepare_cached("SELECT account, role, name FROM tokens WHERE hash = ?1")
            .and_then(|mut s| {
                s.query_row([hash], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .optional()
            })
            .map_err(failed)
    }

    fn insert_token(&self, hash: &str, account: &str, role: &str, name: &str) -> Result<()> {
        self.execute(
            "INSERT INTO tokens (hash, account, role, name, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![hash, account, role, name, now()],
        )
        .map(drop)
        .map_err(failed)
    }

    fn session(&self, hash: &str) -> Result<Option<SessionRow>> {
        self.prepare_cached(
            "SELECT account, actor, role, csrf, expires_at FROM sessions WHERE hash = ?1",
        )
        .and_then(|mut s| {
            s.query_row([hash], |r| {
                Ok(SessionRow {
                    account: r.get(0)?,
                    actor: r.get(1)?,
                    role: r.get(2)?,
                    csrf: r.get(3)?,
                    expires_at: r.get(4)?,
                })
            })
            .optional()
        })
        .map_err(failed)
    }

    fn insert_session(&self, hash: &str, s: &SessionRow) -> Result<()> {
        self.execute(
            "INSERT INTO sessions (hash, account, actor, role, csrf, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![hash, s.account, s.actor, s.role, s.csrf, s.expires_at],
        )
        .map(drop)
        .map_err(failed)
    }

    fn delete_sessions(&self, hash: &str, expired_before: &str) -> Result<()> {
        self.execute(
            "DELETE FROM sessions WHERE hash = ?1 OR expires_at < ?2",
            [hash, expired_before],
        )
        .map(drop)
        .map_err(failed)
    }

    fn expire_keys(&self, cutoff: &str) -> Result<usize> {
        self.execute("DELETE FROM idempotency WHERE created_at < ?1", [cutoff])
            .map_err(failed)
    }

    fn snapshot(&self, account: &str) -> Result<Snapshot> {
        let pools = self
            .prepare_cached(
                "SELECT name, total, dedicated, shared_in_use, revision FROM products WHERE account = ?1 ORDER BY name",
            )
            .and_then(|mut s| s.query_map([account], pool_row)?.collect())
            .map_err(failed)?;
        let organizations = self
            .prepare_cached("SELECT id FROM organizations WHERE account = ?1 ORDER BY id")
            .and_then(|mut s| s.query_map([account], |r| r.get(0))?.collect())
            .map_err(failed)?;
        let allocations = self
            .prepare_cached(
                "SELECT organization, product, dedicated, in_use, managed_by, version, deletion_policy FROM allocations WHERE account = ?1 ORDER BY organization, product",
            )
            .and_then(|mut s| s.query_map([account], allocation_row)?.collect())
            .map_err(failed)?;
        Ok(Snapshot {
            pools,
            organizations,
            allocations,
        })
    }

    // One statement, so one consistent read without a transaction: this is
    // the hot path of the operator and of `GET .../allocations/{product}`.
    // (Writers are serialized by `BEGIN IMMEDIATE`; there is no row to lock.)
    fn observation(&self, account: &str, organization: &str, product: &str) -> Result<Observation> {
        self.prepare_cached(
            "SELECT p.name, p.total, p.dedicated, p.shared_in_use, p.revision,
                    EXISTS (SELECT 1 FROM organizations o WHERE o.account = ?1 AND o.id = ?2),
                    a.dedicated, a.in_use, a.managed_by, a.version, a.deletion_policy
             FROM (SELECT 1)
             LEFT JOIN products p ON p.account = ?1 AND p.name = ?3
             LEFT JOIN allocations a ON a.account = ?1 AND a.organization = ?2 AND a.product = ?3",
        )
        .and_then(|mut s| {
            s.query_row(params![account, organization, product], |r| {
                let pool = match r.get::<_, Option<String>>(0)? {
                    Some(_) => Some(pool_row(r)?),
                    None => None,
                };
                let allocation = match r.get::<_, Option<i64>>(6)? {
                    Some(dedicated) => Some(Allocation {
                        organization: organization.to_string(),
                        product: product.to_string(),
                        dedicated,
                        in_use: r.get(7)?,
                        managed_by: r.get(8)?,
                        version: r.get(9)?,
                        deletion_policy: policy(&r.get::<_, String>(10)?),
                    }),
                    None => None,
                };
                Ok(Observation {
                    pool,
                    organization_exists: r.get(5)?,
                    allocation,
                })
            })
        })
        .map_err(failed)
    }

    fn audit_entries(&self, account: &str) -> Result<Vec<AuditEntry>> {
        self.prepare_cached(
            "SELECT id, time, actor, action, organization, product, from_count, to_count,
                    rehomed, displaced, manager, idempotency_key
             FROM audit WHERE account = ?1 ORDER BY id",
        )
        .and_then(|mut s| {
            s.query_map([account], |r| {
                let action: String = r.get(3)?;
                Ok(AuditEntry {
                    id: r.get(0)?,
                    time: r.get(1)?,
                    actor: r.get(2)?,
                    action: AuditAction::parse(&action).ok_or_else(|| {
                        rusqlite::Error::FromSqlConversionFailure(
                            3,
                            rusqlite::types::Type::Text,
                            format!("unknown audit action {action:?}").into(),
                        )
                    })?,
                    organization: r.get(4)?,
                    product: r.get(5)?,
                    from: r.get(6)?,
                    to: r.get(7)?,
                    rehomed: r.get(8)?,
                    displaced: r.get(9)?,
                    manager: r.get(10)?,
                    idempotency_key: r.get(11)?,
                })
            })?
            .collect()
        })
        .map_err(failed)
    }

    fn export(&self, account: &str) -> Result<AccountRows> {
        let revision = self
            .query_row(
                "SELECT revision FROM accounts WHERE id = ?1",
                [account],
                |r| r.get(0),
            )
            .map_err(failed)?;
        let snapshot = self.snapshot(account)?;
        let organizations = self
            .prepare("SELECT id, name FROM organizations WHERE account = ?1 ORDER BY id")
            .and_then(|mut s| {
                s.query_map([account], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect()
            })
            .map_err(failed)?;
        let tokens = self
            .prepare(
                "SELECT hash, role, name, created_at FROM tokens WHERE account = ?1 ORDER BY hash",
            )
            .and_then(|mut s| {
                s.query_map([account], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })?
                .collect()
            })
            .map_err(failed)?;
        let keys = self
            .prepare("SELECT key, request_hash, response, created_at FROM idempotency WHERE account = ?1 ORDER BY key")
            .and_then(|mut s| {
                s.query_map([account], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                    .collect()
            })
            .map_err(failed)?;
        Ok(AccountRows {
            id: account.to_string(),
            revision,
            pools: snapshot.pools,
            organizations,
            allocations: snapshot.allocations,
            audit: self.audit_entries(account)?,
            tokens,
            keys,
        })
    }

    fn import(&self, a: &AccountRows) -> Result<()> {
        let id = a.id.as_str();
        self.execute(
            "INSERT INTO accounts (id, revision) VALUES (?1, ?2)",
            params![id, a.revision],
        )
        .map_err(failed)?;
        for p in &a.pools {
            self.insert_pool(id, p)?;
        }
        for (org, name) in &a.organizations {
            self.insert_organization(id, org, name.as_deref())?;
        }
        for al in &a.allocations {
            self.save_allocation(id, al)?;
        }
        for e in &a.audit {
            self.execute(
                "INSERT INTO audit (id, account, time, actor, action, organization, product, from_count, to_count, rehomed, displaced, manager, idempotency_key)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                params![e.id, id, e.time, e.actor, e.action.as_str(), e.organization, e.product, e.from, e.to, e.rehomed, e.displaced, e.manager, e.idempotency_key],
            )
            .map_err(failed)?;
        }
        for (hash, role, name, created) in &a.tokens {
            self.execute(
                "INSERT INTO tokens (hash, account, role, name, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![hash, id, role, name, created],
            )
            .map_err(failed)?;
        }
        for (key, request_hash, answer, created) in &a.keys {
            self.execute(
                "INSERT INTO idempotency (account, key, request_hash, response, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id, key, request_hash, answer, created],
            )
            .map_err(failed)?;
        }
        Ok(())
    }

    fn drop_account(&self, account: &str) -> Result<()> {
        self.clear_account(account)?;
        for table in ["idempotency", "tokens", "audit"] {
            self.execute(
                &format!("DELETE FROM {table} WHERE account = ?1"),
                [account],
            )
            .map_err(failed)?;
        }
        self.execute("DELETE FROM accounts WHERE id = ?1", [account])
            .map(drop)
            .map_err(failed)
    }
}
