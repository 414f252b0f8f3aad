//! `licensor operator`: the Kubernetes controller for `DedicatedLicense`.
//!
//! Wiring only: [`reconcile`] holds the pass (observe -> plan -> apply ->
//! status -> events), [`status`] and [`events`] decide what to report
//! (pure), [`metrics`] serves `/metrics`, `/healthz` and `/readyz`. This
//! module starts them: the health server first, then leader election on a
//! `coordination.k8s.io` Lease, then the controller once this process leads.
//! SIGTERM (or SIGINT) stops the controller gracefully and hands the lease
//! back; losing the lease stops the process with an error, so a supervisor
//! restarts it as a standby. [`webhook`], when configured, adds the cleanup
//! finalizer to new objects at admission, on every replica.

pub mod accounts;
pub mod admission;
pub mod backends;
pub mod backoff;
pub mod conclude;
pub mod events;
pub mod finalizer;
pub mod listing;
pub mod local_webhooks;
pub mod metrics;
pub mod pools;
pub mod reconcile;
pub mod resync;
pub mod snapshot;
pub mod status;
pub mod waiting;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use kube::api::Api;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Controller, WatchStreamExt, controller, predicates, watcher};
use kube::{Client, Resource, ResourceExt};
use kube_lease_manager::{LeaseManagerBuilder, LeaseParams};
use tokio::sync::{mpsc, watch};

use crate::backend::Backend;
use crate::domain::Snapshot;
use crate::plan::{Desired, Options, Plan, plan};
use crate::resource::{DedicatedLicense, PAUSED_ANNOTATION};
use metrics::{Metrics, Readiness};
use reconcile::{Context, Settings};

/// Why the operator stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach the Kubernetes API: {0}")]
    Kubernetes(#[from] kube::Error),
    #[error("leader election: {0}")]
    Lease(#[from] kube_lease_manager::LeaseManagerError),
    #[error("lost the leader lease; stopping so that a standby takes over")]
    LostLease,
    #[error("cannot serve /metrics and the health checks: {0}")]
    Endpoint(#[from] std::io::Error),
    #[error("cannot serve /metrics and the health checks on {address} (--listen): {source}")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Webhook(#[from] webhook::Error),
    #[error(transparent)]
    LocalWebhooks(#[from] local_webhooks::Error),
}

/// Leader election settings.
#[derive(Debug, Clone)]
pub struct Election {
    pub lease_name: String,
    pub namespace: String,
    pub identity: String,
    pub duration: Duration,
    pub renew_before: Duration,
}

/// Everything the operator needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Watch one namespace, or all of them.
    pub namespace: Option<String>,
    /// The operator's own namespace: where the Secrets that LicenseAccounts
    /// name are read.
    pub own_namespace: String,
    pub settings: Settings,
    /// Passes that may run at once.
    pub concurrency: u16,
    pub listen: SocketAddr,
    /// `None` runs without leader election (one replica only).
    pub election: Option<Election>,
    /// The admission webhook, served by every replica (leader or not).
    pub webhook: Option<webhook::Webhook>,
    /// Serve the webhooks here for a local cluster, registered by the
    /// operator itself and removed at exit ([`local_webhooks`]).
    pub local_webhooks: Option<SocketAddr>,
    /// What the validating webhook does with a finding that can never
    /// succeed as written.
    pub admission: admission::Mode,
    /// The webhook warns of an until sooner than this (or past).
    pub expiry_warning: std::time::Duration,
}

/// Plans one object on `part`, what the backend holds for its organization
/// and product; when a name is unknown there, again on the whole account,
/// for the closest names (a rare read: a typo). A failed read of the whole
/// account keeps the first plan. The operator's pass and admission plan
/// one object this way.
pub async fn plan_one(
    desired: &Desired,
    part: &Snapshot,
    backend: &dyn Backend,
    instance: &str,
    metrics: &Metrics,
) -> Plan {
    let opts = Options::one(instance, chrono::Utc::now());
    let planned = plan(vec![desired.clone()], part.clone(), &opts);
    if !planned.names_unknown() {
        return planned;
    }
    metrics.backend_read(metrics::Read::Account);
    match backend.snapshot().await {
        Ok(account) => plan(vec![desired.clone()], account, &opts),
        Err(e) => {
            tracing::debug!("reading the whole account for the closest names: {e}");
            planned
        }
    }
}

/// Longest wait of the validating webhook for the backend: well inside the
/// API server's timeout for the webhook (the chart's default is 3 s).
const ADMISSION_TIMEOUT: Duration = Duration::from_millis(1500);

/// Runs the operator until SIGTERM or an unrecoverable error.
pub async fn run(config: Config, backend: Arc<dyn Backend>) -> Result<(), Error> {
    let client = Client::try_default().await?;
    let metrics = Arc::new(Metrics::new());
    // Every replica keeps the accounts: the webhook answers on each.
    let accounts = Arc::new(accounts::Accounts::default());
    let _accounts = AbortOnDrop(tokio::spawn(accounts.clone().keep(client.clone())));
    let readiness = Arc::new(Readiness::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let local = config
        .local_webhooks
        .map(local_webhooks::Local::new)
        .transpose()?;
    let admission = match local
        .as_ref()
        .map(|l| &l.webhook)
        .or(config.webhook.as_ref())
    {
        Some(w) => {
            let validator = admission::Validator {
                backend: backend.clone(),
                instance: config.settings.instance.clone(),
                mode: config.admission,
                timeout: ADMISSION_TIMEOUT,
                expiry_warning: config.expiry_warning,
                metrics: metrics.clone(),
                accounts: accounts.clone(),
            };
            Some(webhook::serve(w, metrics.clone(), validator, stopped(stop_rx.clone())).await?)
        }
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| Error::Listen {
            address: config.listen,
            source,
        })?;
    let endpoints = tokio::spawn(metrics::serve(
        listener,
        metrics.clone(),
        readiness.clone(),
        stopped(stop_rx.clone()),
    ));
    tokio::spawn(signals(stop_tx.clone()));
    let registered = match &local {
        Some(l) => l.register(&client).await,
        None => Ok(()),
    };
    if let Err(e) = registered {
        let _ = stop_tx.send(true);
        if let Some(l) = local {
            l.remove(&client).await;
        }
        return Err(e.into());
    }

    let parts = Parts {
        config: &config,
        client: client.clone(),
        backend,
        accounts,
        metrics,
    };
    let result = lead_and_run(parts, readiness, stop_rx).await;
    let _ = stop_tx.send(true);
    if let Some(local) = local {
        local.remove(&client).await;
    }
    if let Ok(Err(e)) = endpoints.await {
        return Err(e.into());
    }
    if let Some(admission) = admission
        && let Ok(Ok(Err(e))) = tokio::time::timeout(Duration::from_secs(5), admission).await
    {
        return Err(webhook::Error::Serve(e).into());
    }
    result
}

/// What the controller runs on: the configuration and the clients, set up
/// once by [`run`] and handed to the controller when this replica leads.
struct Parts<'a> {
    config: &'a Config,
    client: Client,
    backend: Arc<dyn Backend>,
    accounts: Arc<accounts::Accounts>,
    metrics: Arc<Metrics>,
}

async fn lead_and_run(
    parts: Parts<'_>,
    readiness: Arc<Readiness>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), Error> {
    let (config, metrics) = (parts.config, parts.metrics.clone());
    let Some(election) = &config.election else {
        readiness.leading();
        metrics.leader.set(1);
        return control(parts, stopped(stop)).await;
    };
    let params = LeaseParams::new(
        election.identity.clone(),
        election.duration.as_secs().max(2),
        election
            .renew_before
            .as_secs()
            .clamp(1, election.duration.as_secs().max(2) - 1),
    );
    let manager = LeaseManagerBuilder::new(parts.client.clone(), &election.lease_name)
        .with_namespace(&election.namespace)
        .with_parameters(params)
        .build()
        .await?;
    let (mut leading, lease_task) = manager.watch().await;
    readiness.standby();
    tracing::info!(identity = %election.identity, lease = %election.lease_name, "waiting for the leader lease");
    while !*leading.borrow_and_update() {
        tokio::select! {
            changed = leading.changed() => if changed.is_err() { return Err(Error::LostLease) },
            _ = stop.changed() => return Ok(()),
        }
    }
    tracing::info!(identity = %election.identity, "leading");
    readiness.leading();
    metrics.leader.set(1);

    let mut lost = leading.clone();
    let end = {
        let mut stop = stop.clone();
        async move {
            tokio::select! {
                _ = stop.changed() => {}
                _ = async { while lost.changed().await.is_ok() && *lost.borrow() {} } => {}
            }
        }
    };
    control(parts, end).await?;
    metrics.leader.set(0);
    if *stop.borrow() {
        // Hand the lease back so a standby takes over at once.
        drop(leading);
        let _ = lease_task.await;
        Ok(())
    } else {
        Err(Error::LostLease)
    }
}

/// The controller itself, until `end` resolves.
async fn control(
    parts: Parts<'_>,
    end: impl Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), Error> {
    let Parts {
        config,
        client,
        backend,
        accounts,
        metrics,
    } = parts;
    let api: Api<DedicatedLicense> = match &config.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let reporter = Reporter {
        controller: reconcile::MANAGER.into(),
        instance: config.election.as_ref().map(|e| e.identity.clone()),
    };
    let events = events::Publisher::start(client.clone(), reporter);
    let (wake_tx, wake_rx) = mpsc::unbounded_channel::<ObjectRef<DedicatedLicense>>();
    // The account's pools as LicensePool objects, kept while this replica
    // leads (the task ends with this function).
    let moved = Arc::new(tokio::sync::Notify::new());
    let ctx = Arc::new(
        Context::new(
            client.clone(),
            backend,
            events,
            metrics.clone(),
            config.settings.clone(),
            wake_tx.clone(),
            moved.clone(),
        )
        .with_accounts(accounts.clone()),
    );
    // Each LicenseAccount's client and status, kept while this replica leads.
    let keeping = AbortOnDrop(tokio::spawn(ctx.backends.clone().keep(
        client.clone(),
        config.own_namespace.clone(),
        accounts.clone(),
    )));
    let growth = AbortOnDrop(tokio::spawn(wake_on_growth(
        ctx.clone(),
        config.settings.pool_poll,
    )));

    // Our own status writes do not bump the generation; skip them, but not
    // what a person changes without one (pause, deletion).
    let (reader, writer) = reflector::store();
    let (listed_tx, listed) = watch::channel(false);
    let list_and_watch = watcher(
        api.clone(),
        watcher::Config::default().any_semantic().page_size(100),
    )
    .default_backoff()
    .modify(resync::trim);
    let objects = listing::reflect(list_and_watch, listing::early_watch(api), writer)
        .inspect_ok(move |event| {
            if matches!(event, watcher::Event::InitDone) {
                listed_tx.send_replace(true);
            }
        })
        .applied_objects()
        .predicate_filter(worth_a_pass, Default::default());
    // The per-object gauges read this controller's cache while it runs.
    let gauges = metrics.clone();
    gauges.objects_from(Some(reader.clone()));
    let pools = pools::Pools::new(
        client,
        ctx.backends.clone(),
        config.settings.instance.clone(),
        config.settings.resync,
        moved,
        metrics,
    );
    let pools = AbortOnDrop(tokio::spawn(pools.keep(listed.clone())));
    let walker = AbortOnDrop(tokio::spawn(resync::walk(
        reader.clone(),
        wake_tx,
        config.settings.resync,
        listed.clone(),
    )));
    let wakes =
        futures::stream::unfold(
            wake_rx,
            |mut rx| async move { rx.recv().await.map(|r| (r, rx)) },
        );

    // A change of the accounts or of a Namespace's labels passes every
    // object again: a pass decides what the tenant rule now says.
    let changes = |rx: watch::Receiver<u64>| {
        futures::stream::unfold(rx, |mut rx| async move {
            rx.changed().await.ok().map(|()| ((), rx))
        })
    };
    let tenancy =
        futures::stream::select(changes(accounts.changed()), changes(ctx.backends.changed()));
    Controller::for_stream(objects, reader)
        .with_config(controller::Config::default().concurrency(config.concurrency))
        .reconcile_on(wakes)
        .reconcile_all_on(tenancy)
        .graceful_shutdown_on(end)
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "controller");
            }
        })
        .await;
    drop(walker);
    drop(keeping);
    drop(growth);
    drop(pools);
    gauges.objects_from(None);
    Ok(())
}

/// Wakes the objects stalled on InsufficientPool when their pool grows
/// outside this operator (a raised total, seats or an allocation given
/// back): while any waits, the account is read every `poll`, once for all
/// of them, and a pool with more free seats than its waiting objects saw
/// wakes them. Nothing waits, nothing is read.
async fn wake_on_growth(ctx: Arc<Context>, poll: Duration) {
    let mut every = tokio::time::interval(poll);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if !ctx.waiting.anyone() {
            continue;
        }
        let own = ctx.backends.own();
        match own.snapshot.refresh().await {
            Ok(pools) => {
                for product in ctx.waiting.wake_if_grown(own.id(), &pools) {
                    tracing::debug!(%product, "the pool grew outside the operator: waking what waits for it");
                }
            }
            Err(e) => tracing::debug!("reading the account for stalled objects: {e}"),
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What of an object is worth a pass when it changes.
fn worth_a_pass(dl: &DedicatedLicense) -> Option<u64> {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    predicates::generation(dl).hash(&mut h);
    dl.annotations().get(PAUSED_ANNOTATION).hash(&mut h);
    dl.meta().deletion_timestamp.is_some().hash(&mut h);
    Some(h.finish())
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

async fn signals(stop: watch::Sender<bool>) {
    crate::shutdown::requested().await;
    tracing::info!("stopping: finishing passes in flight");
    let _ = stop.send(true);
}
