//! Executes a [`Plan`] against a backend, in the plan's order (frees before
//! claims). Each change is written on its own: a refusal or failure of one is
//! recorded on that change and the others still go ahead. The backend decides
//! every write again, atomically, so a plan that went stale is refused there
//! rather than applied wrongly. Afterwards the plan's pools are the backend's.

use crate::backend::{Backend, BackendError, Written};
use crate::domain::{Action, PoolView};
use crate::plan::{Change, Outcome, Plan, refuse};

/// Writes every planned change and records its outcome.
pub async fn execute(plan: &mut Plan, backend: &dyn Backend) -> Result<(), BackendError> {
    for change in &mut plan.changes {
        apply_one(change, backend).await;
    }
    let after = backend.snapshot().await?;
    plan.pools = after.pools.iter().map(PoolView::from).collect();
    Ok(())
}

/// Writes one planned change; other outcomes are left as planned. Returns
/// the backend's answer when the write was accepted.
pub async fn apply_one(change: &mut Change, backend: &dyn Backend) -> Option<Written> {
    let write = change.write.take()?;
    if change.action == Action::Orphan {
        // A prune of an allocation whose policy is Orphan: release its
        // manager, as the operator does when the object is deleted.
        let manager = write.managed_by.as_deref().unwrap_or_default();
        match backend
            .release(&write.organization, &write.product, manager)
            .await
        {
            Ok(()) => change.outcome = Outcome::Applied,
            Err(e) => failed(change, e),
        }
        return None;
    }
    match backend.write(&write).await {
        Ok(written) => {
            change.outcome = Outcome::Applied;
            change.rehomed = written.effect.rehomed;
            change.displaced = written.effect.displaced;
            if written.replayed {
                change.message.push_str(" (already applied; replayed)");
            }
            Some(written)
        }
        Err(e) => {
            failed(change, e);
            None
        }
    }
}

/// Records a write the backend did not accept: refused by a rule, or failed.
fn failed(change: &mut Change, e: BackendError) {
    match e {
        BackendError::Refused(refusal) => refuse(change, refusal),
        e => {
            change.outcome = Outcome::Failed;
            change.reason = e.reason();
            change.message = e.to_string();
        }
    }
}
