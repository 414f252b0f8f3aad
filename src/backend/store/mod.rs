//! The embedded license store: one SQLite file.
//!
//! Contract: the schema is versioned and migrated on open
//! ([`sqlite::schema`]), and a file that is not a licensor store, or is
//! newer, is refused untouched; the file runs in WAL mode; every check and
//! write is one `BEGIN IMMEDIATE` transaction running the shared write
//! pipeline ([`pipeline`]) over the [`storage`] rows in this store's SQL
//! ([`sqlite`]), which decides with
//! [`crate::domain`] on rows read inside it (R10), so concurrent writers,
//! threads or processes, cannot over-commit a pool by their own increases.
//! A refusal rolls back: the file keeps exactly the rows it had. Every
//! change writes an audit record ([`audit`], R11); answers to idempotency
//! keys are remembered and replayed. Allocation writes to one product that
//! arrive together share one transaction (`batch`). Reads run on
//! connections of their own ([`sqlite::readers`]), beside the writer and
//! each other. Tokens and sessions are `access`. `licensor serve` uses
//! these same transaction functions; [`postgres`] is the same store on a
//! PostgreSQL server.

mod access;
pub mod audit;
mod batch;
pub mod migrations;
pub mod pipeline;
mod pool;
pub mod postgres;
pub mod sqlite;
pub mod storage;

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, TransactionBehavior};

use super::{AuditEntry, BackendError, Fixture, Written};
use crate::domain::{AllocationWrite, Pool, Reason, Refusal, SeatChange, Snapshot, did_you_mean};
pub use access::{Principal, Session, TokenError, TokenInfo, random_hex, serves};
use storage::Storage;

/// A license store and its transaction functions.
pub struct Store {
    db: Db,
    /// Allocation writes waiting to be written together.
    batches: std::sync::Arc<batch::Batches>,
    /// Where it is, for messages (a path; never credentials).
    location: String,
    /// Tokens found good since the store last changed.
    checked: access::Checked,
    /// The embedded store's checkpoints (after `db`, which closes first).
    _checkpoints: Option<sqlite::checkpoint::Checkpoints>,
}

/// Runs a store call off the async threads (its calls block: SQLite, and
/// the PostgreSQL client on a runtime of its own); a task that panics is
/// an unavailable store, not a panic of the caller.
pub async fn off_thread<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BackendError> + Send + 'static,
) -> Result<T, BackendError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BackendError::Unavailable(format!("store task failed: {e}")))?
}

/// Runs a store call for a task that has nothing else to do meanwhile (a
/// request: each is a task of its own) on the task's own thread, telling
/// the runtime that it blocks (`block_in_place`: the thread's other tasks
/// move to another thread). That saves the two thread switches of
/// [`off_thread`], about a quarter of an allocation read's cost. Never for
/// a task that polls several futures at once (a controller's reconciles):
/// they would all wait for the call. Off the multi-threaded runtime it is
/// [`off_thread`].
pub async fn in_place<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BackendError> + Send + 'static,
) -> Result<T, BackendError> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(runtime) if runtime.runtime_flavor() == RuntimeFlavor::MultiThread => {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                tokio::task::block_in_place(f)
            }))
            .unwrap_or_else(|_| Err(BackendError::Unavailable("store task panicked".into())))
        }
        _ => off_thread(f).await,
    }
}

/// The database behind a store.
enum Db {
    /// The writer's connection, and the connections reads run on beside it.
    Sqlite(Mutex<Connection>, Box<sqlite::readers::Readers>),
    /// A pool of connections (see [`postgres::conn`]).
    Postgres(Box<postgres::Conns>),
}

impl Drop for Store {
    fn drop(&mut self) {
        // The PostgreSQL client closes its connection on a runtime of its
        // own, which cannot run on an async thread: close it off this one.
        if let Db::Postgres(conns) = &self.db {
            let idle = conns.drain();
            let _ = std::thread::spawn(move || drop(idle)).join();
        }
    }
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
        let opened = sqlite::open(path, create)?;
        Ok(Store {
            db: Db::Sqlite(Mutex::new(opened.writer), Box::new(opened.readers)),
            batches: Default::default(),
            location: path.display().to_string(),
            checked: Default::default(),
            _checkpoints: Some(opened.checkpoints),
        })
    }

    /// Connects to a PostgreSQL store (see [`postgres`]). With `create`,
    /// its schema is created or migrated; without, a database that holds
    /// no licensor store is an error and is left as it is.
    pub fn connect(url: &str, create: bool) -> Result<Store, BackendError> {
        let location = crate::backend::redact(url);
        let pool = postgres::pool_size(url)?;
        let mut conn = postgres::connect(url)?;
        Store::set_up(&mut conn, &location, create)?;
        let conns = postgres::Conns::new(conn, postgres::opener(url), pool);
        Ok(Store::on_postgres(conns, location))
    }

    /// [`Store::connect`] for a server (`serve`, `operator`): when the
    /// database cannot be reached yet (not up, restarting), the store is
    /// returned anyway, every call fails `Unavailable` until the database
    /// answers, and the first connection then checks and migrates it. A
    /// database that answers but is no store of licensor's is an error at
    /// once, as with `connect`.
    pub fn connect_when_up(url: &str, create: bool) -> Result<Store, BackendError> {
        let location = crate::backend::redact(url);
        let pool = postgres::pool_size(url)?;
        let conns = match postgres::connect(url) {
            Ok(mut conn) => {
                Store::set_up(&mut conn, &location, create)?;
                postgres::Conns::new(conn, postgres::opener(url), pool)
            }
            Err(e) => {
                tracing::warn!("{e}; starting anyway, and connecting when the database is up");
                let at = location.clone();
                postgres::Conns::pending(
                    postgres::opener(url),
                    pool,
                    Box::new(move |conn| Store::set_up(conn, &at, create)),
                )
            }
        };
        Ok(Store::on_postgres(conns, location))
    }

    /// Checks that a database holds a store (or may get one) and migrates it.
    fn set_up(conn: &mut postgres::Conn, location: &str, create: bool) -> Result<(), BackendError> {
        if !create && !postgres::holds_a_store(conn, location)? {
            return Err(BackendError::Unavailable(format!(
                "{location}: no store here; create one with `licensor backend seed -f FIXTURE`"
            )));
        }
        postgres::migrate(conn, location)
    }

    fn on_postgres(conns: postgres::Conns, location: String) -> Store {
        Store {
            db: Db::Postgres(Box::new(conns)),
            batches: Default::default(),
            location,
            checked: Default::default(),
            _checkpoints: None,
        }
    }

    /// Where the store is, for messages: a path, or a URL without its
    /// password.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// The store as `--backend` names it (`sqlite:PATH`, `postgres://...`),
    /// without credentials.
    pub fn describe(&self) -> String {
        match self.db {
            Db::Sqlite(..) => format!("sqlite:{}", self.location),
            Db::Postgres(_) => self.location.clone(),
        }
    }

    fn failed(&self) -> impl Fn(rusqlite::Error) -> BackendError + '_ {
        move |e| BackendError::Unavailable(format!("{}: {e}", self.location))
    }

    /// Runs `f` on the store in one read transaction: a consistent read
    /// of several statements (PostgreSQL reads a snapshot and an export in
    /// one REPEATABLE READ transaction of their own).
    fn read<T>(
        &self,
        f: impl FnOnce(&dyn Storage) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        self.read_with(true, f)
    }

    /// Whether its reads never wait for a writer or a server: SQLite's, in
    /// WAL mode, read a file beside the writer.
    pub fn reads_never_wait(&self) -> bool {
        matches!(self.db, Db::Sqlite(..))
    }

    /// A number that changes whenever anything is committed to the store,
    /// by any process, where the store can say so cheaply (SQLite); `None`
    /// where it cannot (PostgreSQL), or cannot now.
    fn data_version(&self) -> Option<i64> {
        match &self.db {
            Db::Sqlite(_, readers) => readers.data_version(),
            Db::Postgres(_) => None,
        }
    }

    /// Runs `f`, one statement, outside a transaction: one statement is a
    /// consistent read by itself (the hot paths: an allocation, a token).
    fn read_one<T>(
        &self,
        f: impl FnOnce(&dyn Storage) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        self.read_with(false, f)
    }

    fn read_with<T>(
        &self,
        consistent: bool,
        f: impl FnOnce(&dyn Storage) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        match &self.db {
            Db::Sqlite(_, readers) => readers.with(|conn| {
                if !consistent {
                    return f(&*conn);
                }
                // One read transaction, so that every statement of `f` sees
                // the same commit while other connections write the file
                // (WAL keeps that commit for it); dropping it ends it.
                let tx = conn.transaction().map_err(self.failed())?;
                f(&*tx)
            }),
            Db::Postgres(conns) => {
                let mut conn = conns.take()?;
                let out = f(&postgres::Pg::reads(&mut conn));
                conns.give(conn, out.is_ok());
                out
            }
        }
    }

    /// Runs `f` in one write transaction, committed only on success and
    /// when `commit` (a dry run is rolled back).
    fn transaction<T>(
        &self,
        commit: bool,
        f: impl FnOnce(&dyn Storage) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        self.transaction_then(|tx| Ok((f(tx)?, commit)))
    }

    /// Runs `f` in one write transaction; `f` says whether to commit it.
    fn transaction_then<T>(
        &self,
        f: impl FnOnce(&dyn Storage) -> Result<(T, bool), BackendError>,
    ) -> Result<T, BackendError> {
        match &self.db {
            Db::Sqlite(conn, _) => {
                let mut conn = conn
                    .lock()
                    .map_err(|_| BackendError::Unavailable("store lock poisoned".into()))?;
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(self.failed())?;
                let (out, commit) = f(&*tx)?;
                if commit {
                    tx.commit().map_err(self.failed())?;
                }
                Ok(out)
            }
            Db::Postgres(conns) => {
                let mut conn = conns.take()?;
                let tx = postgres::Pg::writes(&mut conn);
                let out = f(&tx);
                // The queued writes go out with COMMIT; after a refusal or
                // an error they are dropped and the transaction rolled back.
                let end = tx.finish(matches!(out, Ok((_, true))));
                let healthy = end.is_ok();
                conns.give(conn, healthy);
                match (out, end) {
                    (Err(e), _) => Err(e),
                    (Ok(_), Err(e)) => Err(self.unavailable(e)),
                    (Ok((out, _)), Ok(())) => Ok(out),
                }
            }
        }
    }

    fn unavailable(&self, e: tokio_postgres::Error) -> BackendError {
        BackendError::Unavailable(format!("{}: {}", self.location, postgres::describe(&e)))
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
        if dry_run {
            return self.transaction(false, |tx| pipeline::write(tx, account, who, w));
        }
        self.write_batched(account, who, w)
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

    /// Account ids in the store.
    pub fn accounts(&self) -> Result<Vec<String>, BackendError> {
        self.read_one(|s| s.accounts())
    }

    /// The account to use: the one named, or the only one in the store.
    pub fn resolve_account(&self, named: Option<&str>) -> Result<String, BackendError> {
        let accounts = self.accounts()?;
        let at = &self.location;
        match named {
            Some(a) if accounts.iter().any(|x| x == a) => Ok(a.to_string()),
            // A store that holds no account yet is waiting to be seeded;
            // one that holds others was given a wrong name: a person fixes it.
            Some(a) if accounts.is_empty() => Err(BackendError::Unavailable(format!(
                "{at}: holds no account yet; load {a:?} with `licensor backend seed -f FIXTURE`"
            ))),
            Some(a) => Err(Refusal::new(
                Reason::UnknownAccount,
                format!(
                    "{at} has no account {a:?}{} (accounts: {}); check --account",
                    did_you_mean(a, accounts.iter().map(String::as_str)),
                    accounts.join(", ")
                ),
            )
            .into()),
            None => match accounts.as_slice() {
                [one] => Ok(one.clone()),
                [] => Err(BackendError::Unavailable(format!(
                    "{at}: holds no account yet; load one with `licensor backend seed -f FIXTURE`"
                ))),
                many => Err(BackendError::Unavailable(format!(
                    "{at}: holds several accounts ({}); choose one with --account",
                    many.join(", ")
                ))),
            },
        }
    }

    /// Forgets idempotency keys older than `age`; they are kept at least that long.
    pub fn expire_idempotency_keys(&self, age: chrono::Duration) -> Result<usize, BackendError> {
        let cutoff =
            (chrono::Utc::now() - age).to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        self.transaction(true, |s| s.expire_keys(&cutoff))
    }

    /// Pools, organizations and allocations of one account.
    pub fn snapshot(&self, account: &str) -> Result<Snapshot, BackendError> {
        self.read(|s| s.snapshot(account))
    }

    /// The part of the account one allocation is decided on: its product's
    /// pool, whether its organization exists, and the allocation itself.
    pub fn observe(
        &self,
        account: &str,
        organization: &str,
        product: &str,
    ) -> Result<Snapshot, BackendError> {
        self.read_one(|s| s.observe(account, organization, product))
    }

    /// The audit log of one account, oldest first.
    pub fn audit(&self, account: &str) -> Result<Vec<AuditEntry>, BackendError> {
        self.audit_page(account, 0, i64::MAX)
    }

    /// Up to `limit` records of the audit log after the record `after`, for
    /// a reader that goes through a long log a page at a time (ids only
    /// grow, so the pages add up to the log).
    pub fn audit_page(
        &self,
        account: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<AuditEntry>, BackendError> {
        self.read(|s| s.audit_entries(account, after, limit))
    }

    /// Copies one account whole into `to` (`backend copy`), in one
    /// transaction there, and checks that `to` now holds exactly the same
    /// rows. A target that holds the account already is refused unless
    /// `replace`, which removes it there first.
    pub fn copy_account(
        &self,
        account: &str,
        to: &Store,
        replace: bool,
    ) -> Result<(), BackendError> {
        let rows = self.read(|s| s.export(account))?;
        to.transaction(true, |s| {
            if s.accounts()?.iter().any(|a| a == account) {
                if !replace {
                    return Err(Refusal::new(
                        Reason::Invalid,
                        format!(
                            "{} already holds account {account:?}; nothing was copied (--replace removes it there first)",
                            to.location
                        ),
                    )
                    .into());
                }
                s.drop_account(account)?;
            }
            s.import(&rows)
        })?;
        let copied = to.read(|s| s.export(account))?;
        if copied != rows {
            return Err(BackendError::Unavailable(format!(
                "{}: the copy of account {account:?} does not read back as the original",
                to.location
            )));
        }
        Ok(())
    }
}
