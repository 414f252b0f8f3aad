//! The store on PostgreSQL: the same pipeline and the same rules as the
//! embedded file, over a server that several processes and machines share.
//!
//! Contract:
//! - **Connection.** A `postgres://` or `postgresql://` URL, or libpq-style
//!   `key=value` parameters. The password comes from the URL, or else from
//!   `PGPASSWORD`, or else from a libpq password file (`passfile=`,
//!   `PGPASSFILE`, `~/.pgpass`). `sslmode` follows libpq: `disable`, `prefer` (the
//!   default), `require` (encrypted, not verified), `verify-ca` (the chain
//!   must lead to `sslrootcert`), and `verify-full` (that, and the host name
//!   too). TLS is rustls. A location is never shown with its password.
//! - **Concurrency (R10).** Every write is one READ COMMITTED transaction
//!   that locks its product's pool row (`SELECT ... FOR UPDATE`) before it
//!   reads anything else, and then takes the next value of the account's
//!   sequence, which locks the account row. Two writers of one pool
//!   therefore run one after the other, each deciding on rows committed
//!   before it, so their own increases can never over-commit the pool. A
//!   row lock was chosen over SERIALIZABLE because a refusal must report
//!   the real state of the pool; SERIALIZABLE would answer a conflict that
//!   the client then has to retry. Every writer locks in the same order
//!   (pool rows by name, then the account row), seeds included, so writers
//!   cannot deadlock.
//! - **A queue per pool.** Before its row, a writer takes the pool's
//!   transaction-scoped advisory lock ([`POOL_QUEUE`]). PostgreSQL hands a
//!   freed advisory lock to the transaction that has waited longest, while
//!   a freed row goes to whichever asks first, so without the queue one
//!   process could take a pool again and again while another's batch
//!   waited (with three `licensor serve` replicas: p99 21 to 24 ms, 16 to
//!   19 with it). It orders writers and decides nothing: the row lock
//!   still does that. Writers take the queues (by pool name) before any
//!   row, and seeds take none, so the lock order stays one order.
//! - **Round trips.** Each process keeps a few connections ([`Conns`]) and
//!   pipelines its statements ([`conn`]): the lock of a pool row is held
//!   for two round trips per transaction (the observation, then the writes
//!   with `COMMIT`), writes that arrive together share a transaction
//!   (see `store::batch`), and the allocations and audit records of a
//!   transaction go out as one statement each ([`gather`]).
//! - **Migrations.** Versioned in `licensor_schema` and applied under a
//!   transaction-scoped advisory lock, so processes starting together apply
//!   each migration exactly once. A database whose schema is newer than this
//!   licensor is refused before anything is written.

pub mod conn;
pub mod connect;
mod gather;

use std::cell::RefCell;

use tokio_postgres::{Row, SimpleQueryMessage};

use super::audit::{AuditAction, AuditRecord};
use std::collections::HashMap;

use super::storage::{
    AccountRows, KeyRow, Observation, Observations, Result, SessionRow, Storage, TokenRow, now,
    stored_role,
};
use crate::backend::{AuditEntry, BackendError};
use crate::domain::{Allocation, DeletionPolicy, Expiry, Pool, Snapshot};
use conn::{Answer, Param, Request, params};
pub use conn::{Conn, Conns};
use connect::invalid;
pub use connect::{connect, describe, opener, pool_size};
use gather::Gathered;

/// Schema migrations, applied in order; `licensor_schema.version` counts
/// those applied.
pub const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE accounts (
    id TEXT PRIMARY KEY,
    -- The sequence every version and pool revision is drawn from.
    revision BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE products (
    account TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    total BIGINT NOT NULL CHECK (total >= 0),
    shared_in_use BIGINT NOT NULL DEFAULT 0 CHECK (shared_in_use >= 0),
    dedicated BIGINT NOT NULL DEFAULT 0 CHECK (dedicated >= 0),
    revision BIGINT NOT NULL DEFAULT 0,
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
    dedicated BIGINT NOT NULL CHECK (dedicated >= 0),
    in_use BIGINT NOT NULL CHECK (in_use >= 0),
    managed_by TEXT,
    version BIGINT NOT NULL,
    PRIMARY KEY (account, organization, product),
    FOREIGN KEY (account, organization) REFERENCES organizations(account, id) ON DELETE CASCADE,
    FOREIGN KEY (account, product) REFERENCES products(account, name) ON DELETE CASCADE
);
CREATE TABLE audit (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account TEXT NOT NULL,
    time TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    organization TEXT,
    product TEXT,
    from_count BIGINT NOT NULL,
    to_count BIGINT NOT NULL,
    rehomed BIGINT NOT NULL DEFAULT 0,
    displaced BIGINT NOT NULL DEFAULT 0,
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
    super::migrations::SESSIONS,
    super::migrations::DELETION_POLICY,
    super::migrations::TOKEN_LIFECYCLE,
    super::migrations::EXPIRY,
];

/// The advisory lock migrations run under (an arbitrary constant of ours).
const MIGRATION_LOCK: i64 = 0x6c69_6365_6e73_6f72;

/// The class of the advisory lock a seed (or a copy into the store) takes
/// first, keyed by its account's hash. A seed replaces the pool rows the
/// next one must lock: two seeds that each locked the rows they saw could
/// lock different generations of them, and the later one's pool rows be
/// held by the earlier while it waits for the account row. Seeds of one
/// account go one at a time; writers never take this lock.
const SEED_LOCK: i32 = 0x6c69_6365;

/// Whether the database holds a licensor store (its schema table).
pub fn holds_a_store(conn: &mut Conn, location: &str) -> std::result::Result<bool, BackendError> {
    let answer = conn
        .simple_query("SELECT to_regclass('licensor_schema') IS NOT NULL")
        .map_err(|e| invalid(location, describe(&e)))?;
    Ok(first_value(&answer).as_deref() == Some("t"))
}

/// The first column of the first row of a simple query's answer.
fn first_value(answer: &[SimpleQueryMessage]) -> Option<String> {
    answer.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    })
}

/// Applies the migrations the database lacks, under the advisory lock;
/// refuses one whose schema is newer than this licensor.
pub fn migrate(conn: &mut Conn, location: &str) -> std::result::Result<(), BackendError> {
    let failed = |e: tokio_postgres::Error| invalid(location, describe(&e));
    let applied = (|| {
        let answer = conn
            .simple_query(&format!(
                "BEGIN;
                 SELECT pg_advisory_xact_lock({MIGRATION_LOCK});
                 CREATE TABLE IF NOT EXISTS licensor_schema (version INTEGER NOT NULL);
                 SELECT version FROM licensor_schema;"
            ))
            .map_err(failed)?;
        // The lock's row (an empty value) comes first, then the version.
        let version: usize = answer
            .iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get(0),
                _ => None,
            })
            .nth(1)
            .map_or(Ok(0), str::parse)
            .map_err(|e| invalid(location, format!("licensor_schema: {e}")))?;
        if version > MIGRATIONS.len() {
            return Err(invalid(
                location,
                format!(
                    "schema version {version} is newer than this licensor ({}); upgrade licensor",
                    MIGRATIONS.len()
                ),
            ));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            conn.simple_query(sql).map_err(failed)?;
            conn.simple_query(&format!(
                "DELETE FROM licensor_schema; INSERT INTO licensor_schema (version) VALUES ({})",
                i + 1
            ))
            .map_err(failed)?;
        }
        conn.simple_query("COMMIT").map_err(failed).map(drop)
    })();
    if applied.is_err() {
        let _ = conn.simple_query("ROLLBACK");
    }
    applied
}

/// How a [`Pg`] runs its statements.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Outside a transaction: each statement reads on its own, and the
    /// reads that take several statements run in a read-only REPEATABLE
    /// READ transaction of their own (one round trip all the same).
    Reads,
    /// Inside a write transaction (READ COMMITTED) that locks the pool row
    /// a request is decided on.
    Writes,
}

/// The storage interface over one connection.
pub struct Pg<'c> {
    conn: RefCell<&'c mut Conn>,
    mode: Mode,
    /// Values of the account's sequence (next, last) taken with a write's
    /// observations (one round trip fewer while the pool row is locked);
    /// [`Storage::next_revision`] hands them out. Unused ones are gaps; a
    /// transaction rolled back returns them.
    reserved: std::cell::Cell<Option<(i64, i64)>>,
    /// The pools (account, product) whose rows this write transaction has
    /// locked, as it last read or wrote them: read again, they are taken
    /// from here (the lock keeps them as they are).
    locked: RefCell<HashMap<(String, String), Option<Pool>>>,
    /// The allocations and audit records written so far, to go out as one
    /// statement each ([`gather`]).
    gathered: RefCell<Gathered>,
}

fn failed(e: tokio_postgres::Error) -> BackendError {
    BackendError::Unavailable(format!("the store: {}", describe(&e)))
}

impl<'c> Pg<'c> {
    /// Reads on `conn`, outside a transaction.
    pub fn reads(conn: &'c mut Conn) -> Self {
        Pg {
            conn: RefCell::new(conn),
            mode: Mode::Reads,
            reserved: Default::default(),
            locked: Default::default(),
            gathered: Default::default(),
        }
    }

    /// A write transaction on `conn`: its `BEGIN` goes out with the first
    /// statement; [`Pg::finish`] commits or rolls it back.
    pub fn writes(conn: &'c mut Conn) -> Self {
        conn.later(Request::Simple("BEGIN".into()));
        Pg {
            conn: RefCell::new(conn),
            mode: Mode::Writes,
            reserved: Default::default(),
            locked: Default::default(),
            gathered: Default::default(),
        }
    }

    /// Sends the queued writes with `COMMIT` in one round trip, or gives
    /// them up with `ROLLBACK`.
    pub fn finish(self, commit: bool) -> std::result::Result<(), tokio_postgres::Error> {
        if !commit {
            self.gathered.borrow_mut().discard();
            self.conn.borrow_mut().discard();
        }
        let end = if commit { "COMMIT" } else { "ROLLBACK" };
        self.send(vec![Request::Simple(end.into())]).map(drop)
    }

    /// Sends what is queued, its gathered rows made into statements, and
    /// then `requests`, in one round trip: the answers to `requests`.
    fn send(
        &self,
        requests: Vec<Request>,
    ) -> std::result::Result<Vec<Answer>, tokio_postgres::Error> {
        let mut conn = self.conn.borrow_mut();
        self.gathered.borrow_mut().fill(&mut conn)?;
        conn.send(requests)
    }

    /// The pool of `product` as this transaction locked it, if it has.
    fn locked(&self, account: &str, product: &str) -> Option<Option<Pool>> {
        let key = (account.to_string(), product.to_string());
        self.locked.borrow().get(&key).cloned()
    }

    /// Keeps the pool of `product` as this transaction locked it.
    fn keep_locked(&self, account: &str, product: &str, pool: &Option<Pool>) {
        let key = (account.to_string(), product.to_string());
        self.locked.borrow_mut().insert(key, pool.clone());
    }

    fn statement(&self, sql: &str) -> Result<tokio_postgres::Statement> {
        self.conn.borrow_mut().statement(sql).map_err(failed)
    }

    /// The rows of one statement, now.
    fn rows(&self, sql: &str, params: Vec<Param>) -> Result<Vec<Row>> {
        let statement = self.statement(sql)?;
        let mut answers = self
            .send(vec![Request::Query(statement, params)])
            .map_err(failed)?;
        Ok(answers.pop().map(Answer::rows).unwrap_or_default())
    }

    /// The rows of several statements that must agree with each other,
    /// in one round trip.
    fn consistent(&self, queries: Vec<(&str, Vec<Param>)>) -> Result<Vec<Vec<Row>>> {
        let mut requests = Vec::with_capacity(queries.len() + 2);
        if self.mode == Mode::Reads {
            requests.push(Request::Simple(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY".into(),
            ));
        }
        for (sql, params) in queries {
            requests.push(Request::Query(self.statement(sql)?, params));
        }
        if self.mode == Mode::Reads {
            requests.push(Request::Simple("COMMIT".into()));
        }
        let answers = self.send(requests);
        if answers.is_err() && self.mode == Mode::Reads {
            let _ = self.conn.borrow_mut().simple_query("ROLLBACK");
        }
        Ok(answers
            .map_err(failed)?
            .into_iter()
            .filter_map(|a| match a {
                Answer::Rows(rows) => Some(rows),
                _ => None,
            })
            .collect())
    }

    /// Makes the rows gathered so far into their statements, ahead of what
    /// is queued next (a statement that must see them).
    fn seal(&self) -> Result<()> {
        let mut conn = self.conn.borrow_mut();
        self.gathered.borrow_mut().fill(&mut conn).map_err(failed)
    }

    /// Queues a write for the next round trip (with `COMMIT` at the
    /// latest); an error in it fails the transaction there.
    fn later(&self, sql: &str, params: Vec<Param>) -> Result<()> {
        let statement = self.statement(sql)?;
        self.conn
            .borrow_mut()
            .later(Request::Execute(statement, params));
        Ok(())
    }

    /// Runs a write now and returns how many rows it touched.
    fn count(&self, sql: &str, params: Vec<Param>) -> Result<u64> {
        let statement = self.statement(sql)?;
        let mut answers = self
            .send(vec![Request::Execute(statement, params)])
            .map_err(failed)?;
        Ok(answers.pop().map(Answer::count).unwrap_or_default())
    }
}

fn pool_row(r: &Row) -> Pool {
    Pool {
        product: r.get(0),
        total: r.get(1),
        dedicated: r.get(2),
        shared_in_use: r.get(3),
        revision: r.get(4),
    }
}

fn allocation_row(r: &Row) -> Allocation {
    Allocation {
        organization: r.get(0),
        product: r.get(1),
        dedicated: r.get(2),
        in_use: r.get(3),
        managed_by: r.get(4),
        version: r.get(5),
        // The column's CHECK admits only the two spellings.
        deletion_policy: DeletionPolicy::parse(r.get(6)).unwrap_or_default(),
        expiry: Expiry::from_stored(r.get(7), r.get(8)),
    }
}

/// Waits for a pool's turn: a transaction-scoped advisory lock keyed by a
/// 64-bit hash of the account (length first, so that no other account and
/// product spell the same text) and the product. Two pools whose hashes
/// collided would share a queue (their writers would wait for each other),
/// nothing more.
const POOL_QUEUE: &str = "SELECT pg_advisory_xact_lock(hashtextextended(length($1::text) || ':' || $1::text || $2::text, 0))";
const POOL: &str = "SELECT name, total, dedicated, shared_in_use, revision FROM products WHERE account = $1 AND name = $2";
const POOL_FOR_UPDATE: &str = "SELECT name, total, dedicated, shared_in_use, revision FROM products WHERE account = $1 AND name = $2 FOR UPDATE";
const ORGANIZATION_EXISTS: &str = "SELECT 1 FROM organizations WHERE account = $1 AND id = $2";
const ALLOCATION: &str =
    "SELECT organization, product, dedicated, in_use, managed_by, version, deletion_policy, expires_at, then_count FROM allocations
     WHERE account = $1 AND organization = $2 AND product = $3";
/// What one write is decided on besides its pool, in one row: the
/// allocation's columns (null if there is none), then whether the
/// organization exists.
const ORGANIZATION_AND_ALLOCATION: &str =
    "SELECT a.organization, a.product, a.dedicated, a.in_use, a.managed_by, a.version,
            a.deletion_policy, a.expires_at, a.then_count, EXISTS (SELECT 1 FROM organizations o WHERE o.account = $1 AND o.id = $2)
     FROM (VALUES (1)) AS one
     LEFT JOIN allocations a ON a.account = $1 AND a.organization = $2 AND a.product = $3";
/// Takes $2 values of the account's sequence; returns the last.
const RESERVE_REVISIONS: &str =
    "UPDATE accounts SET revision = revision + $2 WHERE id = $1 RETURNING revision";
const REMEMBERED_ANY: &str =
    "SELECT key, request_hash, response FROM idempotency WHERE account = $1 AND key = ANY($2)";
const AUDIT: &str = "SELECT id, time, actor, action, organization, product, from_count, to_count,
            rehomed, displaced, manager, idempotency_key, subject
     FROM audit WHERE account = $1 AND id > $2 ORDER BY id LIMIT $3";

/// The pools, organization ids and allocations of an account, sorted.
fn snapshot_queries(account: &str) -> Vec<(&'static str, Vec<Param>)> {
    vec![
        (
            "SELECT name, total, dedicated, shared_in_use, revision FROM products WHERE account = $1 ORDER BY name",
            params![account],
        ),
        (
            "SELECT id FROM organizations WHERE account = $1 ORDER BY id",
            params![account],
        ),
        (
            "SELECT organization, product, dedicated, in_use, managed_by, version, deletion_policy, expires_at, then_count FROM allocations WHERE account = $1 ORDER BY organization, product",
            params![account],
        ),
    ]
}

fn snapshot_of(pools: &[Row], organizations: &[Row], allocations: &[Row]) -> Snapshot {
    Snapshot {
        pools: pools.iter().map(pool_row).collect(),
        organizations: organizations.iter().map(|r| r.get(0)).collect(),
        allocations: allocations.iter().map(allocation_row).collect(),
    }
}

/// A token's columns, in the order [`token_row`] reads them.
const TOKEN_COLUMNS: &str = "hash, account, role, name, created_at, expires_at, last_used";
/// The tokens of an account, by name.
const TOKENS: &str = "SELECT hash, account, role, name, created_at, expires_at, last_used
     FROM tokens WHERE account = $1 ORDER BY name";

fn token_row(r: &Row) -> Result<TokenRow> {
    Ok(TokenRow {
        hash: r.get(0),
        account: r.get(1),
        role: stored_role(r.get(2))?,
        name: r.get(3),
        created: r.get(4),
        expires: r.get(5),
        last_used: r.get(6),
    })
}

fn audit_row(r: &Row) -> Result<AuditEntry> {
    let action: String = r.get(3);
    Ok(AuditEntry {
        id: r.get(0),
        time: r.get(1),
        actor: r.get(2),
        action: AuditAction::parse(&action)
            .ok_or_else(|| BackendError::Unavailable(format!("unknown audit action {action:?}")))?,
        organization: r.get(4),
        product: r.get(5),
        from: r.get(6),
        to: r.get(7),
        rehomed: r.get(8),
        displaced: r.get(9),
        manager: r.get(10),
        idempotency_key: r.get(11),
        subject: r.get(12),
    })
}

impl Storage for Pg<'_> {
    fn pool(&self, account: &str, product: &str) -> Result<Option<Pool>> {
        if self.mode != Mode::Writes {
            return Ok(self
                .rows(POOL, params![&account, &product])?
                .first()
                .map(pool_row));
        }
        if let Some(pool) = self.locked(account, product) {
            return Ok(pool);
        }
        self.later(POOL_QUEUE, params![account, product])?;
        let pool = self
            .rows(POOL_FOR_UPDATE, params![&account, &product])?
            .first()
            .map(pool_row);
        self.keep_locked(account, product, &pool);
        Ok(pool)
    }

    fn organization_exists(&self, account: &str, organization: &str) -> Result<bool> {
        Ok(!self
            .rows(ORGANIZATION_EXISTS, params![account, organization])?
            .is_empty())
    }

    fn allocation(
        &self,
        account: &str,
        organization: &str,
        product: &str,
    ) -> Result<Option<Allocation>> {
        Ok(self
            .rows(ALLOCATION, params![account, organization, product])?
            .first()
            .map(allocation_row))
    }

    fn observation(&self, account: &str, organization: &str, product: &str) -> Result<Observation> {
        self.observations(account, &[(organization, product)], &[])?
            .seen
            .pop()
            .ok_or_else(|| BackendError::Unavailable("the store: answers missing".into()))
    }

    fn observations(
        &self,
        account: &str,
        wanted: &[(&str, &str)],
        keys: &[&str],
    ) -> Result<Observations> {
        // One round trip. Writing, the pools' queues are waited for and
        // their rows locked first (by name, as every writer locks them),
        // the other rows are read after the locks are held, and as many
        // values of the account's sequence are taken as there are writes
        // (its row locked after the pools'). Reading, all of it is one
        // consistent set.
        let writing = self.mode == Mode::Writes;
        let mut products: Vec<&str> = wanted.iter().map(|(_, p)| *p).collect();
        products.sort_unstable();
        products.dedup();
        // A pool this transaction has locked already is not read again.
        let mut pools: HashMap<String, Pool> = HashMap::new();
        let mut to_read = Vec::with_capacity(products.len());
        for product in products {
            match writing.then(|| self.locked(account, product)).flatten() {
                Some(pool) => pools.extend(pool.map(|p| (p.product.clone(), p))),
                None => to_read.push(product),
            }
        }
        let mut queries = Vec::with_capacity(to_read.len() + wanted.len() + 2);
        for product in &to_read {
            let sql = if writing {
                self.later(POOL_QUEUE, params![account, product])?;
                POOL_FOR_UPDATE
            } else {
                POOL
            };
            queries.push((sql, params![account, product]));
        }
        for (organization, product) in wanted {
            queries.push((
                ORGANIZATION_AND_ALLOCATION,
                params![account, organization, product],
            ));
        }
        let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        if !keys.is_empty() {
            queries.push((REMEMBERED_ANY, params![account, &keys]));
        }
        let reserve = writing && !wanted.is_empty();
        if reserve {
            queries.push((RESERVE_REVISIONS, params![account, &(wanted.len() as i64)]));
        }
        let mut answers = self.consistent(queries)?.into_iter();
        let mut next = || answers.next().unwrap_or_default();
        for product in &to_read {
            let pool = next().first().map(pool_row);
            if writing {
                self.keep_locked(account, product, &pool);
            }
            pools.extend(pool.map(|p| (p.product.clone(), p)));
        }
        let seen = wanted
            .iter()
            .map(|(_, product)| {
                let row = next();
                let row = row.first();
                Observation {
                    pool: pools.get(*product).cloned(),
                    organization_exists: row.is_some_and(|r| r.get(9)),
                    allocation: row
                        .filter(|r| r.get::<_, Option<String>>(0).is_some())
                        .map(allocation_row),
                }
            })
            .collect();
        let remembered = if keys.is_empty() {
            HashMap::new()
        } else {
            next()
                .iter()
                .map(|r| (r.get(0), (r.get(1), r.get(2))))
                .collect()
        };
        if reserve && let Some(r) = next().first() {
            let last: i64 = r.get(0);
            self.reserved
                .set(Some((last - wanted.len() as i64 + 1, last)));
        }
        Ok(Observations { seen, remembered })
    }

    fn next_revision(&self, account: &str) -> Result<i64> {
        if let Some((next, last)) = self.reserved.take() {
            if next < last {
                self.reserved.set(Some((next + 1, last)));
            }
            return Ok(next);
        }
        self.rows(RESERVE_REVISIONS, params![account, &1i64])?
            .first()
            .map(|r| r.get(0))
            .ok_or_else(|| {
                BackendError::Unavailable(format!("the store has no account {account:?}"))
            })
    }

    fn save_pool(&self, account: &str, p: &Pool) -> Result<()> {
        // A batch saves its pool after each of its writes; only the last
        // is written (in the place of the first, still queued), as one
        // update of the row instead of one per write.
        if self.locked(account, &p.product).is_some() {
            self.keep_locked(account, &p.product, &Some(p.clone()));
        }
        let statement = self.statement(
            "UPDATE products SET total = $3, dedicated = $4, shared_in_use = $5, revision = $6
             WHERE account = $1 AND name = $2",
        )?;
        self.conn.borrow_mut().later_instead(
            vec!["pool".into(), account.into(), p.product.clone()],
            Request::Execute(
                statement,
                params![
                    &account,
                    &p.product,
                    &p.total,
                    &p.dedicated,
                    &p.shared_in_use,
                    &p.revision
                ],
            ),
        );
        Ok(())
    }

    fn save_allocation(&self, account: &str, a: &Allocation) -> Result<()> {
        let mut conn = self.conn.borrow_mut();
        self.gathered
            .borrow_mut()
            .save_allocation(&mut conn, account, a);
        Ok(())
    }

    fn remove_allocation(&self, account: &str, organization: &str, product: &str) -> Result<()> {
        self.seal()?;
        self.later(
            "DELETE FROM allocations WHERE account = $1 AND organization = $2 AND product = $3",
            params![&account, &organization, &product],
        )
        .map(drop)
    }

    fn insert_organization(&self, account: &str, id: &str, name: Option<&str>) -> Result<()> {
        self.later(
            "INSERT INTO organizations (account, id, name) VALUES ($1, $2, $3)",
            params![&account, &id, &name],
        )
        .map(drop)
    }

    fn insert_pool(&self, account: &str, p: &Pool) -> Result<()> {
        self.locked.borrow_mut().clear();
        self.later(
            "INSERT INTO products (account, name, total, shared_in_use, dedicated, revision)
             VALUES ($1, $2, $3, $4, $5, $6)",
            params![
                &account,
                &p.product,
                &p.total,
                &p.shared_in_use,
                &p.dedicated,
                &p.revision
            ],
        )
        .map(drop)
    }

    fn clear_account(&self, account: &str) -> Result<()> {
        self.locked.borrow_mut().clear();
        self.seal()?;
        // Seeds of the account one at a time ([`SEED_LOCK`]); then locked
        // in the order every writer locks: the pool rows, then the account
        // row.
        self.later(
            "SELECT pg_advisory_xact_lock($1, hashtext($2))",
            params![SEED_LOCK, account],
        )?;
        self.later(
            "INSERT INTO accounts (id) VALUES ($1) ON CONFLICT DO NOTHING",
            params![account],
        )?;
        self.consistent(vec![
            (
                "SELECT 1 FROM products WHERE account = $1 ORDER BY name FOR UPDATE",
                params![account],
            ),
            (
                "SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE",
                params![account],
            ),
        ])?;
        for table in ["allocations", "organizations", "products"] {
            self.later(
                &format!("DELETE FROM {table} WHERE account = $1"),
                params![&account],
            )?;
        }
        Ok(())
    }

    fn insert_audit(&self, account: &str, actor: &str, r: &AuditRecord<'_>) -> Result<()> {
        let row = (
            account.to_string(),
            now(),
            actor.to_string(),
            r.clone().into_owned(),
        );
        let mut conn = self.conn.borrow_mut();
        self.gathered.borrow_mut().insert_audit(&mut conn, row);
        Ok(())
    }

    fn remembered(&self, account: &str, key: &str) -> Result<Option<(String, String)>> {
        Ok(self
            .rows(
                "SELECT request_hash, response FROM idempotency WHERE account = $1 AND key = $2",
                params![&account, &key],
            )?
            .first()
            .map(|r| (r.get(0), r.get(1))))
    }

    fn remember(&self, account: &str, k: &KeyRow) -> Result<()> {
        self.later(
            "INSERT INTO idempotency (account, key, request_hash, response, created_at) VALUES ($1, $2, $3, $4, $5)",
            params![&account, &k.key, &k.request_hash, &k.answer, &k.created],
        )
        .map(drop)
    }

    fn accounts(&self) -> Result<Vec<String>> {
        Ok(self
            .rows("SELECT id FROM accounts ORDER BY id", params![])?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    fn token(&self, hash: &str) -> Result<Option<TokenRow>> {
        self.rows(
            &format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE hash = $1"),
            params![&hash],
        )?
        .first()
        .map(token_row)
        .transpose()
    }

    fn tokens(&self, account: &str) -> Result<Vec<TokenRow>> {
        self.rows(TOKENS, params![&account])?
            .iter()
            .map(token_row)
            .collect()
    }

    fn expired_tokens(&self, now: &str) -> Result<Vec<TokenRow>> {
        self.rows(
            &format!(
                "SELECT {TOKEN_COLUMNS} FROM tokens WHERE expires_at <= $1 ORDER BY account, name"
            ),
            params![&now],
        )?
        .iter()
        .map(token_row)
        .collect()
    }

    fn insert_token(&self, t: &TokenRow) -> Result<()> {
        self.later(
            "INSERT INTO tokens (hash, account, role, name, created_at, expires_at, last_used)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            params![
                &t.hash,
                &t.account,
                &t.role.as_str(),
                &t.name,
                &t.created,
                &t.expires,
                &t.last_used
            ],
        )
    }

    fn delete_token(&self, hash: &str) -> Result<()> {
        self.later("DELETE FROM sessions WHERE token = $1", params![&hash])?;
        self.later("DELETE FROM tokens WHERE hash = $1", params![&hash])
    }

    fn touch_token(&self, hash: &str, now: &str) -> Result<()> {
        self.later(
            "UPDATE tokens SET last_used = $2 WHERE hash = $1",
            params![&hash, &now],
        )
    }

    fn session(&self, hash: &str, now: &str) -> Result<Option<SessionRow>> {
        self.rows(
            "SELECT s.account, s.actor, s.role, s.csrf, s.expires_at, s.token
             FROM sessions s JOIN tokens t ON t.hash = s.token
             WHERE s.hash = $1 AND (t.expires_at IS NULL OR t.expires_at > $2)",
            params![&hash, &now],
        )?
        .first()
        .map(|r| {
            Ok(SessionRow {
                account: r.get(0),
                actor: r.get(1),
                role: stored_role(r.get(2))?,
                csrf: r.get(3),
                expires_at: r.get(4),
                token: r.get(5),
            })
        })
        .transpose()
    }

    fn insert_session(&self, hash: &str, s: &SessionRow) -> Result<()> {
        self.later(
            "INSERT INTO sessions (hash, account, actor, role, csrf, expires_at, token) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            params![&hash, &s.account, &s.actor, &s.role.as_str(), &s.csrf, &s.expires_at, &s.token],
        )
    }

    fn delete_sessions(&self, hash: &str, expired_before: &str) -> Result<()> {
        self.later(
            "DELETE FROM sessions WHERE hash = $1 OR expires_at < $2",
            params![&hash, &expired_before],
        )
    }

    fn expire_keys(&self, cutoff: &str) -> Result<usize> {
        self.count(
            "DELETE FROM idempotency WHERE created_at < $1",
            params![&cutoff],
        )
        .map(|n| n as usize)
    }

    fn snapshot(&self, account: &str) -> Result<Snapshot> {
        let [pools, organizations, allocations] =
            <[Vec<Row>; 3]>::try_from(self.consistent(snapshot_queries(account))?)
                .map_err(|_| BackendError::Unavailable("the store: answers missing".into()))?;
        Ok(snapshot_of(&pools, &organizations, &allocations))
    }

    fn audit_entries(&self, account: &str, after: i64, limit: i64) -> Result<Vec<AuditEntry>> {
        self.rows(AUDIT, params![account, after, limit])?
            .iter()
            .map(audit_row)
            .collect()
    }

    fn export(&self, account: &str) -> Result<AccountRows> {
        let mut queries = snapshot_queries(account);
        queries.extend([
            (
                "SELECT revision FROM accounts WHERE id = $1",
                params![account],
            ),
            (
                "SELECT id, name FROM organizations WHERE account = $1 ORDER BY id",
                params![account],
            ),
            (TOKENS, params![account]),
            (
                "SELECT key, request_hash, response, created_at FROM idempotency WHERE account = $1 ORDER BY key",
                params![account],
            ),
            (AUDIT, params![account, 0i64, i64::MAX]),
        ]);
        let [
            pools,
            organization_ids,
            allocations,
            revision,
            organizations,
            tokens,
            keys,
            audit,
        ] = <[Vec<Row>; 8]>::try_from(self.consistent(queries)?)
            .map_err(|_| BackendError::Unavailable("the store: answers missing".into()))?;
        let snapshot = snapshot_of(&pools, &organization_ids, &allocations);
        Ok(AccountRows {
            id: account.to_string(),
            revision: revision.first().map_or(0, |r| r.get(0)),
            pools: snapshot.pools,
            organizations: organizations.iter().map(|r| (r.get(0), r.get(1))).collect(),
            allocations: snapshot.allocations,
            audit: audit.iter().map(audit_row).collect::<Result<_>>()?,
            tokens: tokens.iter().map(token_row).collect::<Result<_>>()?,
            keys: keys
                .iter()
                .map(|r| KeyRow {
                    key: r.get(0),
                    request_hash: r.get(1),
                    answer: r.get(2),
                    created: r.get(3),
                })
                .collect(),
        })
    }

    fn drop_account(&self, account: &str) -> Result<()> {
        self.clear_account(account)?;
        for table in ["idempotency", "tokens", "audit"] {
            self.later(
                &format!("DELETE FROM {table} WHERE account = $1"),
                params![&account],
            )?;
        }
        self.later("DELETE FROM accounts WHERE id = $1", params![&account])
            .map(drop)
    }

    fn insert_account(&self, account: &str, revision: i64) -> Result<()> {
        self.later(
            "INSERT INTO accounts (id, revision) VALUES ($1, $2)",
            params![&account, &revision],
        )
    }

    fn restore_audit(&self, account: &str, entries: &[AuditEntry]) -> Result<()> {
        for e in entries {
            self.later(
                "INSERT INTO audit (id, account, time, actor, action, organization, product, from_count, to_count, rehomed, displaced, manager, idempotency_key, subject)
                 OVERRIDING SYSTEM VALUE
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
                params![&e.id,
                    &account,
                    &e.time,
                    &e.actor,
                    &e.action.as_str(),
                    &e.organization,
                    &e.product,
                    &e.from,
                    &e.to,
                    &e.rehomed,
                    &e.displaced,
                    &e.manager,
                    &e.idempotency_key,
                    &e.subject],
            )?;
        }
        // Later audit rows are numbered after the copied ones.
        self.rows(
            "SELECT setval(pg_get_serial_sequence('audit', 'id'), GREATEST((SELECT max(id) FROM audit), 1))",
            params![],
        )?;
        Ok(())
    }
}
