//! Kubernetes events for a pass, chosen purely, sent through the one shared
//! [`Recorder`] by a [`Publisher`] off the reconcile path.
//!
//! Normal events name what was written (`Allocated`, `Increased`,
//! `Decreased`, `Revoked`, `DriftCorrected`, `Adopted`, `Orphaned`). Warnings
//! carry the refusal reason or `BackendUnavailable`, and are only published
//! when the object's Ready condition changes, so a stuck object does not
//! repeat itself at every resync.

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource, ResourceExt};
use tokio::sync::mpsc;

use super::status::{Pass, Verdict, ready};
use crate::domain::Action;
use crate::resource::{DedicatedLicense, DedicatedLicenseStatus};

/// One event to publish: type, reason, note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    pub reason: String,
    pub message: String,
}

/// The events a pass deserves, given the status before and after it.
pub fn for_pass(
    previous: Option<&DedicatedLicenseStatus>,
    next: &DedicatedLicenseStatus,
    pass: &Pass,
) -> Vec<Note> {
    let normal = |reason: &str, message: &str| Note {
        warning: false,
        reason: reason.to_string(),
        message: message.to_string(),
    };
    match &pass.verdict {
        Verdict::Applied(a) => {
            let mut notes = Vec::new();
            if a.adopted {
                notes.push(normal("Adopted", "took over the unmanaged allocation"));
            }
            let reason = match a.action {
                _ if a.drift => Some("DriftCorrected"),
                Action::Create => Some("Allocated"),
                Action::Increase => Some("Increased"),
                Action::Decrease => Some("Decreased"),
                Action::Revoke => Some("Revoked"),
                Action::Orphan => Some("Orphaned"),
                Action::None => None,
            };
            if let Some(reason) = reason {
                notes.push(normal(reason, &a.message));
            }
            notes
        }
        Verdict::Refused { reason, .. } | Verdict::Retrying { reason, .. } => {
            let before = previous.and_then(ready).map(|c| (&c.reason, &c.message));
            let after = ready(next);
            match after {
                Some(c) if before != Some((&c.reason, &c.message)) => vec![Note {
                    warning: true,
                    reason: reason.as_str().to_string(),
                    message: c.message.clone(),
                }],
                _ => Vec::new(),
            }
        }
        Verdict::InSync | Verdict::Held { .. } => Vec::new(),
    }
}

/// Publishes events off the reconcile path, as client-go's broadcaster
/// does: a pass queues its notes and goes on; one task sends them one at a time. When the queue is full (an event storm) notes are dropped and
/// logged: the status carries the same facts.
#[derive(Clone)]
pub struct Publisher {
    queue: mpsc::Sender<(ObjectReference, Event)>,
}

/// Notes queued and not yet sent, at most.
const QUEUE: usize = 4096;
/// Events sent at once: one, so that in a burst they trail the status
/// writes instead of competing with them.
const IN_FLIGHT: usize = 1;

impl Publisher {
    /// Starts the sending task; it ends when every `Publisher` is dropped.
    pub fn start(recorder: Recorder) -> Publisher {
        let (queue, rx) = mpsc::channel::<(ObjectReference, Event)>(QUEUE);
        let pending =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) });
        tokio::spawn(
            pending
                .map(move |(reference, event)| {
                    let recorder = recorder.clone();
                    async move {
                        if let Err(e) = recorder.publish(&event, &reference).await {
                            tracing::warn!(object = ?reference.name, error = %e, "cannot publish event {}", event.reason);
                        }
                    }
                })
                .buffer_unordered(IN_FLIGHT)
                .for_each(|()| async {}),
        );
        Publisher { queue }
    }

    /// Queues notes about an object.
    pub fn publish(&self, dl: &DedicatedLicense, notes: &[Note]) {
        let reference = dl.object_ref(&());
        for n in notes {
            let event = Event {
                type_: if n.warning {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                reason: n.reason.clone(),
                note: Some(truncate(&n.message, 1000)),
                action: "Reconcile".into(),
                secondary: None,
            };
            if self.queue.try_send((reference.clone(), event)).is_err() {
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
