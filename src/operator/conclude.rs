//! What a pass concluded, pure: from what the object asks, what the backend
//! showed and what the write did, to the [`Pass`] that the status and the
//! events are built from. The driver (`reconcile`) does the I/O around it.

use super::status::{Applied, Pass, Seen, Verdict};
use crate::backend::{BackendError, Written};
use crate::domain::{Action, PoolView, Reason, ReasonClass, Snapshot};
use crate::plan::{Change, Desired, Outcome};

/// A pass over `wanted` that has not seen the backend (yet).
pub fn unseen(generation: Option<i64>, wanted: &Desired, deleting: bool, verdict: Verdict) -> Pass {
    Pass {
        generation,
        account: wanted.account.clone(),
        organization: wanted.organization.clone(),
        product: wanted.product.clone(),
        count: wanted.count,
        expiry: wanted.expiry,
        expired: false,
        deleting,
        verdict,
        seen: Seen::Unknown,
        pool: None,
        diff: String::new(),
    }
}

/// A pass the backend answered with an error instead of a decision. What
/// the backend failed (unreachable, slow, garbage, a write gone stale) is
/// retried: `BackendUnavailable`, naming the backend at `location`. A
/// refusal it gave is reported with its reason, and credentials it refused
/// are `Forbidden` until a person fixes the token.
pub fn unanswered(
    generation: Option<i64>,
    wanted: &Desired,
    deleting: bool,
    error: BackendError,
    location: &str,
) -> Pass {
    let reason = error.reason().unwrap_or(Reason::BackendUnavailable);
    let verdict = match (reason.class(), error) {
        (ReasonClass::Backend, e) => Verdict::Retrying {
            reason,
            message: format!("backend {location}: {e}"),
        },
        (_, BackendError::Refused(r)) => Verdict::Refused {
            reason,
            message: r.message,
        },
        (_, BackendError::Unauthorized(m)) => Verdict::Refused {
            reason,
            message: format!(
                "the backend refused the operator's credentials: {m}; check the token"
            ),
        },
        (_, e) => Verdict::Refused {
            reason,
            message: e.to_string(),
        },
    };
    unseen(generation, wanted, deleting, verdict)
}

/// After bringing the backend to the spec: `None` when the write was not
/// decided (the backend was unavailable, or the allocation moved since it
/// was read), which the driver retries.
///
/// `drift`: the backend had moved away from what the object last recorded
/// while its spec stayed the same.
pub fn ensured(
    generation: Option<i64>,
    wanted: &Desired,
    snapshot: &Snapshot,
    drift: bool,
    change: &Change,
    written: Option<&Written>,
) -> Option<Pass> {
    let before = seen(snapshot, wanted);
    let pool_seen = pool_of(snapshot, &wanted.product);
    let (verdict, seen, pool) = match change.outcome {
        Outcome::Applied => {
            let seen = match written.and_then(|w| w.allocation.clone()) {
                Some(a) => Seen::Allocation(a),
                None => Seen::Absent,
            };
            let verdict = Verdict::Applied(applied(change, written, drift));
            (verdict, seen, written.map(|w| w.pool.clone()).or(pool_seen))
        }
        Outcome::Refused => (refused(change, change.message.clone()), before, pool_seen),
        Outcome::Failed => return None,
        Outcome::Unchanged | Outcome::Planned => {
            let verdict = match wanted.hold {
                Some(hold) => Verdict::Held {
                    hold,
                    in_sync: in_sync(&before, change.to),
                },
                None => Verdict::InSync,
            };
            (verdict, before, pool_seen)
        }
    };
    Some(Pass {
        seen,
        pool,
        diff: change.diff.clone(),
        // The count asked for now: a temporary allocation's may have ended.
        count: change.to,
        expired: change.expiry.as_ref().is_some_and(|e| e.passed),
        ..unseen(generation, wanted, false, verdict)
    })
}

/// Where a deletion stands after the revoke its policy asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Removal {
    /// Revoked: the finalizer may go.
    Revoked(Pass),
    /// Nothing of this object's to revoke (missing, unmanaged, someone
    /// else's, or a name that never existed): the finalizer goes at once.
    NothingToRevoke,
    /// A real revoke the rules refuse for now: it says which and why.
    Waits(Pass),
    /// The write was not decided: the driver retries.
    NotDecided,
}

/// After the revoke of a deleted object.
pub fn removed(
    generation: Option<i64>,
    wanted: &Desired,
    snapshot: &Snapshot,
    change: &Change,
    written: Option<&Written>,
) -> Removal {
    match change.outcome {
        Outcome::Applied => Removal::Revoked(Pass {
            seen: Seen::Absent,
            pool: written.map(|w| w.pool.clone()),
            diff: change.diff.clone(),
            ..unseen(
                generation,
                wanted,
                true,
                Verdict::Applied(applied(change, None, false)),
            )
        }),
        Outcome::Unchanged => Removal::NothingToRevoke,
        // A spec change made while waiting (R6 consent, the policy) is
        // picked up by the next pass.
        Outcome::Refused => {
            let advice = match change.reason {
                Some(Reason::WouldDisplaceUsers) => {
                    "; set allowUserDisplacement: true to revoke anyway, or deletionPolicy: Orphan to leave the licenses with the organization"
                }
                _ => "; or set deletionPolicy: Orphan to leave the licenses with the organization",
            };
            let message = format!(
                "deleting: the revoke of {} {} {} -> 0 waits: {}{advice}",
                change.organization, change.product, change.from, change.message
            );
            Removal::Waits(Pass {
                seen: seen(snapshot, wanted),
                pool: pool_of(snapshot, &wanted.product),
                diff: change.diff.clone(),
                ..unseen(generation, wanted, true, refused(change, message))
            })
        }
        Outcome::Failed | Outcome::Planned => Removal::NotDecided,
    }
}

/// Whether a pass waits for seats of its product to be freed, or for the
/// object holding its allocation to go: either is woken when the pool
/// moves that way.
pub fn waits_for_the_pool(pass: &Pass) -> bool {
    matches!(
        pass.verdict,
        Verdict::Refused {
            reason: Reason::InsufficientPool | Reason::Conflict,
            ..
        }
    )
}

/// Whether a pass gave seats back to its product's pool.
pub fn freed_seats(pass: &Pass) -> bool {
    matches!(
        &pass.verdict,
        Verdict::Applied(a) if matches!(a.action, Action::Decrease | Action::Revoke)
    )
}

fn refused(change: &Change, message: String) -> Verdict {
    Verdict::Refused {
        reason: change.reason.unwrap_or(Reason::Invalid),
        message,
    }
}

/// What an applied change did, for status and events.
fn applied(change: &Change, written: Option<&Written>, drift: bool) -> Applied {
    Applied {
        action: change.action,
        from: change.from,
        to: change.to,
        rehomed: change.rehomed,
        displaced: change.displaced,
        adopted: written.is_some_and(|w| w.effect.adopted),
        drift,
        message: change.message.clone(),
    }
}

fn seen(snapshot: &Snapshot, wanted: &Desired) -> Seen {
    snapshot
        .allocations
        .iter()
        .find(|a| a.organization == wanted.organization && a.product == wanted.product)
        .map_or(Seen::Absent, |a| Seen::Allocation(a.clone()))
}

fn pool_of(snapshot: &Snapshot, product: &str) -> Option<PoolView> {
    snapshot
        .pools
        .iter()
        .find(|p| p.product == product)
        .map(PoolView::from)
}

fn in_sync(seen: &Seen, count: i64) -> bool {
    match seen {
        Seen::Allocation(a) => a.dedicated == count,
        Seen::Absent => count == 0,
        Seen::Unknown => false,
    }
}

/// The seen allocation of `wanted`, if the backend has one.
pub fn allocation_in(snapshot: &Snapshot, wanted: &Desired) -> Option<i64> {
    match seen(snapshot, wanted) {
        Seen::Allocation(a) => Some(a.dedicated),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Allocation, Pool, Refusal, Role};
    use crate::plan::{Options, plan, plan_removal};
    use crate::resource::Hold;

    /// 20 TestOps seats: qa-team holds 10 of them, 4 in use, managed by
    /// this object.
    fn snapshot() -> Snapshot {
        Snapshot {
            pools: vec![Pool {
                product: "TestOps".into(),
                total: 20,
                dedicated: 10,
                shared_in_use: 0,
                revision: 7,
            }],
            organizations: vec!["qa-team".into()],
            allocations: vec![Allocation {
                organization: "qa-team".into(),
                product: "TestOps".into(),
                dedicated: 10,
                in_use: 4,
                managed_by: Some("default/licenses/qa".into()),
                deletion_policy: Default::default(),
                expiry: None,
                version: 3,
            }],
        }
    }

    /// The pool over-committed: dev-team holds 8 of TestOps' 10 seats
    /// beside qa-team's 10, so qa-team's 4 users have 2 seats to fall back on.
    fn over_committed() -> Snapshot {
        let mut s = snapshot();
        s.pools[0].total = 10;
        s.pools[0].dedicated = 18;
        s.organizations.push("dev-team".into());
        s.allocations.push(Allocation {
            organization: "dev-team".into(),
            dedicated: 8,
            in_use: 0,
            managed_by: None,
            version: 4,
            ..s.allocations[0].clone()
        });
        s
    }

    fn wanted(count: i64, hold: Option<Hold>) -> Desired {
        Desired {
            resource: "licenses/qa".into(),
            account: "default".into(),
            organization: "qa-team".into(),
            product: "TestOps".into(),
            count,
            expiry: None,
            allow_user_displacement: false,
            managed_by: "default/licenses/qa".into(),
            deletion_policy: Default::default(),
            hold,
            denied: None,
            scope: "uid/1".into(),
        }
    }

    fn change(wanted: &Desired) -> Change {
        let opts = Options {
            prune: false,
            instance: "default".into(),
            role: Role::AccountAdmin,
            keep_writes: true,
            now: chrono::Utc::now(),
        };
        plan(vec![wanted.clone()], snapshot(), &opts)
            .changes
            .pop()
            .expect("one change")
    }

    #[test]
    fn a_raise_past_the_pool_is_refused_with_what_was_seen_and_waits_for_seats() {
        let wanted = wanted(25, None);
        let pass = ensured(Some(2), &wanted, &snapshot(), false, &change(&wanted), None).unwrap();
        assert!(
            matches!(
                &pass.verdict,
                Verdict::Refused { reason: Reason::InsufficientPool, message } if message.contains("requested 15 more TestOps seats but only 10 are free")
            ),
            "{:?}",
            pass.verdict
        );
        assert!(matches!(&pass.seen, Seen::Allocation(a) if a.dedicated == 10));
        assert_eq!(pass.pool.as_ref().map(|p| p.free), Some(10));
        assert!(waits_for_the_pool(&pass));
        assert!(!freed_seats(&pass));
    }

    #[test]
    fn observing_a_difference_is_held_out_of_sync_and_agreement_in_sync() {
        let differs = wanted(12, Some(Hold::Observe));
        let pass = ensured(None, &differs, &snapshot(), false, &change(&differs), None).unwrap();
        assert_eq!(
            pass.verdict,
            Verdict::Held {
                hold: Hold::Observe,
                in_sync: false
            }
        );
        let agrees = wanted(10, Some(Hold::Observe));
        let pass = ensured(None, &agrees, &snapshot(), false, &change(&agrees), None).unwrap();
        assert_eq!(
            pass.verdict,
            Verdict::Held {
                hold: Hold::Observe,
                in_sync: true
            }
        );
    }

    #[test]
    fn an_error_is_retried_a_refusal_reported_and_refused_credentials_are_forbidden() {
        let w = wanted(10, None);
        let verdict = |e: BackendError| unanswered(Some(1), &w, false, e, "sqlite:l.db").verdict;
        for e in [
            BackendError::Unavailable("connection refused".into()),
            BackendError::Stale {
                expected: 1,
                actual: 2,
            },
            BackendError::KeyReused("k".into()),
            BackendError::Refused(Refusal::new(Reason::BackendUnavailable, "down")),
        ] {
            assert!(
                matches!(verdict(e.clone()), Verdict::Retrying { reason: Reason::BackendUnavailable, ref message } if message.starts_with("backend sqlite:l.db: ")),
                "{e:?}"
            );
        }
        assert_eq!(
            verdict(BackendError::Refused(Refusal::new(
                Reason::UnknownProduct,
                "no TestOps"
            ))),
            Verdict::Refused {
                reason: Reason::UnknownProduct,
                message: "no TestOps".into()
            }
        );
        let Verdict::Refused { reason, message } =
            verdict(BackendError::Unauthorized("bad token".into()))
        else {
            panic!("refused credentials are not retried");
        };
        assert_eq!(reason, Reason::Forbidden);
        assert!(
            message.contains("bad token") && message.ends_with("check the token"),
            "{message}"
        );
    }

    #[test]
    fn a_write_the_backend_did_not_decide_is_left_to_the_driver() {
        let wanted = wanted(12, None);
        let mut change = change(&wanted);
        change.outcome = Outcome::Failed;
        change.reason = Some(Reason::BackendUnavailable);
        assert_eq!(
            ensured(None, &wanted, &snapshot(), false, &change, None),
            None
        );
        assert_eq!(
            removed(None, &wanted, &snapshot(), &change, None),
            Removal::NotDecided
        );
    }

    #[test]
    fn a_revoke_that_would_displace_users_waits_and_says_how_to_go_on() {
        let wanted = wanted(10, None);
        let change = plan_removal(&wanted, &over_committed(), Role::AccountAdmin);
        let Removal::Waits(pass) = removed(Some(3), &wanted, &over_committed(), &change, None)
        else {
            panic!("expected the revoke to wait: {change:?}");
        };
        let Verdict::Refused { reason, message } = &pass.verdict else {
            panic!("{:?}", pass.verdict);
        };
        assert_eq!(*reason, Reason::WouldDisplaceUsers);
        assert!(
            message.starts_with("deleting: the revoke of qa-team TestOps 10 -> 0 waits: ")
                && message.ends_with("set allowUserDisplacement: true to revoke anyway, or deletionPolicy: Orphan to leave the licenses with the organization"),
            "{message}"
        );
        assert!(pass.deleting);
        assert_eq!(pass.generation, Some(3));
    }

    #[test]
    fn nothing_to_revoke_when_someone_else_manages_the_allocation() {
        let mut wanted = wanted(10, None);
        wanted.managed_by = "other/licenses/qa".into();
        let change = plan_removal(&wanted, &snapshot(), Role::AccountAdmin);
        assert_eq!(
            removed(None, &wanted, &snapshot(), &change, None),
            Removal::NothingToRevoke
        );
    }
}
