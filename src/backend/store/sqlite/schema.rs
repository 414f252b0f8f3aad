//! The embedded store's schema: versioned migrations (`PRAGMA
//! user_version` counts those applied), applied on open under the write
//! lock, so processes opening the file together apply each exactly once;
//! and the checks that refuse, untouched, a file that is not a licensor
//! store or is newer than this licensor.

use std::path::Path;

use rusqlite::{Connection, TransactionBehavior};

use super::storage;
use crate::backend::BackendError;
use crate::backend::store::migrations as shared;

/// Schema migrations, applied in order; `user_version` counts those applied.
pub const MIGRATIONS: &[&str] = &[
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
    // Sign-in sessions of the License Management page: the cookie names a
    // row by its hash, so any process on the store serves it and sign-out
    // ends it everywhere.
    shared::SESSIONS,
    shared::DELETION_POLICY,
    shared::TOKEN_LIFECYCLE,
    shared::EXPIRY,
];

/// Refuses, before anything is written, a file that is not a licensor store
/// (another application's tables) or whose schema is newer than this
/// licensor's.
pub fn check_schema(conn: &Connection, path: &Path) -> Result<(), BackendError> {
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

/// Applies the migrations this file lacks, in one immediate transaction.
pub fn migrate(conn: &mut Connection, path: &Path) -> Result<(), BackendError> {
    let err = storage(path);
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
    tx.commit().map_err(&err)
}
