//! The embedded store's read connections: reads run beside each other and
//! beside the writer (WAL lets readers see the last commit while a write
//! goes on), instead of queueing on the writer's connection.
//!
//! Connections are opened read-only, on demand, up to [`MAX_READERS`], and
//! kept for the next read; a read waits only when all of them are busy. A
//! read sees every transaction committed before it began, in this process
//! or another, so a write answered to a caller is visible to its next read.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

use crate::backend::BackendError;
use crate::backend::store::pool::Bounded;

/// Reads at once, at most: past the cores a machine has, more only wait.
pub const MAX_READERS: usize = 4;

pub struct Readers {
    path: PathBuf,
    pool: Bounded<Connection>,
    /// A connection of its own for [`Readers::data_version`].
    probe: std::sync::Mutex<Option<Connection>>,
}

impl Readers {
    pub fn new(path: &Path) -> Readers {
        Readers {
            path: path.to_path_buf(),
            pool: Bounded::new(MAX_READERS, None),
            probe: Default::default(),
        }
    }

    /// A number that changes whenever a transaction is committed to the
    /// file by any connection, in this process or another, since the last
    /// call (SQLite's `PRAGMA data_version` on one connection kept for it:
    /// it reads the WAL's shared index, no page). `None` when it cannot be
    /// read, which callers take as "changed".
    pub fn data_version(&self) -> Option<i64> {
        let mut probe = self.probe.lock().ok()?;
        if probe.is_none() {
            *probe = Some(self.open().ok()?);
        }
        let conn = probe.as_ref()?;
        let version = conn
            .prepare_cached("PRAGMA data_version")
            .and_then(|mut pragma| pragma.query_row([], |row| row.get(0)));
        if version.is_err() {
            *probe = None;
        }
        version.ok()
    }

    /// Runs `f` on a read connection.
    pub fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        let mut conn = self.pool.take(|_| true, || self.open())?;
        let out = f(&mut conn);
        self.pool.give(conn, true);
        out
    }

    fn open(&self) -> Result<Connection, BackendError> {
        let failed =
            |e: rusqlite::Error| BackendError::Unavailable(format!("{}: {e}", self.path.display()));
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY
                | OpenFlags::SQLITE_OPEN_URI
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(failed)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(failed)?;
        Ok(conn)
    }
}
