//! Objects that wait for free seats: those a pass left stalled on
//! `InsufficientPool` or `Conflict`, per pool (a backend's product: accounts
//! on one backend share its pools), and the wake-ups that bring them back
//! the moment seats of that pool are freed (by this operator, or outside it
//! as a read of the account finds) instead of at the next resync.
//!
//! Contract: a pass reads [`Waiters::frees_so_far`] before it observes the
//! backend and hands it back when it waits ([`Waiters::wait`]); seats freed
//! in between wake it at once, so no free is missed between the read and
//! the registration.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use kube::runtime::reflector::ObjectRef;
use tokio::sync::mpsc::UnboundedSender;

use crate::resource::DedicatedLicense;

/// The waiting objects, and where their wake-ups go (the controller's
/// queue).
pub struct Waiters {
    by_pool: Mutex<HashMap<Pool, Waiting>>,
    wake: UnboundedSender<ObjectRef<DedicatedLicense>>,
}

/// A pool: the backend it is on (see [`super::backends::Served::id`]) and
/// its product.
pub type Pool = (usize, String);

/// Objects waiting on one pool, and how many times its seats were freed
/// or an allocation of it given up.
#[derive(Default)]
struct Waiting {
    objects: HashSet<ObjectRef<DedicatedLicense>>,
    frees: u64,
    /// The fewest free seats a waiting object saw when it stalled: a read
    /// of the account that finds more wakes them (seats freed outside).
    free_seen: Option<i64>,
}

impl Waiters {
    pub fn new(wake: UnboundedSender<ObjectRef<DedicatedLicense>>) -> Waiters {
        Waiters {
            by_pool: Mutex::default(),
            wake,
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Pool, Waiting>> {
        self.by_pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, r: ObjectRef<DedicatedLicense>) {
        // The receiver lives as long as the controller.
        let _ = self.wake.send(r);
    }

    /// How many times seats of `pool` were freed so far; read before a
    /// pass observes the backend.
    pub fn frees_so_far(&self, pool: &Pool) -> u64 {
        self.map().get(pool).map_or(0, |w| w.frees)
    }

    /// Remembers that `dl` waits for free seats of `pool`, having seen
    /// `free` of them after `frees` frees ([`Self::frees_so_far`] before it
    /// observed). If seats were freed since, it is woken at once instead.
    pub fn wait(&self, dl: &DedicatedLicense, pool: Pool, frees: u64, free: Option<i64>) {
        let r = ObjectRef::from_obj(dl);
        let mut map = self.map();
        let w = map.entry(pool).or_default();
        if frees != w.frees {
            drop(map);
            return self.send(r);
        }
        w.objects.insert(r);
        w.free_seen = match (w.free_seen, free) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }

    /// Forgets that `dl` waits (it is in sync, deleted, or refused for a
    /// reason that no free seat changes).
    pub fn forget(&self, dl: &DedicatedLicense) {
        let r = ObjectRef::from_obj(dl);
        for w in self.map().values_mut() {
            w.objects.remove(&r);
        }
    }

    /// Whether any object waits for free seats.
    pub fn anyone(&self) -> bool {
        self.map().values().any(|w| !w.objects.is_empty())
    }

    /// Wakes what waits for a pool of backend `backend` that, as just read,
    /// has more free seats than its waiting objects saw when they stalled:
    /// seats freed outside this operator (a raised total, released seats,
    /// a lowered allocation). Returns the products woken.
    pub fn wake_if_grown(&self, backend: usize, pools: &[(String, i64)]) -> Vec<String> {
        let grown: Vec<String> = {
            let map = self.map();
            pools
                .iter()
                .filter(|(product, free)| {
                    map.get(&(backend, product.clone())).is_some_and(|w| {
                        !w.objects.is_empty() && w.free_seen.is_some_and(|seen| *free > seen)
                    })
                })
                .map(|(product, _)| product.clone())
                .collect()
        };
        for product in &grown {
            self.seats_freed(&(backend, product.clone()));
        }
        grown
    }

    /// Seats of `pool` were freed, or an allocation of it given up:
    /// re-queue everything waiting for that.
    pub fn seats_freed(&self, pool: &Pool) {
        let woken = {
            let mut map = self.map();
            let w = map.entry(pool.clone()).or_default();
            w.frees += 1;
            w.free_seen = None;
            std::mem::take(&mut w.objects)
        };
        for r in woken {
            self.send(r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::DedicatedLicenseSpec;

    fn object(name: &str, product: &str) -> DedicatedLicense {
        let spec: DedicatedLicenseSpec = serde_json::from_value(
            serde_json::json!({"organization": "qa", "product": product, "count": 1}),
        )
        .unwrap();
        let mut dl = DedicatedLicense::new(name, spec);
        dl.metadata.namespace = Some("team".into());
        dl
    }

    fn woken(
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<ObjectRef<DedicatedLicense>>,
    ) -> Vec<String> {
        let mut names = Vec::new();
        while let Ok(r) = rx.try_recv() {
            names.push(r.name);
        }
        names.sort();
        names
    }

    #[test]
    fn freed_seats_wake_what_waits_for_that_product_once() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let w = Waiters::new(tx);
        let (a, b, c) = (
            object("a", "TestOps"),
            object("b", "TestOps"),
            object("c", "Other"),
        );
        let pool = |dl: &DedicatedLicense| (1, dl.spec.product.clone());
        for dl in [&a, &b, &c] {
            w.wait(dl, pool(dl), w.frees_so_far(&pool(dl)), Some(0));
        }
        assert!(w.anyone());
        w.seats_freed(&(2, "TestOps".into()));
        assert_eq!(
            woken(&mut rx),
            Vec::<String>::new(),
            "another backend's pool"
        );
        w.seats_freed(&(1, "TestOps".into()));
        assert_eq!(woken(&mut rx), ["a", "b"]);
        w.seats_freed(&(1, "TestOps".into()));
        assert_eq!(
            woken(&mut rx),
            Vec::<String>::new(),
            "woken once, then no longer waiting"
        );
        w.forget(&c);
        assert!(!w.anyone());
    }

    #[test]
    fn seats_freed_while_a_pass_observed_wake_it_at_once() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let w = Waiters::new(tx);
        let a = object("a", "TestOps");
        let pool = (1, "TestOps".to_string());
        let before = w.frees_so_far(&pool);
        w.seats_freed(&pool);
        w.wait(&a, pool, before, Some(0));
        assert_eq!(woken(&mut rx), ["a"]);
        assert!(!w.anyone(), "woken, not registered");
    }

    #[test]
    fn a_pool_read_with_more_free_seats_than_were_seen_wakes_its_waiters() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let w = Waiters::new(tx);
        let (a, b) = (object("a", "TestOps"), object("b", "TestOps"));
        w.wait(&a, (1, "TestOps".into()), 0, Some(3));
        w.wait(&b, (1, "TestOps".into()), 0, Some(2));
        let pools = |free: i64| vec![("TestOps".to_string(), free), ("Other".to_string(), 99)];
        assert!(
            w.wake_if_grown(1, &pools(2)).is_empty(),
            "no more than the fewest seen"
        );
        assert!(
            w.wake_if_grown(2, &pools(9)).is_empty(),
            "another backend's pools"
        );
        assert_eq!(woken(&mut rx), Vec::<String>::new());
        assert_eq!(w.wake_if_grown(1, &pools(3)), ["TestOps"]);
        assert_eq!(woken(&mut rx), ["a", "b"]);
    }
}
