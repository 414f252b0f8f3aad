//! The embedded store's SQL: the [`Storage`] rows on one SQLite file
//! (`rusqlite`), where a write transaction is `BEGIN IMMEDIATE`, so writers
//! are serialized. Opening a file ([`open`]) checks and migrates its schema
//! ([`schema`]) and turns on WAL; reads run on connections of their own
//! ([`readers`]), beside the writer and each other, and checkpoints on a
//! thread of their own ([`checkpoint`]).

pub mod checkpoint;
pub mod readers;
pub mod schema;

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, Params, Row, params};

use super::audit::{AuditAction, AuditRecord};
use super::storage::{
    AccountRows, KeyRow, Observation, Result, SessionRow, Storage, TokenRow, now, stored_role,
};
use crate::backend::{AuditEntry, BackendError};
use crate::domain::{Allocation, DeletionPolicy, Expiry, Pool, Role, Snapshot};

/// An open store file: the writer's connection, the readers' and the
/// checkpoints' thread.
pub struct Opened {
    pub writer: Connection,
    pub readers: readers::Readers,
    pub checkpoints: checkpoint::Checkpoints,
}

fn storage(path: &Path) -> impl Fn(rusqlite::Error) -> BackendError + '_ {
    move |e| BackendError::Unavailable(format!("{}: {e}", path.display()))
}

/// Opens (with `create`, creating if needed) and migrates the file at
/// `path`; a file that is not a licensor store, or is newer, is refused
/// before anything is written to it.
pub fn open(path: &Path, create: bool) -> std::result::Result<Opened, BackendError> {
    let err = storage(path);
    if !create && !path.exists() {
        return Err(BackendError::Unavailable(format!(
            "{}: no store here; create one with `licensor backend seed -f FIXTURE`",
            path.display()
        )));
    }
    let mut flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
        | rusqlite::OpenFlags::SQLITE_OPEN_URI
        | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if create {
        flags |= rusqlite::OpenFlags::SQLITE_OPEN_CREATE;
    }
    let mut conn = Connection::open_with_flags(path, flags).map_err(&err)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(&err)?;
    // Before anything is written (WAL mode included): is this a store
    // of ours, and one this licensor understands?
    schema::check_schema(&conn, path)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(&err)?;
    // WAL with NORMAL survives a crash of any process; only a power loss
    // can lose the last commits, never corrupt the file.
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(&err)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(&err)?;
    schema::migrate(&mut conn, path)?;
    // Checkpoints run on a thread of their own (see `checkpoint`).
    conn.pragma_update(None, "wal_autocheckpoint", 0)
        .map_err(&err)?;
    Ok(Opened {
        checkpoints: checkpoint::Checkpoints::start(path)?,
        readers: readers::Readers::new(path),
        writer: conn,
    })
}

fn failed(e: rusqlite::Error) -> BackendError {
    BackendError::Unavailable(format!("the store: {e}"))
}

/// The shapes every statement here takes, each with its error mapped. The
/// write path's statements stay prepared (`_cached`, `row`, `rows`); a
/// statement run now and then (tokens, sessions, an import) is not kept.
trait Statements {
    /// A statement that answers no rows, run once.
    fn run(&self, sql: &str, params: impl Params) -> Result<()>;
    /// A statement that answers no rows, kept prepared.
    fn run_cached(&self, sql: &str, params: impl Params) -> Result<()>;
    /// The row a statement kept prepared answers, if any.
    fn row<T>(
        &self,
        sql: &str,
        params: impl Params,
        f: impl FnOnce(&Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Option<T>>;
    /// Every row a statement kept prepared answers.
    fn rows<T>(
        &self,
        sql: &str,
        params: impl Params,
        f: impl FnMut(&Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>> {
        self.rows_into(Vec::new(), sql, params, f)
    }
    /// [`Statements::rows`], added to `out` (sized by the caller).
    fn rows_into<T>(
        &self,
        out: Vec<T>,
        sql: &str,
        params: impl Params,
        f: impl FnMut(&Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>>;
}

impl Statements for Connection {
    fn run(&self, sql: &str, params: impl Params) -> Result<()> {
        self.execute(sql, params).map(drop).map_err(failed)
    }

    fn run_cached(&self, sql: &str, params: impl Params) -> Result<()> {
        self.prepare_cached(sql)
            .and_then(|mut s| s.execute(params))
            .map(drop)
            .map_err(failed)
    }

    fn row<T>(
        &self,
        sql: &str,
        params: impl Params,
        f: impl FnOnce(&Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Option<T>> {
        self.prepare_cached(sql)
            .and_then(|mut s| s.query_row(params, f).optional())
            .map_err(failed)
    }

    fn rows_into<T>(
        &self,
        mut out: Vec<T>,
        sql: &str,
        params: impl Params,
        f: impl FnMut(&Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>> {
        self.prepare_cached(sql)
            .and_then(|mut s| {
                for row in s.query_map(params, f)? {
                    out.push(row?);
                }
                Ok(out)
            })
            .map_err(failed)
    }
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
/// in_use, managed_by, version, deletion_policy, expires_at, then_count.
pub fn allocation_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Allocation> {
    Ok(Allocation {
        organization: r.get(0)?,
        product: r.get(1)?,
        dedicated: r.get(2)?,
        in_use: r.get(3)?,
        managed_by: r.get(4)?,
        version: r.get(5)?,
        deletion_policy: policy(r, 6)?,
        expiry: Expiry::from_stored(r.get::<_, Option<String>>(7)?.as_deref(), r.get(8)?),
    })
}

/// The stored deletion policy in column `i`, read where it lies rather than
/// copied out for each row; the column's CHECK admits only the two
/// spellings.
fn policy(r: &Row<'_>, i: usize) -> rusqlite::Result<DeletionPolicy> {
    let stored = r.get_ref(i)?.as_str().ok();
    Ok(stored.and_then(DeletionPolicy::parse).unwrap_or_default())
}

/// A token's columns, in the order [`token_row`] reads them.
const TOKEN_COLUMNS: &str = "hash, account, role, name, created_at, expires_at, last_used";

fn token_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRow> {
    Ok(TokenRow {
        hash: r.get(0)?,
        account: r.get(1)?,
        role: r.get(2)?,
        name: r.get(3)?,
        created: r.get(4)?,
        expires: r.get(5)?,
        last_used: r.get(6)?,
    })
}

/// A role as the store keeps it: its name; anything else is a damaged
/// store (see [`stored_role`]).
impl rusqlite::types::FromSql for Role {
    fn column_result(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Role> {
        stored_role(v.as_str()?).map_err(|e| rusqlite::types::FromSqlError::Other(e.into()))
    }
}

/// SQLite: a `Transaction` derefs to its `Connection`, so the write
/// pipeline runs on this inside `BEGIN IMMEDIATE`, and reads outside one.
impl Storage for Connection {
    fn pool(&self, account: &str, product: &str) -> Result<Option<Pool>> {
        self.row(
            "SELECT name, total, dedicated, shared_in_use, revision FROM products WHERE account = ?1 AND name = ?2",
            [account, product],
            pool_row,
        )
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
        self.row(
            "SELECT organization, product, dedicated, in_use, managed_by, version, deletion_policy, expires_at, then_count FROM allocations
             WHERE account = ?1 AND organization = ?2 AND product = ?3",
            [account, organization, product],
            allocation_row,
        )
    }

    fn next_revision(&self, account: &str) -> Result<i64> {
        self.row(
            "UPDATE accounts SET revision = revision + 1 WHERE id = ?1 RETURNING revision",
            [account],
            |r| r.get(0),
        )?
        .ok_or_else(|| BackendError::Unavailable(format!("the store: no account {account}")))
    }

    fn save_pool(&self, account: &str, p: &Pool) -> Result<()> {
        self.run_cached(
            "UPDATE products SET total = ?3, dedicated = ?4, shared_in_use = ?5, revision = ?6
             WHERE account = ?1 AND name = ?2",
            params![
                account,
                p.product,
                p.total,
                p.dedicated,
                p.shared_in_use,
                p.revision
            ],
        )
    }

    fn save_allocation(&self, account: &str, a: &Allocation) -> Result<()> {
        self.run_cached(
            "INSERT INTO allocations (account, organization, product, dedicated, in_use, managed_by, version, deletion_policy, expires_at, then_count)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
             ON CONFLICT (account, organization, product) DO UPDATE SET
               dedicated = excluded.dedicated, in_use = excluded.in_use,
               managed_by = excluded.managed_by, version = excluded.version,
               deletion_policy = excluded.deletion_policy,
               expires_at = excluded.expires_at, then_count = excluded.then_count",
            params![
                account,
                a.organization,
                a.product,
                a.dedicated,
                a.in_use,
                a.managed_by,
                a.version,
                a.deletion_policy.as_str(),
                a.expiry.as_ref().map(Expiry::until_stored),
                a.expiry.map(|e| e.then_count)
            ],
        )
    }

    fn remove_allocation(&self, account: &str, organization: &str, product: &str) -> Result<()> {
        self.run_cached(
            "DELETE FROM allocations WHERE account = ?1 AND organization = ?2 AND product = ?3",
            [account, organization, product],
        )
    }

    fn insert_organization(&self, account: &str, id: &str, name: Option<&str>) -> Result<()> {
        self.run_cached(
            "INSERT INTO organizations (account, id, name) VALUES (?1, ?2, ?3)",
            params![account, id, name],
        )
    }

    fn insert_pool(&self, account: &str, p: &Pool) -> Result<()> {
        self.run_cached(
            "INSERT INTO products (account, name, total, shared_in_use, dedicated, revision)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                account,
                p.product,
                p.total,
                p.shared_in_use,
                p.dedicated,
                p.revision
            ],
        )
    }

    fn clear_account(&self, account: &str) -> Result<()> {
        for table in ["allocations", "organizations", "products"] {
            self.run(
                &format!("DELETE FROM {table} WHERE account = ?1"),
                [account],
            )?;
        }
        self.run("INSERT OR IGNORE INTO accounts (id) VALUES (?1)", [account])
    }

    fn insert_audit(&self, account: &str, actor: &str, r: &AuditRecord<'_>) -> Result<()> {
        self.run_cached(
            "INSERT INTO audit (account, time, actor, action, organization, product, from_count, to_count, rehomed, displaced, manager, idempotency_key, subject)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            params![
                account,
                now(),
                actor,
                r.action.as_str(),
                r.organization.as_deref(),
                r.product.as_deref(),
                r.from,
                r.to,
                r.rehomed,
                r.displaced,
                r.manager.as_deref(),
                r.idempotency_key.as_deref(),
                r.subject.as_deref()
            ],
        )
    }

    fn remembered(&self, account: &str, key: &str) -> Result<Option<(String, String)>> {
        self.row(
            "SELECT request_hash, response FROM idempotency WHERE account = ?1 AND key = ?2",
            [account, key],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
    }

    fn remember(&self, account: &str, k: &KeyRow) -> Result<()> {
        self.run_cached(
            "INSERT INTO idempotency (account, key, request_hash, response, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![account, k.key, k.request_hash, k.answer, k.created],
        )
    }

    fn accounts(&self) -> Result<Vec<String>> {
        self.rows("SELECT id FROM accounts ORDER BY id", [], |r| r.get(0))
    }

    fn token(&self, hash: &str) -> Result<Option<TokenRow>> {
        self.row(
            &format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE hash = ?1"),
            [hash],
            token_row,
        )
    }

    fn tokens(&self, account: &str) -> Result<Vec<TokenRow>> {
        self.rows(
            &format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE account = ?1 ORDER BY name"),
            [account],
            token_row,
        )
    }

    fn expired_tokens(&self, now: &str) -> Result<Vec<TokenRow>> {
        self.rows(
            &format!(
                "SELECT {TOKEN_COLUMNS} FROM tokens WHERE expires_at <= ?1 ORDER BY account, name"
            ),
            [now],
            token_row,
        )
    }

    fn insert_token(&self, t: &TokenRow) -> Result<()> {
        self.run(
            "INSERT INTO tokens (hash, account, role, name, created_at, expires_at, last_used)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                t.hash,
                t.account,
                t.role.as_str(),
                t.name,
                t.created,
                t.expires,
                t.last_used
            ],
        )
    }

    fn delete_token(&self, hash: &str) -> Result<()> {
        self.run("DELETE FROM sessions WHERE token = ?1", [hash])?;
        self.run("DELETE FROM tokens WHERE hash = ?1", [hash])
    }

    fn touch_token(&self, hash: &str, now: &str) -> Result<()> {
        self.run(
            "UPDATE tokens SET last_used = ?2 WHERE hash = ?1",
            [hash, now],
        )
    }

    fn session(&self, hash: &str, now: &str) -> Result<Option<SessionRow>> {
        self.row(
            "SELECT s.account, s.actor, s.role, s.csrf, s.expires_at, s.token
             FROM sessions s JOIN tokens t ON t.hash = s.token
             WHERE s.hash = ?1 AND (t.expires_at IS NULL OR t.expires_at > ?2)",
            [hash, now],
            |r| {
                Ok(SessionRow {
                    account: r.get(0)?,
                    actor: r.get(1)?,
                    role: r.get(2)?,
                    csrf: r.get(3)?,
                    expires_at: r.get(4)?,
                    token: r.get(5)?,
                })
            },
        )
    }

    fn insert_session(&self, hash: &str, s: &SessionRow) -> Result<()> {
        self.run(
            "INSERT INTO sessions (hash, account, actor, role, csrf, expires_at, token) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![hash, s.account, s.actor, s.role.as_str(), s.csrf, s.expires_at, s.token],
        )
    }

    fn delete_sessions(&self, hash: &str, expired_before: &str) -> Result<()> {
        self.run(
            "DELETE FROM sessions WHERE hash = ?1 OR expires_at < ?2",
            [hash, expired_before],
        )
    }

    fn expire_keys(&self, cutoff: &str) -> Result<usize> {
        self.execute("DELETE FROM idempotency WHERE created_at < ?1", [cutoff])
            .map_err(failed)
    }

    fn snapshot(&self, account: &str) -> Result<Snapshot> {
        Ok(Snapshot {
            pools: self.rows(
                "SELECT name, total, dedicated, shared_in_use, revision FROM products WHERE account = ?1 ORDER BY name",
                [account],
                pool_row,
            )?,
            organizations: self.rows(
                "SELECT id FROM organizations WHERE account = ?1 ORDER BY id",
                [account],
                |r| r.get(0),
            )?,
            // Sized first (one read, so the count is the rows'): grown by
            // doubling, a large account's allocations were copied, and
            // their memory touched, twice over.
            allocations: self.rows_into(
                Vec::with_capacity(self.row(
                    "SELECT count(*) FROM allocations WHERE account = ?1",
                    [account],
                    |r| r.get::<_, usize>(0),
                )?.unwrap_or(0)),
                "SELECT organization, product, dedicated, in_use, managed_by, version, deletion_policy, expires_at, then_count FROM allocations WHERE account = ?1 ORDER BY organization, product",
                [account],
                allocation_row,
            )?,
        })
    }

    // One statement, so one consistent read without a transaction: this is
    // the hot path of the operator and of `GET .../allocations/{product}`.
    // (Writers are serialized by `BEGIN IMMEDIATE`; there is no row to lock.)
    fn observation(&self, account: &str, organization: &str, product: &str) -> Result<Observation> {
        self.prepare_cached(
            "SELECT p.name, p.total, p.dedicated, p.shared_in_use, p.revision,
                    EXISTS (SELECT 1 FROM organizations o WHERE o.account = ?1 AND o.id = ?2),
                    a.dedicated, a.in_use, a.managed_by, a.version, a.deletion_policy,
                    a.expires_at, a.then_count
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
                        deletion_policy: policy(r, 10)?,
                        expiry: Expiry::from_stored(
                            r.get::<_, Option<String>>(11)?.as_deref(),
                            r.get(12)?,
                        ),
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

    fn audit_entries(&self, account: &str, after: i64, limit: i64) -> Result<Vec<AuditEntry>> {
        self.prepare_cached(
            "SELECT id, time, actor, action, organization, product, from_count, to_count,
                    rehomed, displaced, manager, idempotency_key, subject
             FROM audit WHERE account = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
        )
        .and_then(|mut s| {
            s.query_map(params![account, after, limit], |r| {
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
                    subject: r.get(12)?,
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
        let tokens = self.tokens(account)?;
        let keys = self
            .prepare("SELECT key, request_hash, response, created_at FROM idempotency WHERE account = ?1 ORDER BY key")
            .and_then(|mut s| {
                s.query_map([account], |r| {
                    Ok(KeyRow {
                        key: r.get(0)?,
                        request_hash: r.get(1)?,
                        answer: r.get(2)?,
                        created: r.get(3)?,
                    })
                })?
                .collect()
            })
            .map_err(failed)?;
        Ok(AccountRows {
            id: account.to_string(),
            revision,
            pools: snapshot.pools,
            organizations,
            allocations: snapshot.allocations,
            audit: self.audit_entries(account, 0, i64::MAX)?,
            tokens,
            keys,
        })
    }

    fn insert_account(&self, account: &str, revision: i64) -> Result<()> {
        self.run(
            "INSERT INTO accounts (id, revision) VALUES (?1, ?2)",
            params![account, revision],
        )
    }

    fn restore_audit(&self, account: &str, entries: &[AuditEntry]) -> Result<()> {
        for e in entries {
            self.run(
                "INSERT INTO audit (id, account, time, actor, action, organization, product, from_count, to_count, rehomed, displaced, manager, idempotency_key, subject)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
                params![e.id, account, e.time, e.actor, e.action.as_str(), e.organization, e.product, e.from, e.to, e.rehomed, e.displaced, e.manager, e.idempotency_key, e.subject],
            )?;
        }
        Ok(())
    }

    fn drop_account(&self, account: &str) -> Result<()> {
        self.clear_account(account)?;
        for table in ["idempotency", "tokens", "audit"] {
            self.run(
                &format!("DELETE FROM {table} WHERE account = ?1"),
                [account],
            )?;
        }
        self.run("DELETE FROM accounts WHERE id = ?1", [account])
    }
}
