//! Keeps the `LicensePool` objects ([`crate::licensepool`]): one per
//! product of the managed account, created, updated and removed by the
//! leading operator, and written only when their content changes.
//!
//! A sync works from the read of the account the passes share (read again
//! once it is half a resync period old, and kept up to date by this
//! operator's own writes, so a burst of writes costs no read of the whole
//! account) and compares it with the objects this instance keeps (by the
//! instance label, so two instances in one cluster never touch each
//! other's). It runs once the objects are listed at start
//! (its read of the account would otherwise add to the list's memory peak),
//! every resync period (which catches changes made outside the cluster),
//! and once a burst of writes is over (a quiet second, or on a large account
//! a quiet time four times as long as the last sync took; a resync period at
//! most).

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use tokio::sync::Notify;

use super::backends::Backends;
use super::metrics::Metrics;
use crate::licensepool::{
    ACCOUNT_LABEL, INSTANCE_LABEL, LicensePool, LicensePoolSpec, LicensePoolStatus, name_in,
};

/// How long after a write the pools are read again, at least: writes that
/// come together are shown together.
const SETTLE: Duration = Duration::from_secs(1);

/// What the pools task needs.
pub struct Pools {
    pub client: Client,
    pub api: Api<LicensePool>,
    /// Every account's backend and shared read.
    pub backends: Arc<Backends>,
    pub instance: String,
    pub resync: Duration,
    /// Notified by passes that wrote to the backend.
    pub moved: Arc<Notify>,
    pub metrics: Arc<Metrics>,
}

impl Pools {
    pub fn new(
        client: Client,
        backends: Arc<Backends>,
        instance: String,
        resync: Duration,
        moved: Arc<Notify>,
        metrics: Arc<Metrics>,
    ) -> Pools {
        Pools {
            api: Api::all(client.clone()),
            client,
            backends,
            instance,
            resync,
            moved,
            metrics,
        }
    }

    /// Syncs from when `listed` turns true until the task is dropped.
    pub async fn keep(self, listed: tokio::sync::watch::Receiver<bool>) {
        if !super::resync::listed(listed).await {
            return;
        }
        loop {
            let started = tokio::time::Instant::now();
            match self.sync().await {
                Ok(0) => {}
                Ok(writes) => tracing::debug!(writes, "license pools synced"),
                Err(e) => tracing::warn!("license pools not synced: {e}"),
            }
            // A sync writes whole pools (every allocation of a product):
            // during a burst of writes, wait for a quiet moment, and on a
            // large account keep syncing to at most a fifth of the time.
            let settle = SETTLE.max(started.elapsed() * 4);
            tokio::select! {
                _ = tokio::time::sleep(self.resync) => {}
                _ = self.moved.notified() => self.quiet(settle).await,
            }
        }
    }

    /// Returns once `settle` passed without a write, or a resync period
    /// after it was called, whichever comes first: one sync after a burst
    /// rather than several during it, where they would compete with the
    /// passes for the API server.
    async fn quiet(&self, settle: Duration) {
        let latest = tokio::time::Instant::now() + self.resync;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(settle) => return,
                _ = tokio::time::sleep_until(latest) => return,
                _ = self.moved.notified() => {}
            }
        }
    }

    /// One sync, on the shared read of the account; returns how many
    /// objects it wrote. It goes one product at a time:
    /// its status built, the object as it is read, compared, written if
    /// different, and dropped before the next (a product's status holds all
    /// its allocations).
    pub async fn sync(&self) -> Result<usize, String> {
        let selector = format!("{INSTANCE_LABEL}={}", self.instance);
        let existing: Vec<(String, Option<String>)> = self
            .api
            .list_metadata(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| e.to_string())?
            .items
            .iter()
            .map(|p| (p.name_any(), p.labels().get(ACCOUNT_LABEL).cloned()))
            .collect();
        let mut writes = 0;
        let mut kept: Vec<String> = Vec::new();
        // An account whose backend cannot be read keeps its objects as they
        // are, and never holds up the others.
        let mut unread: Vec<String> = Vec::new();
        for (account, served) in self.backends.served() {
            match self
                .sync_account(&account, &served.snapshot, &existing, &mut kept)
                .await
            {
                Ok(n) => writes += n,
                Err(e) => {
                    tracing::warn!(%account, "license pools of the account not synced: {e}");
                    unread.push(account);
                }
            }
        }
        let account_of = |label: &Option<String>| {
            label
                .clone()
                .unwrap_or_else(|| crate::licenseaccount::DEFAULT_ACCOUNT.to_string())
        };
        for (gone, label) in existing.iter().filter(|(name, _)| !kept.contains(name)) {
            if unread.contains(&account_of(label)) {
                continue;
            }
            self.api
                .delete(gone, &DeleteParams::default())
                .await
                .map_err(|e| format!("delete licensepool/{gone}: {e}"))?;
            writes += 1;
        }
        self.metrics.pool_writes.inc_by(writes as u64);
        Ok(writes)
    }

    /// Syncs one account's pools; adds their names to `kept`.
    async fn sync_account(
        &self,
        account: &str,
        snapshot: &super::snapshot::Shared,
        existing: &[(String, Option<String>)],
        kept: &mut Vec<String>,
    ) -> Result<usize, String> {
        let products = snapshot.products().await.map_err(|e| e.to_string())?;
        let mut writes = 0;
        for product in &products {
            let Some((_, mut status)) = snapshot
                .pool(&self.instance, product)
                .await
                .map_err(|e| e.to_string())?
            else {
                continue;
            };
            let name = name_in(account, &self.instance, product);
            kept.push(name.clone());
            status.account = Some(account.to_string());
            if existing.iter().any(|(n, _)| *n == name) {
                let current = self
                    .api
                    .get_status(&name)
                    .await
                    .map_err(|e| format!("read licensepool/{name}: {e}"))?;
                if current.status.is_some_and(|s| s.same_figures(&status)) {
                    continue;
                }
            } else {
                let mut object = LicensePool::new(&name, LicensePoolSpec {});
                let labels = object.labels_mut();
                labels.insert(INSTANCE_LABEL.into(), self.instance.clone());
                labels.insert(ACCOUNT_LABEL.into(), account.to_string());
                match self.api.create(&PostParams::default(), &object).await {
                    Ok(_) => writes += 1,
                    // Someone else's object of that name (another
                    // instance's, or made by hand): left alone.
                    Err(kube::Error::Api(e)) if e.code == 409 => {
                        tracing::warn!(
                            "licensepool/{name} exists without the label {INSTANCE_LABEL}={}: left alone",
                            self.instance
                        );
                        continue;
                    }
                    Err(e) => return Err(format!("create licensepool/{name}: {e}")),
                }
            }
            status.observed_time =
                Some(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
            self.write_status(&name, &status)
                .await
                .map_err(|e| format!("status of licensepool/{name}: {e}"))?;
            writes += 1;
        }
        Ok(writes)
    }

    /// Replaces the status of `name` with one JSON patch (which keeps
    /// `resource: null`, where a merge patch would drop it), serialized
    /// straight from `status`; the object the API server sends back is
    /// not decoded.
    async fn write_status(
        &self,
        name: &str,
        status: &LicensePoolStatus,
    ) -> Result<(), kube::Error> {
        #[derive(serde::Serialize)]
        struct Add<'a> {
            op: &'static str,
            path: &'static str,
            value: &'a LicensePoolStatus,
        }
        let body = serde_json::to_vec(&[Add {
            op: "add",
            path: "/status",
            value: status,
        }])
        .map_err(kube::Error::SerdeError)?;
        let request = http::Request::patch(format!(
            "{}/{name}/status",
            LicensePool::url_path(&(), None)
        ))
        .header(http::header::CONTENT_TYPE, "application/json-patch+json")
        .body(body)
        .map_err(kube::Error::HttpError)?;
        self.client.request_text(request).await.map(drop)
    }
}
