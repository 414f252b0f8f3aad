//! Desired state + observed backend snapshot -> [`Plan`], pure.
//!
//! The whole desired set is validated together on a [`Ledger`] copy of the
//! snapshot, in the order apply will write: decreases, then revokes and
//! prunes, then creates and increases. So freed seats are counted before
//! claims, and moving seats between organizations in a full pool plans (and
//! applies) cleanly. Every change carries its action, outcome, refusal reason,
//! rehomed/displaced seats and a unified diff (backend -> desired); the plan
//! carries the projected pools. The CLI prints it; the operator builds status
//! from it; neither decides anything on its own.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::domain::{
    Action, Allocation, AllocationWrite, Basis, DeletionPolicy, Effect, Ending, Expiry, Ledger,
    PAUSED_ANNOTATION, PoolView, Reason, Refusal, Role, Slot, Snapshot, Target, decide_release,
    did_you_mean, managed_resource,
};

/// Why licensor must not write a resource's allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// The `licensor.dev/paused` annotation is "true".
    Paused,
    /// `managementPolicy: Observe`.
    Observe,
}

impl Hold {
    /// Why nothing is written, in words.
    pub fn describe(self) -> String {
        match self {
            Hold::Paused => format!("paused by the {PAUSED_ANNOTATION} annotation"),
            Hold::Observe => "managementPolicy is Observe".to_string(),
        }
    }
}

/// What one resource asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// `namespace/name`.
    pub resource: String,
    /// The LicenseAccount whose licenses these are (for status, events and
    /// metrics; a plan is of one account's backend).
    pub account: String,
    pub organization: String,
    pub product: String,
    pub count: i64,
    /// When `count` ends and what it becomes then (`spec.until`,
    /// `spec.thenCount`): the count planned is the one at [`Options::now`].
    pub expiry: Option<Expiry>,
    pub allow_user_displacement: bool,
    /// `<instance>/<namespace>/<name>`.
    pub managed_by: String,
    /// What deleting the resource does; kept with the allocation it manages.
    pub deletion_policy: DeletionPolicy,
    /// Why this resource must not be written (Observe, paused), if so.
    pub hold: Option<Hold>,
    /// Why its namespace may not ask for this at all, decided before the
    /// plan by the account's tenants (R1): `Forbidden`, or `UnknownAccount`
    /// for an account that is not there. Planned as a refusal, never
    /// written; it still names its allocation, so a prune leaves it alone.
    /// Boxed: rare, and a refusal (120 bytes) inline made each of 100,000
    /// resources' slots, and the changes decided in them, 40% larger.
    pub denied: Option<Box<Refusal>>,
    /// What makes this resource's intent unique over time besides its spec
    /// (the operator: the object's UID and generation; empty for manifests).
    /// Part of every idempotency key the plan derives.
    pub scope: String,
}

/// How a change ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Planned,
    Applied,
    Refused,
    Failed,
    Unchanged,
}

/// One resource's change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Change {
    pub resource: String,
    pub organization: String,
    pub product: String,
    pub from: i64,
    pub to: i64,
    pub action: Action,
    pub outcome: Outcome,
    pub reason: Option<Reason>,
    pub message: String,
    pub rehomed: i64,
    pub displaced: i64,
    pub diff: String,
    /// When the count of a temporary allocation ends, and whether it had
    /// at the moment planned for (boxed, as rare).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry: Option<Box<Ending>>,
    /// The write apply sends, for planned changes (boxed: a change is no
    /// larger than the step it is decided from, see [`plan`]).
    #[serde(skip)]
    pub write: Option<Box<AllocationWrite>>,
}

/// What to plan.
#[derive(Debug, Clone)]
pub struct Options {
    /// Revoke allocations this instance manages that no desired names.
    pub prune: bool,
    /// Instance part of `managedBy`, selecting what prune may touch.
    pub instance: String,
    pub role: Role,
    /// Keep each planned change's write for apply to send. A preview keeps
    /// none: for 100,000 changes that is a third of the plan's memory.
    pub keep_writes: bool,
    /// The moment planned for: a temporary allocation asks for its
    /// `thenCount` from its `until` on (`plan --at` previews another).
    pub now: chrono::DateTime<chrono::Utc>,
}

impl Options {
    /// One resource of `instance`'s, planned as its manager would write it
    /// (the backend enforces R1 on the write itself): what the operator's
    /// pass and admission plan, at `now`.
    pub fn one(instance: &str, now: chrono::DateTime<chrono::Utc>) -> Options {
        Options {
            prune: false,
            instance: instance.to_string(),
            role: Role::AccountAdmin,
            keep_writes: true,
            now,
        }
    }
}

/// The planned changes, in apply order, and the pools before and after.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The moment it was planned for (not in the JSON: each change's
    /// `expiry` says whether it had passed then).
    #[serde(skip)]
    pub at: chrono::DateTime<chrono::Utc>,
    pub changes: Vec<Change>,
    /// Projected pools after the plan (after apply: as observed).
    pub pools: Vec<PoolView>,
    #[serde(skip)]
    pub pools_before: Vec<PoolView>,
}

impl Plan {
    pub fn has_changes(&self) -> bool {
        self.changes.iter().any(|c| c.outcome == Outcome::Planned)
    }

    /// Whether a change was refused for a name the snapshot it was planned
    /// on does not have: planned on a part of the account, it is planned
    /// again on the whole of it, for the closest names.
    pub fn names_unknown(&self) -> bool {
        self.changes.iter().any(|c| {
            matches!(
                c.reason,
                Some(Reason::UnknownProduct | Reason::UnknownOrganization)
            )
        })
    }

    pub fn has_errors(&self) -> bool {
        self.changes
            .iter()
            .any(|c| matches!(c.outcome, Outcome::Refused | Outcome::Failed))
    }
}

/// Plans `desired` against `snapshot`. See the module contract.
///
/// The snapshot is taken, not borrowed: the planner books the changes on it,
/// and a caller that plans 100,000 manifests holds the account once.
pub fn plan(desired: Vec<Desired>, snapshot: Snapshot, opts: &Options) -> Plan {
    plan_on(desired, &mut Ledger::from(snapshot), opts)
}

/// [`plan`] on a ledger the caller holds, which it leaves booked with the
/// plan's changes: the CLI ends with its plan, and lets the process's end
/// return the ledger's 100,000 allocations rather than freeing each.
///
/// `desired` may be made as it is planned: from a vector's iterator (of
/// items that [`builds_in_place`]), the steps and then the changes take
/// that vector's memory, and no other buffer of 100,000 is touched. From a
/// vector of desired resources (the operator's one or few) the steps take
/// a buffer of their own: a step is larger than a desired.
pub fn plan_on(
    desired: impl IntoIterator<Item = Desired>,
    ledger: &mut Ledger,
    opts: &Options,
) -> Plan {
    let pools_before: Vec<PoolView> = ledger.pools.values().map(PoolView::from).collect();

    let mut steps: Vec<Step> = desired
        .into_iter()
        .map(|d| {
            let target = Target::Count(Expiry::count_at(d.expiry.as_ref(), d.count, opts.now));
            let ending = d.expiry.map(|e| Box::new(e.at(opts.now)));
            let mut step = Step::from_desired(d, target, ledger, opts.keep_writes);
            step.expiry = ending;
            step
        })
        .collect();
    if opts.prune {
        let named: HashSet<(&str, &str)> = steps
            .iter()
            .map(|s| (s.write.organization.as_str(), s.write.product.as_str()))
            .collect();
        let pruned: Vec<Step> = ledger
            .allocations()
            .filter(|a| !named.contains(&(a.organization.as_str(), a.product.as_str())))
            .filter_map(|a| {
                let owner = a.managed_by.as_deref()?;
                let resource = managed_resource(&opts.instance, owner)?;
                Some(Step::prune(a, resource))
            })
            .collect();
        steps.extend(pruned);
    }
    // Apply order, stable: small keys are sorted (a few bytes moved per
    // comparison rather than a step), then each step is moved once.
    let mut order: Vec<(u8, &str, &str, usize)> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            (
                s.phase(),
                s.resource.as_str(),
                s.write.organization.as_str(),
                i,
            )
        })
        .collect();
    order.sort_unstable();
    let order: Vec<usize> = order.into_iter().map(|(.., i)| i).collect();
    permute(&mut steps, order);
    // Decided in place: a change fits in its step's slot (checked below),
    // so the changes take the steps' memory rather than 100,000 more slots.
    let changes = steps
        .into_iter()
        .map(|step| step.decide(ledger, opts.role, opts.keep_writes))
        .collect();
    Plan {
        at: opts.now,
        changes,
        pools: ledger.pools.values().map(PoolView::from).collect(),
        pools_before,
    }
}

const _: () = assert!(
    size_of::<Change>() <= size_of::<Step>() && align_of::<Change>() == align_of::<Step>(),
    "a change is decided in its step's slot"
);

/// Whether [`plan_on`] makes its steps in the slots of the `T`s its desired
/// set is made from, if they come from a vector's iterator: the standard
/// library collects in place when each new item fits in an old one's slot.
pub const fn builds_in_place<T>() -> bool {
    size_of::<Step>() <= size_of::<T>() && align_of::<Step>() == align_of::<T>()
}

/// Puts `items` in the order `order` names (`order[k]` is the index of the
/// item that goes to `k`; a permutation), in place, one swap per move.
fn permute<T>(items: &mut [T], mut order: Vec<usize>) {
    for start in 0..items.len() {
        let mut here = start;
        loop {
            let next = order[here];
            order[here] = here;
            if next == start {
                break;
            }
            items.swap(here, next);
            here = next;
        }
    }
}

/// Plans removing a resource's allocation when the resource is deleted with
/// `deletionPolicy: Revoke`. Only the resource's own allocation is touched:
/// one that is missing, unmanaged or managed by someone else (or whose
/// organization or product does not exist) is unchanged, with a message
/// saying so, because there is nothing of the resource's to revoke. R6's
/// consent comes from the resource, as for any revoke.
pub fn plan_removal(d: &Desired, snapshot: &Snapshot, role: Role) -> Change {
    let mut ledger = Ledger::from(snapshot.clone());
    let step = Step::from_desired(d.clone(), Target::Remove, &ledger, true);
    let owner = step.current.as_ref().map(|a| step.manager_of(a));
    let nothing = match owner {
        Some(Some(owner)) if owner == d.managed_by => {
            return step.decide(&mut ledger, role, true);
        }
        Some(Some(owner)) => format!("nothing to revoke: the allocation is managed by {owner}"),
        Some(None) => {
            "nothing to revoke: the allocation is unmanaged, never this resource's".into()
        }
        None if !ledger.pools.contains_key(&d.product) => {
            format!("nothing to revoke: the account has no {} pool", d.product)
        }
        None if !ledger.organizations.contains(&d.organization) => format!(
            "nothing to revoke: organization {} does not exist",
            d.organization
        ),
        None => "nothing to revoke: the allocation does not exist".into(),
    };
    let mut change = step.decide_nothing();
    change.message = nothing;
    change
}

/// What a step needs of the allocation it changes, copied from the ledger
/// without its names: they are the step's write's, and so, most often, is
/// its manager (a plan of 100,000 resources copied 300,000 names here).
struct Current {
    dedicated: i64,
    in_use: i64,
    version: i64,
    deletion_policy: DeletionPolicy,
    expiry: Option<Expiry>,
    /// The allocation's manager where it is not the one the step writes.
    other_manager: Option<Option<String>>,
    /// Where it was found, so that deciding the step finds it again without
    /// a second search (here rather than in the step: a step fits in the
    /// slot of the manifest it was made from).
    slot: Option<Slot>,
}

impl Current {
    fn of(slot: Option<Slot>, a: &Allocation, written: Option<&str>) -> Current {
        let manager = a.managed_by.as_deref();
        Current {
            dedicated: a.dedicated,
            in_use: a.in_use,
            version: a.version,
            deletion_policy: a.deletion_policy,
            expiry: a.expiry,
            other_manager: (manager != written).then(|| manager.map(str::to_string)),
            slot,
        }
    }
}

/// One resource on its way through the planner.
struct Step {
    resource: String,
    write: AllocationWrite,
    /// Boxed: a step's slot becomes its change's, which keeps none of it.
    current: Option<Box<Current>>,
    action: Action,
    hold: Option<Hold>,
    /// Boxed: rare, and a step is planned 100,000 times at once.
    denied: Option<Box<Refusal>>,
    expiry: Option<Box<Ending>>,
}

impl Step {
    /// `keyed`: derive the write's idempotency key (a write that is kept
    /// for apply needs one; a preview's is never sent).
    fn from_desired(d: Desired, target: Target, ledger: &Ledger, keyed: bool) -> Step {
        let found = ledger.find(&d.organization, &d.product);
        let current =
            found.map(|(slot, a)| Box::new(Current::of(Some(slot), a, Some(&d.managed_by))));
        let basis = match &current {
            Some(a) => Basis::Allocation(a.version),
            None => Basis::Absent {
                pool_revision: ledger.pools.get(&d.product).map_or(0, |p| p.revision),
            },
        };
        let mut write = AllocationWrite {
            organization: d.organization,
            product: d.product,
            target,
            managed_by: Some(d.managed_by),
            allow_user_displacement: d.allow_user_displacement,
            deletion_policy: d.deletion_policy,
            expiry: d.expiry,
            expected_version: Some(current.as_ref().map_or(0, |a| a.version)),
            idempotency_key: None,
        };
        write.idempotency_key = keyed.then(|| write.intent_key(&d.scope, basis));
        let mut step = Step::new(d.resource, write, current, d.hold);
        step.denied = d.denied;
        step
    }

    /// An allocation of this instance that no resource names any more:
    /// what deleting its resource does, as its manager last said (the
    /// operator would orphan one whose policy is Orphan; the count stays).
    fn prune(a: &Allocation, resource: &str) -> Step {
        let orphan = a.deletion_policy == DeletionPolicy::Orphan;
        let mut write = AllocationWrite {
            organization: a.organization.clone(),
            product: a.product.clone(),
            target: if orphan {
                Target::Count(a.dedicated)
            } else {
                Target::Remove
            },
            managed_by: a.managed_by.clone(),
            allow_user_displacement: false,
            deletion_policy: a.deletion_policy,
            expiry: a.expiry,
            expected_version: Some(a.version),
            idempotency_key: None,
        };
        write.idempotency_key = Some(write.intent_key("", Basis::Allocation(a.version)));
        let current = Current::of(None, a, write.managed_by.as_deref());
        let mut step = Step::new(resource.to_string(), write, Some(Box::new(current)), None);
        if orphan {
            step.action = Action::Orphan;
        }
        step
    }

    fn new(
        resource: String,
        write: AllocationWrite,
        current: Option<Box<Current>>,
        hold: Option<Hold>,
    ) -> Step {
        let from = current.as_ref().map_or(0, |a| a.dedicated);
        let action = Action::classify(current.is_some(), from, write.target);
        Step {
            resource,
            write,
            current,
            action,
            hold,
            denied: None,
            expiry: None,
        }
    }

    /// Frees first (decreases, then revokes, whose rehoming needs room),
    /// then claims, then what needs nothing.
    fn phase(&self) -> u8 {
        match self.action {
            Action::Decrease => 0,
            Action::Revoke | Action::Orphan => 1,
            Action::Create | Action::Increase => 2,
            Action::None => 3,
        }
    }

    /// The change as it stands before anything is decided: unchanged.
    fn decide_nothing(self) -> Change {
        let change = self.unnamed_change();
        self.named(change, false)
    }

    /// An unchanged change without its names, which [`Step::named`] moves
    /// in once it is decided (100,000 changes, no copy of their names).
    fn unnamed_change(&self) -> Change {
        let from = self.current.as_ref().map_or(0, |a| a.dedicated);
        Change {
            resource: String::new(),
            organization: String::new(),
            product: String::new(),
            from,
            to: from,
            action: Action::None,
            outcome: Outcome::Unchanged,
            reason: None,
            message: String::new(),
            rehomed: 0,
            displaced: 0,
            diff: String::new(),
            expiry: self.expiry.clone(),
            write: None,
        }
    }

    /// `change` with this step's names, and its write when `write` (the
    /// names are then copied, as the write keeps its own).
    fn named(self, mut change: Change, write: bool) -> Change {
        change.resource = self.resource;
        if write {
            change.organization = self.write.organization.clone();
            change.product = self.write.product.clone();
            change.write = Some(Box::new(self.write));
        } else {
            change.organization = self.write.organization;
            change.product = self.write.product;
        }
        change
    }

    fn decide(mut self, ledger: &mut Ledger, role: Role, keep_write: bool) -> Change {
        let mut change = Change {
            to: self.write.target.count(),
            action: self.action,
            ..self.unnamed_change()
        };
        let write = self.decided(&mut change, ledger, role) && keep_write;
        self.named(change, write)
    }

    /// Decides `change` against `ledger`; whether it plans a write.
    fn decided(&mut self, change: &mut Change, ledger: &mut Ledger, role: Role) -> bool {
        if let Some(refusal) = self.denied.take() {
            change.diff = self.diff(None);
            refuse(change, *refusal);
            return false;
        }
        if let Some(hold) = self.hold {
            change.message = format!("not written: {}", hold.describe());
            change.diff = self.diff(None);
            return false;
        }
        if self.action == Action::Orphan {
            return self.decided_orphan(change, ledger, role);
        }
        let slot = self.current.as_ref().and_then(|a| a.slot);
        match ledger.apply_at(role, &self.write.request(), slot) {
            Ok(effect) if effect.is_noop() => {
                change.message = "in sync".into();
                false
            }
            Ok(effect) => {
                let free_before = ledger
                    .pools
                    .get(&self.write.product)
                    .map_or(0, |p| p.free() - (effect.from - effect.to) + effect.rehomed);
                change.outcome = Outcome::Planned;
                change.message = describe(&effect, &self.write.product, free_before);
                if effect.policy_changed {
                    let was = self.current.as_ref().map(|a| a.deletion_policy);
                    change.message = format!(
                        "{}; deletionPolicy {} -> {}, kept with the allocation",
                        change.message,
                        was.unwrap_or_default().as_str(),
                        self.write.deletion_policy.as_str()
                    );
                }
                if effect.expiry_changed {
                    let until = |e: Option<Expiry>| {
                        e.map_or_else(|| "none".to_string(), |e| e.until_text())
                    };
                    change.message = format!(
                        "{}; expiry {} -> {}, kept with the allocation",
                        change.message,
                        until(self.current.as_ref().and_then(|a| a.expiry)),
                        until(self.write.expiry)
                    );
                }
                change.rehomed = effect.rehomed;
                change.displaced = effect.displaced;
                change.diff = self.diff(Some(&effect));
                true
            }
            Err(mut refusal) => {
                refusal.message.push_str(&match refusal.reason {
                    Reason::UnknownProduct => {
                        did_you_mean(&self.write.product, ledger.pools.keys().map(String::as_str))
                    }
                    Reason::UnknownOrganization => did_you_mean(
                        &self.write.organization,
                        ledger.organizations.iter().map(String::as_str),
                    ),
                    _ => String::new(),
                });
                change.outcome = Outcome::Refused;
                change.diff = self.diff(None);
                refuse(change, refusal);
                false
            }
        }
    }

    /// A prune that releases the allocation's manager and leaves its count
    /// (`deletionPolicy: Orphan`), decided as the store decides a release;
    /// whether it plans a write.
    fn decided_orphan(&self, change: &mut Change, ledger: &Ledger, role: Role) -> bool {
        // The ledger's allocation is the step's: a prune names one that no
        // other step does.
        let seen = ledger.observe(&self.write.organization, &self.write.product);
        match decide_release(role, seen, &self.write.request()) {
            Ok(_) => {
                change.outcome = Outcome::Planned;
                change.message = format!(
                    "orphan: releases ownership (deletionPolicy: Orphan); the {} {} {} stay with {}",
                    change.from,
                    self.write.product,
                    seats(change.from),
                    self.write.organization
                );
                change.diff = self.current.as_ref().map_or_else(String::new, |a| {
                    let before = self.record_of(a);
                    let after = Record {
                        managed_by: None,
                        ..before
                    };
                    record_diff(Some(before), Some(after), &self.resource)
                });
                true
            }
            Err(refusal) => {
                change.diff = self.diff(None);
                refuse(change, refusal);
                false
            }
        }
    }

    /// Unified diff from the backend's allocation to the desired one.
    fn diff(&self, effect: Option<&Effect>) -> String {
        let after = match self.write.target {
            Target::Remove => None,
            Target::Count(to) => Some(Record {
                organization: &self.write.organization,
                product: &self.write.product,
                dedicated: to,
                in_use: effect.map_or_else(
                    || self.current.as_ref().map_or(0, |a| a.in_use),
                    |e| e.in_use,
                ),
                managed_by: self.write.managed_by.as_deref(),
            }),
        };
        record_diff(
            self.current.as_deref().map(|a| self.record_of(a)),
            after,
            &self.resource,
        )
    }

    /// The manager of the step's current allocation.
    fn manager_of<'a>(&'a self, current: &'a Current) -> Option<&'a str> {
        match &current.other_manager {
            Some(other) => other.as_deref(),
            None => self.write.managed_by.as_deref(),
        }
    }

    /// The step's current allocation as its diff shows it.
    fn record_of<'a>(&'a self, current: &'a Current) -> Record<'a> {
        Record {
            organization: &self.write.organization,
            product: &self.write.product,
            dedicated: current.dedicated,
            in_use: current.in_use,
            managed_by: self.manager_of(current),
        }
    }
}

/// Records a refusal on a change.
pub fn refuse(change: &mut Change, refusal: Refusal) {
    change.outcome = Outcome::Refused;
    change.reason = Some(refusal.reason);
    change.message = match change.expiry.as_deref() {
        // Said, so that no one takes the count refused for the spec's count.
        Some(e) if e.passed => format!(
            "at its expiry ({}, then {}): {}",
            e.expiry().until_text(),
            e.then_count,
            refusal.message
        ),
        _ => refusal.message,
    };
}

/// An allocation as a plan's diff shows it: five lines, `key: value`,
/// always the same keys in the same order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Record<'a> {
    organization: &'a str,
    product: &'a str,
    dedicated: i64,
    in_use: i64,
    managed_by: Option<&'a str>,
}

impl Record<'_> {
    const LINES: usize = 5;

    fn same_line(&self, other: &Record<'_>, i: usize) -> bool {
        match i {
            0 => self.organization == other.organization,
            1 => self.product == other.product,
            2 => self.dedicated == other.dedicated,
            3 => self.in_use == other.in_use,
            _ => self.managed_by == other.managed_by,
        }
    }

    fn write_line(&self, out: &mut String, sign: char, i: usize) {
        // Pieces pushed, not formatted: 100,000 diffs of five lines each.
        let mut number = itoa::Buffer::new();
        let (key, value) = match i {
            0 => ("organization: ", self.organization),
            1 => ("product: ", self.product),
            2 => ("dedicated: ", number.format(self.dedicated)),
            3 => ("inUse: ", number.format(self.in_use)),
            _ => ("managedBy: ", self.managed_by.unwrap_or("(unmanaged)")),
        };
        out.push(sign);
        out.push_str(key);
        out.push_str(value);
        out.push('\n');
    }
}

/// A unified diff from the backend's record (`None`: no allocation) to the
/// desired one, headed `backend/<organization>/<product>` and
/// `desired/<resource>`; empty when they are equal.
///
/// Both records have the same keys in the same order and no two lines of
/// one record are alike, so line `i` can only match line `i`: the diff any
/// line diff finds is one hunk with every line in it, each run of changed
/// lines shown as its removals, then its additions. A property test holds
/// it to `similar`'s unified diff of the two texts; it is written out here
/// because a plan of 100,000 changes spent a third of its planning time in
/// the general algorithm.
fn record_diff(before: Option<Record<'_>>, after: Option<Record<'_>>, resource: &str) -> String {
    let Some(named) = before.or(after) else {
        return String::new();
    };
    if before == after {
        return String::new();
    }
    // A record's lines in the hunk header, as `start,count`: none, or all.
    const _: () = assert!(Record::LINES == 5, "the header below counts five lines");
    let range = |r: Option<Record<'_>>| if r.is_some() { "1,5" } else { "0,0" };
    let mut out = String::with_capacity(320);
    for piece in [
        "--- backend/",
        named.organization,
        "/",
        named.product,
        "\n+++ desired/",
        resource,
        "\n@@ -",
        range(before),
        " +",
        range(after),
        " @@\n",
    ] {
        out.push_str(piece);
    }
    match (before, after) {
        (Some(old), Some(new)) => {
            let mut i = 0;
            while i < Record::LINES {
                if old.same_line(&new, i) {
                    old.write_line(&mut out, ' ', i);
                    i += 1;
                    continue;
                }
                let end = (i..Record::LINES)
                    .find(|&j| old.same_line(&new, j))
                    .unwrap_or(Record::LINES);
                (i..end).for_each(|j| old.write_line(&mut out, '-', j));
                (i..end).for_each(|j| new.write_line(&mut out, '+', j));
                i = end;
            }
        }
        (Some(old), None) => (0..Record::LINES).for_each(|i| old.write_line(&mut out, '-', i)),
        (None, Some(new)) => (0..Record::LINES).for_each(|i| new.write_line(&mut out, '+', i)),
        (None, None) => {}
    }
    // Held by a plan of up to 100,000 changes: no room to spare. Copied
    // rather than shrunk in place: the buffer goes back whole, to be the
    // next diff's, where a shrink leaves a small remainder behind each
    // diff for the allocator to gather up later.
    out.as_str().to_owned()
}

/// "seat" or "seats", for `n` of them.
fn seats(n: i64) -> &'static str {
    if n == 1 { "seat" } else { "seats" }
}

/// What an accepted change does, in words.
pub fn describe(e: &Effect, product: &str, free_before: i64) -> String {
    let adopt = if e.adopted {
        "; adopts the unmanaged allocation"
    } else {
        ""
    };
    let body = match e.action {
        Action::Create | Action::Increase | Action::Decrease => {
            return count_change(e, product, free_before, adopt);
        }
        Action::Revoke => {
            let mut s = format!(
                "revoke {}: frees {} {product} {}",
                e.from,
                e.from,
                seats(e.from)
            );
            if e.rehomed > 0 {
                s.push_str(&format!(
                    "; {} in-use {} move to the account pool",
                    e.rehomed,
                    seats(e.rehomed)
                ));
            }
            if e.displaced > 0 {
                s.push_str(&format!(
                    "; {} {} displaced (allowed by allowUserDisplacement)",
                    e.displaced,
                    if e.displaced == 1 {
                        "user is"
                    } else {
                        "users are"
                    }
                ));
            }
            s
        }
        Action::Orphan => "releases ownership; the allocation stays".to_string(),
        Action::None => "no count change".to_string(),
    };
    let mut message = body;
    message.push_str(adopt);
    message
}

/// [`describe`] of a change of count: the two messages a plan of 100,000
/// changes writes most, joined from pieces at their size rather than
/// formatted.
fn count_change(e: &Effect, product: &str, free_before: i64, adopt: &str) -> String {
    let claims = e.action != Action::Decrease;
    let (verb, moved, of) = if claims {
        ("takes ", e.to - e.from, free_before)
    } else {
        ("frees ", e.from - e.to, e.from - e.to)
    };
    let mut numbers = [itoa::Buffer::new(); 4];
    let [from, to, moved_text, free] = &mut numbers;
    [
        e.action.as_str(),
        " ",
        from.format(e.from),
        " -> ",
        to.format(e.to),
        ": ",
        verb,
        moved_text.format(moved),
        if claims { " of " } else { "" },
        if claims { free.format(free_before) } else { "" },
        if claims { " free " } else { " " },
        product,
        " ",
        seats(of),
        adopt,
    ]
    .concat()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Pool;
    use proptest::prelude::{Just, Strategy};

    fn snapshot(yaml: &str) -> Snapshot {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn want(name: &str, org: &str, count: i64) -> Desired {
        Desired {
            resource: format!("licenses/{name}"),
            account: "default".into(),
            organization: org.into(),
            product: "TestOps".into(),
            count,
            expiry: None,
            allow_user_displacement: false,
            managed_by: format!("default/licenses/{name}"),
            deletion_policy: Default::default(),
            hold: None,
            denied: None,
            scope: String::new(),
        }
    }

    fn opts() -> Options {
        Options::one("default", chrono::Utc::now())
    }

    #[test]
    fn a_name_missing_from_the_part_read_asks_for_the_whole_account() {
        // Planned on a read of one organization's part of the account, a
        // typo in the organization (or product) is what sends the pass and
        // admission to the whole account, and nothing else is.
        let part = snapshot(FULL_POOL);
        let typo = plan(vec![want("x", "ghost", 1)], part.clone(), &opts());
        assert!(typo.names_unknown(), "{typo:?}");
        let mut other = want("x", "a", 1);
        other.product = "Nope".into();
        assert!(plan(vec![other], part.clone(), &opts()).names_unknown());
        let refused = plan(vec![want("b", "b", 30)], part.clone(), &opts());
        assert_eq!(refused.changes[0].reason, Some(Reason::InsufficientPool));
        assert!(!refused.names_unknown());
    }

    const FULL_POOL: &str = "
pools: [{product: TestOps, total: 20, dedicated: 20, sharedInUse: 0}]
organizations: [a, b]
allocations:
  - {organization: a, product: TestOps, dedicated: 15, inUse: 0, managedBy: default/licenses/a, version: 1}
  - {organization: b, product: TestOps, dedicated: 5, inUse: 0, managedBy: default/licenses/b, version: 1}
";

    const THREE_MANAGERS: &str = "
pools: [{product: TestOps, total: 40, dedicated: 25, sharedInUse: 0}]
organizations: [a, b, c]
allocations:
  - {organization: a, product: TestOps, dedicated: 15, inUse: 0, managedBy: default/licenses/a, version: 1}
  - {organization: b, product: TestOps, dedicated: 5, inUse: 0, version: 1}
  - {organization: c, product: TestOps, dedicated: 5, inUse: 0, managedBy: other/licenses/c, version: 1}
";

    #[test]
    fn a_diff_shows_the_manager_an_allocation_has_not_the_one_written() {
        // A step keeps an allocation's manager only where it is not the
        // one it writes; each diff must still show the manager it had.
        let p = plan(
            vec![want("a", "a", 14), want("b", "b", 5), want("c", "c", 5)],
            snapshot(THREE_MANAGERS),
            &opts(),
        );
        let diff = |org: &str| {
            &p.changes
                .iter()
                .find(|c| c.organization == org)
                .unwrap()
                .diff
        };
        assert!(
            diff("a").contains("\n managedBy: default/licenses/a\n"),
            "{}",
            diff("a")
        );
        assert!(
            diff("b").contains("-managedBy: (unmanaged)\n+managedBy: default/licenses/b\n"),
            "{}",
            diff("b")
        );
        assert!(
            diff("c").contains("-managedBy: other/licenses/c\n+managedBy: default/licenses/c\n"),
            "{}",
            diff("c")
        );
        let account = snapshot(THREE_MANAGERS);
        let removal = |name: &str| plan_removal(&want(name, name, 0), &account, Role::AccountAdmin);
        assert_eq!(
            removal("c").message,
            "nothing to revoke: the allocation is managed by other/licenses/c"
        );
        assert_eq!(
            removal("b").message,
            "nothing to revoke: the allocation is unmanaged, never this resource's"
        );
        let revoked = removal("a");
        assert_eq!(
            (revoked.action, revoked.outcome),
            (Action::Revoke, Outcome::Planned)
        );
        assert!(
            revoked.diff.contains("-managedBy: default/licenses/a\n"),
            "{}",
            revoked.diff
        );
    }

    #[test]
    fn moving_seats_in_a_full_pool_frees_before_it_claims() {
        let p = plan(
            vec![want("b", "b", 15), want("a", "a", 5)],
            snapshot(FULL_POOL),
            &opts(),
        );
        let order: Vec<_> = p.changes.iter().map(|c| (c.action, c.outcome)).collect();
        assert_eq!(
            order,
            vec![
                (Action::Decrease, Outcome::Planned),
                (Action::Increase, Outcome::Planned)
            ]
        );
        assert_eq!(p.pools[0].free, 0);
    }

    #[test]
    fn claim_beyond_the_pool_is_refused_with_the_numbers() {
        let p = plan(vec![want("b", "b", 6)], snapshot(FULL_POOL), &opts());
        let c = &p.changes[0];
        assert_eq!(
            (c.outcome, c.reason),
            (Outcome::Refused, Some(Reason::InsufficientPool))
        );
        assert!(
            c.message
                .contains("requested 1 more TestOps seats but only 0 are free")
        );
        assert!(
            c.diff.contains("-dedicated: 5\n+dedicated: 6"),
            "{}",
            c.diff
        );
    }

    #[test]
    fn prune_revokes_only_what_this_instance_manages() {
        let mut s = snapshot(FULL_POOL);
        s.allocations[1].managed_by = Some("other/licenses/b".into());
        let p = plan(
            vec![],
            s,
            &Options {
                prune: true,
                ..opts()
            },
        );
        assert_eq!(p.changes.len(), 1);
        assert_eq!(p.changes[0].resource, "licenses/a");
        assert_eq!(p.changes[0].action, Action::Revoke);
        assert_eq!(p.pools[0].free, 15);
    }

    #[test]
    fn a_preview_plans_the_same_changes_without_their_writes() {
        let wanted = || vec![want("b", "b", 6), want("a", "a", 3)];
        let applied = plan(wanted(), snapshot(FULL_POOL), &opts());
        let preview = plan(
            wanted(),
            snapshot(FULL_POOL),
            &Options {
                keep_writes: false,
                ..opts()
            },
        );
        assert!(applied.changes.iter().all(|c| c.write.is_some()));
        assert!(preview.changes.iter().all(|c| c.write.is_none()));
        let without_writes = |p: Plan| {
            p.changes
                .into_iter()
                .map(|c| Change { write: None, ..c })
                .collect::<Vec<_>>()
        };
        assert_eq!(without_writes(preview), without_writes(applied));
    }

    #[test]
    fn held_resources_are_reported_not_written() {
        let mut d = want("a", "a", 3);
        d.hold = Some(Hold::Observe);
        let p = plan(vec![d], snapshot(FULL_POOL), &opts());
        assert_eq!(p.changes[0].outcome, Outcome::Unchanged);
        assert!(p.changes[0].write.is_none());
        assert!(!p.has_changes());
        assert_eq!(p.pools, p.pools_before);
    }

    #[test]
    fn in_sync_resource_is_unchanged_with_no_diff() {
        let p = plan(vec![want("a", "a", 15)], snapshot(FULL_POOL), &opts());
        assert_eq!(p.changes[0].outcome, Outcome::Unchanged);
        assert!(p.changes[0].diff.is_empty());
    }

    #[test]
    fn removal_touches_only_the_resources_own_allocation() {
        let snap = snapshot(
            "
pools: [{product: TestOps, total: 20, dedicated: 9, sharedInUse: 0}]
organizations: [a, b, c]
allocations:
  - {organization: a, product: TestOps, dedicated: 5, inUse: 0, managedBy: default/licenses/a, version: 3}
  - {organization: b, product: TestOps, dedicated: 4, inUse: 0, version: 4}
",
        );
        let ours = plan_removal(&want("a", "a", 5), &snap, Role::AccountAdmin);
        assert_eq!(
            (ours.action, ours.outcome),
            (Action::Revoke, Outcome::Planned)
        );
        for (d, says) in [
            (want("b", "b", 4), "unmanaged"),
            (want("other", "a", 5), "managed by default/licenses/a"),
            (want("c", "c", 1), "does not exist"),
            (
                want("ghost", "ghost", 1),
                "organization ghost does not exist",
            ),
            (
                Desired {
                    product: "studio".into(),
                    ..want("a", "a", 1)
                },
                "no studio pool",
            ),
        ] {
            let c = plan_removal(&d, &snap, Role::AccountAdmin);
            assert_eq!(
                (c.outcome, c.write.is_none()),
                (Outcome::Unchanged, true),
                "{d:?}"
            );
            assert!(c.message.contains(says), "{says:?} not in {:?}", c.message);
        }
    }

    #[test]
    fn pool_view_spells_out_free() {
        let v = PoolView::from(&Pool {
            product: "X".into(),
            total: 10,
            dedicated: 12,
            shared_in_use: 1,
            revision: 0,
        });
        assert_eq!(v.free, -3);
    }

    proptest::proptest! {
        /// The record diff is the unified diff a general line diff gives.
        #[test]
        fn the_record_diff_is_the_general_unified_diff(
            before in proptest::option::of((0i64..3, 0i64..3, proptest::option::of(0u8..2))),
            after in proptest::option::of((0i64..3, 0i64..3, proptest::option::of(0u8..2))),
        ) {
            let owners = ["default/licenses/a", "other/licenses/b"];
            let record = |r: Option<(i64, i64, Option<u8>)>| {
                r.map(|(dedicated, in_use, owner)| Record {
                    organization: "org-1",
                    product: "TestOps",
                    dedicated,
                    in_use,
                    managed_by: owner.map(|o| owners[usize::from(o)]),
                })
            };
            let text = |r: Option<Record<'_>>| {
                let mut s = String::new();
                if let Some(r) = r {
                    (0..Record::LINES).for_each(|i| r.write_line(&mut s, ' ', i));
                }
                s.lines().map(|l| format!("{}\n", &l[1..])).collect::<String>()
            };
            let (before, after) = (record(before), record(after));
            let (old, new) = (text(before), text(after));
            let general = if old == new {
                String::new()
            } else {
                similar::TextDiff::from_lines(&old, &new)
                    .unified_diff()
                    .context_radius(10)
                    .header("backend/org-1/TestOps", "desired/licenses/a")
                    .to_string()
            };
            proptest::prop_assert_eq!(record_diff(before, after, "licenses/a"), general);
        }
    }

    proptest::proptest! {
        /// DESIGN §11: for any until, thenCount and clock, a temporary
        /// allocation plans as if it had no expiry before its until, and
        /// as `count: thenCount` from it on (refusals say it was the
        /// expiry); the change says when it ends either way.
        #[test]
        fn an_expiry_plans_the_count_before_until_and_then_count_after(
            count in 0i64..12,
            then_count in 0i64..12,
            until in -100i64..100,
            clock in -100i64..100,
            (dedicated, in_use, shared) in (0i64..12, 0i64..12, 0i64..6),
        ) {
            let base: chrono::DateTime<chrono::Utc> = "2026-12-07T12:00:00Z".parse().unwrap();
            let now = base + chrono::TimeDelta::seconds(clock);
            let expiry = Expiry { until: base + chrono::TimeDelta::seconds(until), then_count };
            // The allocation records what its manager last wrote: the
            // temporary resource's expiry, or none.
            let account = |kept: Option<Expiry>| snapshot(&format!("
pools: [{{product: TestOps, total: 20, dedicated: {dedicated}, sharedInUse: {shared}}}]
organizations: [a]
allocations:
  - {{organization: a, product: TestOps, dedicated: {dedicated}, inUse: {in_use}, managedBy: default/licenses/a, version: 3{}}}
", kept.map_or(String::new(), |e| format!(", expiry: {{until: '{}', thenCount: {}}}", e.until_stored(), e.then_count))));
            let opts = Options::one("default", now);
            let planned = |count: i64, expiry: Option<Expiry>| {
                let d = Desired { expiry, ..want("a", "a", count) };
                let mut p = plan(vec![d], account(expiry), &opts);
                let mut change = p.changes.pop().unwrap();
                // The write carries the expiry to keep; the rest of it is
                // the plain one's.
                let kept = change.write.as_mut().map(|w| (w.expiry.take(), w.idempotency_key.take()));
                (change, kept.map(|k| k.0))
            };
            let (temporary, kept) = planned(count, Some(expiry));
            if let Some(kept) = kept {
                proptest::prop_assert_eq!(kept, Some(expiry));
            }
            let ending = temporary.expiry.as_deref().copied();
            proptest::prop_assert_eq!(ending, Some(expiry.at(now)));
            let passed = clock >= until;
            let (plain, _) = planned(if passed { then_count } else { count }, None);
            let prefix = format!("at its expiry ({}, then {then_count}): ", expiry.until_text());
            let message = match temporary.message.strip_prefix(&prefix) {
                Some(rest) if passed && temporary.outcome == Outcome::Refused => rest.to_string(),
                _ => temporary.message.clone(),
            };
            proptest::prop_assert_eq!(
                Change { expiry: None, message, ..temporary },
                plain
            );
        }

        /// A manager's new expiry is a change even when the count stays:
        /// the allocation keeps what its manager last said (DESIGN §11).
        #[test]
        fn a_new_expiry_is_written_even_when_the_count_stays(count in 1i64..12, then_count in 0i64..12) {
            let until: chrono::DateTime<chrono::Utc> = "2026-12-08T12:00:00Z".parse().unwrap();
            let now = until - chrono::TimeDelta::hours(1);
            let account = snapshot(&format!("
pools: [{{product: TestOps, total: 20, dedicated: {count}, sharedInUse: 0}}]
organizations: [a]
allocations:
  - {{organization: a, product: TestOps, dedicated: {count}, inUse: 0, managedBy: default/licenses/a, version: 3}}
"));
            let expiry = Expiry { until, then_count };
            let d = Desired { expiry: Some(expiry), ..want("a", "a", count) };
            let mut p = plan(vec![d], account, &Options::one("default", now));
            let change = p.changes.pop().unwrap();
            proptest::prop_assert_eq!(change.outcome, Outcome::Planned);
            proptest::prop_assert_eq!((change.from, change.to), (count, count));
            proptest::prop_assert_eq!(
                change.message,
                "no count change; expiry none -> 2026-12-08T12:00:00Z, kept with the allocation"
            );
            proptest::prop_assert_eq!(change.write.and_then(|w| w.expiry), Some(expiry));
        }
    }

    proptest::proptest! {
        #[test]
        fn permute_puts_each_item_where_the_order_says(
            order in (0usize..40).prop_flat_map(|n| Just((0..n).collect::<Vec<_>>()).prop_shuffle())
        ) {
            let mut items: Vec<usize> = (0..order.len()).map(|i| i * 10).collect();
            permute(&mut items, order.clone());
            let wanted: Vec<usize> = order.iter().map(|&i| i * 10).collect();
            proptest::prop_assert_eq!(items, wanted);
        }
    }
}
