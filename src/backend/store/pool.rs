//! A bounded pool of blocking connections, shared by the embedded store's
//! readers and the PostgreSQL store's connections.
//!
//! Contract: at most `max` connections are open at once; an idle one is
//! reused (one its owner no longer finds usable is closed and its place
//! freed); a new one is opened only while fewer than `max` are open, and a
//! failed open frees its place again; otherwise a caller waits until one is
//! given back. Connections are opened and closed outside the lock.

use std::sync::{Condvar, Mutex};

use crate::backend::BackendError;

pub struct Bounded<C> {
    idle: Mutex<Idle<C>>,
    freed: Condvar,
    max: usize,
}

struct Idle<C> {
    conns: Vec<C>,
    open: usize,
}

fn poisoned<T>(_: T) -> BackendError {
    BackendError::Unavailable("store lock poisoned".into())
}

impl<C> Bounded<C> {
    /// A pool of at most `max`, holding `first` (already open) if given.
    pub fn new(max: usize, first: Option<C>) -> Self {
        let conns: Vec<C> = first.into_iter().collect();
        Bounded {
            idle: Mutex::new(Idle {
                open: conns.len(),
                conns,
            }),
            freed: Condvar::new(),
            max,
        }
    }

    /// An idle connection `usable` accepts, or one `open` opens while fewer
    /// than `max` are open; else waits for one to be given back.
    pub fn take(
        &self,
        usable: impl Fn(&C) -> bool,
        open: impl FnOnce() -> Result<C, BackendError>,
    ) -> Result<C, BackendError> {
        let mut idle = self.idle.lock().map_err(poisoned)?;
        loop {
            if let Some(conn) = idle.conns.pop() {
                if usable(&conn) {
                    return Ok(conn);
                }
                idle.open -= 1;
                continue;
            }
            if idle.open < self.max {
                idle.open += 1;
                drop(idle);
                return open().inspect_err(|_| {
                    if let Ok(mut idle) = self.idle.lock() {
                        idle.open -= 1;
                    }
                    self.freed.notify_one();
                });
            }
            idle = self.freed.wait(idle).map_err(poisoned)?;
        }
    }

    /// Gives a connection back: kept for the next caller when `keep`, else
    /// closed (dropped, outside the lock) and its place freed.
    pub fn give(&self, conn: C, keep: bool) {
        let closed = match self.idle.lock() {
            Ok(mut idle) if keep => {
                idle.conns.push(conn);
                None
            }
            Ok(mut idle) => {
                idle.open -= 1;
                Some(conn)
            }
            Err(_) => Some(conn),
        };
        drop(closed);
        self.freed.notify_one();
    }

    /// Takes every idle connection (to close them where the caller may).
    pub fn drain(&self) -> Vec<C> {
        self.idle
            .lock()
            .map(|mut idle| std::mem::take(&mut idle.conns))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn never_more_than_max_open_and_a_failed_open_frees_its_place() {
        let pool = Arc::new(Bounded::<usize>::new(2, None));
        let opened = AtomicUsize::new(0);
        let open = || Ok(opened.fetch_add(1, Ordering::SeqCst));
        let a = pool.take(|_| true, open).unwrap();
        let b = pool.take(|_| true, open).unwrap();
        // Full: a third caller waits until one is given back.
        let waiter = {
            let pool = pool.clone();
            std::thread::spawn(move || pool.take(|_| true, || Ok(99)).unwrap())
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!waiter.is_finished(), "a third connection was opened");
        pool.give(a, true);
        assert_eq!(waiter.join().unwrap(), a, "the idle one is reused");
        // One given back as unusable frees its place; a failed open too.
        pool.give(b, false);
        let failed = pool.take(|_| true, || Err(BackendError::Unavailable("down".into())));
        assert!(failed.is_err());
        let c = pool.take(|_| true, open).unwrap();
        assert_eq!(c, 2, "a new one opens in the freed place");
        // An idle connection its owner finds unusable is closed, not reused.
        pool.give(c, true);
        let d = pool.take(|&n| n != 2, || Ok(7)).unwrap();
        assert_eq!(d, 7);
        assert_eq!(opened.load(Ordering::SeqCst), 3);
    }
}
