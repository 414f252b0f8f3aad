//! The write pipeline, written once for every store: each function runs
//! inside one transaction of a [`Storage`] and decides with
//! [`crate::domain`], so a store adds only its SQL. A refusal returns
//! before anything is written, and the caller rolls the transaction back:
//! the store keeps exactly the rows it had.
//!
//! Allocation writes come in batches (one write alone is a batch of one;
//! see `store::batch`). A batch reads what it is decided on first, in one
//! go: the rows of its allocations and pools (a store that locks rows
//! locks the pools here) and the answers stored under its keys. Then each
//! write goes: role (R1, first, so a Viewer never receives an answer
//! stored for an admin) -> replay of the key's first answer -> decide on
//! the rows as the writes before it left them -> version check -> write ->
//! audit -> remember the answer under the key. Every answer is remembered,
//! a no-op included, so a retry gets what the first try got even if
//! another writer moved the allocation since. Refusals are not remembered:
//! they change nothing, so a retry is decided afresh and any version check
//! still applies.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use super::Principal;
use super::audit::{AuditAction, AuditRecord};
use super::storage::{KeyRow, Observation, Observations, Storage, now};
use crate::backend::{BackendError, Fixture, Written};
use crate::domain::{
    Allocation, AllocationWrite, DeletionPolicy, Pool, PoolView, Reason, Refusal, Request,
    SeatChange, SeatTarget, Target, check_identifier, decide, decide_release, decide_seats,
    decide_total, require_admin, unknown_product,
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
    write_all(s, account, &[(who, w)])?
        .pop()
        .unwrap_or_else(|| Err(BackendError::Unavailable("no answer".into())))
}

/// Decides and applies allocation writes in order, in one transaction:
/// the rows they are decided on (and their keys' answers) are read
/// together first, and each write is decided on those rows as the writes
/// before it left them, exactly as if it had come alone a moment later.
/// A store failure fails them all; otherwise each has its own answer.
pub fn write_all<S: Storage + ?Sized>(
    s: &S,
    account: &str,
    writes: &[(&Principal, &AllocationWrite)],
) -> Result<Vec<Result<Written, BackendError>>, BackendError> {
    let wanted: Vec<(&str, &str)> = writes
        .iter()
        .map(|(_, w)| (w.organization.as_str(), w.product.as_str()))
        .collect();
    let keys: Vec<&str> = writes
        .iter()
        .filter_map(|(_, w)| w.idempotency_key.as_deref())
        .collect();
    let Observations {
        seen,
        mut remembered,
    } = s.observations(account, &wanted, &keys)?;
    let mut rows = Rows::default();
    for ((organization, product), seen) in wanted.iter().zip(seen) {
        rows.pools.insert(product.to_string(), seen.pool);
        rows.organizations
            .insert(organization.to_string(), seen.organization_exists);
        rows.allocations.insert(
            (organization.to_string(), product.to_string()),
            seen.allocation,
        );
    }
    let mut answers = Vec::with_capacity(writes.len());
    for (who, w) in writes {
        match write_one(s, account, who, w, &mut rows, &mut remembered) {
            Err(e @ BackendError::Unavailable(_)) => return Err(e),
            answer => answers.push(answer),
        }
    }
    Ok(answers)
}

/// The rows a batch of writes is decided on, as the writes so far left them.
#[derive(Default)]
struct Rows {
    pools: HashMap<String, Option<Pool>>,
    organizations: HashMap<String, bool>,
    allocations: HashMap<(String, String), Option<Allocation>>,
}

impl Rows {
    fn observation(&self, w: &AllocationWrite) -> Observation {
        Observation {
            pool: self.pools.get(&w.product).cloned().flatten(),
            organization_exists: self
                .organizations
                .get(&w.organization)
                .copied()
                .unwrap_or(false),
            allocation: self
                .allocations
                .get(&(w.organization.clone(), w.product.clone()))
                .cloned()
                .flatten(),
        }
    }
}

/// One write of a batch: role, replay, decide and write, remember.
fn write_one<S: Storage + ?Sized>(
    s: &S,
    account: &str,
    who: &Principal,
    w: &AllocationWrite,
    rows: &mut Rows,
    remembered: &mut HashMap<String, (String, String)>,
) -> Result<Written, BackendError> {
    require_admin(who.role, "change allocations")?;
    let request_hash = hash(&serde_json::to_string(w).unwrap_or_default());
    if let Some(key) = &w.idempotency_key
        && let Some(answer) = replay(remembered.get(key), key, &request_hash)?
    {
        return Ok(answer);
    }
    let (written, pool) = decide_and_write(s, account, who, w, rows.observation(w))?;
    rows.pools.insert(w.product.clone(), Some(pool));
    rows.allocations.insert(
        (w.organization.clone(), w.product.clone()),
        written.allocation.clone(),
    );
    if let Some(key) = &w.idempotency_key {
        let row = KeyRow {
            key: key.clone(),
            request_hash,
            answer: serde_json::to_string(&written).unwrap_or_default(),
            created: now(),
        };
        s.remember(account, &row)?;
        remembered.insert(row.key, (row.request_hash, row.answer));
    }
    Ok(written)
}

/// The first answer to `key`, if it was used for this same request; a
/// different request under the key is an error.
fn replay(
    remembered: Option<&(String, String)>,
    key: &str,
    request_hash: &str,
) -> Result<Option<Written>, BackendError> {
    let Some((h, answer)) = remembered else {
        return Ok(None);
    };
    if h != request_hash {
        return Err(BackendError::KeyReused(key.to_string()));
    }
    let mut written: Written = serde_json::from_str(answer).map_err(|e| {
        BackendError::Unavailable(format!("stored idempotent answer unreadable: {e}"))
    })?;
    written.replayed = true;
    Ok(Some(written))
}

/// Checks the version, decides and writes one allocation change with its
/// audit record, on the rows `seen`; a no-op writes nothing. Returns the
/// answer and the pool as it now is.
fn decide_and_write<S: Storage + ?Sized>(
    s: &S,
    account: &str,
    who: &Principal,
    w: &AllocationWrite,
    seen: Observation,
) -> Result<(Written, Pool), BackendError> {
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
    // A manager that only changes what it keeps with its allocation (the
    // deletion policy, the expiry) writes the allocation (a new version) but no audit
    // record: no license moves.
    let audited = AuditAction::of(effect.action, effect.adopted);
    if audited.is_none() && !effect.terms_changed() {
        let view = PoolView::from(&pool);
        return Ok((
            Written {
                effect,
                allocation: current,
                pool: view,
                replayed: false,
            },
            pool,
        ));
    }
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
                // The manager writing says what its deletion does; a write
                // by nobody in particular keeps what is there.
                deletion_policy: match (&w.managed_by, &current) {
                    (Some(_), _) => w.deletion_policy,
                    (None, Some(a)) => a.deletion_policy,
                    (None, None) => DeletionPolicy::Revoke,
                },
                // So does its expiry; an unmanaged allocation has none,
                // since no manager would act on it.
                expiry: match &w.managed_by {
                    Some(_) => w.expiry,
                    None => current.as_ref().and_then(|a| a.expiry),
                },
                version: revision,
            };
            s.save_allocation(account, &allocation)?;
            Some(allocation)
        }
    };
    if let Some(action) = audited {
        let record = AuditRecord {
            rehomed: effect.rehomed,
            displaced: effect.displaced,
            manager: w.managed_by.as_deref().map(Into::into),
            idempotency_key: w.idempotency_key.as_deref().map(Into::into),
            ..AuditRecord::allocation(
                action,
                &w.organization,
                &w.product,
                (effect.from, effect.to),
            )
        };
        s.insert_audit(account, &who.actor, &record)?;
    }
    let view = PoolView::from(&pool);
    Ok((
        Written {
            effect,
            allocation,
            pool: view,
            replayed: false,
        },
        pool,
    ))
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
        deletion_policy: DeletionPolicy::Revoke,
        expiry: None,
    };
    if !decide_release(who.role, seen.seen(), &request)? {
        return Ok(());
    }
    let (Some(mut pool), Some(mut allocation)) = (seen.pool, seen.allocation) else {
        return Ok(());
    };
    let revision = s.next_revision(account)?;
    allocation.managed_by = None;
    allocation.deletion_policy = DeletionPolicy::Revoke;
    allocation.expiry = None;
    allocation.version = revision;
    s.save_allocation(account, &allocation)?;
    pool.revision = revision;
    s.save_pool(account, &pool)?;
    let record = AuditRecord {
        manager: Some(manager.into()),
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
        product: Some(product.into()),
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
                deletion_policy: DeletionPolicy::Revoke,
                expiry: None,
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
