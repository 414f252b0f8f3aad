//! The license rules of DESIGN §1, pure: no I/O, no clock, no async.
//!
//! Everything that decides whether an allocation may change lives here and
//! nowhere else. The planner simulates a whole manifest set with [`Ledger`];
//! the SQLite store loads one pool and one allocation inside a transaction and
//! calls [`decide`]; the HTTP server calls the store. A refusal is a
//! [`Refusal`] whose [`Reason`] is spelled once and used everywhere: CLI JSON,
//! HTTP problem types, status reasons, events and metric labels.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

pub mod expiry;
pub mod tenants;

pub use expiry::{Ending, Expiry};

/// Largest dedicated count one allocation may hold.
pub const MAX_COUNT: i64 = 1_000_000;
/// Largest product total an account may hold.
pub const MAX_TOTAL: i64 = 1_000_000_000;
/// Longest organization id or product name, in characters (not bytes).
pub const MAX_IDENTIFIER: usize = 253;
/// The one alphabet of organization ids and product names, as a regular
/// expression that RE2 (the Kubernetes API server), ECMAScript and Python
/// read alike: 1 to 253 characters, none of them a control character (C0,
/// DEL, C1), no space at either end. [`check_identifier`] is the same rule.
pub const IDENTIFIER_PATTERN: &str =
    r"^[^\x00-\x20\x7F-\x9F]([^\x00-\x1F\x7F-\x9F]{0,251}[^\x00-\x20\x7F-\x9F])?$";

/// Checks an organization id or product name against the one alphabet
/// ([`IDENTIFIER_PATTERN`]); `what` names it in the message.
pub fn check_identifier(what: &str, value: &str) -> Result<(), Refusal> {
    let control = |c: char| matches!(c, '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}');
    let length = value.chars().count();
    let problem = if length == 0 {
        "is empty"
    } else if length > MAX_IDENTIFIER {
        "is longer than 253 characters"
    } else if value.chars().any(control) {
        "holds a control character"
    } else if value.starts_with(' ') || value.ends_with(' ') {
        "starts or ends with a space"
    } else {
        return Ok(());
    };
    let shown: String = value.chars().take(40).collect();
    let more = if length > 40 { "..." } else { "" };
    Err(Refusal::new(
        Reason::Invalid,
        format!(
            "{what} {shown:?}{more} {problem}: ids and names are 1 to {MAX_IDENTIFIER} characters, no control characters, no space at either end"
        ),
    ))
}

/// Why a change was refused, or (for `OverCommitted` and `BackendUnavailable`)
/// why a resource is not healthy. The variant name is the reason string.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    strum::EnumIter,
    strum::IntoStaticStr,
    strum::EnumString,
    utoipa::ToSchema,
)]
pub enum Reason {
    /// R1: only the Account Admin may change allocations or totals.
    Forbidden,
    /// R2: the product has no pool in this account.
    UnknownProduct,
    /// R3: the pool has fewer free seats than the increase needs.
    InsufficientPool,
    /// R4: the new count is below the seats in use.
    BelowInUse,
    /// R6: the revoke would leave users without a license.
    WouldDisplaceUsers,
    /// R7: the organization does not exist.
    UnknownOrganization,
    /// R8: another manager owns the allocation.
    Conflict,
    /// The account named (`--account`) is not in the backend.
    UnknownAccount,
    /// R9: the pool hands out more than its total (a condition, not a refusal).
    OverCommitted,
    /// The backend could not be reached or answered garbage.
    BackendUnavailable,
    /// The request itself is malformed (bad count, bad fixture).
    Invalid,
}

impl Reason {
    /// Every reason, in the order they are declared: the compiler keeps
    /// the list, so a new reason cannot be missed.
    pub fn all() -> impl Iterator<Item = Reason> {
        <Reason as strum::IntoEnumIterator>::iter()
    }

    /// The reason as spelled everywhere: CLI JSON, problems, status, events.
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    pub fn parse(s: &str) -> Option<Reason> {
        s.parse().ok()
    }

    /// What a refusal for this reason asks of whoever reads it.
    pub fn class(self) -> ReasonClass {
        match self {
            Reason::UnknownOrganization
            | Reason::UnknownProduct
            | Reason::Conflict
            | Reason::UnknownAccount
            | Reason::Invalid => ReasonClass::AsWritten,
            Reason::InsufficientPool | Reason::BelowInUse | Reason::WouldDisplaceUsers => {
                ReasonClass::OfTheMoment
            }
            Reason::Forbidden => ReasonClass::Access,
            Reason::BackendUnavailable => ReasonClass::Backend,
            Reason::OverCommitted => ReasonClass::Condition,
        }
    }
}

/// The kinds of [`Reason`]: which of them can never succeed as written,
/// which depend on the moment, and the rest. The validating webhook denies
/// the first and warns on the second; the operator stalls on both and
/// retries only what the backend failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasonClass {
    /// The request must change (an unknown name, another manager's
    /// allocation, a malformed request).
    AsWritten,
    /// It may succeed later, as seats free up or users leave.
    OfTheMoment,
    /// The credential may not do this (R1).
    Access,
    /// The backend failed; a retry may succeed.
    Backend,
    /// A condition to report, never a refusal (R9).
    Condition,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The numbers behind a refusal, so a client can act without parsing prose.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RefusalDetail {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_use: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub displaced: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// A refused change: the reason, a message for people that says what to do,
/// and the numbers behind it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct Refusal {
    pub reason: Reason,
    pub message: String,
    #[serde(default)]
    pub detail: RefusalDetail,
}

impl Refusal {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Refusal {
            reason,
            message: message.into(),
            detail: RefusalDetail::default(),
        }
    }

    fn with(mut self, detail: RefusalDetail) -> Self {
        self.detail = detail;
        self
    }
}

/// Who is asking (R1). The variant name is the role's spelling, stored and
/// on the wire.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    strum::EnumIter,
    strum::IntoStaticStr,
    strum::EnumString,
)]
pub enum Role {
    AccountAdmin,
    Viewer,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        s.parse().ok()
    }

    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Refuses anything but the Account Admin (R1).
pub fn require_admin(role: Role, what: &str) -> Result<(), Refusal> {
    match role {
        Role::AccountAdmin => Ok(()),
        Role::Viewer => Err(Refusal::new(
            Reason::Forbidden,
            format!("only the AccountAdmin role may {what}; this credential is a Viewer"),
        )),
    }
}

/// One product's pool in an account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pool {
    pub product: String,
    pub total: i64,
    /// Sum of the organizations' dedicated counts.
    pub dedicated: i64,
    /// Seats claimed straight from the account pool.
    pub shared_in_use: i64,
    /// Moves with every change in this pool (an allocation written or
    /// removed, seats, the total) and never repeats in the account. A write
    /// to an allocation that does not exist is keyed on it: an absence has
    /// no version of its own (DESIGN §6).
    #[serde(default)]
    pub revision: i64,
}

impl Pool {
    /// `total - dedicated - sharedInUse`; negative when over-committed (R9).
    pub fn free(&self) -> i64 {
        self.total - self.dedicated - self.shared_in_use
    }

    pub fn over_committed(&self) -> bool {
        self.free() < 0
    }

    /// Books an accepted effect into the pool.
    pub fn book(&mut self, effect: &Effect) {
        self.dedicated += effect.to - effect.from;
        self.shared_in_use += effect.rehomed;
    }
}

/// An organization's dedicated allocation of one product.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Allocation {
    pub organization: String,
    pub product: String,
    pub dedicated: i64,
    pub in_use: i64,
    pub managed_by: Option<String>,
    /// What removing its manager's resource does, as the manager said when
    /// it last wrote (Revoke for an unmanaged allocation): `--prune`
    /// orphans what the operator would orphan.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// When its count ends and what it becomes then, as its manager said
    /// when it last wrote (DESIGN §11); only a managed allocation has one,
    /// since only its manager acts on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry: Option<Expiry>,
    /// Bumped by every write; the ETag of the HTTP API.
    #[serde(default)]
    pub version: i64,
}

/// The annotation that stops writes to a resource's allocation ("true").
pub const PAUSED_ANNOTATION: &str = "licensor.dev/paused";

/// `managedBy` of an allocation licensor manages:
/// `<instance>/<namespace>/<name>`, written and read back here only.
pub fn managed_by(instance: &str, namespace: &str, name: &str) -> String {
    [instance, "/", namespace, "/", name].concat()
}

/// The resource (`namespace/name`) a `managedBy` names when it is
/// `instance`'s; `None` for another instance's, or another tool's.
pub fn managed_resource<'a>(instance: &str, managed_by: &'a str) -> Option<&'a str> {
    managed_by
        .strip_prefix(instance)?
        .strip_prefix('/')
        .filter(|rest| rest.contains('/'))
}

/// What deleting a DedicatedLicense does to its allocation.
#[derive(
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    schemars::JsonSchema,
    utoipa::ToSchema,
    strum::EnumIter,
    strum::IntoStaticStr,
    strum::EnumString,
)]
pub enum DeletionPolicy {
    #[default]
    Revoke,
    Orphan,
}

impl DeletionPolicy {
    /// The variant name: as stored, on the wire and in the resource.
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// The stored spelling back; anything else is `None`.
    pub fn parse(s: &str) -> Option<DeletionPolicy> {
        s.parse().ok()
    }
}

/// What the requester wants an allocation to become.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Target {
    /// Hold exactly this many dedicated seats; 0 revokes them (R5) but keeps
    /// the allocation and its manager.
    Count(i64),
    /// Revoke and remove the allocation, releasing its manager.
    Remove,
}

impl Target {
    pub fn count(self) -> i64 {
        match self {
            Target::Count(n) => n,
            Target::Remove => 0,
        }
    }
}

/// A requested change to one allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    pub organization: &'a str,
    pub product: &'a str,
    pub target: Target,
    /// The manager making the change (R8); `None` writes as nobody in particular
    /// and may only touch unmanaged allocations.
    pub managed_by: Option<&'a str>,
    /// R6 consent.
    pub allow_user_displacement: bool,
    /// The manager's deletion policy, kept with the allocation it manages.
    pub deletion_policy: DeletionPolicy,
    /// The manager's expiry, kept with the allocation it manages.
    pub expiry: Option<Expiry>,
}

/// The kind of change, as shown in plans and audit entries.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Create,
    Increase,
    Decrease,
    Revoke,
    None,
    Orphan,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Increase => "increase",
            Action::Decrease => "decrease",
            Action::Revoke => "revoke",
            Action::None => "none",
            Action::Orphan => "orphan",
        }
    }

    pub fn classify(existing: bool, from: i64, target: Target) -> Action {
        let to = target.count();
        match target {
            Target::Remove if existing => Action::Revoke,
            Target::Remove => Action::None,
            Target::Count(_) if !existing && to > 0 => Action::Create,
            Target::Count(_) if to > from => Action::Increase,
            Target::Count(0) if from > 0 => Action::Revoke,
            Target::Count(_) if to < from => Action::Decrease,
            Target::Count(_) => Action::None,
        }
    }
}

/// The arithmetic outcome of an accepted change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Effect {
    pub action: Action,
    pub from: i64,
    pub to: i64,
    /// In-use seats after the change.
    pub in_use: i64,
    /// In-use seats moved to the account pool by a revoke (R5).
    pub rehomed: i64,
    /// In-use seats left without a license by a revoke (R5, R6).
    pub displaced: i64,
    /// The allocation was unmanaged and now has a manager (R8).
    pub adopted: bool,
    /// Its manager changed the deletion policy kept with it (the count may
    /// stay).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub policy_changed: bool,
    /// Its manager changed the expiry kept with it (the count may stay).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub expiry_changed: bool,
}

impl Effect {
    /// Nothing changes in the backend.
    pub fn is_noop(&self) -> bool {
        self.action == Action::None && !self.adopted && !self.terms_changed()
    }

    /// Its manager changed only what it keeps with the allocation (the
    /// deletion policy, the expiry): the allocation is written, no license
    /// moves.
    pub fn terms_changed(&self) -> bool {
        self.policy_changed || self.expiry_changed
    }
}

/// What the store observed for one request, inside its transaction.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    pub pool: Option<&'a Pool>,
    pub organization_exists: bool,
    pub allocation: Option<&'a Allocation>,
}

/// A count in a request body: a JSON integer, which JSON Schema also
/// spells `5.0`. Anything else (a fraction, a string, a number past i64)
/// is refused.
pub fn whole_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    use serde::de::Error;
    let n = <serde_json::Number as Deserialize>::deserialize(d)?;
    if let Some(i) = n.as_i64() {
        return Ok(i);
    }
    match n.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(f as i64),
        _ => Err(D::Error::custom(format!(
            "{n} is not a whole number in range"
        ))),
    }
}

/// Checks counts a request may carry at all.
pub fn check_count(count: i64) -> Result<(), Refusal> {
    check_count_of("count", count)
}

/// [`check_count`] for a count `field` names (a temporary allocation's
/// `thenCount`).
pub fn check_count_of(field: &str, count: i64) -> Result<(), Refusal> {
    if (0..=MAX_COUNT).contains(&count) {
        Ok(())
    } else {
        Err(Refusal::new(
            Reason::Invalid,
            format!("{field} {count} is outside 0..={MAX_COUNT}"),
        ))
    }
}

/// An expiry is kept for the manager that acts on it, and ends at a count
/// like any other.
fn check_expiry(req: &Request<'_>) -> Result<(), Refusal> {
    let Some(e) = &req.expiry else { return Ok(()) };
    if req.managed_by.is_none() {
        return Err(Refusal::new(
            Reason::Invalid,
            "an expiry is kept only for a manager, which acts on it at its until; give managedBy",
        ));
    }
    check_count_of("thenCount", e.then_count)
}

/// Decides one change against what was observed: R1-R8 in one place.
pub fn decide(role: Role, seen: Observed<'_>, req: &Request<'_>) -> Result<Effect, Refusal> {
    require_admin(role, "change allocations")?;
    check_count(req.target.count())?;
    check_expiry(req)?;
    let pool = seen.pool.ok_or_else(|| unknown_product(req.product))?;
    if !seen.organization_exists {
        return Err(unknown_organization(req.organization));
    }
    let (from, in_use, owner, policy, expiry) = match seen.allocation {
        Some(a) => (
            a.dedicated,
            a.in_use,
            a.managed_by.as_deref(),
            a.deletion_policy,
            a.expiry,
        ),
        None => (0, 0, None, DeletionPolicy::Revoke, None),
    };
    // What a manager keeps with its allocation changes only by that
    // manager, and not by a removal (which takes the allocation away).
    let keeps = owner.is_some() && owner == req.managed_by && !matches!(req.target, Target::Remove);
    let adopted = match (owner, req.managed_by) {
        (Some(owner), Some(me)) if owner != me => return Err(conflict(owner)),
        (Some(owner), None) => return Err(conflict(owner)),
        (None, Some(_)) => !matches!(req.target, Target::Remove),
        _ => false,
    };
    let action = Action::classify(seen.allocation.is_some(), from, req.target);
    let to = req.target.count();
    let free = pool.free();
    let mut effect = Effect {
        action,
        from,
        to,
        in_use,
        rehomed: 0,
        displaced: 0,
        adopted: adopted && seen.allocation.is_some(),
        policy_changed: keeps && policy != req.deletion_policy,
        expiry_changed: keeps && expiry != req.expiry,
    };
    if to > from {
        let requested = to - from;
        if requested > free {
            return Err(insufficient(req.product, requested, free));
        }
    } else if to > 0 && to < in_use {
        return Err(Refusal::new(
            Reason::BelowInUse,
            format!(
                "cannot lower {}/{} to {to}: {in_use} seats are in use; release seats first, lower to at least {in_use}, or set 0 to revoke all",
                req.organization, req.product
            ),
        )
        .with(RefusalDetail {
            requested: Some(to),
            in_use: Some(in_use),
            ..Default::default()
        }));
    } else if to == 0 {
        let rehomed = in_use.min((free + from).max(0));
        let displaced = in_use - rehomed;
        if displaced > 0 && !req.allow_user_displacement {
            return Err(Refusal::new(
                Reason::WouldDisplaceUsers,
                format!(
                    "revoking {}/{} would leave {displaced} of its {in_use} users without a license: the {} pool is over-committed ({free} free); set allowUserDisplacement: true to confirm, or raise the total first",
                    req.organization, req.product, req.product
                ),
            )
            .with(RefusalDetail {
                in_use: Some(in_use),
                displaced: Some(displaced),
                free: Some(free),
                ..Default::default()
            }));
        }
        effect.rehomed = rehomed;
        effect.displaced = displaced;
        effect.in_use = 0;
    }
    Ok(effect)
}

/// ` (did you mean "TestOps"?)` when one of `known` is close to `name`
/// (the same but for case, or a typo or two away); empty otherwise.
pub fn did_you_mean<'a>(name: &str, known: impl IntoIterator<Item = &'a str>) -> String {
    let lower = name.to_lowercase();
    let best = known
        .into_iter()
        .filter(|k| *k != name)
        .map(|k| (strsim::levenshtein(&lower, &k.to_lowercase()), k))
        .filter(|(d, k)| *d <= (k.chars().count() / 3).max(1))
        .min();
    best.map_or_else(String::new, |(_, k)| format!(" (did you mean {k:?}?)"))
}

/// R2: the product has no pool in the account.
pub fn unknown_product(product: &str) -> Refusal {
    Refusal::new(
        Reason::UnknownProduct,
        format!(
            "the account has no pool for product {product:?}; pools are per product and never mix"
        ),
    )
}

/// R7: the organization does not exist.
pub fn unknown_organization(organization: &str) -> Refusal {
    Refusal::new(
        Reason::UnknownOrganization,
        format!(
            "organization {organization:?} does not exist in the account; create it on the license platform first (licensor never creates organizations)"
        ),
    )
}

/// Decides giving up the management of an allocation (deletionPolicy
/// Orphan), which leaves its count. Only its manager may release it (R8);
/// `Ok(false)` when there is nothing to release (no allocation, or it is
/// unmanaged).
pub fn decide_release(role: Role, seen: Observed<'_>, req: &Request<'_>) -> Result<bool, Refusal> {
    require_admin(role, "release allocations")?;
    seen.pool.ok_or_else(|| unknown_product(req.product))?;
    if !seen.organization_exists {
        return Err(unknown_organization(req.organization));
    }
    match seen.allocation.and_then(|a| a.managed_by.as_deref()) {
        None => Ok(false),
        Some(owner) if Some(owner) == req.managed_by => Ok(true),
        Some(owner) => Err(conflict(owner)),
    }
}

fn conflict(owner: &str) -> Refusal {
    Refusal::new(
        Reason::Conflict,
        format!(
            "the allocation is managed by {owner}; remove it there (or orphan it) before another manager can take it over"
        ),
    )
    .with(RefusalDetail {
        owner: Some(owner.to_string()),
        ..Default::default()
    })
}

/// The R3 refusal, also used for seat claims that find no room.
pub fn insufficient(product: &str, requested: i64, free: i64) -> Refusal {
    let hint = if free < 0 {
        format!(
            "the {product} pool is over-committed by {} (its total was lowered below what is handed out); free seats elsewhere or raise the total",
            -free
        )
    } else {
        format!(
            "free {} seats elsewhere or raise the total",
            requested - free
        )
    };
    Refusal::new(
        Reason::InsufficientPool,
        format!("requested {requested} more {product} seats but only {free} are free; {hint}"),
    )
    .with(RefusalDetail {
        requested: Some(requested),
        free: Some(free),
        ..Default::default()
    })
}

/// A change of seats in use (users signing in or out).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SeatChange {
    Claim(i64),
    Release(i64),
}

/// Where a seat change lands: the organization's allocation or the shared pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeatTarget {
    Dedicated { in_use: i64 },
    Shared { shared_in_use: i64 },
}

/// Decides a seat claim or release. Claims use the organization's dedicated
/// seats when it has an allocation, the shared pool otherwise.
pub fn decide_seats(
    seen: Observed<'_>,
    organization: &str,
    product: &str,
    change: SeatChange,
) -> Result<SeatTarget, Refusal> {
    let pool = seen.pool.ok_or_else(|| unknown_product(product))?;
    if !seen.organization_exists {
        return Err(unknown_organization(organization));
    }
    let n = match change {
        SeatChange::Claim(n) | SeatChange::Release(n) => n,
    };
    if !(1..=MAX_COUNT).contains(&n) {
        return Err(Refusal::new(
            Reason::Invalid,
            format!("seat count {n} is outside 1..={MAX_COUNT}"),
        ));
    }
    match (seen.allocation.filter(|a| a.dedicated > 0), change) {
        (Some(a), SeatChange::Claim(n)) => {
            if a.in_use + n > a.dedicated {
                Err(Refusal::new(
                    Reason::InsufficientPool,
                    format!(
                        "{organization} has {} dedicated {} seats with {} in use; {n} more do not fit",
                        a.dedicated, a.product, a.in_use
                    ),
                )
                .with(RefusalDetail {
                    requested: Some(n),
                    free: Some(a.dedicated - a.in_use),
                    ..Default::default()
                }))
            } else {
                Ok(SeatTarget::Dedicated {
                    in_use: a.in_use + n,
                })
            }
        }
        (Some(a), SeatChange::Release(n)) => {
            if n > a.in_use {
                Err(Refusal::new(
                    Reason::Invalid,
                    format!("{organization} has only {} seats in use", a.in_use),
                ))
            } else {
                Ok(SeatTarget::Dedicated {
                    in_use: a.in_use - n,
                })
            }
        }
        (None, SeatChange::Claim(n)) => {
            if n > pool.free() {
                Err(insufficient(&pool.product, n, pool.free()))
            } else {
                Ok(SeatTarget::Shared {
                    shared_in_use: pool.shared_in_use + n,
                })
            }
        }
        (None, SeatChange::Release(n)) => {
            if n > pool.shared_in_use {
                Err(Refusal::new(
                    Reason::Invalid,
                    format!("only {} shared seats are in use", pool.shared_in_use),
                ))
            } else {
                Ok(SeatTarget::Shared {
                    shared_in_use: pool.shared_in_use - n,
                })
            }
        }
    }
}

/// Decides a change of a product's total (R1, R9: lowering below what is
/// handed out is allowed and leaves the pool over-committed).
pub fn decide_total(role: Role, total: i64) -> Result<(), Refusal> {
    require_admin(role, "change product totals")?;
    if !(0..=MAX_TOTAL).contains(&total) {
        return Err(Refusal::new(
            Reason::Invalid,
            format!("total {total} is outside 0..={MAX_TOTAL}"),
        ));
    }
    Ok(())
}

/// Everything a backend holds for one account, as read at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub pools: Vec<Pool>,
    pub organizations: Vec<String>,
    pub allocations: Vec<Allocation>,
}

/// A pool as shown to people and in JSON, with `free` spelled out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolView {
    pub product: String,
    pub total: i64,
    pub dedicated: i64,
    pub shared_in_use: i64,
    pub free: i64,
}

impl PoolView {
    /// R9: whether more is handed out than the total (`free < 0`); increases
    /// are then refused, decreases and revokes still work.
    pub fn is_over_committed(&self) -> bool {
        self.free < 0
    }

    /// R9: seats handed out beyond the total; 0 when none.
    pub fn over_committed(&self) -> i64 {
        (-self.free).max(0)
    }

    /// Free seats as a person counts them: none when over-committed.
    pub fn free_seats(&self) -> i64 {
        self.free.max(0)
    }
}

impl From<&Pool> for PoolView {
    fn from(p: &Pool) -> Self {
        PoolView {
            product: p.product.clone(),
            total: p.total,
            dedicated: p.dedicated,
            shared_in_use: p.shared_in_use,
            free: p.free(),
        }
    }
}

/// One write a driver asks a backend to make; the backend decides it again,
/// atomically, with [`decide`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllocationWrite {
    pub organization: String,
    pub product: String,
    pub target: Target,
    pub managed_by: Option<String>,
    pub allow_user_displacement: bool,
    /// The manager's deletion policy, kept with the allocation.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// The manager's expiry, kept with the allocation (absent from the
    /// JSON when there is none, so the hash of a write from before expiries
    /// is what it was).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry: Option<Expiry>,
    /// Refuse the write if the allocation's version moved (0: must not exist).
    pub expected_version: Option<i64>,
    /// Same key and same write replays the first answer instead of writing again.
    pub idempotency_key: Option<String>,
}

impl AllocationWrite {
    /// Moves `organization`'s `product` to `target`, as nobody in particular
    /// (an unmanaged allocation, its deletion policy the default, no
    /// expiry), unconditionally and without a key; a caller sets the rest
    /// with `..AllocationWrite::new(..)`.
    pub fn new(
        organization: impl Into<String>,
        product: impl Into<String>,
        target: Target,
    ) -> AllocationWrite {
        AllocationWrite {
            organization: organization.into(),
            product: product.into(),
            target,
            managed_by: None,
            allow_user_displacement: false,
            deletion_policy: DeletionPolicy::Revoke,
            expiry: None,
            expected_version: None,
            idempotency_key: None,
        }
    }

    /// Sets `organization`'s `product` to `count`, as [`AllocationWrite::new`].
    pub fn count(organization: &str, product: &str, count: i64) -> AllocationWrite {
        AllocationWrite::new(organization, product, Target::Count(count))
    }

    pub fn request(&self) -> Request<'_> {
        Request {
            organization: &self.organization,
            product: &self.product,
            target: self.target,
            managed_by: self.managed_by.as_deref(),
            allow_user_displacement: self.allow_user_displacement,
            deletion_policy: self.deletion_policy,
            expiry: self.expiry,
        }
    }

    /// A key that names this intended change, planned against `basis`, so a
    /// retry (even from a restarted process) repeats rather than re-applies,
    /// and a new intent (after a delete and re-create, a prune, a re-seed)
    /// gets a new key because the basis never repeats. `scope` is what else
    /// makes the requester's intent unique over time (the operator passes an
    /// object's UID and generation; empty for manifests).
    pub fn intent_key(&self, scope: &str, basis: Basis) -> String {
        use sha2::{Digest, Sha256};
        use std::fmt::Write as _;
        /// Formats straight into the hash: the key of 100,000 writes is
        /// planned without a string for each.
        struct Hashing(Sha256);
        impl std::fmt::Write for Hashing {
            fn write_str(&mut self, s: &str) -> std::fmt::Result {
                self.0.update(s.as_bytes());
                Ok(())
            }
        }
        let mut text = Hashing(Sha256::new());
        let _ = write!(
            text,
            "{scope}\n{}\n{}\n{}\n",
            self.managed_by.as_deref().unwrap_or(""),
            self.organization,
            self.product
        );
        let _ = match basis {
            Basis::Allocation(version) => write!(text, "version {version}"),
            Basis::Absent { pool_revision } => {
                write!(text, "absent in pool revision {pool_revision}")
            }
        };
        let _ = match self.target {
            Target::Count(n) => write!(text, "\n{n}"),
            Target::Remove => write!(text, "\nremove"),
        };
        let _ = write!(text, "\n{}", self.allow_user_displacement);
        // Another policy is another intent (Revoke, the default, keeps the
        // keys written before the policy was kept).
        if self.deletion_policy != DeletionPolicy::Revoke {
            let _ = write!(text, "\n{}", self.deletion_policy.as_str());
        }
        // So is another expiry (none keeps the keys from before expiries).
        if let Some(e) = &self.expiry {
            let _ = write!(text, "\nuntil {} then {}", e.until_stored(), e.then_count);
        }
        hex::encode(&text.0.finalize()[..16])
    }
}

/// What a write was planned against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basis {
    /// The allocation at this version.
    Allocation(i64),
    /// No allocation, in the pool at this revision.
    Absent { pool_revision: i64 },
}

impl From<Snapshot> for Ledger {
    fn from(s: Snapshot) -> Self {
        Ledger::new(s.pools, s.organizations, s.allocations)
    }
}

/// An in-memory account: the planner's simulation and the property tests'
/// model. Every change goes through [`decide`], so it obeys the same rules as
/// the stores.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    pub pools: BTreeMap<String, Pool>,
    pub organizations: BTreeSet<String>,
    allocations: Allocations,
}

/// A ledger's allocations, found by (organization, product) as borrowed
/// strings. Each allocation is its own key: no second copy of its names
/// (for 100,000 allocations, 12 MiB). They sit side by side in the order
/// they came (a snapshot's vector is kept, not copied), and the table holds
/// only their positions: 4 bytes a slot, 0.6 MB for 100,000 rather than an
/// 18 MB table of allocations.
struct Allocations {
    slots: Vec<Allocation>,
    index: hashbrown::HashTable<u32>,
    /// foldhash, seeded per process: a plan hashes two names for each of
    /// 100,000 resources, and SipHash was a tenth of what planning cost.
    state: hashbrown::DefaultHashBuilder,
    /// Which layout of which allocations this is: drawn anew, unique in the
    /// process, when the allocations are made or copied and whenever one
    /// of them moves (a removal). A [`Slot`] found under it is where its
    /// allocation still is; adding one at the end keeps it.
    stamp: u64,
}

/// A stamp no [`Allocations`] of this process had before.
fn fresh_stamp() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl Default for Allocations {
    fn default() -> Self {
        Allocations::with_capacity(0)
    }
}

impl Clone for Allocations {
    /// A copy with a stamp of its own: the two may add different
    /// allocations at the same place.
    fn clone(&self) -> Self {
        Allocations {
            slots: self.slots.clone(),
            index: self.index.clone(),
            state: self.state.clone(),
            stamp: fresh_stamp(),
        }
    }
}

impl Allocations {
    fn with_capacity(n: usize) -> Self {
        Allocations {
            slots: Vec::with_capacity(n),
            index: hashbrown::HashTable::with_capacity(n),
            state: Default::default(),
            stamp: fresh_stamp(),
        }
    }

    fn hash(state: &hashbrown::DefaultHashBuilder, organization: &str, product: &str) -> u64 {
        use std::hash::BuildHasher;
        state.hash_one((organization, product))
    }

    fn at<'a>(
        slots: &'a [Allocation],
        organization: &'a str,
        product: &'a str,
    ) -> impl Fn(&u32) -> bool + 'a {
        move |&i| Self::holds(slots, i as usize, organization, product)
    }

    /// Whether the allocation at `i` has these names.
    fn holds(slots: &[Allocation], i: usize, organization: &str, product: &str) -> bool {
        slots
            .get(i)
            .is_some_and(|a| a.organization == organization && a.product == product)
    }

    /// Where the allocation of these names sits.
    fn position(&self, organization: &str, product: &str) -> Option<usize> {
        let hash = Self::hash(&self.state, organization, product);
        self.index
            .find(hash, Self::at(&self.slots, organization, product))
            .map(|&i| i as usize)
    }

    fn get(&self, organization: &str, product: &str) -> Option<&Allocation> {
        self.position(organization, product).map(|i| &self.slots[i])
    }

    /// Adds `a`, or replaces the allocation of the same names; where it sits.
    fn insert(&mut self, a: Allocation) -> usize {
        if let Some(i) = self.position(&a.organization, &a.product) {
            self.slots[i] = a;
            return i;
        }
        let (state, slots) = (&self.state, &self.slots);
        let hash = Self::hash(state, &a.organization, &a.product);
        let i = slots.len();
        self.index.insert_unique(hash, position(i), |&j| {
            let b = &slots[j as usize];
            Self::hash(state, &b.organization, &b.product)
        });
        self.slots.push(a);
        i
    }

    /// Removes the allocation at `i`; the last one takes its place.
    fn remove_at(&mut self, i: usize) {
        let last = self.slots.len() - 1;
        for (at, now) in [(i, None), (last, Some(i))] {
            let a = &self.slots[at];
            let hash = Self::hash(&self.state, &a.organization, &a.product);
            if let Ok(entry) = self.index.find_entry(hash, |&j| j as usize == at) {
                match now {
                    None => drop(entry.remove()),
                    Some(now) => *entry.into_mut() = position(now),
                }
            }
        }
        self.slots.swap_remove(i);
        self.stamp = fresh_stamp();
    }
}

impl From<Vec<Allocation>> for Allocations {
    /// The allocations where they are, indexed; a later one of the same
    /// names replaces an earlier one.
    fn from(slots: Vec<Allocation>) -> Self {
        let mut all = Allocations {
            index: hashbrown::HashTable::with_capacity(slots.len()),
            ..Allocations::default()
        };
        let state = &all.state;
        for (i, a) in slots.iter().enumerate() {
            let hash = Self::hash(state, &a.organization, &a.product);
            let at = Self::at(&slots, &a.organization, &a.product);
            match all.index.entry(hash, at, |&j| {
                let b = &slots[j as usize];
                Self::hash(state, &b.organization, &b.product)
            }) {
                hashbrown::hash_table::Entry::Vacant(e) => {
                    e.insert(position(i));
                }
                // Names twice (never from a store): one by one instead.
                hashbrown::hash_table::Entry::Occupied(_) => {
                    let mut all = Allocations::with_capacity(slots.len());
                    for a in slots {
                        all.insert(a);
                    }
                    return all;
                }
            }
        }
        all.slots = slots;
        all
    }
}

/// Where an allocation sat in a [`Ledger`] when it was found, and under
/// which stamp of its allocations: [`Ledger::apply_at`] goes straight there
/// while that ledger still has that stamp (nothing moved since, and it is
/// the same ledger), and searches otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    at: u32,
    stamp: u64,
}

/// A position in [`Allocations`]: a ledger holds far fewer than 2^32.
fn position(i: usize) -> u32 {
    u32::try_from(i).expect("fewer than 2^32 allocations")
}

impl PartialEq for Allocations {
    fn eq(&self, other: &Self) -> bool {
        self.slots.len() == other.slots.len()
            && self
                .slots
                .iter()
                .all(|a| other.get(&a.organization, &a.product) == Some(a))
    }
}

impl Eq for Allocations {}

impl fmt::Debug for Allocations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.slots.iter()).finish()
    }
}

impl Ledger {
    pub fn new(
        pools: impl IntoIterator<Item = Pool>,
        organizations: impl IntoIterator<Item = String>,
        allocations: impl IntoIterator<Item = Allocation>,
    ) -> Self {
        Ledger {
            pools: pools.into_iter().map(|p| (p.product.clone(), p)).collect(),
            organizations: organizations.into_iter().collect(),
            // A snapshot's vector becomes the ledger's, not copied.
            allocations: Allocations::from(allocations.into_iter().collect::<Vec<_>>()),
        }
    }

    pub fn allocation(&self, organization: &str, product: &str) -> Option<&Allocation> {
        self.allocations.get(organization, product)
    }

    /// [`Ledger::allocation`] and where it sits, for [`Ledger::apply_at`].
    pub fn find(&self, organization: &str, product: &str) -> Option<(Slot, &Allocation)> {
        let i = self.allocations.position(organization, product)?;
        let slot = Slot {
            at: position(i),
            stamp: self.allocations.stamp,
        };
        Some((slot, &self.allocations.slots[i]))
    }

    fn allocation_mut(&mut self, organization: &str, product: &str) -> Option<&mut Allocation> {
        let i = self.allocations.position(organization, product)?;
        Some(&mut self.allocations.slots[i])
    }

    /// Every allocation, in (organization, product) order.
    pub fn allocations(&self) -> impl Iterator<Item = &Allocation> {
        let mut all: Vec<&Allocation> = self.allocations.slots.iter().collect();
        all.sort_unstable_by(|a, b| {
            (&a.organization, &a.product).cmp(&(&b.organization, &b.product))
        });
        all.into_iter()
    }

    /// What a store would observe for a request. An allocation's
    /// organization exists (the stores keep none without it), so the
    /// organizations are searched only when there is no allocation: in a
    /// plan of 100,000 resources, each search was a walk over names
    /// scattered through memory.
    pub fn observe<'a>(&'a self, organization: &str, product: &str) -> Observed<'a> {
        let at = self.allocations.position(organization, product);
        self.observed(organization, product, at)
    }

    /// [`Ledger::observe`] with the allocation's position already found.
    fn observed<'a>(
        &'a self,
        organization: &str,
        product: &str,
        at: Option<usize>,
    ) -> Observed<'a> {
        Observed {
            pool: self.pools.get(product),
            organization_exists: at.is_some() || self.organizations.contains(organization),
            allocation: at.map(|i| &self.allocations.slots[i]),
        }
    }

    /// Decides and, when accepted, books a change. A refusal changes nothing.
    pub fn apply(&mut self, role: Role, req: &Request<'_>) -> Result<Effect, Refusal> {
        self.apply_at(role, req, None)
    }

    /// [`Ledger::apply`], told where the request's allocation was found
    /// before (by [`Ledger::find`] on these names): the allocation is
    /// searched for again only if this ledger moved any since, or the slot
    /// is another ledger's (a plan finds each allocation once, when it
    /// reads it, and no name is compared a second time).
    pub fn apply_at(
        &mut self,
        role: Role,
        req: &Request<'_>,
        seen: Option<Slot>,
    ) -> Result<Effect, Refusal> {
        // One search at most, for deciding and for booking; none where the
        // step found its allocation in this layout. A slot of another
        // layout may name another allocation now: it is not looked at.
        let at = match seen {
            Some(Slot { at, stamp }) if stamp == self.allocations.stamp => {
                let at = at as usize;
                debug_assert!(
                    Allocations::holds(&self.allocations.slots, at, req.organization, req.product),
                    "a slot found for other names"
                );
                Some(at)
            }
            _ => self.allocations.position(req.organization, req.product),
        };
        let seen = self.observed(req.organization, req.product, at);
        let effect = decide(role, seen, req)?;
        if let Some(pool) = self.pools.get_mut(req.product) {
            pool.book(&effect);
        }
        match (req.target, at) {
            (Target::Remove, Some(i)) => self.allocations.remove_at(i),
            (Target::Remove, None) | (Target::Count(0), None) => {}
            (Target::Count(to), at) => {
                let i = at.unwrap_or_else(|| {
                    self.allocations.insert(Allocation {
                        organization: req.organization.to_string(),
                        product: req.product.to_string(),
                        dedicated: 0,
                        in_use: 0,
                        managed_by: None,
                        deletion_policy: DeletionPolicy::Revoke,
                        expiry: None,
                        version: 0,
                    })
                });
                let entry = &mut self.allocations.slots[i];
                entry.dedicated = to;
                entry.in_use = effect.in_use;
                if req.managed_by.is_some() {
                    if entry.managed_by.as_deref() != req.managed_by {
                        entry.managed_by = req.managed_by.map(str::to_string);
                    }
                    entry.deletion_policy = req.deletion_policy;
                    entry.expiry = req.expiry;
                }
                if !effect.is_noop() {
                    entry.version += 1;
                }
            }
        }
        Ok(effect)
    }

    /// Lowers or raises a total (R9).
    pub fn set_total(&mut self, role: Role, product: &str, total: i64) -> Result<(), Refusal> {
        decide_total(role, total)?;
        let pool = self.pools.get_mut(product).ok_or_else(|| {
            Refusal::new(Reason::UnknownProduct, format!("no pool for {product:?}"))
        })?;
        pool.total = total;
        Ok(())
    }

    /// Claims or releases seats in use.
    pub fn seats(
        &mut self,
        organization: &str,
        product: &str,
        change: SeatChange,
    ) -> Result<(), Refusal> {
        match decide_seats(
            self.observe(organization, product),
            organization,
            product,
            change,
        )? {
            SeatTarget::Dedicated { in_use } => {
                if let Some(a) = self.allocation_mut(organization, product) {
                    a.in_use = in_use;
                }
            }
            SeatTarget::Shared { shared_in_use } => {
                if let Some(p) = self.pools.get_mut(product) {
                    p.shared_in_use = shared_in_use;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_and_policies_are_spelled_as_serde_spells_them() {
        use strum::IntoEnumIterator;
        for role in Role::iter() {
            let wire = serde_json::to_value(role).unwrap();
            assert_eq!(wire, role.as_str());
            assert_eq!(Role::parse(role.as_str()), Some(role));
        }
        for policy in DeletionPolicy::iter() {
            let wire = serde_json::to_value(policy).unwrap();
            assert_eq!(wire, policy.as_str());
            assert_eq!(DeletionPolicy::parse(policy.as_str()), Some(policy));
        }
        assert_eq!(Role::parse("admin"), None);
        assert_eq!(DeletionPolicy::parse("revoke"), None, "spellings are exact");
    }

    /// A ledger keeps its allocations side by side and a removal moves the
    /// last into the gap: a slot found before a move, or in another ledger,
    /// is not gone to.
    #[test]
    fn a_slot_from_before_a_move_or_of_another_ledger_is_searched_for() {
        let allocation = |organization: &str, dedicated: i64| Allocation {
            organization: organization.into(),
            product: "TestOps".into(),
            dedicated,
            in_use: 0,
            managed_by: None,
            deletion_policy: DeletionPolicy::Revoke,
            expiry: None,
            version: 1,
        };
        let pool = Pool {
            product: "TestOps".into(),
            total: 100,
            dedicated: 6,
            shared_in_use: 0,
            revision: 0,
        };
        let orgs = ["a", "b", "c", "d", "e", "f"].map(String::from);
        let mut ledger = Ledger::new(
            [pool],
            orgs,
            [allocation("a", 1), allocation("b", 2), allocation("c", 3)],
        );
        let (c_was, _) = ledger.find("c", "TestOps").unwrap();
        let write = |organization: &str, target: Target| AllocationWrite {
            target,
            ..AllocationWrite::count(organization, "TestOps", 0)
        };
        // b goes; c moves into its place, d takes the slot c was found in.
        let b = write("b", Target::Remove);
        ledger.apply(Role::AccountAdmin, &b.request()).unwrap();
        let d = write("d", Target::Count(4));
        ledger.apply(Role::AccountAdmin, &d.request()).unwrap();
        assert_eq!(ledger.find("d", "TestOps").unwrap().0.at, c_was.at);

        let c = write("c", Target::Count(7));
        ledger
            .apply_at(Role::AccountAdmin, &c.request(), Some(c_was))
            .unwrap();
        let counts: Vec<(&str, i64)> = ledger
            .allocations()
            .map(|a| (a.organization.as_str(), a.dedicated))
            .collect();
        assert_eq!(counts, [("a", 1), ("c", 7), ("d", 4)]);
        assert_eq!(ledger.allocation("b", "TestOps"), None);

        // A copy adds another allocation at the place where the original
        // adds one: the original's slot for it is not the copy's.
        let mut copy = ledger.clone();
        let e = write("e", Target::Count(2));
        ledger.apply(Role::AccountAdmin, &e.request()).unwrap();
        let f = write("f", Target::Count(3));
        copy.apply(Role::AccountAdmin, &f.request()).unwrap();
        let (e_was, _) = ledger.find("e", "TestOps").unwrap();
        assert_eq!(copy.find("f", "TestOps").unwrap().0.at, e_was.at);
        let e = write("e", Target::Count(5));
        copy.apply_at(Role::AccountAdmin, &e.request(), Some(e_was))
            .unwrap();
        let counts: Vec<(&str, i64)> = copy
            .allocations()
            .map(|a| (a.organization.as_str(), a.dedicated))
            .collect();
        assert_eq!(counts, [("a", 1), ("c", 7), ("d", 4), ("e", 5), ("f", 3)]);

        // Names given twice: the later allocation is the one kept.
        let twice = Ledger::new([], [], [allocation("a", 1), allocation("a", 5)]);
        let counts: Vec<i64> = twice.allocations().map(|a| a.dedicated).collect();
        assert_eq!(counts, [5]);
    }

    /// The key is the hash of one text, the one keys were derived from
    /// before it was formatted straight into the hash: keys stored by
    /// earlier versions keep matching.
    #[test]
    fn intent_keys_hash_the_documented_text() {
        use sha2::{Digest, Sha256};
        let mut w = AllocationWrite {
            managed_by: Some("default/licenses/qa".into()),
            expected_version: Some(3),
            ..AllocationWrite::count("qa-team", "TestOps", 7)
        };
        let key = |text: &str| hex::encode(&Sha256::digest(text.as_bytes())[..16]);
        assert_eq!(
            w.intent_key("uid-1/2", Basis::Allocation(3)),
            key("uid-1/2\ndefault/licenses/qa\nqa-team\nTestOps\nversion 3\n7\nfalse")
        );
        w.target = Target::Remove;
        w.managed_by = None;
        w.allow_user_displacement = true;
        w.deletion_policy = DeletionPolicy::Orphan;
        assert_eq!(
            w.intent_key("", Basis::Absent { pool_revision: 12 }),
            key("\n\nqa-team\nTestOps\nabsent in pool revision 12\nremove\ntrue\nOrphan")
        );
        // An expiry is part of the intent: another until, another key.
        w.expiry = Some(Expiry {
            until: "2027-03-31T17:00:00.250Z".parse().unwrap(),
            then_count: 2,
        });
        let expiring = w.intent_key("", Basis::Absent { pool_revision: 12 });
        assert_eq!(
            expiring,
            key(
                "\n\nqa-team\nTestOps\nabsent in pool revision 12\nremove\ntrue\nOrphan\nuntil 2027-03-31T17:00:00.250Z then 2"
            )
        );
        w.expiry = Some(Expiry {
            until: "2027-03-31T17:00:00.251Z".parse().unwrap(),
            then_count: 2,
        });
        assert_ne!(
            w.intent_key("", Basis::Absent { pool_revision: 12 }),
            expiring
        );
    }

    /// The documented example: 200 TestOps, qa-team holds 5 with 4 in use.
    fn documented() -> Ledger {
        Ledger::new(
            [Pool {
                product: "TestOps".into(),
                total: 200,
                dedicated: 5,
                shared_in_use: 0,
                revision: 1,
            }],
            ["qa-team".to_string(), "dev-team".to_string()],
            [Allocation {
                organization: "qa-team".into(),
                product: "TestOps".into(),
                dedicated: 5,
                in_use: 4,
                managed_by: None,
                deletion_policy: Default::default(),
                expiry: None,
                version: 1,
            }],
        )
    }

    fn set(org: &str, n: i64) -> Request<'_> {
        Request {
            organization: org,
            product: "TestOps",
            target: Target::Count(n),
            managed_by: Some("default/ns/x"),
            deletion_policy: Default::default(),
            expiry: None,
            allow_user_displacement: false,
        }
    }

    #[test]
    fn raise_takes_from_the_remaining_pool() {
        let mut l = documented();
        assert_eq!(l.pools["TestOps"].free(), 195);
        let e = l.apply(Role::AccountAdmin, &set("qa-team", 10)).unwrap();
        assert_eq!(
            (e.action, e.from, e.to, e.adopted),
            (Action::Increase, 5, 10, true)
        );
        assert_eq!(l.pools["TestOps"].free(), 190);
    }

    #[test]
    fn decrease_below_in_use_is_refused() {
        let mut l = documented();
        let before = l.clone();
        let r = l.apply(Role::AccountAdmin, &set("qa-team", 3)).unwrap_err();
        assert_eq!(r.reason, Reason::BelowInUse);
        assert_eq!(r.detail.in_use, Some(4));
        assert_eq!(l, before);
    }

    #[test]
    fn lowering_to_in_use_frees_the_rest() {
        let mut l = documented();
        let e = l.apply(Role::AccountAdmin, &set("qa-team", 4)).unwrap();
        assert_eq!(e.action, Action::Decrease);
        assert_eq!(l.pools["TestOps"].free(), 196);
    }

    #[test]
    fn zero_revokes_and_rehomes_in_use_seats() {
        let mut l = documented();
        let e = l.apply(Role::AccountAdmin, &set("qa-team", 0)).unwrap();
        assert_eq!((e.action, e.rehomed, e.displaced), (Action::Revoke, 4, 0));
        let p = &l.pools["TestOps"];
        assert_eq!((p.dedicated, p.shared_in_use, p.free()), (0, 4, 196));
    }

    #[test]
    fn over_commitment_is_spelled_once_for_every_view() {
        let mut l = documented();
        let view = PoolView::from(&l.pools["TestOps"]);
        assert_eq!(
            (
                view.is_over_committed(),
                view.over_committed(),
                view.free_seats()
            ),
            (false, 0, 195)
        );
        l.set_total(Role::AccountAdmin, "TestOps", 3).unwrap();
        let view = PoolView::from(&l.pools["TestOps"]);
        assert_eq!(
            (
                view.is_over_committed(),
                view.over_committed(),
                view.free_seats()
            ),
            (true, 2, 0)
        );
    }

    #[test]
    fn every_reason_has_a_class_and_its_spelling_round_trips() {
        let classes: Vec<_> = Reason::all().map(|r| (r, r.class())).collect();
        assert_eq!(classes.len(), 11);
        for (r, class) in classes {
            assert_eq!(Reason::parse(r.as_str()), Some(r));
            let denied_at_admission = class == ReasonClass::AsWritten;
            assert_eq!(
                denied_at_admission,
                matches!(
                    r,
                    Reason::UnknownOrganization
                        | Reason::UnknownProduct
                        | Reason::Conflict
                        | Reason::UnknownAccount
                        | Reason::Invalid
                ),
                "{r}"
            );
        }
    }

    #[test]
    fn over_committed_pool_refuses_increase_allows_decrease() {
        let mut l = documented();
        l.set_total(Role::AccountAdmin, "TestOps", 3).unwrap();
        assert!(l.pools["TestOps"].over_committed());
        let r = l.apply(Role::AccountAdmin, &set("qa-team", 6)).unwrap_err();
        assert_eq!(
            (r.reason, r.detail.free),
            (Reason::InsufficientPool, Some(-2))
        );
        l.apply(Role::AccountAdmin, &set("qa-team", 4)).unwrap();
    }

    #[test]
    fn displacing_revoke_needs_consent() {
        let mut l = documented();
        l.set_total(Role::AccountAdmin, "TestOps", 2).unwrap();
        // free = 2 - 5 = -3; rehomed = min(4, max(0, -3 + 5)) = 2, displaced 2.
        let r = l.apply(Role::AccountAdmin, &set("qa-team", 0)).unwrap_err();
        assert_eq!(
            (r.reason, r.detail.displaced),
            (Reason::WouldDisplaceUsers, Some(2))
        );
        let mut req = set("qa-team", 0);
        req.allow_user_displacement = true;
        let e = l.apply(Role::AccountAdmin, &req).unwrap();
        assert_eq!((e.rehomed, e.displaced), (2, 2));
    }

    #[test]
    fn viewer_is_forbidden() {
        let mut l = documented();
        let r = l.apply(Role::Viewer, &set("qa-team", 6)).unwrap_err();
        assert_eq!(r.reason, Reason::Forbidden);
    }

    #[test]
    fn unknown_product_and_organization_are_refused() {
        let mut l = documented();
        let mut req = set("qa-team", 1);
        req.product = "Studio";
        assert_eq!(
            l.apply(Role::AccountAdmin, &req).unwrap_err().reason,
            Reason::UnknownProduct
        );
        assert_eq!(
            l.apply(Role::AccountAdmin, &set("nobody", 1))
                .unwrap_err()
                .reason,
            Reason::UnknownOrganization
        );
    }

    #[test]
    fn another_manager_is_a_conflict_naming_the_owner() {
        let mut l = documented();
        l.apply(Role::AccountAdmin, &set("qa-team", 5)).unwrap();
        let mut req = set("qa-team", 6);
        req.managed_by = Some("default/ns/other");
        let r = l.apply(Role::AccountAdmin, &req).unwrap_err();
        assert_eq!(r.reason, Reason::Conflict);
        assert_eq!(r.detail.owner.as_deref(), Some("default/ns/x"));
    }

    #[test]
    fn identifiers_have_one_alphabet() {
        for ok in [
            "qa-team",
            "TestOps",
            "Katalon Studio",
            "équipe-qa",
            "組織",
            &"x".repeat(253),
        ] {
            assert!(check_identifier("organization", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            " qa",
            "qa ",
            "q\ta",
            "q\u{85}a",
            "q\u{7f}",
            &"é".repeat(254),
        ] {
            let r = check_identifier("organization", bad).unwrap_err();
            assert_eq!(r.reason, Reason::Invalid, "{bad:?}");
        }
        // 253 characters, not bytes: 253 two-byte characters are fine.
        assert!(check_identifier("product", &"é".repeat(253)).is_ok());
    }

    #[test]
    fn typos_get_the_closest_known_name() {
        let known = ["TestOps", "Studio", "RuntimeEngine"];
        assert_eq!(
            did_you_mean("studio", known),
            r#" (did you mean "Studio"?)"#
        );
        assert_eq!(
            did_you_mean("TestOp", known),
            r#" (did you mean "TestOps"?)"#
        );
        assert_eq!(did_you_mean("Jira", known), "");
        assert_eq!(did_you_mean("TestOps", known), "");
    }

    #[test]
    fn reasons_round_trip_through_their_names() {
        for r in Reason::all() {
            assert_eq!(Reason::parse(r.as_str()), Some(r));
        }
    }
}
