//! Kubernetes events for a pass, chosen purely, sent through kube-runtime's
//! [`Recorder`] by a [`Publisher`] off the reconcile path.
//!
//! Normal events name what was written (`Allocated`, `Increased`,
//! `Decreased`, `Revoked`, `DriftCorrected`, `Adopted`, `Orphaned`). Warnings
//! carry the refusal reason or `BackendUnavailable`, and are only published
//! when the object's Ready condition changes, so a stuck object does not
//! repeat itself at every resync.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Resource, ResourceExt};
use tokio::sync::mpsc;

use super::status::{Pass, Verdict, ready};
use crate::domain::{Action, Reason};
use crate::resource::{DedicatedLicense, DedicatedLicenseStatus};

/// One event to publish: type, reason, note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    pub reason: EventReason,
    pub message: String,
}

impl Note {
    /// A `Normal` event: what a pass did.
    fn normal(reason: EventReason, message: &str) -> Note {
        Note {
            warning: false,
            reason,
            message: message.to_string(),
        }
    }
}

/// An event's `reason`: what was written, or the refusal that stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventReason {
    Adopted,
    DriftCorrected,
    Allocated,
    Increased,
    Decreased,
    Revoked,
    Orphaned,
    /// A temporary allocation reached its thenCount at its until.
    Expired,
    /// A refusal or `BackendUnavailable`, named as the rules name it.
    Rule(Reason),
}

impl EventReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EventReason::Adopted => "Adopted",
            EventReason::DriftCorrected => "DriftCorrected",
            EventReason::Allocated => "Allocated",
            EventReason::Increased => "Increased",
            EventReason::Decreased => "Decreased",
            EventReason::Revoked => "Revoked",
            EventReason::Orphaned => "Orphaned",
            EventReason::Expired => "Expired",
            EventReason::Rule(r) => r.as_str(),
        }
    }

    /// What a written change is called, if it changed anything.
    fn written(action: Action, drift: bool) -> Option<EventReason> {
        match action {
            _ if drift => Some(EventReason::DriftCorrected),
            Action::None => None,
            Action::Create => Some(EventReason::Allocated),
            Action::Increase => Some(EventReason::Increased),
            Action::Decrease => Some(EventReason::Decreased),
            Action::Revoke => Some(EventReason::Revoked),
            Action::Orphan => Some(EventReason::Orphaned),
        }
    }
}

impl std::fmt::Display for EventReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The events a pass deserves, given the status before and after it.
pub fn for_pass(
    previous: Option<&DedicatedLicenseStatus>,
    next: &DedicatedLicenseStatus,
    pass: &Pass,
) -> Vec<Note> {
    let mut notes = Vec::new();
    // Once: the pass that finds the allocation at its thenCount after the
    // until, where the status before had another count (the write, or a
    // pass after a restart that came between the write and its status).
    if let Some(e) = pass.expiry.filter(|_| pass.expired)
        && matches!(pass.verdict, Verdict::Applied(_) | Verdict::InSync)
        && next.allocated == Some(e.then_count)
        && previous.and_then(|p| p.allocated) != Some(e.then_count)
    {
        notes.push(Note::normal(
            EventReason::Expired,
            &format!(
                "{} for {} became {} at its until, {}",
                pass.product,
                pass.organization,
                e.then_count,
                e.until_text()
            ),
        ));
    }
    notes.extend(for_verdict(previous, next, pass));
    notes
}

/// The events of what a pass wrote or why it could not.
fn for_verdict(
    previous: Option<&DedicatedLicenseStatus>,
    next: &DedicatedLicenseStatus,
    pass: &Pass,
) -> Vec<Note> {
    match &pass.verdict {
        Verdict::Applied(a) => {
            let mut notes = Vec::new();
            if a.adopted {
                notes.push(Note::normal(
                    EventReason::Adopted,
                    "took over the unmanaged allocation",
                ));
            }
            if let Some(reason) = EventReason::written(a.action, a.drift) {
                notes.push(Note::normal(reason, &a.message));
            }
            notes
        }
        Verdict::Refused { reason, .. } | Verdict::Retrying { reason, .. } => {
            let before = previous.and_then(ready).map(|c| (&c.reason, &c.message));
            let after = ready(next);
            match after {
                Some(c) if before != Some((&c.reason, &c.message)) => vec![Note {
                    warning: true,
                    reason: EventReason::Rule(*reason),
                    message: c.message.clone(),
                }],
                _ => Vec::new(),
            }
        }
        Verdict::InSync | Verdict::Held { .. } => Vec::new(),
    }
}

/// Publishes events off the reconcile path, as client-go's broadcaster
/// does: a pass queues its notes and goes on; one task sends them one at a
/// time. Status comes first: while passes are running, an event waits for a
/// quiet moment, but never more than [`MAX_DELAY`] after it was queued, so
/// a burst of new objects turns Ready without its events competing for the
/// API server, and the events follow. When the queue is full (an event
/// storm) notes are dropped and logged: the status carries the same facts.
#[derive(Clone)]
pub struct Publisher {
    queue: mpsc::Sender<(Instant, ObjectReference, Event)>,
    activity: Arc<Activity>,
}

/// Notes queued and not yet sent, at most.
const QUEUE: usize = 4096;
/// The longest an event waits for the passes to quiet down.
const MAX_DELAY: Duration = Duration::from_secs(5);
/// How long no pass must have run for the operator to count as quiet.
const QUIET: Duration = Duration::from_millis(100);

/// Passes running now, and when the last one ended.
#[derive(Debug)]
struct Activity {
    running: AtomicUsize,
    last: Mutex<Instant>,
}

/// Held for the length of a pass.
pub struct Running(Arc<Activity>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(mut last) = self.0.last.lock() {
            *last = Instant::now();
        }
        self.0.running.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            running: AtomicUsize::new(0),
            last: Mutex::new(Instant::now()),
        })
    }

    /// Counts a pass as running until the guard is dropped.
    fn enter(self: &Arc<Self>) -> Running {
        self.running.fetch_add(1, Ordering::AcqRel);
        Running(self.clone())
    }

    fn is_quiet(&self) -> bool {
        self.running.load(Ordering::Acquire) == 0
            && self.last.lock().map_or(true, |l| l.elapsed() >= QUIET)
    }

    /// Resolves once no pass has run for a moment, or at `deadline`.
    async fn quiet_or(&self, deadline: Instant) {
        while !self.is_quiet() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Publisher {
    /// Starts the sending task; it ends when every `Publisher` is dropped.
    ///
    /// Each event goes through a [`Recorder`] of its own. kube-runtime's
    /// `Recorder` keeps every event it sent for six minutes, to count
    /// repeats as a series, and goes through all of them on every send: with
    /// 10,000 new objects that was 17 MB of the operator's peak heap and a
    /// pass over thousands of entries per event. These notes are published
    /// on a change of state ([`for_pass`]), so a repeat within minutes is
    /// rare, and is a second event.
    pub fn start(client: Client, reporter: Reporter) -> Publisher {
        let (queue, mut rx) = mpsc::channel::<(Instant, ObjectReference, Event)>(QUEUE);
        let activity = Activity::new();
        let quiet = activity.clone();
        tokio::spawn(async move {
            while let Some((queued, reference, event)) = rx.recv().await {
                quiet.quiet_or(queued + MAX_DELAY).await;
                let recorder = Recorder::new(client.clone(), reporter.clone());
                if let Err(e) = recorder.publish(&event, &reference).await {
                    tracing::warn!(object = ?reference.name, error = %e, "cannot publish event {}", event.reason);
                }
            }
        });
        Publisher { queue, activity }
    }

    /// Marks a pass as running until the guard is dropped.
    pub fn running(&self) -> Running {
        self.activity.enter()
    }

    /// Queues notes about an object.
    pub fn publish(&self, dl: &DedicatedLicense, notes: &[Note]) {
        let reference = dl.object_ref(&());
        // An account other than the operator's own is named in each note.
        let account = dl.spec.account();
        let named = |message: &str| match account {
            crate::licenseaccount::DEFAULT_ACCOUNT => message.to_string(),
            _ => format!("account {account}: {message}"),
        };
        for n in notes {
            let event = Event {
                type_: if n.warning {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                reason: n.reason.to_string(),
                note: Some(truncate(&named(&n.message), 1000)),
                action: "Reconcile".into(),
                secondary: None,
            };
            if self
                .queue
                .try_send((Instant::now(), reference.clone(), event))
                .is_err()
            {
                tracing::debug!(object = %dl.name_any(), "event queue full; dropped {}", n.reason);
            }
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Reason;
    use crate::operator::status::{Applied, build};
    use k8s_openapi::jiff::Timestamp;

    fn pass(verdict: Verdict) -> Pass {
        Pass::example(verdict)
    }

    fn applied(action: Action, adopted: bool, drift: bool) -> Verdict {
        Verdict::Applied(Applied {
            action,
            from: 5,
            to: 10,
            rehomed: 0,
            displaced: 0,
            adopted,
            drift,
            message: "what happened".into(),
        })
    }

    fn reasons(notes: &[Note]) -> Vec<(bool, &str)> {
        notes
            .iter()
            .map(|n| (n.warning, n.reason.as_str()))
            .collect()
    }

    #[tokio::test]
    async fn events_wait_for_quiet_passes_but_not_longer_than_the_deadline() {
        let activity = Activity::new();
        tokio::time::sleep(QUIET).await;
        let started = Instant::now();
        activity.quiet_or(started + Duration::from_secs(5)).await;
        assert!(
            started.elapsed() < Duration::from_millis(50),
            "idle: at once"
        );

        let pass = activity.enter();
        let started = Instant::now();
        activity
            .quiet_or(started + Duration::from_millis(300))
            .await;
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(300),
            "busy: until the deadline, {waited:?}"
        );

        drop(pass);
        let started = Instant::now();
        activity.quiet_or(started + Duration::from_secs(5)).await;
        let waited = started.elapsed();
        assert!(
            waited >= QUIET - Duration::from_millis(30) && waited < Duration::from_secs(1),
            "just ended: a quiet moment later, {waited:?}"
        );
    }

    #[test]
    fn writes_are_named_by_what_they_did() {
        let none = DedicatedLicenseStatus::default();
        let cases = [
            (
                applied(Action::Increase, true, false),
                vec![(false, "Adopted"), (false, "Increased")],
            ),
            (
                applied(Action::Create, false, false),
                vec![(false, "Allocated")],
            ),
            (
                applied(Action::Decrease, false, true),
                vec![(false, "DriftCorrected")],
            ),
            (
                applied(Action::Revoke, false, false),
                vec![(false, "Revoked")],
            ),
            (Verdict::InSync, vec![]),
        ];
        for (verdict, want) in cases {
            assert_eq!(reasons(&for_pass(None, &none, &pass(verdict))), want);
        }
    }

    #[test]
    fn a_warning_is_published_once_per_new_refusal() {
        let refused = |m: &str| Verdict::Refused {
            reason: Reason::InsufficientPool,
            message: m.into(),
        };
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let p = pass(refused("only 2 free"));
        let first = build(None, &p, now);
        assert_eq!(
            reasons(&for_pass(None, &first, &p)),
            vec![(true, "InsufficientPool")]
        );
        let again = build(Some(&first), &p, now);
        assert!(
            for_pass(Some(&first), &again, &p).is_empty(),
            "a repeat is silent"
        );
        let changed = pass(refused("only 1 free"));
        let next = build(Some(&again), &changed, now);
        assert_eq!(
            reasons(&for_pass(Some(&again), &next, &changed)),
            vec![(true, "InsufficientPool")]
        );
    }
}
