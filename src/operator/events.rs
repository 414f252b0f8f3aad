//! Kubernetes events for a pass, chosen purely, published through the one
//! shared [`Recorder`].
//!
//! Normal events name what was written (`Allocated`, `Increased`,
//! `Decreased`, `Revoked`, `DriftCorrected`, `Adopted`, `Orphaned`). Warnings
//! carry the refusal reason or `BackendUnavailable`, and are only published
//! when the object's Ready condition changes, so a stuck object does not
//! repeat itself at every resync.

use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource, ResourceExt};

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

/// Publishes notes about an object; a failure to publish is logged, never
/// fatal: the status carries the same facts.
pub async fn publish(recorder: &Recorder, dl: &DedicatedLicense, notes: &[Note]) {
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
        if let Err(e) = recorder.publish(&event, &reference).await {
            tracing::warn!(object = %dl.name_any(), error = %e, "cannot publish event {}", n.reason);
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
