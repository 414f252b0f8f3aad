//! The write pipeline, written once for every store: each function runs
//! inside one transaction of a [`Storage`] and decides with
//! [`crate::domain`], so a store adds only its SQL. A refusal returns
//! before anything is written, and the caller rolls the transaction back:
//! the store keeps exactly the rows it had.
//!
//! An allocation write goes: role (R1, first, so a Viewer never receives
//! an answer stored for an admin) -> replay of the key's first answer ->
//! observe -> decide -> version check -> write -> audit -> remember the
//! answer under the key. Every answer is remembered, a no-op included, so a
//! retry gets what the first try got even if another writer moved the
//! allocation since. Refusals are not remembered: they change nothing, so a
//! retry is decided afresh and any version check still applies.

use sha2::{Digest, Sha256};

use super::Principal;
use super::audit::{AuditAction, AuditRecord};
use super::rows::{Observation, Storage};
use crate::backend::{BackendError, Fixture, Written};
use crate::domain::{
    Allocation, AllocationWrite, Pool, PoolView, Reason, Refusal, Request, SeatChange, SeatTarget,
    Target, check_identifier, decide, decide_release, decide_seats, decide_total, require_admin,
    unknown_product,
};

/// Hex SHA-256, for tokens and request fingerprints.
pub fn hash(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// Decides and applies one allocation write (see the module contract).
pub fn write<S: Storage + ?Sized>(
    s: &S,
    account: &str,
    who: &Principal,
    w: &AllocationWrite,
) -> Result<Written, BackendError> {
    require_admin(who.role, "change allocations")?;
    let request_hash = hash(&serde_json::to_string(w).unwrap_or_default());
    if let Some(key) = &w.idempotency_key
        && let Some(answer) = replay(s, account, key, &request_hash)?
    {
        return Ok(answer);
    }
    let written = decide_and_write(s, account, who, w)?;
    if let Some(key) = &w.idempotency_key {
        let answer = serde_json::to_string(&written).unwrap_or_default();
        s.remember(account, key, &request_hash, &answer)?;
    }
    Ok(written)
}

/// The first answer to `key`, if it was used for this same request; a
/// different request under the key is an error.
fn replay<S: Storage + ?Sized>(
    s: &S,
    account: &str,
    key: &str,
    request_hash: &str,
) -> Result<Option<Written>, BackendError> {
    let Some((h, answer)) = s.remembered(account, key)? else {
        return Ok(None);
    };
    if h != request_hash {
        return Err(BackendError::KeyReused(key.to_string()));
    }
    let mut written: Written = serde_json::from_str(&answer).map_err(|e| {
        BackendError::Unavailable(format!("stored idempotent answer unreadable: {e}"))
    })?;
    written.replayed = true;
    Ok(Some(written))
}

/// Observes, decides, checks the version and writes one allocation change
/// with its audit record; a no-op writes nothing.
fn decide_and_write<S: Storage + ?Sized>(
    s: &S,
    account: &str,
    who: &Principal,
    w: &AllocationWrite,
) -> Result<Written, BackendError> {
    let seen = s.observation(account, &w.organization, &w.product)?;
    let effect = decide(who.role, seen.seen(), &w.request())?;
    let Observation {
        pool,
        allocation: current,
        ..
    } = seen;
    if let Some(expected) = w.expected_version {
        let actual = current.as_ref().map_or(0, |a| a.version);
        if expected != actual {
            return Err(BackendError::Stale { expected, actual });
        }
    }
    let mut pool = pool.ok_or_else(|| unknown_product(&w.product))?;
    let Some(action) = AuditAction::of(effect.action, effect.adopted) else {
        return Ok(Written {
            effect,
            allocation: current,
            pool: PoolView::from(&pool),
            replayed: false,
        });
    };
    let revision = s.next_revision(account)?;
    pool.book(&effect);
    pool.revision = revision;
    s.save_pool(account, &pool)?;
    let allocation = match w.target {
        Target::Remove => {
            s.remove_allocation(account, &w.organization, &w.product)?;
            None
        }
        Target::Count(to) => {
            let allocation = Allocation {
                organization: w.organization.clone(),
                product: w.product.clone(),
                dedicated: to,
                in_use: effect.in_use,
                managed_by: w
                    .managed_by
                    .clone()
                    .or_else(|| current.as_ref().and_then(|a| a.managed_by.clone())),
                version: revision,
            };
            s.save_allocation(account, &allocation)?;
            Some(allocation)
        }
    };
    let record = AuditRecord {
        rehomed: effect.rehomed,
        displaced: effect.displaced,
        manager: w.managed_by.as_deref(),
        idempotency_key: w.idempotency_key.as_deref(),
        ..AuditRecord::allocation(
            action,
            &w.organization,
            &w.product,
            (effect.from, effect.to),
        )
    };
    s.insert_audit(account, &who.actor, &record)?;
    Ok(Written {
        effect,
        allocation,
        pool: PoolView::from(&pool),
        replayed: false,
    })
}

/// Gives up the management of an allocation (deletionPolicy Orphan),
/// decided by [`decide_release`]; the count stays.
pub fn release<S: Storage + ?Sized>(
    s: &S,
    account: &str,
    who: &Principal,
    organization: &str,
    product: &str,
    manager: &str,
) -> Result<(), BackendError> {
    let seen = s.observation(account, organization, product)?;
    let dedicated = seen.allocation.as_ref().map_or(0, |a| a.dedicated);
    let request = Request {
        organization,
        product,
        target: Target::Count(dedicated),
        managed_by: Some(manager),
        allow_user_displacement: false,
    };
    if !decide_release(who.role, seen.seen(), &request)? {
        return Ok(());
    }
    let (Some(mut pool), Some(mut allocation)) = (seen.pool, seen.allocation) else {
        return Ok(());
    };
    let revision = s.next_revision(account)?;
    allocation.managed_by = None;
    allocation.version = revision;
    s.save_allocation(account, &allocation)?;
    pool.revision = revision;
    s.save_pool(account, &pool)?;
    let record = AuditRecord {
        manager: Some(manager),
        ..AuditRecord::allocation(
            AuditAction::Orphan,
            organization,
            product,
            (dedicated, dedicated),
        )
    };
    s.insert_audit(account, &who.actor, &record)
}

/// Sets a product's total (R1; R9: it may go below what is handed out).
pub fn set_total<S: Storage + ?Sized>(
    s: &S,
    account: &str,
    who: &Principal,
    product: &str,
    total: i64,
) -> Result<Pool, BackendError> {
    decide_total(who.role, total)?;
    let mut pool = s
        .pool(account, product)?
        .ok_or_else(|| unknown_product(product))?;
    let from = pool.total;
    pool.total = total;
    pool.revision = s.next_revision(account)?;
    s.save_pool(account, &pool)?;
    let record = AuditRecord {
        product: Some(product),
        from,
        to: total,
        ..AuditRecord::new(AuditAction::Total)
    };
    s.insert_audit(account, &who.actor, &record)?;
    Ok(pool)
}

/// Claims or releases seats in use, decided by [`decide_seats`].
pub fn seats<S: Storage + ?Sized>(
    s: &S,
    account: &str,
    who: &Principal,
    organization: &str,
    product: &str,
    change: SeatChange,
) -> Result<(), BackendError> {
    require_admin(who.role, "change seats in use")?;
    let seen = s.observation(account, organization, product)?;
    let target = decide_seats(seen.seen(), organization, product, change)?;
    let (Some(mut pool), current) = (seen.pool, seen.allocation) else {
        return Err(unknown_product(product).into());
    };
    let revision = s.next_revision(account)?;
    pool.revision = revision;
    let (from, to) = match (target, current) {
        (SeatTarget::Dedicated { in_use }, Some(mut a)) => {
            let from = a.in_use;
            a.in_use = in_use;
            a.version = revision;
            s.save_allocation(account, &a)?;
            (from, in_use)
        }
        (SeatTarget::Shared { shared_in_use }, _) => {
            let from = pool.shared_in_use;
            pool.shared_in_use = shared_in_use;
            (from, shared_in_use)
        }
        (SeatTarget::Dedicated { .. }, None) => {
            return Err(Refusal::new(Reason::Invalid, "no allocation to claim from").into());
        }
    };
    s.save_pool(account, &pool)?;
    let action = match change {
        SeatChange::Claim(_) => AuditAction::Claim,
        SeatChange::Release(_) => AuditAction::Release,
    };
    let record = AuditRecord::allocation(action, organization, product, (from, to));
    s.insert_audit(account, &who.actor, &record)
}

/// Replaces one account's contents with a fixture. The account's sequence
/// goes on, so nothing seeded has a version or revision handed out before.
pub fn seed<S: Storage + ?Sized>(
    s: &S,
    who: &Principal,
    fixture: &Fixture,
) -> Result<(), BackendError> {
    fixture.validate()?;
    require_admin(who.role, "seed the account")?;
    let account = fixture.account.as_str();
    s.clear_account(account)?;
    for p in &fixture.products {
        let dedicated: i64 = fixture
            .organizations
            .iter()
            .flat_map(|o| &o.allocations)
            .filter(|a| a.product == p.name)
            .map(|a| a.dedicated)
            .sum();
        let pool = Pool {
            product: p.name.clone(),
            total: p.total,
            dedicated,
            shared_in_use: p.shared_in_use,
            revision: s.next_revision(account)?,
        };
        s.insert_pool(account, &pool)?;
    }
    for o in &fixture.organizations {
        s.insert_organization(account, &o.id, o.name.as_deref())?;
        for a in &o.allocations {
            let allocation = Allocation {
                organization: o.id.clone(),
                product: a.product.clone(),
                dedicated: a.dedicated,
                in_use: a.in_use,
                managed_by: a.managed_by.clone(),
                version: s.next_revision(account)?,
            };
            s.save_allocation(account, &allocation)?;
        }
    }
    s.insert_audit(account, &who.actor, &AuditRecord::new(AuditAction::Seed))
}

/// Adds an organization to an account (R1: Account Admin only).
pub fn create_organization<S: Storage + ?Sized>(
    s: &S,
    account: &str,
    who: &Principal,
    id: &str,
    name: Option<&str>,
) -> Result<(), BackendError> {
    require_admin(who.role, "create organizations")?;
    check_identifier("organization id", id)?;
    if s.organization_exists(account, id)? {
        return Err(
            Refusal::new(Reason::Invalid, format!("organization {id} already exists")).into(),
        );
    }
    s.insert_organization(account, id, name)
}
