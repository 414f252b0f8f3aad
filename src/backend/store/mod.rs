//! The embedded license store: one SQLite file.
//!
//! Contract: the schema is versioned and migrated on open ([`schema`]), and
//! a file that is not a licensor store, or is newer, is refused untouched;
//! the file runs in WAL mode; every check and write is one `BEGIN
//! IMMEDIATE` transaction running the shared write pipeline
//! ([`pipeline`]) over this store's SQL ([`rows`]), which decides with
//! [`crate::domain`] on rows read inside it (R10), so concurrent writers,
//! threads or processes, cannot over-commit a pool by their own increases.
//! A refusal rolls back: the file keeps exactly the rows it had. Every
//! change writes an audit record ([`audit`], R11); answers to idempotency
//! keys are remembered and replayed. `licensor serve` uses these same
//! transaction functions.

pub mod audit;
pub mod pipeline;
pub mod rows;
pub mod schema;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

use super::{AuditEntry, BackendError, Fixture, Written};
use crate::domain::{
    Allocation, AllocationWrite, Pool, Reason, Refusal, Role, SeatChange, Snapshot, did_you_mean,
};
use pipeline::hash;
use rows::{allocation_row, now, pool_row};

/// Who is acting on the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Shown in the audit log; never the token.
    pub actor: String,
    pub role: Role,
}

impl Principal {
    /// Whoever can open the file can change it anyway, so local access
    /// without a token acts as the Account Admin.
    pub fn local() -> Principal {
        Principal {
            actor: "local".into(),
            role: Role::AccountAdmin,
        }
    }
}

/// The SQLite file and its transaction functions.
pub struct Store {
    conn: Mutex<Connection>,
    path: PathBuf,
}

fn storage(path: &Path) -> impl Fn(rusqlite::Error) -> BackendError + '_ {
    move |e| BackendError::Unavailable(format!("{}: {e}", path.display()))
}

impl Store {
    /// Opens (creating if needed) and migrates the file: for the commands
    /// that own a store (`backend seed`, `token create`, `serve`, `operator`).
    pub fn open(path: &Path) -> Result<Store, BackendError> {
        Store::open_with(path, true)
    }

    /// Opens an existing store and migrates it; a missing file is an error
    /// and is not created (commands that read, or that write into an account
    /// that must already be there).
    pub fn open_existing(path: &Path) -> Result<Store, BackendError> {
        Store::open_with(path, false)
    }

    fn open_with(path: &Path, create: bool) -> Result<Store, BackendError> {
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
        Ok(Store {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        let mut conn = self
            .conn
            .lock()
            .map_err(|_| BackendError::Unavailable("store lock poisoned".into()))?;
        f(&mut conn)
    }

    /// Runs `f` in one immediate transaction, committed only on success
    /// and when `commit` (a dry run is rolled back).
    fn transaction<T>(
        &self,
        commit: bool,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        let err = storage(&self.path);
        self.with(|conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(&err)?;
            let out = f(&tx)?;
            if commit {
                tx.commit().map_err(&err)?;
            }
            Ok(out)
        })
    }

    /// Decides and applies one allocation write ([`pipeline::write`]); with
    /// `dry_run` it answers without writing.
    pub fn write(
        &self,
        account: &str,
        who: &Principal,
        w: &AllocationWrite,
        dry_run: bool,
    ) -> Result<Written, BackendError> {
        self.transaction(!dry_run, |tx| pipeline::write(tx, account, who, w))
    }

    /// Releases ownership of an allocation (deletionPolicy Orphan).
    pub fn release(
        &self,
        account: &str,
        who: &Principal,
        organization: &str,
        product: &str,
        manager: &str,
    ) -> Result<(), BackendError> {
        self.transaction(true, |tx| {
            pipeline::release(tx, account, who, organization, product, manager)
        })
    }

    /// Sets a product's total (R1, R9).
    pub fn set_total(
        &self,
        account: &str,
        who: &Principal,
        product: &str,
        total: i64,
    ) -> Result<Pool, BackendError> {
        self.transaction(true, |tx| {
            pipeline::set_total(tx, account, who, product, total)
        })
    }

    /// Claims or releases seats in use.
    pub fn seats(
        &self,
        account: &str,
        who: &Principal,
        organization: &str,
        product: &str,
        change: SeatChange,
    ) -> Result<(), BackendError> {
        self.transaction(true, |tx| {
            pipeline::seats(tx, account, who, organization, product, change)
        })
    }

    /// Replaces one account's contents with a fixture, in one transaction.
    pub fn seed(&self, who: &Principal, fixture: &Fixture) -> Result<(), BackendError> {
        self.transaction(true, |tx| pipeline::seed(tx, who, fixture))
    }

    /// Adds an organization to an account (R1: Account Admin only).
    pub fn create_organization(
        &self,
        account: &str,
        who: &Principal,
        id: &str,
        name: Option<&str>,
    ) -> Result<(), BackendError> {
        self.transaction(true, |tx| {
            pipeline::create_organization(tx, account, who, id, name)
        })
    }

    /// Account ids in the file.
    pub fn accounts(&self) -> Result<Vec<String>, BackendError> {
        let err = storage(&self.path);
        self.with(|conn| {
            let mut stmt = conn
                .prepare("SELECT id FROM accounts ORDER BY id")
                .map_err(&err)?;
            let rows = stmt.query_map([], |r| r.get(0)).map_err(&err)?;
            rows.collect::<Result<_, _>>().map_err(&err)
        })
    }

    /// The account to use: the one named, or the only one in the file.
    pub fn resolve_account(&self, named: Option<&str>) -> Result<String, BackendError> {
        let accounts = self.accounts()?;
        match named {
            Some(a) if accounts.iter().any(|x| x == a) => Ok(a.to_string()),
            // A store that holds no account yet is waiting to be seeded;
            // one that holds others was given a wrong name: a person fixes it.
            Some(a) if accounts.is_empty() => Err(BackendError::Unavailable(format!(
                "{}: holds no account yet; load {a:?} with `licensor backend seed -f FIXTURE`",
                self.path.display()
            ))),
            Some(a) => Err(Refusal::new(
                Reason::UnknownAccount,
                format!(
                    "{} has no account {a:?}{} (accounts: {}); check --account",
                    self.path.display(),
                    did_you_mean(a, accounts.iter().map(String::as_str)),
                    accounts.join(", ")
                ),
            )
            .into()),
            None => match accounts.as_slice() {
                [one] => Ok(one.clone()),
                [] => Err(BackendError::Unavailable(format!(
                    "{}: holds no account yet; load one with `licensor backend seed -f FIXTURE`",
                    self.path.display()
                ))),
                many => Err(BackendError::Unavailable(format!(
                    "{}: holds several accounts ({}); choose one with --account",
                    self.path.display(),
                    many.join(", ")
                ))),
            },
        }
    }

    /// Maps a bearer token to its principal; only the hash is stored.
    pub fn authenticate(&self, account: &str, token: &str) -> Result<Principal, BackendError> {
        let err = storage(&self.path);
        let found: Option<(String, String, String)> = self.with(|conn| {
            conn.query_row(
                "SELECT account, role, name FROM tokens WHERE hash = ?1",
                [hash(token)],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(&err)
        })?;
        match found {
            Some((a, role, name)) if a == account => Ok(Principal {
                actor: format!("token:{name}"),
                role: Role::parse(&role).unwrap_or(Role::Viewer),
            }),
            _ => Err(BackendError::Unauthorized(
                "the token is unknown or not for this account".into(),
            )),
        }
    }

    /// Creates a token and returns it; it is shown once and stored hashed.
    pub fn create_token(
        &self,
        account: &str,
        role: Role,
        name: &str,
    ) -> Result<String, BackendError> {
        let mut bytes = [0u8; 24];
        getrandom::fill(&mut bytes)
            .map_err(|e| BackendError::Unavailable(format!("no randomness: {e}")))?;
        let token = format!("lsr_{}", hex::encode(bytes));
        let err = storage(&self.path);
        self.transaction(true, |tx| {
            tx.execute(
                "INSERT INTO tokens (hash, account, role, name, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![hash(&token), account, role.as_str(), name, now()],
            )
            .map_err(&err)?;
            Ok(())
        })?;
        Ok(token)
    }

    /// Forgets idempotency keys older than `age`; they are kept at least that long.
    pub fn expire_idempotency_keys(&self, age: chrono::Duration) -> Result<usize, BackendError> {
        let err = storage(&self.path);
        let cutoff =
            (chrono::Utc::now() - age).to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        self.transaction(true, |tx| {
            tx.execute("DELETE FROM idempotency WHERE created_at < ?1", [cutoff])
                .map_err(&err)
        })
    }

    /// Pools, organizations and allocations of one account.
    pub fn snapshot(&self, account: &str) -> Result<Snapshot, BackendError> {
        let err = storage(&self.path);
        self.with(|conn| {
            let tx = conn.transaction().map_err(&err)?;
            let pools = {
                let mut s = tx
                    .prepare_cached("SELECT name, total, dedicated, shared_in_use, revision FROM products WHERE account = ?1 ORDER BY name")
                    .map_err(&err)?;
                s.query_map([account], pool_row)
                .map_err(&err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(&err)?
            };
            let organizations = {
                let mut s = tx
                    .prepare_cached("SELECT id FROM organizations WHERE account = ?1 ORDER BY id")
                    .map_err(&err)?;
                s.query_map([account], |r| r.get(0))
                    .map_err(&err)?
                    .collect::<Result<Vec<String>, _>>()
                    .map_err(&err)?
            };
            let allocations = {
                let mut s = tx
                    .prepare_cached("SELECT organization, product, dedicated, in_use, managed_by, version FROM allocations WHERE account = ?1 ORDER BY organization, product")
                    .map_err(&err)?;
                s.query_map([account], allocation_row)
                    .map_err(&err)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(&err)?
            };
            Ok(Snapshot {
                pools,
                organizations,
                allocations,
            })
        })
    }

    /// The part of the account one allocation is decided on: its product's
    /// pool, whether its organization exists, and the allocation itself.
    pub fn observe(
        &self,
        account: &str,
        organization: &str,
        product: &str,
    ) -> Result<Snapshot, BackendError> {
        let err = storage(&self.path);
        // One statement, so one consistent read without a transaction: this
        // is the hot path of the operator and of `GET .../allocations/{product}`.
        self.with(|conn| {
            let mut s = conn
                .prepare_cached(
                    "SELECT p.name, p.total, p.dedicated, p.shared_in_use, p.revision,
                            EXISTS (SELECT 1 FROM organizations o WHERE o.account = ?1 AND o.id = ?2),
                            a.dedicated, a.in_use, a.managed_by, a.version
                     FROM (SELECT 1)
                     LEFT JOIN products p ON p.account = ?1 AND p.name = ?3
                     LEFT JOIN allocations a ON a.account = ?1 AND a.organization = ?2 AND a.product = ?3",
                )
                .map_err(&err)?;
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
                    }),
                    None => None,
                };
                Ok(Snapshot {
                    pools: pool.into_iter().collect(),
                    organizations: r
                        .get::<_, bool>(5)?
                        .then(|| organization.to_string())
                        .into_iter()
                        .collect(),
                    allocations: allocation.into_iter().collect(),
                })
            })
            .map_err(&err)
        })
    }

    /// The audit log of one account, oldest first.
    pub fn audit(&self, account: &str) -> Result<Vec<AuditEntry>, BackendError> {
        let err = storage(&self.path);
        self.with(|conn| {
            let mut s = conn
                .prepare(
                    "SELECT id, time, actor, action, organization, product, from_count, to_count,
                            rehomed, displaced, manager, idempotency_key
                     FROM audit WHERE account = ?1 ORDER BY id",
                )
                .map_err(&err)?;
            s.query_map([account], |r| {
                Ok(AuditEntry {
                    id: r.get(0)?,
                    time: r.get(1)?,
                    actor: r.get(2)?,
                    action: {
                        let text: String = r.get(3)?;
                        audit::AuditAction::parse(&text).ok_or_else(|| {
                            rusqlite::Error::FromSqlConversionFailure(
                                3,
                                rusqlite::types::Type::Text,
                                format!("unknown audit action {text:?}").into(),
                            )
                        })?
                    },
                    organization: r.get(4)?,
                    product: r.get(5)?,
                    from: r.get(6)?,
                    to: r.get(7)?,
                    rehomed: r.get(8)?,
                    displaced: r.get(9)?,
                    manager: r.get(10)?,
                    idempotency_key: r.get(11)?,
                })
            })
            .map_err(&err)?
            .collect::<Result<_, _>>()
            .map_err(&err)
        })
    }
}
