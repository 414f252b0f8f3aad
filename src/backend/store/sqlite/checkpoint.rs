//! The embedded store's write-ahead log is copied into the database file by
//! a thread of its own. Left to SQLite, the copy (a checkpoint) runs inside
//! whichever commit crosses its threshold of 1,000 pages, and the writes of
//! that commit wait for it: under load that was the slowest 1% of writes
//! (`make bench-platform`: p99 18 to 24 ms with it, 5 to 7 ms without).
//!
//! The store's connection turns automatic checkpoints off; this thread runs
//! a passive checkpoint every [`EVERY`] on a connection of its own. A
//! passive checkpoint waits for no reader or writer: it copies what no
//! reader still needs, and the log starts again from its beginning once all
//! of it was copied. When the store closes, SQLite checkpoints the rest as
//! the last connection closes.

use std::path::Path;
use std::sync::mpsc::{RecvTimeoutError, Sender, channel};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use crate::backend::BackendError;

/// How often the log is copied into the file.
const EVERY: Duration = Duration::from_millis(250);

/// The thread that checkpoints one store; stopped when dropped.
pub struct Checkpoints {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpoints {
    /// Starts checkpointing the store at `path` (open, in WAL mode).
    pub fn start(path: &Path) -> Result<Checkpoints, BackendError> {
        let failed = |e: &dyn std::fmt::Display| {
            BackendError::Unavailable(format!("{}: checkpoints: {e}", path.display()))
        };
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).map_err(|e| failed(&e))?;
        let (stop, stopped) = channel::<()>();
        let thread = std::thread::Builder::new()
            .name("sqlite-checkpoints".into())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(EVERY) {
                    // Busy or failed, it is tried again next time; the log
                    // keeps everything until then.
                    let _ = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
                }
            })
            .map_err(|e| failed(&e))?;
        Ok(Checkpoints {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpoints {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
