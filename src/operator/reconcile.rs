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
//! serve comes back with per-object exponential backoff ([`super::backoff`]),
//! reset on success. An `InsufficientPool` or `Conflict` refusal also
//! registers the object under its product ([`super::waiting`]), and a pass
//! that frees seats of that product or gives up an allocation of it (a
//! revoke, an orphaning release) wakes those objects at once. What the
//! backend answered is concluded in [`super::conclude`], pure; this file
//! does the I/O around it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action as Requeue;
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::mpsc::UnboundedSender;

use super::accounts::Accounts;
use super::backends::{Backends, Served};
use super::backoff::Backoff;
use super::conclude::{self, Removal};
use super::events::{self, EventReason, Note, Publisher};
use super::finalizer;
use super::metrics::{AddedBy, Metrics, PassResult, Read};
use super::snapshot::{self, Followers};
use super::status::{self, Hold, Pass, Verdict};
use super::waiting::Waiters;
use crate::apply::apply_one;
use crate::backend::{Backend, BackendError, Written};
use crate::domain::{Reason, Role, Snapshot};
use crate::licenseaccount::Directory;
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

/// What every pass shares: the clients, and one part per mechanism.
pub struct Context {
    pub client: Client,
    /// Each account's backend (the operator's own for `default`).
    pub backends: Arc<Backends>,
    pub events: Publisher,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
    /// Consecutive failures per object.
    backoff: Backoff,
    /// Objects stalled for want of free seats, and their wake-ups.
    pub waiting: Waiters,
    /// Told of every write of this operator's (the shared read of the
    /// account, the LicensePools).
    pub followers: Followers,
    /// The cluster's accounts and Namespaces, for the tenant rule.
    pub accounts: Arc<Accounts>,
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
        let ttl = settings.resync / 2;
        let own = Arc::new(Served::new(
            backend.clone(),
            Arc::new(snapshot::Shared::new(backend, metrics.clone(), ttl)),
        ));
        Context {
            client,
            backends: Arc::new(Backends::new(own, metrics.clone(), ttl)),
            events,
            metrics,
            backoff: Backoff::new(settings.backoff_base, settings.backoff_cap),
            settings,
            waiting: Waiters::new(wake),
            followers: Followers { pools_moved },
            accounts: Arc::default(),
        }
    }

    /// The context reading `accounts` for the tenant rule (none otherwise:
    /// every object on `default`, with no tenants).
    pub fn with_accounts(self, accounts: Arc<Accounts>) -> Context {
        Context { accounts, ..self }
    }

    /// The accounts and Namespaces the tenant rule reads now.
    fn directory(&self) -> Arc<crate::licenseaccount::Directory> {
        self.accounts.directory()
    }
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
        self.requeue_by(ctx, None)
    }

    /// [`Ended::requeue`], and back by `ends` at the latest: a temporary
    /// allocation's until, which the operator acts at.
    fn requeue_by(self, ctx: &Context, ends: Option<Duration>) -> Requeue {
        ctx.metrics.result(self.label());
        match (self, ends) {
            (Ended::Released, _) => Requeue::await_change(),
            (Ended::Ok | Ended::Refused, None) => Requeue::await_change(),
            (Ended::Ok | Ended::Refused, Some(ends)) => Requeue::requeue(ends),
            (Ended::Retrying(after) | Ended::Failed(after), ends) => {
                Requeue::requeue(ends.map_or(after, |ends| ends.min(after)))
            }
        }
    }
}

/// How long until a temporary allocation's count ends, when that is
/// sooner than the resync walker comes back (a later one is timed by a
/// later pass).
fn ends_in(wanted: &Desired, resync: Duration) -> Option<Duration> {
    let until = wanted.expiry?.until;
    (until - chrono::Utc::now())
        .to_std()
        .ok()
        .filter(|d| *d < resync)
}

/// Requeue after a failed pass (the Kubernetes API refused a write).
pub fn error_policy(dl: Arc<DedicatedLicense>, error: &Error, ctx: Arc<Context>) -> Requeue {
    let key = key(&dl);
    let delay = ctx.backoff.failed(&key);
    tracing::warn!(object = %key, error = %error, retry_in = ?delay, "reconcile failed");
    Ended::Failed(delay).requeue(&ctx)
}

fn key(dl: &DedicatedLicense) -> String {
    format!("{}/{}", dl.namespace().unwrap_or_default(), dl.name_any())
}

fn api(dl: &DedicatedLicense, ctx: &Context) -> Api<DedicatedLicense> {
    Api::namespaced(ctx.client.clone(), &dl.namespace().unwrap_or_default())
}

/// What the object asks for, as the planner sees it, and whether its
/// namespace may ask for it (the tenant rule).
fn desired(dl: &DedicatedLicense, ctx: &Context, directory: &Directory) -> Desired {
    // A deleted and re-created object of the same name is a new intent.
    let scope = format!(
        "{}/{}",
        dl.meta().uid.as_deref().unwrap_or_default(),
        dl.meta().generation.unwrap_or_default()
    );
    dl.spec.clone().desired(
        &ctx.settings.instance,
        &dl.namespace().unwrap_or_default(),
        &dl.name_any(),
        dl.annotations(),
        scope,
        directory,
    )
}

/// Brings the backend to the spec (or reports why not).
async fn ensure(dl: &DedicatedLicense, ctx: &Context) -> Result<Requeue, Error> {
    if needs_finalizer(&dl.spec, dl.finalizers()) {
        add_finalizer(dl, ctx).await?;
        ctx.metrics.finalizer_added(AddedBy::Operator);
    }
    let directory = ctx.directory();
    let wanted = desired(dl, ctx, &directory);
    if let Some(refusal) = wanted.denied.as_deref().cloned() {
        return denied(dl, ctx, &wanted, refusal).await;
    }
    let served = match ctx.backends.of(dl.spec.account(), &directory) {
        Ok(served) => served,
        Err(refusal) => return denied(dl, ctx, &wanted, refusal).await,
    };
    let ends = ends_in(&wanted, ctx.settings.resync);
    if let Some(ended) = checked_quietly(dl, ctx, &served, &wanted).await {
        return Ok(ended.requeue_by(ctx, ends));
    }
    let pool = (served.id(), wanted.product.clone());
    let frees_before = ctx.waiting.frees_so_far(&pool);
    let c = match converge(ctx, &served, &wanted, Goal::Spec).await {
        Ok(Some(c)) => c,
        Ok(None) => return Ok(Requeue::requeue(ends.unwrap_or(ctx.settings.resync))),
        Err(e) => return unanswered(dl, ctx, &served, &wanted, e, false).await,
    };
    let generation = dl.meta().generation;
    let drift = conclude::allocation_in(&c.snapshot, &wanted)
        .is_some_and(|dedicated| status::drifted(dl.status.as_ref(), generation, dedicated));
    let Some(pass) = conclude::ensured(
        generation,
        &wanted,
        &c.snapshot,
        drift,
        &c.change,
        c.written.as_ref(),
    ) else {
        return not_decided(dl, ctx, &served, &wanted, &c.change, false).await;
    };
    write_status_and_events(dl, ctx, &pass).await?;
    Ok(count_and_wake(dl, ctx, &served, &pass, frees_before).requeue_by(ctx, ends))
}

/// Where a pass brings the backend.
#[derive(Debug, Clone, Copy)]
enum Goal {
    /// What the spec asks.
    Spec,
    /// The deletion policy's revoke.
    Removal,
}

/// What a pass saw and did: the backend as observed, the change planned on
/// it (its outcome set by the write), and what the write returned.
struct Converged {
    snapshot: Snapshot,
    change: Change,
    written: Option<Written>,
}

/// Observe -> plan -> apply -> record, the one sequence every pass runs
/// against the backend: it reads only this object's pool, organization and
/// allocation, plans with the CLI's planner, applies when the plan says so,
/// and tells the followers of an applied write. `None`: the planner had
/// nothing to say about the object. An error: the backend could not be
/// read.
async fn converge(
    ctx: &Context,
    served: &Served,
    wanted: &Desired,
    goal: Goal,
) -> Result<Option<Converged>, BackendError> {
    ctx.metrics.backend_read(Read::Allocation);
    let snapshot = served
        .backend
        .observe(&wanted.organization, &wanted.product)
        .await?;
    let mut change = match goal {
        Goal::Spec => match plan_one(wanted, &snapshot, ctx, served).await {
            Some(change) => change,
            None => return Ok(None),
        },
        Goal::Removal => plan_removal(wanted, &snapshot, Role::AccountAdmin),
    };
    let written = apply_one(&mut change, served.backend.as_ref()).await;
    if change.outcome == Outcome::Applied {
        ctx.followers
            .wrote(
                served,
                &wanted.organization,
                &wanted.product,
                written.as_ref(),
            )
            .await;
    }
    Ok(Some(Converged {
        snapshot,
        change,
        written,
    }))
}

/// An object whose status is Ready for its generation is checked against
/// the shared snapshot of the account: when the planner finds nothing to
/// write and its status would stay as it is, the pass is done without a
/// backend call of its own. Anything else (drift, a refusal, a status that
/// would change, a snapshot that cannot be read) takes the full pass, which
/// reads its own allocation again.
async fn checked_quietly(
    dl: &DedicatedLicense,
    ctx: &Context,
    served: &Served,
    wanted: &Desired,
) -> Option<Ended> {
    if !ready_for_its_generation(dl) {
        return None;
    }
    let previous = dl.status.as_ref()?;
    let generation = dl.meta().generation;
    let snapshot = served
        .snapshot
        .observe(&wanted.organization, &wanted.product)
        .await
        .ok()?;
    let change = plan(
        vec![wanted.clone()],
        snapshot.clone(),
        &Options::one(&ctx.settings.instance, chrono::Utc::now()),
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
    Some(count_and_wake(dl, ctx, served, &pass, 0))
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
async fn plan_one(
    wanted: &Desired,
    snapshot: &Snapshot,
    ctx: &Context,
    served: &Served,
) -> Option<Change> {
    super::plan_one(
        wanted,
        snapshot,
        served.backend.as_ref(),
        &ctx.settings.instance,
        &ctx.metrics,
    )
    .await
    .changes
    .pop()
}

/// After the status is written: wake-ups, metrics, and how the pass ended.
fn count_and_wake(
    dl: &DedicatedLicense,
    ctx: &Context,
    served: &Served,
    pass: &Pass,
    frees_before: u64,
) -> Ended {
    let pool = (served.id(), pass.product.clone());
    ctx.backoff.succeeded(&key(dl));
    ctx.metrics.backend_answered();
    if conclude::waits_for_the_pool(pass) {
        let free_seen = pass.pool.as_ref().map(|p| p.free);
        ctx.waiting.wait(dl, pool.clone(), frees_before, free_seen);
    } else {
        ctx.waiting.forget(dl);
    }
    if conclude::freed_seats(pass) {
        ctx.waiting.seats_freed(&pool);
    }
    if let Some(p) = &pass.pool {
        ctx.metrics.pool(dl.spec.account(), p);
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
    let directory = ctx.directory();
    let wanted = desired(dl, ctx, &directory);
    let generation = dl.meta().generation;
    ctx.waiting.forget(dl);
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
    let served = match ctx.backends.of(dl.spec.account(), &directory) {
        Ok(served) => served,
        // Its account is gone: nothing of it can be reached, and nothing
        // is revoked.
        Err(r) if r.reason == Reason::UnknownAccount => return remove_finalizer(dl, ctx).await,
        // Its backend is not connected (yet): the revoke waits for it.
        Err(r) => {
            let e = BackendError::Unavailable(r.message);
            return unanswered(dl, ctx, ctx.backends.own(), &wanted, e, true).await;
        }
    };
    match wanted.denied.as_ref().map(|r| r.reason) {
        // No longer this namespace's to manage: ownership is given up and
        // no count changes.
        Some(Reason::Forbidden) => return orphan(dl, ctx, &served, &wanted).await,
        // Never written here: nothing to give back.
        Some(_) => return remove_finalizer(dl, ctx).await,
        None => {}
    }
    if dl.spec.deletion_policy == DeletionPolicy::Orphan {
        return orphan(dl, ctx, &served, &wanted).await;
    }
    let c = match converge(ctx, &served, &wanted, Goal::Removal).await {
        Ok(Some(c)) => c,
        Ok(None) => return Ok(Requeue::requeue(ctx.settings.resync)),
        Err(e) => return unanswered(dl, ctx, &served, &wanted, e, true).await,
    };
    let removal = conclude::removed(
        generation,
        &wanted,
        &c.snapshot,
        &c.change,
        c.written.as_ref(),
    );
    match removal {
        Removal::Revoked(pass) => {
            let notes = events::for_pass(dl.status.as_ref(), &Default::default(), &pass);
            ctx.events.publish(dl, &notes);
            ctx.waiting
                .seats_freed(&(served.id(), wanted.product.clone()));
            if let Some(p) = &pass.pool {
                ctx.metrics.pool(dl.spec.account(), p);
            }
            remove_finalizer(dl, ctx).await
        }
        Removal::NothingToRevoke => {
            tracing::info!(object = %key(dl), "{}", c.change.message);
            remove_finalizer(dl, ctx).await
        }
        Removal::Waits(pass) => {
            write_status_and_events(dl, ctx, &pass).await?;
            Ok(Requeue::requeue(ctx.settings.resync))
        }
        Removal::NotDecided => not_decided(dl, ctx, &served, &wanted, &c.change, true).await,
    }
}

/// `deletionPolicy: Orphan`: gives up the ownership and leaves the seats.
async fn orphan(
    dl: &DedicatedLicense,
    ctx: &Context,
    served: &Served,
    wanted: &Desired,
) -> Result<Requeue, Error> {
    match served
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
            ctx.followers
                .released(served, &wanted.organization, &wanted.product)
                .await;
            // An object refused with Conflict over it may now adopt it.
            ctx.waiting
                .seats_freed(&(served.id(), wanted.product.clone()));
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
        Err(e) => unanswered(dl, ctx, served, wanted, e, true).await,
    }
}

/// An object its namespace may not ask for (the tenant rule), or of an
/// account this operator does not serve: Stalled with the reason, and no
/// backend call at all (a tenant change never writes by itself).
async fn denied(
    dl: &DedicatedLicense,
    ctx: &Context,
    wanted: &Desired,
    refusal: crate::domain::Refusal,
) -> Result<Requeue, Error> {
    ctx.waiting.forget(dl);
    let verdict = Verdict::Refused {
        reason: refusal.reason,
        message: refusal.message,
    };
    let pass = conclude::unseen(dl.meta().generation, wanted, false, verdict);
    write_status_and_events(dl, ctx, &pass).await?;
    ctx.backoff.succeeded(&key(dl));
    ctx.metrics.error(refusal.reason);
    Ok(Ended::Refused.requeue(ctx))
}

/// A write that the backend did not decide (unavailable, stale).
async fn not_decided(
    dl: &DedicatedLicense,
    ctx: &Context,
    served: &Served,
    wanted: &Desired,
    change: &Change,
    deleting: bool,
) -> Result<Requeue, Error> {
    if change.reason == Some(Reason::BackendUnavailable) {
        let e = BackendError::Unavailable(change.message.clone());
        return unanswered(dl, ctx, served, wanted, e, deleting).await;
    }
    // Someone wrote the allocation between our read and our write: plan again.
    let delay = ctx.backoff.failed(&key(dl));
    tracing::info!(object = %key(dl), reason = %change.message, retry_in = ?delay, "write went stale");
    Ok(Ended::Retrying(delay).requeue(ctx))
}

/// The backend answered the pass with an error ([`conclude::unanswered`]):
/// say so, and back off when it is the backend's to retry.
async fn unanswered(
    dl: &DedicatedLicense,
    ctx: &Context,
    served: &Served,
    wanted: &Desired,
    e: BackendError,
    deleting: bool,
) -> Result<Requeue, Error> {
    let location = served.backend.location();
    let pass = conclude::unanswered(dl.meta().generation, wanted, deleting, e, &location);
    let (Verdict::Refused { reason, message } | Verdict::Retrying { reason, message }) =
        &pass.verdict
    else {
        unreachable!("an unanswered pass is refused or retried");
    };
    let retry = matches!(pass.verdict, Verdict::Retrying { .. });
    if retry {
        ctx.metrics.backend_failed(message);
    } else {
        ctx.metrics.backend_answered();
    }
    tracing::warn!(object = %key(dl), reason = reason.as_str(), deleting, "{message}");
    let reason = *reason;
    write_status_and_events(dl, ctx, &pass).await?;
    ctx.metrics.error(reason);
    let ended = if retry {
        Ended::Retrying(ctx.backoff.failed(&key(dl)))
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
    ctx.backoff.succeeded(&key(dl));
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

/// The driver against a recorded API server: every request a pass makes is
/// answered and kept, so a test asserts the calls, in order, and what the
/// store holds after. The backend is a real SQLite store, or one that is
/// down. The end-to-end tests run the same passes on a real API server.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::local::StoreBackend;
    use crate::backend::store::{Principal, Store};
    use crate::backend::{AuditEntry, Fixture};
    use crate::domain::{AllocationWrite, PoolView, SeatChange};
    use kube::client::Body;
    use kube::runtime::events::Reporter;
    use serde_json::Value;
    use std::sync::Mutex;

    /// One request the pass made.
    #[derive(Debug, Clone)]
    struct Call {
        method: String,
        /// The path below the object's collection (`qa`, `qa/status`).
        path: String,
        content_type: String,
        body: Value,
    }

    /// A client whose requests go to a recorded server answering `object`
    /// for every call on it (events are answered and not kept).
    fn recorded(object: &DedicatedLicense) -> (Client, Arc<Mutex<Vec<Call>>>) {
        const BASE: &str = "/apis/licensor.dev/v1alpha1/namespaces/team/dedicatedlicenses/";
        let (service, mut handle) =
            tower_test::mock::pair::<http::Request<Body>, http::Response<Body>>();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let kept = calls.clone();
        let answer = serde_json::to_vec(object).unwrap();
        tokio::spawn(async move {
            while let Some((request, respond)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let bytes = body.collect_bytes().await.unwrap_or_default();
                let path = parts.uri.path();
                let reply = match path.strip_prefix(BASE) {
                    Some(rest) => {
                        kept.lock().unwrap().push(Call {
                            method: parts.method.to_string(),
                            path: rest.to_string(),
                            content_type: parts
                                .headers
                                .get(http::header::CONTENT_TYPE)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default()
                                .to_string(),
                            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
                        });
                        answer.clone()
                    }
                    None => bytes.to_vec(),
                };
                respond.send_response(
                    http::Response::builder()
                        .status(200)
                        .header(http::header::CONTENT_TYPE, "application/json")
                        .body(Body::from(reply))
                        .unwrap(),
                );
            }
        });
        (Client::new(service, "default"), calls)
    }

    fn object(count: i64) -> DedicatedLicense {
        let spec = serde_json::from_value(
            json!({"organization": "qa-team", "product": "TestOps", "count": count}),
        )
        .unwrap();
        let mut dl = DedicatedLicense::new("qa", spec);
        dl.metadata.namespace = Some("team".into());
        dl.metadata.uid = Some("0b7e".into());
        dl.metadata.generation = Some(1);
        dl
    }

    /// 20 TestOps seats; qa-team holds none yet.
    fn store() -> (tempfile::TempDir, Arc<StoreBackend>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("l.db")).unwrap();
        let fixture: Fixture = serde_yaml::from_str(
            "{account: acme, products: [{name: TestOps, total: 20}], organizations: [{id: qa-team}, {id: dev-team}]}",
        )
        .unwrap();
        store.seed(&Principal::local(), &fixture).unwrap();
        (dir, Arc::new(StoreBackend::new(store, Some("acme"), None)))
    }

    fn context(client: Client, backend: Arc<dyn Backend>) -> Arc<Context> {
        let events = Publisher::start(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance: None,
            },
        );
        let settings = Settings {
            instance: "default".into(),
            resync: Duration::from_secs(300),
            pool_poll: Duration::from_secs(5),
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(60),
        };
        let (wake, _) = tokio::sync::mpsc::unbounded_channel();
        Arc::new(Context::new(
            client,
            backend,
            events,
            Arc::new(Metrics::new()),
            settings,
            wake,
            Arc::default(),
        ))
    }

    fn calls(recorded: &Mutex<Vec<Call>>) -> Vec<(String, String, String)> {
        let calls = recorded.lock().unwrap();
        calls
            .iter()
            .map(|c| (c.method.clone(), c.path.clone(), c.content_type.clone()))
            .collect()
    }

    fn call(method: &str, path: &str, content_type: &str) -> (String, String, String) {
        (method.into(), path.into(), content_type.into())
    }

    /// The Ready condition of the status a call wrote.
    fn ready(c: &Call) -> &Value {
        c.body["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
            .unwrap_or_else(|| panic!("no Ready condition in {}", c.body))
    }

    const JSON_PATCH: &str = "application/json-patch+json";
    const APPLY: &str = "application/apply-patch+yaml";

    #[tokio::test]
    async fn a_new_object_gets_its_finalizer_then_its_seats_then_its_status() {
        let (_dir, backend) = store();
        let dl = object(5);
        let (client, recorded) = recorded(&dl);
        let ctx = context(client, backend.clone());
        let requeue = reconcile(Arc::new(dl), ctx).await.unwrap();
        assert_eq!(requeue, Requeue::await_change());
        assert_eq!(
            calls(&recorded),
            [
                call("PATCH", "qa", JSON_PATCH),
                call("PATCH", "qa/status", APPLY)
            ]
        );
        let written = recorded.lock().unwrap().clone();
        assert_eq!(
            written[0].body,
            json!([{"op": "test", "path": "/metadata/finalizers", "value": null},
                   {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}]),
            "the finalizer patch fails rather than clobber a list changed meanwhile"
        );
        assert_eq!(written[1].body["status"]["observedGeneration"], 1);
        assert_eq!(ready(&written[1])["status"], "True");
        let allocation = &backend.snapshot().await.unwrap().allocations[0];
        assert_eq!(
            (allocation.dedicated, allocation.managed_by.as_deref()),
            (5, Some("default/team/qa"))
        );
    }

    #[tokio::test]
    async fn a_raise_past_the_pool_is_stalled_and_waits_for_seats() {
        let (_dir, backend) = store();
        let mut dl = object(25);
        dl.metadata.finalizers = Some(vec![FINALIZER.into()]);
        let (client, recorded) = recorded(&dl);
        let ctx = context(client, backend.clone());
        let requeue = reconcile(Arc::new(dl), ctx.clone()).await.unwrap();
        assert_eq!(requeue, Requeue::await_change(), "refusals do not loop");
        assert_eq!(calls(&recorded), [call("PATCH", "qa/status", APPLY)]);
        let status = recorded.lock().unwrap()[0].clone();
        assert_eq!(ready(&status)["status"], "False");
        assert_eq!(ready(&status)["reason"], "InsufficientPool");
        assert!(ctx.waiting.anyone(), "woken when seats of TestOps free up");
        assert!(backend.snapshot().await.unwrap().allocations.is_empty());
    }

    #[tokio::test]
    async fn a_deleted_object_revokes_its_seats_before_its_finalizer_goes() {
        let (_dir, backend) = store();
        let mut dl = object(5);
        dl.metadata.finalizers = Some(vec![FINALIZER.into()]);
        let (client, recorded) = recorded(&dl);
        let ctx = context(client, backend.clone());
        reconcile(Arc::new(dl.clone()), ctx.clone()).await.unwrap();
        assert_eq!(backend.snapshot().await.unwrap().allocations.len(), 1);
        recorded.lock().unwrap().clear();
        dl.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()),
        );
        let requeue = reconcile(Arc::new(dl), ctx).await.unwrap();
        assert_eq!(requeue, Requeue::await_change());
        assert_eq!(calls(&recorded), [call("PATCH", "qa", JSON_PATCH)]);
        assert_eq!(
            recorded.lock().unwrap()[0].body,
            json!([{"op": "test", "path": "/metadata/finalizers/0", "value": FINALIZER},
                   {"op": "remove", "path": "/metadata/finalizers/0"}])
        );
        assert!(backend.snapshot().await.unwrap().allocations.is_empty());
    }

    /// Accounts whose `default` lets namespace `team` manage only `other-*`.
    fn qa_elsewhere() -> Arc<Accounts> {
        let account: crate::licenseaccount::LicenseAccount = serde_yaml::from_str(
            "{apiVersion: licensor.dev/v1alpha1, kind: LicenseAccount, metadata: {name: default},
              spec: {tenants: [{namespaces: [team], organizations: ['other-*']}]}}",
        )
        .unwrap();
        let accounts = Arc::new(Accounts::default());
        accounts.set(Directory {
            accounts: [("default".to_string(), account)].into(),
            namespaces: Default::default(),
        });
        accounts
    }

    #[tokio::test]
    async fn a_forbidden_object_is_stalled_and_nothing_is_read_or_written() {
        let (_dir, backend) = store();
        let mut dl = object(5);
        dl.metadata.finalizers = Some(vec![FINALIZER.into()]);
        let (client, recorded) = recorded(&dl);
        let ctx = Arc::new(
            Arc::into_inner(context(client, backend.clone()))
                .unwrap()
                .with_accounts(qa_elsewhere()),
        );
        let requeue = reconcile(Arc::new(dl), ctx).await.unwrap();
        assert_eq!(requeue, Requeue::await_change());
        assert_eq!(calls(&recorded), [call("PATCH", "qa/status", APPLY)]);
        let status = recorded.lock().unwrap()[0].clone();
        assert_eq!(ready(&status)["reason"], "Forbidden");
        assert_eq!(
            ready(&status)["message"],
            "namespace team may not manage 5 TestOps licenses for organization qa-team on account default: its tenant entries allow organizations other-*"
        );
        assert!(backend.snapshot().await.unwrap().allocations.is_empty());
    }

    #[tokio::test]
    async fn deleting_an_object_that_became_forbidden_gives_up_ownership_and_keeps_the_count() {
        let (_dir, backend) = store();
        let mut dl = object(5);
        dl.metadata.finalizers = Some(vec![FINALIZER.into()]);
        let (client, recorded) = recorded(&dl);
        let ctx = context(client.clone(), backend.clone());
        reconcile(Arc::new(dl.clone()), ctx).await.unwrap();
        // The tenants change: the object is no longer its namespace's.
        let ctx = Arc::new(
            Arc::into_inner(context(client, backend.clone()))
                .unwrap()
                .with_accounts(qa_elsewhere()),
        );
        recorded.lock().unwrap().clear();
        dl.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()),
        );
        reconcile(Arc::new(dl), ctx).await.unwrap();
        assert_eq!(
            calls(&recorded),
            [call("PATCH", "qa", JSON_PATCH)],
            "the finalizer goes"
        );
        let allocation = &backend.snapshot().await.unwrap().allocations[0];
        assert_eq!(
            (allocation.dedicated, allocation.managed_by.as_deref()),
            (5, None),
            "the count stays; ownership is given up"
        );
    }

    /// A backend that is down: every call fails as unreachable.
    struct Down;

    #[async_trait::async_trait]
    impl Backend for Down {
        fn location(&self) -> String {
            "https://licenses.invalid".into()
        }
        async fn snapshot(&self) -> Result<Snapshot, BackendError> {
            Err(BackendError::Unavailable("connection refused".into()))
        }
        async fn write(&self, _: &AllocationWrite) -> Result<Written, BackendError> {
            unreachable!("nothing is written to a backend that was not read")
        }
        async fn release(&self, _: &str, _: &str, _: &str) -> Result<(), BackendError> {
            Err(BackendError::Unavailable("connection refused".into()))
        }
        async fn set_total(&self, _: &str, _: i64) -> Result<PoolView, BackendError> {
            unreachable!()
        }
        async fn seats(&self, _: &str, _: &str, _: SeatChange) -> Result<(), BackendError> {
            unreachable!()
        }
        async fn seed(&self, _: &Fixture) -> Result<(), BackendError> {
            unreachable!()
        }
        async fn audit_page(&self, _: i64, _: i64) -> Result<Vec<AuditEntry>, BackendError> {
            unreachable!()
        }
    }

    #[tokio::test]
    async fn a_backend_that_is_down_is_reported_and_retried_with_backoff() {
        let mut dl = object(5);
        dl.metadata.finalizers = Some(vec![FINALIZER.into()]);
        let (client, recorded) = recorded(&dl);
        let ctx = context(client, Arc::new(Down));
        let dl = Arc::new(dl);
        let first = reconcile(dl.clone(), ctx.clone()).await.unwrap();
        let second = reconcile(dl.clone(), ctx.clone()).await.unwrap();
        assert_eq!(
            (first, second),
            (
                Requeue::requeue(Duration::from_secs(1)),
                Requeue::requeue(Duration::from_secs(2))
            ),
            "backs off per object"
        );
        let status = recorded.lock().unwrap()[0].clone();
        assert_eq!(ready(&status)["reason"], "BackendUnavailable");
        assert_eq!(
            ready(&status)["message"],
            "backend https://licenses.invalid: backend unavailable: connection refused; retrying with backoff"
        );
        // Deleting while the backend is down keeps the finalizer: the
        // revoke is not lost.
        recorded.lock().unwrap().clear();
        let mut deleted = (*dl).clone();
        deleted.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()),
        );
        let third = reconcile(Arc::new(deleted), ctx).await.unwrap();
        assert_eq!(third, Requeue::requeue(Duration::from_secs(4)));
        assert_eq!(calls(&recorded), [call("PATCH", "qa/status", APPLY)]);
    }
}
