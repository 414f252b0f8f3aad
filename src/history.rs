//! The account's history, from its audit log: what each pool (total,
//! dedicated, in use, free) and each allocation (dedicated, in use) held
//! over a range of time, a value per step, for the page's charts.
//!
//! The audit log records every change with its numbers, so the history is
//! the account as it is now, with the records undone newest first: the
//! state at a moment is the present with every later record undone. A
//! `seed` replaced the account with numbers the log does not hold: the
//! history starts there (the steps before it have no value). The log is
//! read once, in O(records + steps × series).

use std::collections::BTreeMap;

use chrono::{DateTime, TimeDelta, Utc};

use crate::api::{AuditAction, AuditEntry};
use crate::domain::Snapshot;

/// How far back a history goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Range {
    #[default]
    Days30,
    Days90,
    Year,
    /// From the oldest record on.
    All,
}

impl Range {
    pub const ALL: [Range; 4] = [Range::Days30, Range::Days90, Range::Year, Range::All];

    /// As the page's links spell it: `30d`, `90d`, `1y`, `all`.
    pub fn as_str(self) -> &'static str {
        match self {
            Range::Days30 => "30d",
            Range::Days90 => "90d",
            Range::Year => "1y",
            Range::All => "all",
        }
    }

    /// In words, for headings and labels.
    pub fn words(self) -> &'static str {
        match self {
            Range::Days30 => "the last 30 days",
            Range::Days90 => "the last 90 days",
            Range::Year => "the last year",
            Range::All => "all the recorded history",
        }
    }

    /// The spelling back; anything else is the default (30 days).
    pub fn parse(s: &str) -> Range {
        Range::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .unwrap_or_default()
    }

    fn days(self) -> Option<i64> {
        match self {
            Range::Days30 => Some(30),
            Range::Days90 => Some(90),
            Range::Year => Some(365),
            Range::All => None,
        }
    }
}

/// A pool's figures at one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolFigures {
    pub total: i64,
    pub dedicated: i64,
    /// Seats in use: the allocations' and the account pool's.
    pub in_use: i64,
    /// `total - dedicated - shared in use`; below 0 when over-committed.
    pub free: i64,
}

/// An allocation's figures at one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AllocationFigures {
    pub dedicated: i64,
    pub in_use: i64,
}

/// What the account held at each step of a range: `None` before the
/// history starts (before a seed, or the step has nothing to show).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    /// The range it covers.
    pub range: Range,
    /// The end of each step, oldest first; the last is now.
    pub steps: Vec<DateTime<Utc>>,
    pub pools: BTreeMap<String, Vec<Option<PoolFigures>>>,
    /// Per `(organization, product)`: those of `organization` only.
    pub allocations: BTreeMap<(String, String), Vec<Option<AllocationFigures>>>,
    /// Records within the range.
    pub changes: usize,
}

/// The most steps a history has: a step a day for a year, longer steps
/// for longer (the page stays small however old the account).
pub const MAX_STEPS: i64 = 366;

#[derive(Debug, Clone, Copy, Default)]
struct Pool {
    total: i64,
    dedicated: i64,
    shared_in_use: i64,
    /// Sum of the allocations' in-use seats.
    allocated_in_use: i64,
}

impl Pool {
    fn figures(&self) -> PoolFigures {
        PoolFigures {
            total: self.total,
            dedicated: self.dedicated,
            in_use: self.allocated_in_use + self.shared_in_use,
            free: self.total - self.dedicated - self.shared_in_use,
        }
    }
}

/// The account as it is now, changed back one record at a time.
struct Undo {
    pools: BTreeMap<String, Pool>,
    allocations: BTreeMap<(String, String), AllocationFigures>,
}

impl Undo {
    fn new(now: &Snapshot) -> Undo {
        let mut pools: BTreeMap<String, Pool> = now
            .pools
            .iter()
            .map(|p| {
                let pool = Pool {
                    total: p.total,
                    dedicated: p.dedicated,
                    shared_in_use: p.shared_in_use,
                    allocated_in_use: 0,
                };
                (p.product.clone(), pool)
            })
            .collect();
        let mut allocations = BTreeMap::new();
        for a in &now.allocations {
            if let Some(p) = pools.get_mut(&a.product) {
                p.allocated_in_use += a.in_use;
            }
            let figures = AllocationFigures {
                dedicated: a.dedicated,
                in_use: a.in_use,
            };
            allocations.insert((a.organization.clone(), a.product.clone()), figures);
        }
        Undo { pools, allocations }
    }

    /// Undoes `e`: the state is then as it was before it. `false` for a
    /// seed, before which nothing is known.
    fn undo(&mut self, e: &AuditEntry) -> bool {
        let Some(product) = &e.product else {
            return e.action != AuditAction::Seed;
        };
        let key = e.organization.clone().map(|o| (o, product.clone()));
        // Seats come from the organization's dedicated ones when it has
        // some, from the account pool otherwise.
        let claims_dedicated = key
            .as_ref()
            .and_then(|k| self.allocations.get(k))
            .is_some_and(|a| a.dedicated > 0);
        let pool = self.pools.entry(product.clone()).or_default();
        let mut allocation = AllocationFigures::default();
        let allocation_changed = match e.action {
            AuditAction::Create
            | AuditAction::Increase
            | AuditAction::Decrease
            | AuditAction::Revoke => {
                // A revoke moved its in-use seats to the account pool or
                // left them without a license; before it they were its own.
                pool.dedicated -= e.to - e.from;
                pool.shared_in_use -= e.rehomed;
                pool.allocated_in_use += e.rehomed + e.displaced;
                allocation.dedicated = e.from;
                allocation.in_use = e.rehomed + e.displaced;
                true
            }
            AuditAction::Claim | AuditAction::Release if claims_dedicated => {
                pool.allocated_in_use -= e.to - e.from;
                allocation.in_use = e.from - e.to;
                true
            }
            AuditAction::Claim | AuditAction::Release => {
                pool.shared_in_use = e.from;
                false
            }
            AuditAction::Total => {
                pool.total = e.from;
                false
            }
            AuditAction::Seed => return false,
            _ => false,
        };
        if let (true, Some(key)) = (allocation_changed, key) {
            let a = self.allocations.entry(key).or_default();
            match e.action {
                AuditAction::Claim | AuditAction::Release => a.in_use += allocation.in_use,
                _ => {
                    a.dedicated = allocation.dedicated;
                    a.in_use += allocation.in_use;
                }
            }
        }
        true
    }
}

/// Puts `value` at step `i` of the series of `key`; a series that starts
/// here (walking back) held nothing at the later steps.
fn put<K: Ord + Clone, T: Copy + Default>(
    series: &mut BTreeMap<K, Vec<Option<T>>>,
    key: &K,
    steps: usize,
    i: usize,
    value: Option<T>,
) {
    let s = series
        .entry(key.clone())
        .or_insert_with(|| (0..steps).map(|j| (j > i).then(T::default)).collect());
    s[i] = value;
}

/// The history of the account `now` holds over `range`, ending at `at`,
/// from its audit log `audit` (oldest first, as stored); the allocations
/// of `organization` too, when one is named.
pub fn history(
    now: &Snapshot,
    audit: &[AuditEntry],
    range: Range,
    at: DateTime<Utc>,
    organization: Option<&str>,
) -> History {
    let time = |e: &AuditEntry| {
        DateTime::parse_from_rfc3339(&e.time)
            .map(|t| t.to_utc())
            .unwrap_or(at)
    };
    let start = match range.days() {
        Some(days) => at - TimeDelta::days(days),
        None => audit.first().map_or(at, time),
    };
    let span = (at - start).max(TimeDelta::days(1));
    let steps_wanted = range
        .days()
        .unwrap_or(span.num_days() + 1)
        .clamp(1, MAX_STEPS);
    let step = span / (steps_wanted as i32);
    // Counted back from `at`, so that the last step ends now exactly.
    let steps: Vec<DateTime<Utc>> = (0..steps_wanted)
        .map(|i| at - step * ((steps_wanted - 1 - i) as i32))
        .collect();
    let mut undo = Undo::new(now);
    let mut pools: BTreeMap<String, Vec<Option<PoolFigures>>> = BTreeMap::new();
    let mut allocations: BTreeMap<(String, String), Vec<Option<AllocationFigures>>> =
        BTreeMap::new();
    let mut records = audit.iter().rev().peekable();
    let mut known = true;
    let mut changes = 0;
    // Steps newest first: undo every record after the step's end, then
    // take the state.
    for (i, end) in steps.iter().enumerate().rev() {
        while known && records.peek().is_some_and(|e| time(e) > *end) {
            let e = records.next().expect("peeked");
            changes += usize::from(time(e) > start);
            known = undo.undo(e);
        }
        for (product, pool) in &undo.pools {
            put(
                &mut pools,
                product,
                steps.len(),
                i,
                known.then(|| pool.figures()),
            );
        }
        for (key, a) in &undo.allocations {
            if Some(key.0.as_str()) == organization {
                put(&mut allocations, key, steps.len(), i, known.then_some(*a));
            }
        }
    }
    changes += records.take_while(|e| known && time(e) > start).count();
    History {
        range,
        steps,
        pools,
        allocations,
        changes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Allocation, Pool as DomainPool};

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn record(
        id: i64,
        time: &str,
        action: AuditAction,
        org: Option<&str>,
        (from, to): (i64, i64),
    ) -> AuditEntry {
        AuditEntry {
            id,
            time: time.into(),
            actor: "t".into(),
            action,
            organization: org.map(Into::into),
            product: Some("TestOps".into()),
            from,
            to,
            rehomed: 0,
            displaced: 0,
            manager: None,
            idempotency_key: None,
            subject: None,
        }
    }

    /// The documented account, seeded ten days ago: qa-team 5 of 200 with
    /// 4 in use; raised to 10 five days ago; a seat claimed two days ago;
    /// the total raised to 250 yesterday (each an hour off the steps'
    /// ends, at noon).
    fn account() -> (Snapshot, Vec<AuditEntry>) {
        let now = Snapshot {
            pools: vec![DomainPool {
                product: "TestOps".into(),
                total: 250,
                dedicated: 10,
                shared_in_use: 0,
                revision: 9,
            }],
            organizations: vec!["qa-team".into()],
            allocations: vec![Allocation {
                organization: "qa-team".into(),
                product: "TestOps".into(),
                dedicated: 10,
                in_use: 5,
                managed_by: None,
                deletion_policy: Default::default(),
                expiry: None,
                version: 9,
            }],
        };
        let mut seed = record(1, "2026-11-27T11:00:00Z", AuditAction::Seed, None, (0, 0));
        seed.product = None;
        let audit = vec![
            seed,
            record(
                2,
                "2026-12-02T13:00:00Z",
                AuditAction::Increase,
                Some("qa-team"),
                (5, 10),
            ),
            record(
                3,
                "2026-12-05T13:00:00Z",
                AuditAction::Claim,
                Some("qa-team"),
                (4, 5),
            ),
            record(
                4,
                "2026-12-06T13:00:00Z",
                AuditAction::Total,
                None,
                (200, 250),
            ),
        ];
        (now, audit)
    }

    #[test]
    fn the_past_is_the_present_with_later_records_undone() {
        let (now, audit) = account();
        let h = history(
            &now,
            &audit,
            Range::Days30,
            at("2026-12-07T12:00:00Z"),
            Some("qa-team"),
        );
        assert_eq!(h.steps.len(), 30);
        assert_eq!(h.changes, 4);
        let pool = &h.pools["TestOps"];
        let figures = |total, dedicated, in_use| {
            Some(PoolFigures {
                total,
                dedicated,
                in_use,
                free: total - dedicated,
            })
        };
        // The steps end at noon: step 29 is now, 28 a day ago.
        assert_eq!(pool[29], figures(250, 10, 5));
        assert_eq!(pool[28], figures(200, 10, 5), "before the total was raised");
        assert_eq!(pool[26], figures(200, 10, 4), "before the claim");
        assert_eq!(pool[24], figures(200, 5, 4), "before the raise");
        assert_eq!(pool[19], figures(200, 5, 4), "the seed itself");
        assert_eq!(pool[18], None, "before the seed nothing is known");
        let qa = &h.allocations[&("qa-team".to_string(), "TestOps".to_string())];
        assert_eq!(
            qa[29],
            Some(AllocationFigures {
                dedicated: 10,
                in_use: 5
            })
        );
        assert_eq!(
            qa[24],
            Some(AllocationFigures {
                dedicated: 5,
                in_use: 4
            })
        );
        // Another organization's allocations are not drawn.
        let none = history(
            &now,
            &audit,
            Range::Days30,
            at("2026-12-07T12:00:00Z"),
            None,
        );
        assert!(none.allocations.is_empty());
    }

    #[test]
    fn a_revoke_undone_gives_its_seats_back_to_the_allocation() {
        let (mut now, _) = account();
        // Revoked: 10 dedicated, 5 in use, 3 moved to the account pool, 2
        // displaced.
        now.pools[0].dedicated = 0;
        now.pools[0].shared_in_use = 3;
        now.allocations.clear();
        let mut revoke = record(
            5,
            "2026-12-07T06:00:00Z",
            AuditAction::Revoke,
            Some("qa-team"),
            (10, 0),
        );
        revoke.rehomed = 3;
        revoke.displaced = 2;
        let h = history(
            &now,
            &[revoke],
            Range::Days30,
            at("2026-12-07T12:00:00Z"),
            Some("qa-team"),
        );
        let pool = &h.pools["TestOps"];
        assert_eq!(pool[29].unwrap().in_use, 3);
        assert_eq!(
            pool[28],
            Some(PoolFigures {
                total: 250,
                dedicated: 10,
                in_use: 5,
                free: 240
            })
        );
        let qa = &h.allocations[&("qa-team".to_string(), "TestOps".to_string())];
        assert_eq!(
            qa[28],
            Some(AllocationFigures {
                dedicated: 10,
                in_use: 5
            })
        );
        assert_eq!(
            qa[29],
            Some(AllocationFigures {
                dedicated: 0,
                in_use: 0
            })
        );
    }

    #[test]
    fn all_of_a_long_history_is_at_most_a_step_a_day_and_never_more_than_a_year_of_steps() {
        let (now, mut audit) = account();
        audit[0].time = "2020-01-01T00:00:00Z".into();
        let h = history(&now, &audit, Range::All, at("2026-12-07T12:00:00Z"), None);
        assert_eq!(h.steps.len() as i64, MAX_STEPS);
        assert_eq!(*h.steps.last().unwrap(), at("2026-12-07T12:00:00Z"));
        let short = history(
            &now,
            &audit[1..],
            Range::All,
            at("2026-12-07T12:00:00Z"),
            None,
        );
        assert_eq!(short.steps.len(), 5, "a day short of five days: five steps");
        assert_eq!(Range::parse("1y"), Range::Year);
        assert_eq!(Range::parse("forever"), Range::Days30);
    }

    #[test]
    fn an_account_without_records_has_a_flat_history() {
        let (now, _) = account();
        let h = history(&now, &[], Range::Days90, at("2026-12-07T12:00:00Z"), None);
        assert_eq!(h.changes, 0);
        assert!(h.pools["TestOps"].iter().all(|f| f.unwrap().total == 250));
    }
}
