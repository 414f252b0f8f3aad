//! Builds a `DedicatedLicense` status from one reconcile pass, pure.
//!
//! The driver says what the pass concluded (a [`Verdict`]) and what it saw;
//! [`build`] turns that and the previous status into the next one. Conditions
//! follow kstatus: `Ready` is always present, `Reconciling=True` while a retry
//! is pending, `Stalled=True` when a person must act, never both. Fields that
//! describe a moment (`pool`, `diff`, `lastChange`) only move when this object
//! changed or was refused, and a condition keeps its `lastTransitionTime` while
//! its status stays, so a pass that finds nothing new builds an equal status
//! and the driver writes nothing.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::domain::{Action, Allocation, PoolView, Reason};
pub use crate::resource::Hold;
use crate::resource::{DedicatedLicenseStatus, Failure, LastChange, PoolStatus};

/// kstatus condition types.
pub const READY: &str = "Ready";
pub const RECONCILING: &str = "Reconciling";
pub const STALLED: &str = "Stalled";

/// Why a condition stands (its `reason`): the rules' refusal or
/// `BackendUnavailable`, or where the operator left things.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditionReason {
    /// The backend holds what the spec asks.
    Reconciled,
    /// Writes are paused by the annotation.
    Paused,
    /// `managementPolicy: Observe`, and the backend agrees with the spec.
    Observed,
    /// `managementPolicy: Observe`, and the backend differs from the spec.
    OutOfSync,
    Rule(Reason),
}

impl ConditionReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionReason::Reconciled => "Reconciled",
            ConditionReason::Paused => "Paused",
            ConditionReason::Observed => "Observed",
            ConditionReason::OutOfSync => "OutOfSync",
            ConditionReason::Rule(r) => r.as_str(),
        }
    }
}

/// Most failures kept in status.
pub const MAX_FAILURES: usize = 5;

/// What one pass concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The backend holds what the spec asks; nothing was written.
    InSync,
    /// A change was written this pass.
    Applied(Applied),
    /// The rules refused the change; a person must act.
    Refused { reason: Reason, message: String },
    /// Writes are held; the backend may or may not match the spec.
    Held { hold: Hold, in_sync: bool },
    /// The backend could not be reached; the pass is retried with backoff.
    Retrying { reason: Reason, message: String },
}

/// A change written this pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub action: Action,
    pub from: i64,
    pub to: i64,
    pub rehomed: i64,
    pub displaced: i64,
    pub adopted: bool,
    /// The backend had moved away from what this object last recorded
    /// without the spec changing: an out-of-band change was undone.
    pub drift: bool,
    pub message: String,
}

/// What the backend held after the pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// The backend was not read (it is unavailable).
    Unknown,
    /// The backend has no allocation for this organization and product.
    Absent,
    Allocation(Allocation),
}

/// Everything [`build`] needs from one pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pass {
    pub generation: Option<i64>,
    /// The LicenseAccount of the object.
    pub account: String,
    pub organization: String,
    pub product: String,
    /// The count the object asks for at the pass.
    pub count: i64,
    /// When a temporary allocation's count ends.
    pub expiry: Option<crate::domain::Expiry>,
    /// It had ended when the pass planned: `count` is its thenCount.
    pub expired: bool,
    /// The object is being deleted.
    pub deleting: bool,
    pub verdict: Verdict,
    pub seen: Seen,
    /// The product's pool as this pass saw or left it.
    pub pool: Option<PoolView>,
    /// Backend -> desired, empty when they agree.
    pub diff: String,
}

/// The next status: see the module contract.
pub fn build(
    previous: Option<&DedicatedLicenseStatus>,
    pass: &Pass,
    now: Timestamp,
) -> DedicatedLicenseStatus {
    let prev = previous.cloned().unwrap_or_default();
    let now = Timestamp::from_second(now.as_second()).unwrap_or(now);
    let moment = matches!(pass.verdict, Verdict::Applied(_) | Verdict::Refused { .. });

    let (allocated, in_use) = match &pass.seen {
        Seen::Unknown => (prev.allocated, prev.in_use),
        Seen::Absent => (Some(0), Some(0)),
        Seen::Allocation(a) => (Some(a.dedicated), Some(a.in_use)),
    };
    let pool = match &pass.pool {
        Some(p) if moment || prev.pool.is_none() => Some(PoolStatus {
            total: p.total,
            dedicated: p.dedicated,
            shared_in_use: p.shared_in_use,
            free: p.free,
        }),
        _ => prev.pool.clone(),
    };
    let diff = if pass.diff.is_empty() {
        prev.diff.clone()
    } else {
        Some(pass.diff.clone())
    };
    let last_change = match &pass.verdict {
        Verdict::Applied(a) => Some(LastChange {
            time: now.to_string(),
            from: a.from,
            to: a.to,
            rehomed: a.rehomed,
            displaced: a.displaced,
        }),
        _ => prev.last_change.clone(),
    };
    let failures = match &pass.verdict {
        Verdict::InSync | Verdict::Applied(_) => Vec::new(),
        Verdict::Held { .. } => prev.failures.clone(),
        Verdict::Refused { reason, message } | Verdict::Retrying { reason, message } => {
            let mut failures = prev.failures.clone();
            let repeat = failures
                .first()
                .is_some_and(|f| f.reason == reason.as_str() && f.message == *message);
            if !repeat {
                failures.insert(
                    0,
                    Failure {
                        since: now.to_string(),
                        reason: reason.as_str().to_string(),
                        message: message.clone(),
                    },
                );
                failures.truncate(MAX_FAILURES);
            }
            failures
        }
    };

    let wanted = conditions(pass, allocated, in_use);
    let conditions = wanted
        .into_iter()
        .map(|(type_, status, reason, message)| {
            let since = prev
                .conditions
                .iter()
                .find(|c| c.type_ == type_ && status.of(c))
                .map_or_else(|| Time(now), |c| c.last_transition_time.clone());
            Condition {
                type_: type_.to_string(),
                status: status.as_str().to_string(),
                reason: reason.as_str().to_string(),
                message,
                last_transition_time: since,
                observed_generation: pass.generation,
            }
        })
        .collect();

    DedicatedLicenseStatus {
        observed_generation: pass.generation,
        account: Some(pass.account.clone()),
        expires_at: pass.expiry.map(|e| e.until_text()),
        conditions,
        allocated,
        in_use,
        pool,
        diff,
        last_change,
        failures,
    }
}

/// A condition's status, as metav1.Condition spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Is {
    True,
    False,
}

impl Is {
    pub fn as_str(self) -> &'static str {
        match self {
            Is::True => "True",
            Is::False => "False",
        }
    }

    /// Whether a condition has this status.
    pub fn of(self, c: &Condition) -> bool {
        c.status == self.as_str()
    }
}

/// `(type, status, reason, message)` of each condition to show.
fn conditions(
    pass: &Pass,
    allocated: Option<i64>,
    in_use: Option<i64>,
) -> Vec<(&'static str, Is, ConditionReason, String)> {
    let holding = format!(
        "{} holds {} {} {} ({} in use)",
        pass.organization,
        allocated.unwrap_or(0),
        pass.product,
        licenses(allocated.unwrap_or(0)),
        in_use.unwrap_or(0)
    );
    let ready = |status, reason, message: String| (READY, status, reason, message);
    match &pass.verdict {
        // What was done is in lastChange and the event; the condition says
        // where things stand, so the next idle pass builds the same one.
        Verdict::InSync | Verdict::Applied(_) => {
            vec![ready(Is::True, ConditionReason::Reconciled, holding)]
        }
        Verdict::Held { hold, in_sync } => {
            let (reason, why) = match hold {
                Hold::Paused => (
                    ConditionReason::Paused,
                    "remove the annotation to resume writes",
                ),
                Hold::Observe => (
                    if *in_sync {
                        ConditionReason::Observed
                    } else {
                        ConditionReason::OutOfSync
                    },
                    "licensor reports and never writes",
                ),
            };
            let state = if pass.deleting {
                "deletion waits until writes resume".to_string()
            } else if *in_sync {
                holding
            } else {
                format!("{holding}, the spec asks for {}", pass.count)
            };
            let status = if *in_sync && !pass.deleting {
                Is::True
            } else {
                Is::False
            };
            let message = format!("{state}; {}: {why}", hold.describe());
            // Observing a difference is a finding a person acts on (change
            // the manifest, or let licensor manage it), not progress: it is
            // Stalled, so kstatus says Failed and Argo CD Degraded rather
            // than waiting forever for it to become Ready.
            if matches!(hold, Hold::Observe) && !*in_sync && !pass.deleting {
                return vec![
                    ready(status, reason, message.clone()),
                    (STALLED, Is::True, reason, message),
                ];
            }
            vec![ready(status, reason, message)]
        }
        Verdict::Refused { reason, message } => {
            let message = if pass.deleting {
                format!("deletion waits: {message}")
            } else {
                message.clone()
            };
            let reason = ConditionReason::Rule(*reason);
            vec![
                ready(Is::False, reason, message.clone()),
                (STALLED, Is::True, reason, message),
            ]
        }
        Verdict::Retrying { reason, message } => {
            let message = format!("{message}; retrying with backoff");
            let reason = ConditionReason::Rule(*reason);
            vec![
                ready(Is::False, reason, message.clone()),
                (RECONCILING, Is::True, reason, message),
            ]
        }
    }
}

fn licenses(n: i64) -> &'static str {
    if n == 1 { "license" } else { "licenses" }
}

/// Whether the backend moved away from what this object last recorded while
/// its spec stayed the same: an out-of-band change.
pub fn drifted(
    previous: Option<&DedicatedLicenseStatus>,
    generation: Option<i64>,
    now_allocated: i64,
) -> bool {
    let Some(prev) = previous else {
        return false;
    };
    let was_ready = prev
        .conditions
        .iter()
        .any(|c| c.type_ == READY && Is::True.of(c));
    was_ready
        && prev.observed_generation == generation
        && prev.allocated.is_some_and(|a| a != now_allocated)
}

/// The Ready condition of a status, if any.
pub fn ready(status: &DedicatedLicenseStatus) -> Option<&Condition> {
    status.conditions.iter().find(|c| c.type_ == READY)
}

impl Pass {
    /// A pass over qa-team's TestOps (count 10, generation 2) that ends in
    /// `verdict`, having seen no allocation and no pool: what the tests of
    /// a status, of its events and of kstatus's reading start from.
    #[doc(hidden)]
    pub fn example(verdict: Verdict) -> Pass {
        Pass {
            generation: Some(2),
            account: "default".into(),
            organization: "qa-team".into(),
            product: "TestOps".into(),
            count: 10,
            expiry: None,
            expired: false,
            deleting: false,
            verdict,
            seen: Seen::Absent,
            pool: None,
            diff: String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(free: i64) -> PoolView {
        PoolView {
            product: "TestOps".into(),
            total: 200,
            dedicated: 200 - free - 10,
            shared_in_use: 10,
            free,
        }
    }

    fn allocation(dedicated: i64, in_use: i64) -> Seen {
        Seen::Allocation(serde_yaml::from_str(&format!(
            "{{organization: qa-team, product: TestOps, dedicated: {dedicated}, inUse: {in_use}, managedBy: default/licenses/qa, version: 1}}"
        )).unwrap())
    }

    fn pass(verdict: Verdict, seen: Seen) -> Pass {
        Pass {
            seen,
            pool: Some(pool(185)),
            ..Pass::example(verdict)
        }
    }

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + second).unwrap()
    }

    fn types(s: &DedicatedLicenseStatus) -> Vec<(String, String, String)> {
        s.conditions
            .iter()
            .map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone()))
            .collect()
    }

    fn increase() -> Verdict {
        Verdict::Applied(Applied {
            action: Action::Increase,
            from: 5,
            to: 10,
            rehomed: 0,
            displaced: 0,
            adopted: false,
            drift: false,
            message: "increase 5 -> 10: takes 5 of 190 free TestOps seats".into(),
        })
    }

    #[test]
    fn applied_change_is_ready_and_recorded() {
        let s = build(None, &pass(increase(), allocation(10, 4)), at(0));
        assert_eq!(
            types(&s),
            vec![("Ready".into(), "True".into(), "Reconciled".into())]
        );
        assert_eq!(
            (s.allocated, s.in_use, s.observed_generation),
            (Some(10), Some(4), Some(2))
        );
        let change = s.last_change.unwrap();
        assert_eq!((change.from, change.to), (5, 10));
        assert_eq!(s.pool.unwrap().free, 185);
        assert!(
            ready_message(&s.conditions).contains("qa-team holds 10 TestOps licenses (4 in use)")
        );
    }

    fn ready_message(c: &[Condition]) -> String {
        c.iter().find(|c| c.type_ == READY).unwrap().message.clone()
    }

    #[test]
    fn the_pass_after_a_change_builds_the_same_status() {
        let changed = build(None, &pass(increase(), allocation(10, 4)), at(0));
        let idle = build(
            Some(&changed),
            &pass(Verdict::InSync, allocation(10, 4)),
            at(300),
        );
        assert_eq!(idle, changed);
    }

    #[test]
    fn refusal_stalls_and_is_not_repeated_in_failures() {
        let refused = Verdict::Refused {
            reason: Reason::BelowInUse,
            message: "cannot lower to 3: 4 seats are in use".into(),
        };
        let first = build(None, &pass(refused.clone(), allocation(10, 4)), at(0));
        assert_eq!(
            types(&first),
            vec![
                ("Ready".into(), "False".into(), "BelowInUse".into()),
                ("Stalled".into(), "True".into(), "BelowInUse".into())
            ]
        );
        let again = build(Some(&first), &pass(refused, allocation(10, 4)), at(60));
        assert_eq!(again, first, "a stuck object must build the same status");
        assert_eq!(again.failures.len(), 1);
    }

    #[test]
    fn failures_keep_the_newest_five_and_clear_on_success() {
        let mut s = build(None, &pass(Verdict::InSync, allocation(10, 4)), at(0));
        for i in 0..7 {
            let v = Verdict::Retrying {
                reason: Reason::BackendUnavailable,
                message: format!("attempt {i}"),
            };
            s = build(Some(&s), &pass(v, Seen::Unknown), at(i + 1));
        }
        assert_eq!(s.failures.len(), MAX_FAILURES);
        assert_eq!(s.failures[0].message, "attempt 6");
        assert_eq!(
            s.allocated,
            Some(10),
            "an unreachable backend keeps what was last seen"
        );
        assert_eq!(
            types(&s)[1],
            (
                "Reconciling".into(),
                "True".into(),
                "BackendUnavailable".into()
            )
        );
        let healed = build(Some(&s), &pass(Verdict::InSync, allocation(10, 4)), at(100));
        assert!(healed.failures.is_empty());
        assert_eq!(healed.conditions.len(), 1);
    }

    #[test]
    fn transition_time_moves_only_when_the_status_flips() {
        let first = build(None, &pass(Verdict::InSync, allocation(10, 4)), at(0));
        let later = build(
            Some(&first),
            &pass(Verdict::InSync, allocation(10, 5)),
            at(300),
        );
        assert_eq!(
            first.conditions[0].last_transition_time,
            later.conditions[0].last_transition_time
        );
        let refused = Verdict::Refused {
            reason: Reason::InsufficientPool,
            message: "no room".into(),
        };
        let stalled = build(Some(&later), &pass(refused, allocation(10, 5)), at(600));
        assert_eq!(stalled.conditions[0].last_transition_time, Time(at(600)));
    }

    #[test]
    fn pool_is_a_snapshot_of_this_objects_last_change() {
        let first = build(None, &pass(increase(), allocation(10, 4)), at(0));
        let mut other_moved_the_pool = pass(Verdict::InSync, allocation(10, 4));
        other_moved_the_pool.pool = Some(pool(20));
        let s = build(Some(&first), &other_moved_the_pool, at(10));
        assert_eq!(s.pool.unwrap().free, 185);
    }

    #[test]
    fn paused_and_observed_objects_say_why_nothing_is_written() {
        let paused = build(
            None,
            &pass(
                Verdict::Held {
                    hold: Hold::Paused,
                    in_sync: false,
                },
                allocation(5, 4),
            ),
            at(0),
        );
        assert_eq!(
            types(&paused),
            vec![("Ready".into(), "False".into(), "Paused".into())]
        );
        assert!(ready_message(&paused.conditions).contains("the spec asks for 10"));
        let observed = build(
            None,
            &pass(
                Verdict::Held {
                    hold: Hold::Observe,
                    in_sync: true,
                },
                allocation(10, 4),
            ),
            at(0),
        );
        assert_eq!(
            types(&observed),
            vec![("Ready".into(), "True".into(), "Observed".into())]
        );
    }

    #[test]
    fn drift_needs_an_unchanged_spec_and_a_ready_object() {
        let s = build(None, &pass(Verdict::InSync, allocation(10, 4)), at(0));
        assert!(drifted(Some(&s), Some(2), 7));
        assert!(!drifted(Some(&s), Some(3), 7), "a spec change is not drift");
        assert!(!drifted(Some(&s), Some(2), 10));
        assert!(!drifted(None, Some(2), 7));
    }
}
