//! The embedded license backend: one SQLite file.
//!
//! Contract: the schema is versioned (`PRAGMA user_version`) and migrated on
//! open; the file runs in WAL mode; every check and write is one `BEGIN
//! IMMEDIATE` transaction that decides with [`crate::domain`] on rows read
//! inside it (R10), so concurrent writers, threads or processes, cannot
//! over-commit a pool by their own increases. A refusal rolls back: the file
//! keeps exactly the rows it had. Every change writes an audit row (R11);
//! accepted writes with an idempotency key are remembered and replayed.
//! `licensor serve` uses these same transaction functions.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use sha2::{Digest, Sha256};

use super::{AuditEntry, Backend, BackendError, Fixture, Written};
use crate::domain::{
    Action, Allocation, AllocationWrite, Observed, Pool, PoolView, Reason, Refusal, Request, Role,
    SeatChange, SeatTarget, Snapshot, Target, check_identifier, decide, decide_release,
    decide_seats, decide_total, did_you_mean, require_admin, unknown_product,
};

/// Schema migrations, applied in order; `user_version` counts those applied.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE accounts (
    id TEXT PRIMARY KEY
);
CREATE TABLE products (
    account TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    total INTEGER NOT NULL CHECK (total >= 0),
    shared_in_use INTEGER NOT NULL DEFAULT 0 CHECK (shared_in_use >= 0),
    -- sum(allocations.dedicated), kept in the same transactions so that a
    -- write reads its pool in O(1) instead of summing every allocation.
    dedicated INTEGER NOT NULL DEFAULT 0 CHECK (dedicated >= 0),
    PRIMARY KEY (account, name)
);
CREATE TABLE organizations (
    account TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    id TEXT NOT NULL,
    name TEXT,
    PRIMARY KEY (account, id)
);
CREATE TABLE allocations (
    account TEXT NOT NULL,
    organization TEXT NOT NULL,
    product TEXT NOT NULL,
    dedicated INTEGER NOT NULL CHECK (dedicated >= 0),
    in_use INTEGER NOT NULL CHECK (in_use >= 0),
    managed_by TEXT,
    version INTEGER NOT NULL,
    PRIMARY KEY (account, organization, product),
    FOREIGN KEY (account, organization) REFERENCES organizations(account, id) ON DELETE CASCADE,
    FOREIGN KEY (account, product) REFERENCES products(account, name) ON DELETE CASCADE
);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    account TEXT NOT NULL,
    time TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    organization TEXT,
    product TEXT,
    from_count INTEGER NOT NULL,
    to_count INTEGER NOT NULL,
    rehomed INTEGER NOT NULL DEFAULT 0,
    displaced INTEGER NOT NULL DEFAULT 0,
    manager TEXT,
    idempotency_key TEXT
);
CREATE INDEX audit_account ON audit(account, id);
CREATE TABLE idempotency (
    account TEXT NOT NULL,
    key TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    response TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (account, key)
);
CREATE TABLE tokens (
    hash TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    role TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at TEXT NOT NULL
);
"#,
    // Versions come from one sequence per account, so an allocation's version
    // (its ETag) never repeats: not after a delete and re-create, not after a
    // re-seed. A product's revision moves with every change in its pool.
    r#"
ALTER TABLE accounts ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;
ALTER TABLE products ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;
UPDATE accounts SET revision =
    (SELECT COALESCE(MAX(version), 0) FROM allocations WHERE allocations.account = accounts.id) + 1;
UPDATE products SET revision =
    (SELECT revision FROM accounts WHERE accounts.id = products.account);
"#,
];

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

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn hash(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
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
        check_schema(&conn, path)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(&err)?;
        // WAL with NORMAL survives a crash of any process; only a power loss
        // can lose the last commits, never corrupt the file.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(&err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(&err)?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&err)?;
        // Read again inside the write lock: another process may have migrated.
        let version: usize = tx
            .query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
            .map_err(&err)? as usize;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            tx.execute_batch(sql).map_err(&err)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)
                .map_err(&err)?;
        }
        tx.commit().map_err(&err)?;
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

    /// Runs `f` in one immediate transaction, committed only on success.
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

    /// Adds an organization to an account (R1: Account Admin only).
    pub fn create_organization(
        &self,
        account: &str,
        who: &Principal,
        id: &str,
        name: Option<&str>,
    ) -> Result<(), BackendError> {
        let err = storage(&self.path);
        self.transaction(true, |tx| {
            require_admin(who.role, "create organizations")?;
            check_identifier("organization id", id)?;
            if organization_exists(tx, account, id).map_err(&err)? {
                return Err(Refusal::new(
                    Reason::Invalid,
                    format!("organization {id} already exists"),
                )
                .into());
            }
            tx.execute(
                "INSERT INTO organizations (account, id, name) VALUES (?1, ?2, ?3)",
                params![account, id, name],
            )
            .map_err(&err)?;
            Ok(())
        })
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

    /// Decides and applies one allocation write; with `dry_run` it answers
    /// without writing. Steps: role (R1, before anything else, so a Viewer
    /// never receives an answer stored for an admin) -> replay of the key's
    /// first answer -> observe -> decide -> version check -> write -> audit
    /// -> remember the answer under the key. Every answer is remembered, a
    /// no-op included, so a retry gets what the first try got even if
    /// another writer moved the allocation since. Refusals are not
    /// remembered: they change nothing, so a retry is decided afresh and
    /// any version check still applies.
    pub fn write(
        &self,
        account: &str,
        who: &Principal,
        w: &AllocationWrite,
        dry_run: bool,
    ) -> Result<Written, BackendError> {
        let err = storage(&self.path);
        self.transaction(!dry_run, |tx| {
            require_admin(who.role, "change allocations")?;
            let request_hash = hash(&serde_json::to_string(w).unwrap_or_default());
            if let Some(key) = &w.idempotency_key
                && let Some(answer) = replay(tx, account, key, &request_hash)?
            {
                return Ok(answer);
            }
            let written = decide_and_write(tx, account, who, w)?;
            if let Some(key) = &w.idempotency_key {
                let response = serde_json::to_string(&written).unwrap_or_default();
                tx.prepare_cached(
                    "INSERT INTO idempotency (account, key, request_hash, response, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .and_then(|mut st| st.execute(params![account, key, request_hash, response, now()]))
                .map_err(&err)?;
            }
            Ok(written)
        })
    }

    /// Releases ownership of an allocation (deletionPolicy Orphan), decided
    /// by [`decide_release`].
    pub fn release(
        &self,
        account: &str,
        who: &Principal,
        organization: &str,
        product: &str,
        manager: &str,
    ) -> Result<(), BackendError> {
        let err = storage(&self.path);
        self.transaction(true, |tx| {
            let rows = Rows::read(tx, account, organization, product).map_err(&err)?;
            let dedicated = rows.allocation.as_ref().map_or(0, |a| a.dedicated);
            let request = Request {
                organization,
                product,
                target: Target::Count(dedicated),
                managed_by: Some(manager),
                allow_user_displacement: false,
            };
            if !decide_release(who.role, rows.seen(), &request)? {
                return Ok(());
            }
            let revision = next_revision(tx, account).map_err(&err)?;
            tx.execute(
                "UPDATE allocations SET managed_by = NULL, version = ?4 WHERE account = ?1 AND organization = ?2 AND product = ?3",
                params![account, organization, product, revision],
            )
            .map_err(&err)?;
            touch_pool(tx, account, product, revision).map_err(&err)?;
            audit(
                tx,
                account,
                who,
                Action::Orphan.as_str(),
                Some((organization, product)),
                (dedicated, dedicated),
                (0, 0),
                Some(manager),
                None,
            )
            .map_err(&err)?;
            Ok(())
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
        let err = storage(&self.path);
        self.transaction(true, |tx| {
            decide_total(who.role, total)?;
            let mut pool = read_pool(tx, account, product)
                .map_err(&err)?
                .ok_or_else(|| unknown_product(product))?;
            let from = pool.total;
            pool.total = total;
            pool.revision = next_revision(tx, account).map_err(&err)?;
            tx.execute(
                "UPDATE products SET total = ?3, revision = ?4 WHERE account = ?1 AND name = ?2",
                params![account, product, total, pool.revision],
            )
            .map_err(&err)?;
            audit(
                tx,
                account,
                who,
                "total",
                Some(("", product)),
                (from, total),
                (0, 0),
                None,
                None,
            )
            .map_err(&err)?;
            Ok(pool)
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
        let err = storage(&self.path);
        self.transaction(true, |tx| {
            require_admin(who.role, "change seats in use")?;
            let rows = Rows::read(tx, account, organization, product).map_err(&err)?;
            let action = match change {
                SeatChange::Claim(_) => "claim",
                SeatChange::Release(_) => "release",
            };
            let target = decide_seats(rows.seen(), organization, product, change)?;
            let revision = next_revision(tx, account).map_err(&err)?;
            touch_pool(tx, account, product, revision).map_err(&err)?;
            let (from, to) = match target {
                SeatTarget::Dedicated { in_use } => {
                    tx.execute(
                        "UPDATE allocations SET in_use = ?4, version = ?5 WHERE account = ?1 AND organization = ?2 AND product = ?3",
                        params![account, organization, product, in_use, revision],
                    )
                    .map_err(&err)?;
                    (rows.allocation.map_or(0, |a| a.in_use), in_use)
                }
                SeatTarget::Shared { shared_in_use } => {
                    tx.execute(
                        "UPDATE products SET shared_in_use = ?3 WHERE account = ?1 AND name = ?2",
                        params![account, product, shared_in_use],
                    )
                    .map_err(&err)?;
                    (rows.pool.map_or(0, |p| p.shared_in_use), shared_in_use)
                }
            };
            audit(tx, account, who, action, Some((organization, product)), (from, to), (0, 0), None, None)
                .map_err(&err)?;
            Ok(())
        })
    }

    /// Replaces one account's contents with a fixture, in one transaction.
    pub fn seed(&self, who: &Principal, fixture: &Fixture) -> Result<(), BackendError> {
        let err = storage(&self.path);
        fixture.validate()?;
        self.transaction(true, |tx| {
            require_admin(who.role, "seed the account")?;
            let account = fixture.account.as_str();
            for table in ["allocations", "organizations", "products"] {
                tx.execute(&format!("DELETE FROM {table} WHERE account = ?1"), [account])
                    .map_err(&err)?;
            }
            tx.execute("INSERT OR IGNORE INTO accounts (id) VALUES (?1)", [account])
                .map_err(&err)?;
            // The account's sequence goes on across a re-seed, so nothing
            // seeded now has a version or revision that was handed out before.
            for p in &fixture.products {
                let dedicated: i64 = fixture
                    .organizations
                    .iter()
                    .flat_map(|o| &o.allocations)
                    .filter(|a| a.product == p.name)
                    .map(|a| a.dedicated)
                    .sum();
                let revision = next_revision(tx, account).map_err(&err)?;
                tx.execute(
                    "INSERT INTO products (account, name, total, shared_in_use, dedicated, revision) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![account, p.name, p.total, p.shared_in_use, dedicated, revision],
                )
                .map_err(&err)?;
            }
            for o in &fixture.organizations {
                tx.execute(
                    "INSERT INTO organizations (account, id, name) VALUES (?1, ?2, ?3)",
                    params![account, o.id, o.name],
                )
                .map_err(&err)?;
                for a in &o.allocations {
                    let version = next_revision(tx, account).map_err(&err)?;
                    tx.execute(
                        "INSERT INTO allocations (account, organization, product, dedicated, in_use, managed_by, version) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                        params![account, o.id, a.product, a.dedicated, a.in_use, a.managed_by, version],
                    )
                    .map_err(&err)?;
                }
            }
            audit(tx, account, who, "seed", None, (0, 0), (0, 0), None, None).map_err(&err)?;
            Ok(())
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
                    action: r.get(3)?,
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

/// Refuses, before anything is written, a file that is not a licensor store
/// (another application's tables) or whose schema is newer than this
/// licensor's.
fn check_schema(conn: &Connection, path: &Path) -> Result<(), BackendError> {
    let err = storage(path);
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(&err)?;
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")
        .and_then(|mut st| st.query_map([], |r| r.get(0))?.collect())
        .map_err(&err)?;
    let ours = ["accounts", "allocations", "products"]
        .iter()
        .all(|t| tables.iter().any(|x| x == t));
    if (version == 0 && !tables.is_empty()) || (version > 0 && !ours) {
        return Err(BackendError::Unavailable(format!(
            "{} is not a licensor store (it holds the tables {}); licensor leaves it untouched: name another file",
            path.display(),
            tables.join(", ")
        )));
    }
    if version as usize > MIGRATIONS.len() {
        return Err(BackendError::Unavailable(format!(
            "{}: schema version {version} is newer than this licensor ({}); upgrade licensor",
            path.display(),
            MIGRATIONS.len()
        )));
    }
    Ok(())
}

/// The first answer to `key`, if it was used for this same request; a
/// different request under the key is an error.
fn replay(
    tx: &Transaction<'_>,
    account: &str,
    key: &str,
    request_hash: &str,
) -> Result<Option<Written>, BackendError> {
    let seen: Option<(String, String)> = tx
        .prepare_cached(
            "SELECT request_hash, response FROM idempotency WHERE account = ?1 AND key = ?2",
        )
        .and_then(|mut st| {
            st.query_row([account, key], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
        .map_err(|e| BackendError::Unavailable(format!("reading idempotency keys: {e}")))?;
    let Some((h, response)) = seen else {
        return Ok(None);
    };
    if h != request_hash {
        return Err(BackendError::KeyReused(key.to_string()));
    }
    let mut written: Written = serde_json::from_str(&response).map_err(|e| {
        BackendError::Unavailable(format!("stored idempotent answer unreadable: {e}"))
    })?;
    written.replayed = true;
    Ok(Some(written))
}

/// Observes, decides with [`decide`], checks the version and writes one
/// allocation change with its audit entry; a no-op writes nothing.
fn decide_and_write(
    tx: &Transaction<'_>,
    account: &str,
    who: &Principal,
    w: &AllocationWrite,
) -> Result<Written, BackendError> {
    let err = |e: rusqlite::Error| BackendError::Unavailable(format!("writing an allocation: {e}"));
    let rows = Rows::read(tx, account, &w.organization, &w.product).map_err(err)?;
    let effect = decide(who.role, rows.seen(), &w.request())?;
    let Rows {
        pool,
        allocation: current,
        ..
    } = rows;
    if let Some(expected) = w.expected_version {
        let actual = current.as_ref().map_or(0, |a| a.version);
        if expected != actual {
            return Err(BackendError::Stale { expected, actual });
        }
    }
    let mut pool = pool.ok_or_else(|| unknown_product(&w.product))?;
    if effect.is_noop() {
        return Ok(Written {
            effect,
            allocation: current,
            pool: PoolView::from(&pool),
            replayed: false,
        });
    }
    let revision = next_revision(tx, account).map_err(err)?;
    pool.book(&effect);
    pool.revision = revision;
    tx.prepare_cached(
        "UPDATE products SET dedicated = ?3, shared_in_use = ?4, revision = ?5 WHERE account = ?1 AND name = ?2",
    )
    .and_then(|mut st| {
        st.execute(params![account, w.product, pool.dedicated, pool.shared_in_use, revision])
    })
    .map_err(err)?;
    let allocation = match w.target {
        Target::Remove => {
            tx.prepare_cached(
                "DELETE FROM allocations WHERE account = ?1 AND organization = ?2 AND product = ?3",
            )
            .and_then(|mut st| st.execute(params![account, w.organization, w.product]))
            .map_err(err)?;
            None
        }
        Target::Count(to) => {
            let allocation = Allocation {
                organization: w.organization.clone(),
                product: w.product.clone(),
                dedicated: to,
                in_use: effect.in_use,
                managed_by: w
                    .managed_by
                    .clone()
                    .or_else(|| current.as_ref().and_then(|a| a.managed_by.clone())),
                version: revision,
            };
            tx.prepare_cached(
                "INSERT INTO allocations (account, organization, product, dedicated, in_use, managed_by, version)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (account, organization, product) DO UPDATE SET
                   dedicated = excluded.dedicated, in_use = excluded.in_use,
                   managed_by = excluded.managed_by, version = excluded.version",
            )
            .and_then(|mut st| {
                st.execute(params![
                    account,
                    allocation.organization,
                    allocation.product,
                    allocation.dedicated,
                    allocation.in_use,
                    allocation.managed_by,
                    allocation.version
                ])
            })
            .map_err(err)?;
            Some(allocation)
        }
    };
    let action = match effect.action {
        Action::None if effect.adopted => "adopt",
        other => other.as_str(),
    };
    audit(
        tx,
        account,
        who,
        action,
        Some((&w.organization, &w.product)),
        (effect.from, effect.to),
        (effect.rehomed, effect.displaced),
        w.managed_by.as_deref(),
        w.idempotency_key.as_deref(),
    )
    .map_err(err)?;
    Ok(Written {
        effect,
        allocation,
        pool: PoolView::from(&pool),
        replayed: false,
    })
}

fn allocation_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Allocation> {
    Ok(Allocation {
        organization: r.get(0)?,
        product: r.get(1)?,
        dedicated: r.get(2)?,
        in_use: r.get(3)?,
        managed_by: r.get(4)?,
        version: r.get(5)?,
    })
}

/// A pool from the columns name, total, dedicated, shared_in_use, revision.
fn pool_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Pool> {
    Ok(Pool {
        product: r.get(0)?,
        total: r.get(1)?,
        dedicated: r.get(2)?,
        shared_in_use: r.get(3)?,
        revision: r.get(4)?,
    })
}

fn read_pool(tx: &Transaction<'_>, account: &str, product: &str) -> rusqlite::Result<Option<Pool>> {
    tx.prepare_cached(
        "SELECT name, total, dedicated, shared_in_use, revision FROM products WHERE account = ?1 AND name = ?2",
    )?
    .query_row([account, product], pool_row)
    .optional()
}

/// The next value of the account's sequence: every version and pool
/// revision is one, so none ever repeats in the account.
fn next_revision(tx: &Transaction<'_>, account: &str) -> rusqlite::Result<i64> {
    tx.prepare_cached(
        "UPDATE accounts SET revision = revision + 1 WHERE id = ?1 RETURNING revision",
    )?
    .query_row([account], |r| r.get(0))
}

/// Marks a change in `product`'s pool at `revision`.
fn touch_pool(
    tx: &Transaction<'_>,
    account: &str,
    product: &str,
    revision: i64,
) -> rusqlite::Result<()> {
    tx.prepare_cached("UPDATE products SET revision = ?3 WHERE account = ?1 AND name = ?2")?
        .execute(params![account, product, revision])?;
    Ok(())
}

fn organization_exists(tx: &Transaction<'_>, account: &str, org: &str) -> rusqlite::Result<bool> {
    tx.prepare_cached("SELECT 1 FROM organizations WHERE account = ?1 AND id = ?2")?
        .exists([account, org])
}

/// What one request is decided on, read inside its transaction: the
/// product's pool, whether the organization exists, and the allocation.
struct Rows {
    pool: Option<Pool>,
    organization_exists: bool,
    allocation: Option<Allocation>,
}

impl Rows {
    fn read(
        tx: &Transaction<'_>,
        account: &str,
        org: &str,
        product: &str,
    ) -> rusqlite::Result<Rows> {
        Ok(Rows {
            pool: read_pool(tx, account, product)?,
            organization_exists: organization_exists(tx, account, org)?,
            allocation: read_allocation(tx, account, org, product)?,
        })
    }

    fn seen(&self) -> Observed<'_> {
        Observed {
            pool: self.pool.as_ref(),
            organization_exists: self.organization_exists,
            allocation: self.allocation.as_ref(),
        }
    }
}

fn read_allocation(
    tx: &Transaction<'_>,
    account: &str,
    org: &str,
    product: &str,
) -> rusqlite::Result<Option<Allocation>> {
    tx.prepare_cached(
        "SELECT organization, product, dedicated, in_use, managed_by, version FROM allocations
         WHERE account = ?1 AND organization = ?2 AND product = ?3",
    )?
    .query_row([account, org, product], allocation_row)
    .optional()
}

#[allow(clippy::too_many_arguments)]
fn audit(
    tx: &Transaction<'_>,
    account: &str,
    who: &Principal,
    action: &str,
    subject: Option<(&str, &str)>,
    (from, to): (i64, i64),
    (rehomed, displaced): (i64, i64),
    manager: Option<&str>,
    key: Option<&str>,
) -> rusqlite::Result<()> {
    let (org, product) = match subject {
        Some((o, p)) => (Some(o).filter(|o| !o.is_empty()), Some(p)),
        None => (None, None),
    };
    tx.prepare_cached(
        "INSERT INTO audit (account, time, actor, action, organization, product, from_count, to_count, rehomed, displaced, manager, idempotency_key)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?
    .execute(params![account, now(), who.actor, action, org, product, from, to, rehomed, displaced, manager, key])?;
    Ok(())
}

/// The embedded store as a [`Backend`] for one account.
#[derive(Clone)]
pub struct SqliteBackend {
    store: Arc<Store>,
    account: Option<String>,
    principal: Principal,
    token: Option<String>,
}

impl SqliteBackend {
    /// Opens the file (creating it only with `create`). Without `account`,
    /// the file's only account is used. With a token, its role applies;
    /// without, local access is the admin.
    pub fn open(
        path: &Path,
        create: bool,
        account: Option<&str>,
        token: Option<&str>,
    ) -> Result<SqliteBackend, BackendError> {
        let store = if create {
            Store::open(path)?
        } else {
            Store::open_existing(path)?
        };
        Ok(SqliteBackend {
            store: Arc::new(store),
            account: account.map(str::to_string),
            principal: Principal::local(),
            token: token.map(str::to_string),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The account and the principal acting on it.
    fn session(&self) -> Result<(String, Principal), BackendError> {
        let account = self.store.resolve_account(self.account.as_deref())?;
        let principal = match &self.token {
            Some(t) => self.store.authenticate(&account, t)?,
            None => self.principal.clone(),
        };
        Ok((account, principal))
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store, String, Principal) -> Result<T, BackendError> + Send + 'static,
    ) -> Result<T, BackendError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let (account, principal) = this.session()?;
            f(&this.store, account, principal)
        })
        .await
        .map_err(|e| BackendError::Unavailable(format!("store task failed: {e}")))?
    }
}

#[async_trait]
impl Backend for SqliteBackend {
    fn location(&self) -> String {
        format!("sqlite:{}", self.store.path.display())
    }

    async fn snapshot(&self) -> Result<Snapshot, BackendError> {
        self.blocking(|s, account, _| s.snapshot(&account)).await
    }

    async fn observe(&self, organization: &str, product: &str) -> Result<Snapshot, BackendError> {
        let (o, p) = (organization.to_string(), product.to_string());
        self.blocking(move |s, account, _| s.observe(&account, &o, &p))
            .await
    }

    async fn write(&self, write: &AllocationWrite) -> Result<Written, BackendError> {
        let write = write.clone();
        self.blocking(move |s, account, who| s.write(&account, &who, &write, false))
            .await
    }

    async fn release(
        &self,
        organization: &str,
        product: &str,
        manager: &str,
    ) -> Result<(), BackendError> {
        let (o, p, m) = (
            organization.to_string(),
            product.to_string(),
            manager.to_string(),
        );
        self.blocking(move |s, account, who| s.release(&account, &who, &o, &p, &m))
            .await
    }

    async fn set_total(&self, product: &str, total: i64) -> Result<PoolView, BackendError> {
        let product = product.to_string();
        self.blocking(move |s, account, who| s.set_total(&account, &who, &product, total))
            .await
            .map(|pool| PoolView::from(&pool))
    }

    async fn seats(
        &self,
        organization: &str,
        product: &str,
        change: SeatChange,
    ) -> Result<(), BackendError> {
        let (o, p) = (organization.to_string(), product.to_string());
        self.blocking(move |s, account, who| s.seats(&account, &who, &o, &p, change))
            .await
    }

    async fn seed(&self, fixture: &Fixture) -> Result<(), BackendError> {
        if let Some(a) = &self.account
            && *a != fixture.account
        {
            return Err(Refusal::new(
                Reason::Invalid,
                format!(
                    "the fixture is for account {:?}, not {a:?}",
                    fixture.account
                ),
            )
            .into());
        }
        let fixture = fixture.clone();
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let who = match &this.token {
                Some(t) => this.store.authenticate(&fixture.account, t)?,
                None => this.principal.clone(),
            };
            this.store.seed(&who, &fixture)
        })
        .await
        .map_err(|e| BackendError::Unavailable(format!("store task failed: {e}")))?
    }

    async fn audit(&self) -> Result<Vec<AuditEntry>, BackendError> {
        self.blocking(|s, account, _| s.audit(&account)).await
    }
}
