//! Property tests of the rules: random sequences of operations on the
//! in-memory ledger, and the same sequences on a real SQLite file.

mod common;

use licensor::backend::store::{Principal, Store};
use licensor::backend::{BackendError, Fixture};
use licensor::domain::{
    AllocationWrite, DeletionPolicy, Expiry, Ledger, Pool, Request, Role, SeatChange, Snapshot,
    Target,
};
use proptest::prelude::*;

const ORGS: [&str; 4] = ["a", "b", "c", "d"];

#[derive(Debug, Clone)]
enum Op {
    Set {
        org: usize,
        count: i64,
        allow: bool,
        manager: usize,
        role: Role,
        policy: DeletionPolicy,
        expiry: Option<Expiry>,
    },
    Remove {
        org: usize,
        manager: usize,
    },
    Total(i64),
    Claim {
        org: usize,
        n: i64,
    },
    Release {
        org: usize,
        n: i64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let role = prop_oneof![9 => Just(Role::AccountAdmin), 1 => Just(Role::Viewer)];
    prop_oneof![
        6 => (0..4usize, 0..40i64, any::<bool>(), 0..2usize, role, prop_oneof![Just(DeletionPolicy::Revoke), Just(DeletionPolicy::Orphan)], expiry())
            .prop_map(|(org, count, allow, manager, role, policy, expiry)| Op::Set { org, count, allow, manager, role, policy, expiry }),
        1 => (0..4usize, 0..2usize).prop_map(|(org, manager)| Op::Remove { org, manager }),
        1 => (0..80i64).prop_map(Op::Total),
        2 => (0..4usize, 1..10i64).prop_map(|(org, n)| Op::Claim { org, n }),
        1 => (0..4usize, 1..10i64).prop_map(|(org, n)| Op::Release { org, n }),
    ]
}

/// None mostly; otherwise one of a few moments, some with fractions of a
/// second (a store must read back the moment it was given), and a
/// `thenCount` that is sometimes out of range.
fn expiry() -> impl Strategy<Value = Option<Expiry>> {
    proptest::option::weighted(
        0.4,
        (
            0..3i64,
            prop_oneof![Just(0u32), Just(500_000_000), Just(123_456_789)],
            -1..12i64,
        )
            .prop_map(|(day, nanos, then_count)| Expiry {
                until: chrono::DateTime::from_timestamp(1_800_000_000 + day * 86_400, nanos)
                    .unwrap(),
                then_count: if then_count < 0 {
                    2_000_000
                } else {
                    then_count
                },
            }),
    )
}

fn managers(i: usize) -> &'static str {
    ["default/licenses/x", "default/licenses/y"][i]
}

fn start() -> Ledger {
    Ledger::new(
        [Pool {
            product: "TestOps".into(),
            total: 50,
            dedicated: 0,
            shared_in_use: 0,
            revision: 0,
        }],
        ORGS.iter().map(|o| o.to_string()),
        [],
    )
}

/// Applies an op to the ledger; `Ok(grew)` says whether it claimed seats.
fn apply(ledger: &mut Ledger, op: &Op) -> Result<bool, ()> {
    let pool = |l: &Ledger| l.pools["TestOps"].clone();
    let before = pool(ledger);
    let r = match op {
        Op::Set {
            org,
            count,
            allow,
            manager,
            role,
            policy,
            expiry,
        } => ledger
            .apply(
                *role,
                &Request {
                    organization: ORGS[*org],
                    product: "TestOps",
                    target: Target::Count(*count),
                    managed_by: Some(managers(*manager)),
                    allow_user_displacement: *allow,
                    deletion_policy: *policy,
                    expiry: *expiry,
                },
            )
            .map(|_| ()),
        Op::Remove { org, manager } => ledger
            .apply(
                Role::AccountAdmin,
                &Request {
                    organization: ORGS[*org],
                    product: "TestOps",
                    target: Target::Remove,
                    managed_by: Some(managers(*manager)),
                    allow_user_displacement: true,
                    deletion_policy: DeletionPolicy::Revoke,
                    expiry: None,
                },
            )
            .map(|_| ()),
        Op::Total(t) => ledger.set_total(Role::AccountAdmin, "TestOps", *t),
        Op::Claim { org, n } => ledger.seats(ORGS[*org], "TestOps", SeatChange::Claim(*n)),
        Op::Release { org, n } => ledger.seats(ORGS[*org], "TestOps", SeatChange::Release(*n)),
    };
    let after = pool(ledger);
    r.map(|()| after.dedicated > before.dedicated || after.shared_in_use > before.shared_in_use)
        .map_err(|_| ())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn no_accepted_claim_over_commits_and_refusals_change_nothing(ops in prop::collection::vec(op(), 1..60)) {
        let mut ledger = start();
        for op in &ops {
            let before = ledger.clone();
            match apply(&mut ledger, op) {
                Err(()) => prop_assert_eq!(&ledger, &before, "a refused {:?} changed the ledger", op),
                Ok(grew) => {
                    let p = &ledger.pools["TestOps"];
                    if grew {
                        prop_assert!(p.dedicated + p.shared_in_use <= p.total,
                            "{:?} over-committed the pool: {:?}", op, p);
                    }
                }
            }
            let p = &ledger.pools["TestOps"];
            let sum: i64 = ledger.allocations().map(|a| a.dedicated).sum();
            prop_assert_eq!(p.dedicated, sum);
            prop_assert!(p.shared_in_use >= 0);
            for a in ledger.allocations() {
                prop_assert!(0 <= a.in_use && a.in_use <= a.dedicated, "{:?}", a);
            }
        }
    }
}

fn store_snapshot(store: &Store) -> Snapshot {
    store.snapshot("acme").unwrap()
}

fn ledger_snapshot(l: &Ledger) -> Snapshot {
    Snapshot {
        pools: l.pools.values().cloned().collect(),
        organizations: l.organizations.iter().cloned().collect(),
        allocations: l.allocations().cloned().collect(),
    }
}

/// The store decides exactly as the planner's ledger: the rules are
/// written once.
fn store_agrees_with_the_ledger(
    store: &Store,
    ops: &[Op],
) -> Result<(), proptest::test_runner::TestCaseError> {
    let admin = Principal::local();
    let fixture: Fixture = serde_yaml::from_str(
        "account: acme\nproducts: [{name: TestOps, total: 50}]\norganizations: [{id: a}, {id: b}, {id: c}, {id: d}]\n",
    ).unwrap();
    store.seed(&admin, &fixture).unwrap();
    let mut ledger = start();
    for op in ops {
        let expected = apply(&mut ledger, op).is_ok();
        let got = match op {
            Op::Set {
                org,
                count,
                allow,
                manager,
                role,
                policy,
                expiry,
            } => store
                .write(
                    "acme",
                    &Principal {
                        actor: "t".into(),
                        role: *role,
                    },
                    &AllocationWrite {
                        organization: ORGS[*org].into(),
                        product: "TestOps".into(),
                        target: Target::Count(*count),
                        managed_by: Some(managers(*manager).into()),
                        allow_user_displacement: *allow,
                        deletion_policy: *policy,
                        expiry: *expiry,
                        expected_version: None,
                        idempotency_key: None,
                    },
                    false,
                )
                .map(|_| ()),
            Op::Remove { org, manager } => store
                .write(
                    "acme",
                    &admin,
                    &AllocationWrite {
                        organization: ORGS[*org].into(),
                        product: "TestOps".into(),
                        target: Target::Remove,
                        managed_by: Some(managers(*manager).into()),
                        allow_user_displacement: true,
                        deletion_policy: DeletionPolicy::Revoke,
                        expiry: None,
                        expected_version: None,
                        idempotency_key: None,
                    },
                    false,
                )
                .map(|_| ()),
            Op::Total(t) => store.set_total("acme", &admin, "TestOps", *t).map(|_| ()),
            Op::Claim { org, n } => {
                store.seats("acme", &admin, ORGS[*org], "TestOps", SeatChange::Claim(*n))
            }
            Op::Release { org, n } => store.seats(
                "acme",
                &admin,
                ORGS[*org],
                "TestOps",
                SeatChange::Release(*n),
            ),
        };
        prop_assert!(
            !matches!(got, Err(BackendError::Unavailable(_))),
            "{:?}",
            got
        );
        prop_assert_eq!(got.is_ok(), expected, "{:?}: store {:?}", op, got);
        let mut s = store_snapshot(store);
        let mut l = ledger_snapshot(&ledger);
        // Versions count writes differently (seat claims bump the store's).
        for a in s.allocations.iter_mut().chain(l.allocations.iter_mut()) {
            a.version = 0;
        }
        for p in s.pools.iter_mut().chain(l.pools.iter_mut()) {
            p.revision = 0;
        }
        prop_assert_eq!(s, l);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn the_sqlite_store_agrees_with_the_ledger(ops in prop::collection::vec(op(), 1..30)) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("l.db")).unwrap();
        store_agrees_with_the_ledger(&store, &ops)?;
    }

    #[test]
    fn the_postgres_store_agrees_with_the_ledger(ops in prop::collection::vec(op(), 1..30)) {
        let pg = common::postgres::server();
        let store = Store::connect(&pg.url_with_password(&pg.database()), true).unwrap();
        store_agrees_with_the_ledger(&store, &ops)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// The identifier rule in code and the pattern published in the CRD and
    /// the OpenAPI document are one rule.
    #[test]
    fn the_identifier_check_and_its_pattern_agree(
        value in prop_oneof![
            "[ -~]{0,8}",
            "\\PC{0,6}",
            "[\\x00-\\x20\\x7f-\\xa0a]{0,4}",
            "[a-z]{250,256}",
            "[é]{252,254}",
        ]
    ) {
        static PATTERN: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
            regex::Regex::new(licensor::domain::IDENTIFIER_PATTERN).unwrap()
        });
        prop_assert_eq!(
            licensor::domain::check_identifier("x", &value).is_ok(),
            PATTERN.is_match(&value),
            "{:?}", value
        );
    }
}
