//! One reconcile pass of one `DedicatedLicense`, in named steps:
//! observe the backend (only this object's pool, organization and
//! allocation) -> plan with the CLI's planner -> apply when managed and not
//! paused -> build status (pure) -> write status only when it changed ->
//! events. Deletion runs the same steps with the deletion policy's target and
//! removes the finalizer only once the backend agrees, so a revoke is never
//! lost.
//!
//! Requeue policy: a pass that ends in sync, held or refused waits for a
//! change, or for the resync walker ([`super::resync`]) to ask for it again
//! within the period (refusals do not loop); a pass the backend could not
//! serve comes back with per-object exponential backoff, reset on success. An
//! `InsufficientPool` or `Conflict` refusal also registers the object under its
//! product, and a pass that frees seats of that product or gives up an
//! allocation of it (a revoke, an orphaning release) wakes those objects at
//! once.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action as Requeue;
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::mpsc::UnboundedSender;

use super::conclude::{self, Removal};
use super::events::{self, EventReason, Note, Publisher};
use super::finalizer;
use super::metrics::{AddedBy, Metrics, PassResult, Read};
use super::snapshot;
use super::status::{self, Hold, Pass, Verdict};
use crate::apply::apply_one;
use crate::backend::{Backend, BackendError, Written};
use crate::domain::{Reason, Role, Snapshot};
use crate::plan::{Change, Desired, Options, Outcome, plan, plan_removal};
use crate::resource::{
    API_VERSION, DedicatedLicense, DeletionPolicy, FINALIZER, KIND, needs_finalizer,
};

/// Field manager of the operator's writes.
pub const MANAGER: &str = "licensor-operator";

/// Why a pass failed in a way the controller should retry.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Talking to the Kubernetes API failed (status, finalizer).
    #[error("kubernetes API: {0}")]
    Kubernetes(#[from] kube::Error),
}

/// Objects stalled on `InsufficientPool` or `Conflict` for one product, and
/// how many times its seats were freed or an allocation of it given up.
#[derive(Default)]
struct Waiting {
    objects: HashSet<ObjectRef<DedicatedLicense>>,
    frees: u64,
    /// The fewest free seats a waiting object saw when it stalled: a read
    /// of the account that finds more wakes them (seats freed outside).
    free_seen: Option<i64>,
}

/// Settings of the reconciler.
#[derive(Debug, Clone)]
pub struct Settings {
    pub instance: String,
    pub resync: Duration,
    /// How often the account is read while objects wait for free seats, so
    /// that seats freed outside the cluster wake them: one read for all.
    pub pool_poll: Duration,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
}

/// What every pass shares.
pub struct Context {
    pub client: Client,
    pub backend: Arc<dyn Backend>,
    pub events: Publisher,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
    /// Consecutive backend failures per object (`namespace/name`).
    failures: Mutex<HashMap<String, u32>>,
    /// Objects stalled on `InsufficientPool`, per product.
    waiting: Mutex<HashMap<String, Waiting>>,
    wake: UnboundedSender<ObjectRef<DedicatedLicense>>,
    /// Told when a pass wrote to the backend (the LicensePools follow).
    pub pools_moved: Arc<tokio::sync::Notify>,
    /// The account as last read whole (see [`snapshot`]).
    pub snapshot: Arc<snapshot::Shared>,
}

impl Context {
    pub fn new(
        client: Client,
        backend: Arc<dyn Backend>,
        events: Publisher,
        metrics: Arc<Metrics>,
        settings: Settings,
        wake: UnboundedSender<ObjectRef<DedicatedLicense>>,
        pools_moved: Arc<tokio::sync::Notify>,
    ) -> Context {
        // Read at most twice a resync period, whatever the number of
        // objects (and, while objects wait for seats, every pool poll).
        let snapshot = Arc::new(snapshot::Shared::new(
            backend.clone(),
            metrics.clone(),
            settings.resync / 2,
        ));
        Context {
            client,
            backend,
            events,
            metrics,
            settings,
            failures: Mutex::default(),
            waiting: Mutex::default(),
            wake,
            pools_moved,
            snapshot,
        }
    }

    /// The delay before retrying `key` after its next failure.
    fn backoff(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = failures.entry(key.to_string()).or_insert(0);
        let delay = backoff(&self.settings, *n);
        *n = n.saturating_add(1);
        delay
    }

    fn succeeded(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// Remembers (or forgets) that `dl` waits for free seats of its product.
    /// How many times seats of `product` were freed so far; read before a
    /// pass observes the backend.
    fn frees_so_far(&self, product: &str) -> u64 {
        let map = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        map.get(product).map_or(0, |w| w.frees)
    }

    /// Remembers (or forgets) that `dl` waits for free seats of its product.
    /// If seats were freed since the pass observed (`frees` is what
    /// [`Self::frees_so_far`] said then), it is woken at once instead.
    fn wait_for_seats(&self, dl: &DedicatedLicense, waiting: Option<(u64, Option<i64>)>) {
        let mut map = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let w = map.entry(dl.spec.product.clone()).or_default();
        let r = ObjectRef::from_obj(dl);
        match waiting {
            Some((frees, _)) if frees != w.frees => {
                // The receiver lives as long as the controller.
                let _ = self.wake.send(r);
            }
            Some((_, free)) => {
                w.objects.insert(r);
                w.free_seen = match (w.free_seen, free) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            None => {
                w.objects.remove(&r);
            }
        }
    }

    /// A write of this operator's: the shared read of the account takes
    /// it, and the LicensePools show it shortly.
    async fn recorded(&self, organization: &str, product: &str, written: Option<&Written>) {
        if let Some(w) = written {
            self.snapshot.record(organization, product, w).await;
        }
        self.pools_moved.notify_one();
    }

    /// Whether any object waits for free seats (stalled on InsufficientPool).
    pub fn anyone_waiting(&self) -> bool {
        let map = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        map.values().any(|w| !w.objects.is_empty())
    }

    /// Wakes what waits for a product whose pool, as just read, has more
    /// free seats than its waiting objects saw when they stalled: seats
    /// freed outside this operator (a raised total, released seats, a
    /// lowered allocation). Returns the products woken.
    pub fn wake_if_grown(&self, pools: &[(String, i64)]) -> Vec<String> {
        let grown: Vec<String> = {
            let map = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
            pools
                .iter()
                .filter(|(product, free)| {
                    map.get(product).is_some_and(|w| {
                        !w.objects.is_empty() && w.free_seen.is_some_and(|seen| *free > seen)
                    })
                })
                .map(|(product, _)| product.clone())
                .collect()
        };
        for product in &grown {
            self.seats_freed(product);
        }
        grown
    }

    /// Seats of `product` were freed, or an allocation of it given up
    /// (by this operator, or outside it as the shared read of the account
    /// found): re-queue everything waiting for that.
    pub fn seats_freed(&self, product: &str) {
        let mut map = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let w = map.entry(product.to_string()).or_default();
        w.frees += 1;
        w.free_seen = None;
        for r in std::mem::take(&mut w.objects) {
            let _ = self.wake.send(r);
        }
    }
}

/// Base delay doubled per earlier failure, capped.
pub fn backoff(settings: &Settings, failures: u32) -> Duration {
    settings
        .backoff_base
        .saturating_mul(2u32.saturating_pow(failures.min(31)))
        .min(settings.backoff_cap)
}

/// The controller's entry point for one object.
pub async fn reconcile(dl: Arc<DedicatedLicense>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let started = Instant::now();
    let _running = ctx.events.running();
    let result = if dl.meta().deletion_timestamp.is_some() {
        finalize(&dl, &ctx).await
    } else {
        ensure(&dl, &ctx).await
    };
    ctx.metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    result
}

/// How a pass ended: its `result` label in `licensor_reconciles_total`, and
/// when the object comes back.
enum Ended {
    /// In sync, written, or held: back when it changes, or at the walker's
    /// next round.
    Ok,
    /// Refused by the rules: as `Ok` (or woken earlier, when seats free).
    Refused,
    /// The backend could not serve it, or the write went stale: back after
    /// `0`.
    Retrying(Duration),
    /// The finalizer is gone: nothing to do until the object changes.
    Released,
    /// The Kubernetes API refused a write: back after `0`.
    Failed(Duration),
}

impl Ended {
    fn label(&self) -> PassResult {
        match self {
            Ended::Ok | Ended::Released => PassResult::Ok,
            Ended::Refused => PassResult::Refused,
            Ended::Retrying(_) => PassResult::Retrying,
            Ended::Failed(_) => PassResult::Error,
        }
    }

    /// Counts the pass and says when it comes back.
    fn requeue(self, ctx: &Context) -> Requeue {
        ctx.metrics.result(self.label());
        match self {
            Ended::Ok | Ended::Refused | Ended::Released => Requeue::await_change(),
            Ended::Retrying(after) | Ended::Failed(after) => Requeue::requeue(after),
        }
    }
}

/// Requeue after a failed pass (the Kubernetes API refused a write).
pub fn error_policy(dl: Arc<DedicatedLicense>, error: &Error, ctx: Arc<Context>) -> Requeue {
    let key = key(&dl);
    let delay = ctx.backoff(&key);
    tracing::warn!(object = %key, error = %error, retry_in = ?delay, "reconcile failed");
    Ended::Failed(delay).requeue(&ctx)
}

fn key(dl: &DedicatedLicense) -> String {
    format!("{}/{}", dl.namespace().unwrap_or_default(), dl.name_any())
}

fn api(dl: &DedicatedLicense, ctx: &Context) -> Api<DedicatedLicense> {
    Api::namespaced(ctx.client.clone(), &dl.namespace().unwrap_or_default())
}

/// What the object asks for, as the planner sees it.
fn desired(dl: &DedicatedLicense, ctx: &Context) -> Desired {
    // A deleted and re-created object of the same name is a new intent.
    let scope = format!(
        "{}/{}",
        dl.meta().uid.as_deref().unwrap_or_default(),
        dl.meta().generation.unwrap_or_default()
    );
    dl.spec.desired(
        &ctx.settings.instance,
        &dl.namespace().unwrap_or_default(),
        &dl.name_any(),
        dl.annotations(),
        scope,
    )
}

/// Brings the backend to the spec (or reports why not).
async fn ensure(dl: &DedicatedLicense, ctx: &Context) -> Result<Requeue, Error> {
    if needs_finalizer(&dl.spec, dl.finalizers()) {
        add_finalizer(dl, ctx).await?;
        ctx.metrics.finalizer_added(AddedBy::Operator);
    }
    let wanted = desired(dl, ctx);
    if let Some(ended) = checked_quietly(dl, ctx, &wanted).await {
        return Ok(ended.requeue(ctx));
    }
    let frees_before = ctx.frees_so_far(&wanted.product);
    ctx.metrics.backend_read(Read::Allocation);
    let snapshot = match ctx
        .backend
        .observe(&wanted.organization, &wanted.product)
        .await
    {
        Ok(s) => s,
        Err(e) => return unavailable(dl, ctx, e, false).await,
    };
    let drift = conclude::allocation_in(&snapshot, &wanted).is_some_and(|dedicated| {
        status::drifted(dl.status.as_ref(), dl.meta().generation, dedicated)
    });
    let Some(mut change) = plan_one(&wanted, &snapshot, ctx).await else {
        return Ok(Requeue::requeue(ctx.settings.resync));
    };
    let written = apply_one(&mut change, ctx.backend.as_ref()).await;
    if change.outcome == Outcome::Applied {
        ctx.recorded(&wanted.organization, &wanted.product, written.as_ref())
            .await;
    }
    let generation = dl.meta().generation;
    let Some(pass) = conclude::ensured(
        generation,
        &wanted,
        &snapshot,
        drift,
        &change,
        written.as_ref(),
    ) else {
        return failed(dl, ctx, &change, false).await;
    };
    write_status_and_events(dl, ctx, &pass).await?;
    Ok(count_and_wake(dl, ctx, &pass, frees_before).requeue(ctx))
}

/// An object whose status is Ready for its generation is checked against
/// the shared snapshot of the account: when the planner finds nothing to
/// write and its status would stay as it is, the pass is done without a
/// backend call of its own. Anything else (drift, a refusal, a status that
/// would change, a snapshot that cannot be read) takes the full pass, which
/// reads its own allocation again.
async fn checked_quietly(dl: &DedicatedLicense, ctx: &Context, wanted: &Desired) -> Option<Ended> {
    if !ready_for_its_generation(dl) {
        return None;
    }
    let previous = dl.status.as_ref()?;
    let generation = dl.meta().generation;
    let snapshot = ctx
        .snapshot
        .observe(&wanted.organization, &wanted.product)
        .await
        .ok()?;
    let change = plan(
        vec![wanted.clone()],
        snapshot.clone(),
        &Options::one(&ctx.settings.instance),
    )
    .changes
    .pop()?;
    if change.outcome != Outcome::Unchanged {
        return None;
    }
    let drift = conclude::allocation_in(&snapshot, wanted)
        .is_some_and(|dedicated| status::drifted(Some(previous), generation, dedicated));
    let pass = conclude::ensured(generation, wanted, &snapshot, drift, &change, None)?;
    if status::build(Some(previous), &pass, Timestamp::now()) != *previous {
        return None;
    }
    ctx.metrics.quiet_check();
    Some(count_and_wake(dl, ctx, &pass, 0))
}

/// The object's status says Ready for the generation it has now.
pub fn ready_for_its_generation(dl: &DedicatedLicense) -> bool {
    let generation = dl.meta().generation;
    dl.status.as_ref().is_some_and(|s| {
        generation.is_some()
            && s.observed_generation == generation
            && s.conditions
                .iter()
                .any(|c| c.type_ == status::READY && status::Is::True.of(c))
    })
}

/// The change that brings the backend to `wanted`, from the planner. A pass
/// reads only its own pool; a name the account does not have is rare, so
/// only then is the whole account read, for the closest names.
async fn plan_one(wanted: &Desired, snapshot: &Snapshot, ctx: &Context) -> Option<Change> {
    super::plan_one(
        wanted,
        snapshot,
        ctx.backend.as_ref(),
        &ctx.settings.instance,
        &ctx.metrics,
    )
    .await
    .changes
    .pop()
}

/// After the status is written: wake-ups, metrics, and how the pass ended.
fn count_and_wake(dl: &DedicatedLicense, ctx: &Context, pass: &Pass, frees_before: u64) -> Ended {
    ctx.succeeded(&key(dl));
    ctx.metrics.backend_answered();
    let waits = conclude::waits_for_the_pool(pass);
    let free_seen = pass.pool.as_ref().map(|p| p.free);
    ctx.wait_for_seats(dl, waits.then_some((frees_before, free_seen)));
    if conclude::freed_seats(pass) {
        ctx.seats_freed(&pass.product);
    }
    if let Some(p) = &pass.pool {
        ctx.metrics.pool(p);
    }
    tracing::debug!(object = %key(dl), verdict = ?pass.verdict, "reconciled");
    match pass.verdict {
        Verdict::Refused { reason, .. } => {
            ctx.metrics.error(reason);
            Ended::Refused
        }
        _ => Ended::Ok,
    }
}

/// Runs the deletion policy; the finalizer goes only when it is done.
async fn finalize(dl: &DedicatedLicense, ctx: &Context) -> Result<Requeue, Error> {
    if !dl.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Requeue::await_change());
    }
    let wanted = desired(dl, ctx);
    let generation = dl.meta().generation;
    ctx.wait_for_seats(dl, None);
    match wanted.hold {
        Some(Hold::Observe) => return remove_finalizer(dl, ctx).await,
        Some(Hold::Paused) => {
            let held = Verdict::Held {
                hold: Hold::Paused,
                in_sync: false,
            };
            let pass = conclude::unseen(generation, &wanted, true, held);
            write_status_and_events(dl, ctx, &pass).await?;
            return Ok(Requeue::requeue(ctx.settings.resync));
        }
        None => {}
    }
    if dl.spec.deletion_policy == DeletionPolicy::Orphan {
        return orphan(dl, ctx, &wanted).await;
    }

    ctx.metrics.backend_read(Read::Allocation);
    let snapshot = match ctx
        .backend
        .observe(&wanted.organization, &wanted.product)
        .await
    {
        Ok(s) => s,
        Err(e) => return unavailable(dl, ctx, e, true).await,
    };
    let mut change = plan_removal(&wanted, &snapshot, Role::AccountAdmin);
    let written = apply_one(&mut change, ctx.backend.as_ref()).await;
    if change.outcome == Outcome::Applied {
        ctx.recorded(&wanted.organization, &wanted.product, written.as_ref())
            .await;
    }
    match conclude::removed(generation, &wanted, &snapshot, &change, written.as_ref()) {
        Removal::Revoked(pass) => {
            let notes = events::for_pass(dl.status.as_ref(), &Default::default(), &pass);
            ctx.events.publish(dl, &notes);
            ctx.seats_freed(&wanted.product);
            if let Some(p) = &pass.pool {
                ctx.metrics.pool(p);
            }
            remove_finalizer(dl, ctx).await
        }
        Removal::NothingToRevoke => {
            tracing::info!(object = %key(dl), "{}", change.message);
            remove_finalizer(dl, ctx).await
        }
        Removal::Waits(pass) => {
            write_status_and_events(dl, ctx, &pass).await?;
            Ok(Requeue::requeue(ctx.settings.resync))
        }
        Removal::NotDecided => failed(dl, ctx, &change, true).await,
    }
}

/// `deletionPolicy: Orphan`: gives up the ownership and leaves the seats.
async fn orphan(dl: &DedicatedLicense, ctx: &Context, wanted: &Desired) -> Result<Requeue, Error> {
    match ctx
        .backend
        .release(&wanted.organization, &wanted.product, &wanted.managed_by)
        .await
    {
        Ok(()) => {
            let note = Note {
                warning: false,
                reason: EventReason::Orphaned,
                message: format!(
                    "released ownership; {} keeps its {} licenses",
                    wanted.organization, wanted.product
                ),
            };
            ctx.events.publish(dl, &[note]);
            ctx.snapshot
                .released(&wanted.organization, &wanted.product)
                .await;
            ctx.pools_moved.notify_one();
            // An object refused with Conflict over it may now adopt it.
            ctx.seats_freed(&wanted.product);
            remove_finalizer(dl, ctx).await
        }
        // Someone else manages it, or it cannot exist (a typo in the
        // organization or product): there is nothing of ours to leave.
        Err(BackendError::Refused(r))
            if matches!(
                r.reason,
                Reason::Conflict | Reason::UnknownOrganization | Reason::UnknownProduct
            ) =>
        {
            remove_finalizer(dl, ctx).await
        }
        Err(e) => unavailable(dl, ctx, e, true).await,
    }
}

/// A write that the backend did not decide (unavailable, stale).
async fn failed(
    dl: &DedicatedLicense,
    ctx: &Context,
    change: &Change,
    deleting: bool,
) -> Result<Requeue, Error> {
    if change.reason == Some(Reason::BackendUnavailable) {
        let e = BackendError::Unavailable(change.message.clone());
        return unavailable(dl, ctx, e, deleting).await;
    }
    // Someone wrote the allocation between our read and our write: plan again.
    let delay = ctx.backoff(&key(dl));
    tracing::info!(object = %key(dl), reason = %change.message, retry_in = ?delay, "write went stale");
    Ok(Ended::Retrying(delay).requeue(ctx))
}

/// The backend could not serve the pass: say so and back off.
async fn unavailable(
    dl: &DedicatedLicense,
    ctx: &Context,
    e: BackendError,
    deleting: bool,
) -> Result<Requeue, Error> {
    let wanted = desired(dl, ctx);
    let verdict = match e {
        BackendError::Refused(r) => Verdict::Refused {
            reason: r.reason,
            message: r.message,
        },
        BackendError::Unauthorized(m) => Verdict::Refused {
            reason: Reason::Forbidden,
            message: format!(
                "the backend refused the operator's credentials: {m}; check the token"
            ),
        },
        other => Verdict::Retrying {
            reason: Reason::BackendUnavailable,
            message: format!("backend {}: {other}", ctx.backend.location()),
        },
    };
    let retry = matches!(verdict, Verdict::Retrying { .. });
    match &verdict {
        Verdict::Retrying { message, .. } => ctx.metrics.backend_failed(message),
        _ => ctx.metrics.backend_answered(),
    }
    if let Verdict::Refused { reason, message } | Verdict::Retrying { reason, message } = &verdict {
        tracing::warn!(object = %key(dl), reason = reason.as_str(), deleting, "{message}");
    }
    let pass = conclude::unseen(dl.meta().generation, &wanted, deleting, verdict);
    write_status_and_events(dl, ctx, &pass).await?;
    if let Verdict::Refused { reason, .. } | Verdict::Retrying { reason, .. } = pass.verdict {
        ctx.metrics.error(reason);
    }
    let ended = if retry {
        Ended::Retrying(ctx.backoff(&key(dl)))
    } else {
        Ended::Refused
    };
    Ok(ended.requeue(ctx))
}

/// Builds the status, writes it if it changed, and publishes the events.
async fn write_status_and_events(
    dl: &DedicatedLicense,
    ctx: &Context,
    pass: &Pass,
) -> Result<(), Error> {
    let previous = dl.status.as_ref();
    let next = status::build(previous, pass, Timestamp::now());
    let notes = events::for_pass(previous, &next, pass);
    if previous != Some(&next) {
        let body = json!({"apiVersion": API_VERSION, "kind": KIND, "status": next});
        api(dl, ctx)
            .patch_status(
                &dl.name_any(),
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await?;
    }
    for n in &notes {
        if n.warning {
            tracing::warn!(object = %key(dl), reason = %n.reason, "{}", n.message);
        } else {
            tracing::info!(object = %key(dl), reason = %n.reason, "{}", n.message);
        }
    }
    ctx.events.publish(dl, &notes);
    Ok(())
}

async fn add_finalizer(dl: &DedicatedLicense, ctx: &Context) -> Result<(), Error> {
    patch_finalizers(dl, ctx, finalizer::add(dl.finalizers(), true)).await
}

async fn remove_finalizer(dl: &DedicatedLicense, ctx: &Context) -> Result<Requeue, Error> {
    if let Some(patch) = finalizer::remove(dl.finalizers()) {
        patch_finalizers(dl, ctx, patch).await?;
    }
    ctx.succeeded(&key(dl));
    Ok(Ended::Released.requeue(ctx))
}

/// A JSON patch of the finalizer list; its `test` makes it fail rather than
/// clobber a list someone else changed meanwhile.
async fn patch_finalizers(
    dl: &DedicatedLicense,
    ctx: &Context,
    patch: json_patch::Patch,
) -> Result<(), Error> {
    api(dl, ctx)
        .patch(
            &dl.name_any(),
            &PatchParams {
                field_manager: Some(MANAGER.into()),
                ..PatchParams::default()
            },
            &Patch::Json::<()>(patch),
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let settings = Settings {
            instance: "default".into(),
            resync: Duration::from_secs(300),
            pool_poll: Duration::from_secs(5),
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(60),
        };
        let delays: Vec<u64> = (0..9).map(|n| backoff(&settings, n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff(&settings, u32::MAX), Duration::from_secs(60));
    }
}
