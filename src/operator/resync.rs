//! When an object in sync is looked at again, and what of it is kept.
//!
//! Every object is checked once per resync period, for drift made outside
//! Kubernetes. Rather than each object re-queueing itself (10,000 entries
//! held in the controller's queue all the time, and the queue flooded after
//! a restart), one walker goes through the cache each period and asks for a
//! pass of each object at an even pace; the pass of an object in sync is a
//! check against the shared read of the account ([`super::snapshot`]).
//!
//! After a restart (or when a new leader starts), the initial list does not
//! queue the objects whose status already says Ready for their generation:
//! the walker's first round checks them, spread over half a period, so a
//! new or changed object is picked up at once instead of waiting behind
//! thousands of checks ([`in_sync_at_start`]).
//!
//! The cache keeps what a pass reads ([`trim`]): not the managed fields,
//! labels or the copy of the manifest that `kubectl apply` keeps in an
//! annotation, which are most of an object.

use std::collections::BTreeMap;
use std::time::Duration;

use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::watch;
use tokio::time::Instant;

use super::reconcile::ready_for_its_generation;
use crate::resource::{DedicatedLicense, PAUSED_ANNOTATION, needs_finalizer};

/// Drops what no pass reads from an object before it is cached.
pub fn trim(dl: &mut DedicatedLicense) {
    let meta = &mut dl.metadata;
    meta.managed_fields = None;
    meta.labels = None;
    meta.owner_references = None;
    let paused = meta
        .annotations
        .take()
        .and_then(|mut a| a.remove_entry(PAUSED_ANNOTATION));
    meta.annotations = paused.map(|(k, v)| BTreeMap::from([(k, v)]));
}

/// Ready for its generation, with its finalizer, not being deleted and
/// not awaiting an expiry: when listed at start, left to the walker's first
/// round; every other listed object is queued once the list is in the
/// cache ([`super::listing`]).
///
/// A temporary allocation that has not reached its `thenCount` is queued:
/// its pass arms the timer for its `until` (or acts on an `until` that
/// passed while no operator ran), which the walker's round, spread over half
/// a period, would reach too late.
pub fn in_sync_at_start(dl: &DedicatedLicense) -> bool {
    dl.metadata.deletion_timestamp.is_none()
        && !needs_finalizer(&dl.spec, dl.finalizers())
        && ready_for_its_generation(dl)
        && !awaits_its_expiry(dl)
}

/// Has an expiry whose `thenCount` its status does not show allocated.
fn awaits_its_expiry(dl: &DedicatedLicense) -> bool {
    dl.spec
        .expiry()
        .is_some_and(|e| dl.status.as_ref().and_then(|s| s.allocated) != Some(e.then_count))
}

/// Asks for a pass of every cached object once per `period`, at an even
/// pace, from the moment the initial list is in the cache ([`listed`]).
/// The first round takes half a period and asks only for the objects in
/// sync (the others were queued at start and are being seen to). Runs until
/// dropped.
pub async fn walk(
    store: Store<DedicatedLicense>,
    wake: UnboundedSender<ObjectRef<DedicatedLicense>>,
    period: Duration,
    listed: watch::Receiver<bool>,
) {
    if !self::listed(listed).await {
        return;
    }
    let mut round = period / 2;
    loop {
        let started = Instant::now();
        let mut objects = store.state();
        if round < period {
            objects.retain(|dl| in_sync_at_start(dl));
        }
        tracing::debug!(
            objects = objects.len(),
            seconds = round.as_secs_f64(),
            "resync round"
        );
        for (i, dl) in objects.iter().enumerate() {
            tokio::time::sleep_until(started + due(round, i, objects.len())).await;
            if wake.send(ObjectRef::from_obj(dl)).is_err() {
                return;
            }
        }
        tokio::time::sleep_until(started + round).await;
        round = period;
    }
}

/// Waits until the initial list is in the cache (`listed` turns true);
/// false if the controller ended first. (Not `Store::wait_until_ready`: that
/// wakes only the last of several waiters, and the controller waits on it.)
pub async fn listed(mut listed: watch::Receiver<bool>) -> bool {
    listed.wait_for(|done| *done).await.is_ok()
}

/// When the `i`-th of `n` objects is due in a round of length `round`.
fn due(round: Duration, i: usize, n: usize) -> Duration {
    round.mul_f64(i as f64 / n.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::FINALIZER;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    fn object(yaml: &str) -> DedicatedLicense {
        serde_yaml::from_str(yaml).expect("fixture")
    }

    const APPLIED: &str = r#"
apiVersion: licensor.dev/v1alpha1
kind: DedicatedLicense
metadata:
  name: acme-testops
  namespace: licenses
  generation: 2
  finalizers: [licensor.dev/cleanup]
  labels: {team: acme}
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: '{"spec":{"count":3}}'
    licensor.dev/paused: "true"
  managedFields:
    - {manager: kubectl, operation: Apply, apiVersion: licensor.dev/v1alpha1}
spec: {organization: acme, product: TestOps, count: 3}
status:
  observedGeneration: 2
  conditions:
    - {type: Ready, status: "True", reason: InSync, message: in sync, lastTransitionTime: "2026-11-28T12:00:00Z"}
"#;

    #[test]
    fn trimming_keeps_what_a_pass_reads() {
        let mut dl = object(APPLIED);
        let (spec, status) = (dl.spec.clone(), dl.status.clone());
        trim(&mut dl);
        assert_eq!(dl.metadata.managed_fields, None);
        assert_eq!(dl.metadata.labels, None);
        assert_eq!(
            dl.metadata.annotations,
            Some(BTreeMap::from([(
                PAUSED_ANNOTATION.to_string(),
                "true".to_string()
            )]))
        );
        assert_eq!(dl.finalizers(), [FINALIZER]);
        assert_eq!((dl.spec, dl.status), (spec, status));
    }

    #[test]
    fn trimming_an_object_without_annotations_leaves_none() {
        let mut dl = object(APPLIED);
        dl.metadata.annotations = None;
        trim(&mut dl);
        assert_eq!(dl.metadata.annotations, None);
    }

    #[test]
    fn only_objects_ready_for_their_generation_wait_at_start() {
        let ready = object(APPLIED);
        assert!(in_sync_at_start(&ready));

        let mut changed = ready.clone();
        changed.metadata.generation = Some(3);
        let mut deleting = ready.clone();
        deleting.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
        let mut without_finalizer = ready.clone();
        without_finalizer.metadata.finalizers = None;
        let mut unseen = ready.clone();
        unseen.status = None;
        for dl in [changed, deleting, without_finalizer, unseen] {
            assert!(!in_sync_at_start(&dl));
        }
    }

    /// A temporary allocation waits for the walker only once its status
    /// shows the thenCount: before that its timer must be armed at start.
    #[test]
    fn a_temporary_allocation_short_of_its_then_count_is_queued_at_start() {
        let mut temporary = object(APPLIED);
        temporary.spec.until = Some("2026-12-08T00:00:00Z".parse().unwrap());
        temporary.spec.then_count = Some(1);
        let allocated = |dl: &mut DedicatedLicense, n| {
            dl.status.as_mut().unwrap().allocated = Some(n);
        };
        allocated(&mut temporary, 3);
        assert!(!in_sync_at_start(&temporary));
        allocated(&mut temporary, 1);
        assert!(in_sync_at_start(&temporary));
        temporary.spec.then_count = None;
        assert!(!in_sync_at_start(&temporary));
        allocated(&mut temporary, 0);
        assert!(in_sync_at_start(&temporary));
    }

    #[test]
    fn a_round_spreads_objects_evenly() {
        let round = Duration::from_secs(30);
        let dues: Vec<Duration> = (0..4).map(|i| due(round, i, 4)).collect();
        assert_eq!(
            dues,
            [0, 7500, 15000, 22500].map(Duration::from_millis).to_vec()
        );
        assert_eq!(due(round, 0, 0), Duration::ZERO);
    }
}
