//! The account as last read whole, shared by the passes that only check an
//! object already in sync and by the `LicensePool` sync: a resync period
//! (and a restart) costs one read of the account, not one per object.
//!
//! Nothing is written on the strength of this snapshot: a pass that finds
//! something to change reads its one allocation again and writes it with
//! its version (`If-Match`), as before. The snapshot only decides that there
//! is nothing to do, which at worst is as old as the TTL (half the resync
//! period), the same delay a periodic pass always had.
//!
//! It is kept indexed by organization and product, so a check looks up its
//! own allocation instead of going through the account's, and a write of
//! this operator's updates it in place.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::backends::Served;
use super::metrics::Metrics;
use crate::backend::{Backend, BackendError, Written};
use crate::domain::{Allocation, Pool, Snapshot};
use crate::licensepool::{self, LicensePoolStatus};

/// The account as read, by name.
struct Account {
    read: Instant,
    pools: Vec<Pool>,
    organizations: HashSet<String>,
    allocations: HashMap<(String, String), Allocation>,
}

impl Account {
    fn new(snapshot: Snapshot) -> Account {
        Account {
            read: Instant::now(),
            pools: snapshot.pools,
            organizations: snapshot.organizations.into_iter().collect(),
            allocations: snapshot
                .allocations
                .into_iter()
                .map(|a| ((a.organization.clone(), a.product.clone()), a))
                .collect(),
        }
    }

    /// What [`Backend::observe`] answers for one organization and product.
    fn observe(&self, organization: &str, product: &str) -> Snapshot {
        let key = (organization.to_string(), product.to_string());
        Snapshot {
            pools: self
                .pools
                .iter()
                .filter(|p| p.product == product)
                .cloned()
                .collect(),
            organizations: self
                .organizations
                .get(organization)
                .cloned()
                .into_iter()
                .collect(),
            allocations: self.allocations.get(&key).cloned().into_iter().collect(),
        }
    }
}

/// What follows this operator's writes: the shared read of the account
/// written to takes each write at once, and the LicensePools are told the
/// pools moved.
pub struct Followers {
    pub pools_moved: Arc<tokio::sync::Notify>,
}

impl Followers {
    /// A write of this operator's was applied on `served` (`written`, when
    /// the backend answered what it wrote).
    pub async fn wrote(
        &self,
        served: &Served,
        organization: &str,
        product: &str,
        written: Option<&Written>,
    ) {
        if let Some(w) = written {
            served.snapshot.record(organization, product, w).await;
        }
        self.pools_moved.notify_one();
    }

    /// This operator gave up managing an allocation on `served`.
    pub async fn released(&self, served: &Served, organization: &str, product: &str) {
        served.snapshot.released(organization, product).await;
        self.pools_moved.notify_one();
    }
}

/// One shared read of the account.
pub struct Shared {
    backend: Arc<dyn Backend>,
    metrics: Arc<Metrics>,
    ttl: Duration,
    /// Held across the read, so passes that ask meanwhile wait for it
    /// rather than read again.
    current: tokio::sync::Mutex<Option<Account>>,
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

    /// Reads the account again now, whatever its age, and answers each
    /// product's free seats: what a pool that grew outside the cluster is
    /// found by while objects wait for seats.
    pub async fn refresh(&self) -> Result<Vec<(String, i64)>, BackendError> {
        let mut current = self.current.lock().await;
        let account = self.read(&mut current).await?;
        Ok(account
            .pools
            .iter()
            .map(|p| (p.product.clone(), p.free()))
            .collect())
    }

    /// What the backend held for one organization and product at the last
    /// read of the account, read again once it is older than the TTL.
    pub async fn observe(
        &self,
        organization: &str,
        product: &str,
    ) -> Result<Snapshot, BackendError> {
        let mut current = self.current.lock().await;
        let account = self.current_account(&mut current).await?;
        Ok(account.observe(organization, product))
    }

    /// The account's products at the shared read.
    pub async fn products(&self) -> Result<Vec<String>, BackendError> {
        let mut current = self.current.lock().await;
        let account = self.current_account(&mut current).await?;
        Ok(account.pools.iter().map(|p| p.product.clone()).collect())
    }

    /// The LicensePool of one product, as an operator of `instance` shows
    /// it ([`licensepool::status`]); `None` if the account no longer has
    /// the product. One product at a time, so a sync holds one pool's
    /// allocations, not the account's.
    pub async fn pool(
        &self,
        instance: &str,
        product: &str,
    ) -> Result<Option<(String, LicensePoolStatus)>, BackendError> {
        let mut current = self.current.lock().await;
        let account = self.current_account(&mut current).await?;
        Ok(account
            .pools
            .iter()
            .find(|p| p.product == product)
            .map(|pool| licensepool::status(instance, pool, account.allocations.values())))
    }

    async fn current_account<'a>(
        &self,
        current: &'a mut Option<Account>,
    ) -> Result<&'a Account, BackendError> {
        let stale = current
            .as_ref()
            .is_none_or(|a| a.read.elapsed() >= self.ttl);
        if stale {
            return self.read(current).await;
        }
        Ok(current.as_ref().expect("checked just now"))
    }

    async fn read<'a>(
        &self,
        current: &'a mut Option<Account>,
    ) -> Result<&'a Account, BackendError> {
        self.metrics.backend_read(super::metrics::Read::Account);
        // The old read goes first: two copies of a large account at
        // once would be the operator's peak. Nobody reads it meanwhile
        // (the lock is held), and a failed read leaves none, so the
        // next caller reads again.
        *current = None;
        Ok(current.insert(Account::new(self.backend.snapshot().await?)))
    }

    /// Keeps the snapshot in step with a release of this operator's: the
    /// allocation stays, managed by no one.
    pub async fn released(&self, organization: &str, product: &str) {
        let mut current = self.current.lock().await;
        let key = (organization.to_string(), product.to_string());
        if let Some(a) = current.as_mut().and_then(|a| a.allocations.get_mut(&key)) {
            a.managed_by = None;
        }
    }

    /// Keeps the snapshot in step with a write of this operator's: the
    /// allocation and its pool as the backend left them.
    pub async fn record(&self, organization: &str, product: &str, written: &Written) {
        let mut current = self.current.lock().await;
        let Some(account) = current.as_mut() else {
            return;
        };
        let key = (organization.to_string(), product.to_string());
        match &written.allocation {
            Some(a) => {
                account.allocations.insert(key, a.clone());
            }
            None => {
                account.allocations.remove(&key);
            }
        }
        if let Some(pool) = account.pools.iter_mut().find(|p| p.product == product) {
            pool.total = written.pool.total;
            pool.dedicated = written.pool.dedicated;
            pool.shared_in_use = written.pool.shared_in_use;
        }
    }
}
