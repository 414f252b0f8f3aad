//! Property test of write identity (DESIGN §6) on a real SQLite file: any
//! interleaving of creates, changes, deletes, re-creates and re-seeds, with
//! retries of earlier requests (same key) and stale re-sends of them (a
//! new key, the old `If-Match`), never answers a new intent with a replay,
//! never writes a retry twice, and never accepts a version from before the
//! allocation last changed.

mod common;

use licensor::backend::store::{Principal, Store};
use licensor::backend::{BackendError, Fixture, Written};
use licensor::domain::{AllocationWrite, Role};
use licensor::plan::{Desired, Options, Outcome, plan, plan_removal};
use proptest::prelude::*;

const ORGS: [&str; 3] = ["a", "b", "c"];
const FIXTURE: &str = "
account: acme
products: [{name: TestOps, total: 20}]
organizations: [{id: a, allocations: [{product: TestOps, dedicated: 2, inUse: 1}]}, {id: b}, {id: c}]
";

#[derive(Debug, Clone)]
enum Op {
    /// Declare a count, planned as the CLI plans it.
    Set { org: usize, count: i64 },
    /// Delete the declaring object (deletionPolicy Revoke).
    Delete { org: usize },
    /// Replace the account with the fixture.
    Reseed,
    /// Send an earlier write again, exactly (a retry).
    Retry { nth: usize },
    /// Send an earlier write again under a new key: its If-Match is old.
    Resend { nth: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..3usize, 0..8i64).prop_map(|(org, count)| Op::Set { org, count }),
        2 => (0..3usize).prop_map(|org| Op::Delete { org }),
        1 => Just(Op::Reseed),
        3 => any::<usize>().prop_map(|nth| Op::Retry { nth }),
        2 => any::<usize>().prop_map(|nth| Op::Resend { nth }),
    ]
}

fn desired(org: usize, count: i64) -> Desired {
    Desired {
        resource: format!("licenses/{}", ORGS[org]),
        account: "default".into(),
        organization: ORGS[org].into(),
        product: "TestOps".into(),
        count,
        expiry: None,
        allow_user_displacement: true,
        managed_by: format!("default/licenses/{}", ORGS[org]),
        deletion_policy: Default::default(),
        hold: None,
        denied: None,
        scope: String::new(),
    }
}

/// The allocation's version now; 0 when it does not exist.
fn version(store: &Store, w: &AllocationWrite) -> i64 {
    store
        .observe("acme", &w.organization, &w.product)
        .unwrap()
        .allocations
        .first()
        .map_or(0, |a| a.version)
}

fn audit_len(store: &Store) -> usize {
    store.audit("acme").unwrap().len()
}

/// The write the planner derives for `op` from the store as it is now.
fn planned(store: &Store, op: &Op) -> Option<AllocationWrite> {
    let snapshot = store.snapshot("acme").unwrap();
    let change = match op {
        Op::Set { org, count } => {
            let opts = Options {
                prune: false,
                instance: "default".into(),
                role: Role::AccountAdmin,
                keep_writes: true,
                now: chrono::Utc::now(),
            };
            plan(vec![desired(*org, *count)], snapshot.clone(), &opts)
                .changes
                .pop()?
        }
        Op::Delete { org } => plan_removal(&desired(*org, 0), &snapshot, Role::AccountAdmin),
        _ => return None,
    };
    (change.outcome == Outcome::Planned).then_some(*change.write?)
}

/// The property, on one store: see the module contract.
fn never_matches_what_it_did_not_come_from(
    store: &Store,
    ops: &[Op],
) -> Result<(), proptest::test_runner::TestCaseError> {
    let admin = Principal::local();
    let fixture: Fixture = serde_yaml::from_str(FIXTURE).unwrap();
    store.seed(&admin, &fixture).unwrap();
    // Every write sent, with the first answer it got.
    let mut sent: Vec<(AllocationWrite, Result<Written, BackendError>)> = Vec::new();
    for op in ops {
        let entries = audit_len(store);
        match op {
            Op::Set { .. } | Op::Delete { .. } => {
                let Some(write) = planned(store, op) else {
                    continue;
                };
                let answer = store.write("acme", &admin, &write, false);
                if let Ok(w) = &answer {
                    prop_assert!(
                        !w.replayed,
                        "{:?}: a new intent was answered as a replay: {:?}",
                        op,
                        w
                    );
                    prop_assert_eq!(audit_len(store), entries + 1, "{:?} wrote once", op);
                }
                sent.push((write, answer));
            }
            Op::Reseed => store.seed(&admin, &fixture).unwrap(),
            Op::Retry { nth } if !sent.is_empty() => {
                let (write, first) = sent[nth % sent.len()].clone();
                let version_before = version(store, &write);
                let again = store.write("acme", &admin, &write, false);
                match (&first, &again) {
                    (Ok(first), Ok(again)) => {
                        prop_assert!(
                            again.replayed,
                            "a retry of an accepted write was written again: {:?}",
                            again
                        );
                        prop_assert_eq!(&first.effect, &again.effect);
                        prop_assert_eq!(&first.allocation, &again.allocation);
                        prop_assert_eq!(audit_len(store), entries, "a replay wrote");
                    }
                    (Ok(_), Err(e)) => {
                        prop_assert!(false, "a retry of an accepted write failed: {:?}", e)
                    }
                    // A refusal is not remembered: the retry is decided afresh
                    // and still carries its If-Match.
                    (Err(_), Ok(again)) => {
                        prop_assert!(!again.replayed);
                        prop_assert_eq!(
                            write.expected_version,
                            Some(version_before),
                            "a retried refusal was applied against another version"
                        );
                    }
                    (Err(_), Err(_)) => {}
                }
            }
            Op::Resend { nth } if !sent.is_empty() => {
                let (mut write, _) = sent[nth % sent.len()].clone();
                // A key never used before, in this store (one database serves many cases).
                static RESENT: std::sync::atomic::AtomicUsize =
                    std::sync::atomic::AtomicUsize::new(0);
                let n = RESENT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                write.idempotency_key = Some(format!("resent-{}-{n}", std::process::id()));
                let current = version(store, &write);
                let answer = store.write("acme", &admin, &write, false);
                if write.expected_version != Some(current) {
                    prop_assert!(
                        answer.is_err(),
                        "If-Match {:?} accepted at version {}: {:?}",
                        write.expected_version,
                        current,
                        answer
                    );
                    prop_assert_eq!(audit_len(store), entries);
                }
            }
            Op::Retry { .. } | Op::Resend { .. } => {}
        }
    }
    Ok(())
}

/// One database for every case of the PostgreSQL run; each case re-seeds
/// the account (the sequence goes on, as it does for a real re-seed).
fn postgres_store() -> Store {
    static DATABASE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let pg = common::postgres::server();
    let database = DATABASE.get_or_init(|| pg.database());
    Store::connect(&pg.url_with_password(database), true).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn on_sqlite_keys_and_versions_never_match_what_they_did_not_come_from(
        ops in prop::collection::vec(op(), 1..40)
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("l.db")).unwrap();
        never_matches_what_it_did_not_come_from(&store, &ops)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn on_postgres_keys_and_versions_never_match_what_they_did_not_come_from(
        ops in prop::collection::vec(op(), 1..40)
    ) {
        let store = postgres_store();
        never_matches_what_it_did_not_come_from(&store, &ops)?;
    }
}

/// Writes that arrive together in one process are written together (one
/// transaction, one after the other): each is still decided on what the
/// ones before it left, gets a version of its own, and a retry racing its
/// first try is written once.
fn racing_writers_are_decided_one_after_the_other(kind: common::Kind) {
    let place = common::Place::new(kind);
    let store = &place.open();
    const RACERS: usize = 24;
    const ROOM: i64 = 10;
    let mut fixture =
        format!("account: acme\nproducts: [{{name: TestOps, total: {ROOM}}}]\norganizations:\n");
    for i in 0..RACERS {
        fixture.push_str(&format!("  - {{id: org-{i}}}\n"));
    }
    let fixture: Fixture = serde_yaml::from_str(&fixture).unwrap();
    store.seed(&Principal::local(), &fixture).unwrap();
    let audit_before = store.audit("acme").unwrap().len();
    let write = |i: usize| AllocationWrite {
        organization: format!("org-{i}"),
        product: "TestOps".into(),
        target: licensor::domain::Target::Count(1),
        managed_by: Some(format!("default/licenses/org-{i}")),
        deletion_policy: Default::default(),
        expiry: None,
        allow_user_displacement: false,
        expected_version: None,
        idempotency_key: Some(format!("key-{i}")),
    };
    // Every racer once, and racer 0's request a second time (a retry).
    let start = std::sync::Barrier::new(RACERS + 1);
    let answers: Vec<(usize, Result<Written, BackendError>)> = std::thread::scope(|s| {
        let racers: Vec<_> = (0..RACERS)
            .chain([0])
            .map(|i| {
                let (start, w) = (&start, write(i));
                s.spawn(move || {
                    start.wait();
                    (i, store.write("acme", &Principal::local(), &w, false))
                })
            })
            .collect();
        racers.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let (written, refused): (Vec<_>, Vec<_>) = answers.iter().partition(|(_, a)| a.is_ok());
    for (_, a) in &refused {
        match a {
            Err(BackendError::Refused(r)) => {
                assert_eq!(r.reason, licensor::domain::Reason::InsufficientPool, "{r}")
            }
            other => panic!("a racer got {other:?}"),
        }
    }
    let snapshot = store.snapshot("acme").unwrap();
    assert_eq!(snapshot.pools[0].dedicated, ROOM, "{snapshot:?}");
    assert_eq!(snapshot.allocations.len(), ROOM as usize);
    let mut versions: Vec<i64> = snapshot.allocations.iter().map(|a| a.version).collect();
    versions.sort();
    versions.dedup();
    assert_eq!(
        versions.len(),
        ROOM as usize,
        "versions repeat: {versions:?}"
    );
    // Racer 0 and its retry both failed or both succeeded, once.
    let zero: Vec<_> = answers.iter().filter(|(i, _)| *i == 0).collect();
    match (&zero[0].1, &zero[1].1) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a.allocation, b.allocation);
            assert!(a.replayed != b.replayed, "written twice or replayed twice");
            assert_eq!(written.len(), ROOM as usize + 1);
        }
        (Err(_), Err(_)) => assert_eq!(written.len(), ROOM as usize),
        other => panic!("a retry answered differently from its first try: {other:?}"),
    }
    // One audit entry per allocation written, none for refusals or replays.
    assert_eq!(
        store.audit("acme").unwrap().len(),
        audit_before + ROOM as usize
    );
}

// A store of its own (the property test above re-seeds its account).
on_every_store!(racing_writers_are_decided_one_after_the_other);
