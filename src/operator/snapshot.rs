//! The account as last read whole, shared by the passes that only check an
//! object already in sync and by the `LicensePool` sync: a resync period
//! (and a restart) costs one read of the account, not one per object.
//!
//! Nothing is written on the strength of this snapshot: a pass that finds
//! something to change reads its one allocation again and writes it with
//! its version (`If-Match`), as before. The snapshot only decides that there
//! is nothing to do, which at worst is as old as the TTL (half the resync
//! period), the same delay a periodic pass always had.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::metrics::Metrics;
use crate::backend::{Backend, BackendError, Written};
use crate::domain::Snapshot;

/// One shared read of the account.
pub struct Shared {
    backend: Arc<dyn Backend>,
    metrics: Arc<Metrics>,
    ttl: Duration,
    /// Held across the read, so passes that ask meanwhile wait for it
    /// rather than read again.
    current: tokio::sync::Mutex<Option<(Instant, Arc<Snapshot>)>>,
}

impl Shared {
    pub fn new(backend: Arc<dyn Backend>, metrics: Arc<Metrics>, ttl: Duration) -> Shared {
        Shared {
            backend,
            metrics,
            ttl,
            current: tokio::sync::Mutex::new(None),
        }
    }

    /// The snapshot, read again once it is older than the TTL.
    pub async fn get(&self) -> Result<Arc<Snapshot>, BackendError> {
        self.read(false).await
    }

    /// A snapshot read now (after the pools moved).
    pub async fn fresh(&self) -> Result<Arc<Snapshot>, BackendError> {
        self.read(true).await
    }

    async fn read(&self, fresh: bool) -> Result<Arc<Snapshot>, BackendError> {
        let mut current = self.current.lock().await;
        if let Some((at, snapshot)) = current.as_ref()
            && !fresh
            && at.elapsed() < self.ttl
        {
            return Ok(snapshot.clone());
        }
        self.metrics.backend_read("account");
        let snapshot = Arc::new(self.backend.snapshot().await?);
        *current = Some((Instant::now(), snapshot.clone()));
        Ok(snapshot)
    }

    /// Keeps the snapshot in step with a write of this operator's: the
    /// allocation and its pool as the backend left them.
    pub async fn record(&self, organization: &str, product: &str, written: &Written) {
        let mut current = self.current.lock().await;
        let Some((at, snapshot)) = current.take() else {
            return;
        };
        let mut next = (*snapshot).clone();
        next.allocations
            .retain(|a| !(a.organization == organization && a.product == product));
        if let Some(a) = &written.allocation {
            next.allocations.push(a.clone());
            next.allocations
                .sort_by(|x, y| (&x.organization, &x.product).cmp(&(&y.organization, &y.product)));
        }
        if let Some(pool) = next.pools.iter_mut().find(|p| p.product == product) {
            pool.total = written.pool.total;
            pool.dedicated = written.pool.dedicated;
            pool.shared_in_use = written.pool.shared_in_use;
        }
        *current = Some((at, Arc::new(next)));
    }
}
