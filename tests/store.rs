//! A store's own guarantees: idempotency keys, optimistic concurrency,
//! dry runs and reads of one moment, on every store (a real SQLite file, a
//! real PostgreSQL database); and the embedded file's own: migrations, its
//! write-ahead log, a damaged file.

mod common;

use common::{Kind, Place};
use licensor::backend::store::{Principal, Store};
use licensor::backend::{BackendError, Fixture};
use licensor::domain::{AllocationWrite, Target};

on_every_store!(
    same_key_and_body_replays_without_writing_twice,
    a_stale_expected_version_is_refused_and_writes_nothing,
    a_dry_run_answers_without_writing,
    idempotency_keys_are_kept_a_day_then_forgotten,
    observing_one_allocation_reads_its_pool_organization_and_row,
    snapshots_read_one_moment_while_another_handle_writes,
    tokens_expire_are_revoked_and_end_their_sessions,
    a_token_found_good_is_read_again_once_the_store_changes,
);

fn seeded(kind: Kind) -> (Place, Store) {
    let place = Place::new(kind);
    let store = place.open();
    let fixture: Fixture = serde_yaml::from_str(
        "account: acme\nproducts: [{name: TestOps, total: 200}]\norganizations:\n  - {id: qa-team, allocations: [{product: TestOps, dedicated: 5, inUse: 4}]}\n",
    )
    .unwrap();
    store.seed(&Principal::local(), &fixture).unwrap();
    (place, store)
}

fn raise(to: i64, key: Option<&str>) -> AllocationWrite {
    AllocationWrite {
        organization: "qa-team".into(),
        product: "TestOps".into(),
        target: Target::Count(to),
        managed_by: Some("default/licenses/qa".into()),
        deletion_policy: Default::default(),
        expiry: None,
        allow_user_displacement: false,
        expected_version: None,
        idempotency_key: key.map(String::from),
    }
}

fn same_key_and_body_replays_without_writing_twice(kind: Kind) {
    let (_place, store) = seeded(kind);
    let who = Principal::local();
    let first = store
        .write("acme", &who, &raise(10, Some("k1")), false)
        .unwrap();
    assert!(!first.replayed);
    let audit_len = store.audit("acme").unwrap().len();
    let again = store
        .write("acme", &who, &raise(10, Some("k1")), false)
        .unwrap();
    assert!(again.replayed);
    assert_eq!(again.effect, first.effect);
    assert_eq!(store.audit("acme").unwrap().len(), audit_len);
    let err = store
        .write("acme", &who, &raise(11, Some("k1")), false)
        .unwrap_err();
    assert_eq!(err, BackendError::KeyReused("k1".into()));
    assert_eq!(store.snapshot("acme").unwrap().allocations[0].dedicated, 10);
}

fn a_stale_expected_version_is_refused_and_writes_nothing(kind: Kind) {
    let (_place, store) = seeded(kind);
    let who = Principal::local();
    let mut w = raise(10, None);
    w.expected_version = Some(7);
    let seeded_version = store.snapshot("acme").unwrap().allocations[0].version;
    w.expected_version = Some(seeded_version + 1);
    let err = store.write("acme", &who, &w, false).unwrap_err();
    assert_eq!(
        err,
        BackendError::Stale {
            expected: seeded_version + 1,
            actual: seeded_version
        }
    );
    w.expected_version = Some(seeded_version);
    let ok = store.write("acme", &who, &w, false).unwrap();
    assert!(ok.allocation.unwrap().version > seeded_version);
}

fn a_dry_run_answers_without_writing(kind: Kind) {
    let (_place, store) = seeded(kind);
    let before = (
        store.snapshot("acme").unwrap(),
        store.audit("acme").unwrap(),
    );
    let answer = store
        .write("acme", &Principal::local(), &raise(10, Some("k")), true)
        .unwrap();
    assert_eq!(
        (answer.effect.from, answer.effect.to, answer.pool.free),
        (5, 10, 190)
    );
    assert_eq!(
        (
            store.snapshot("acme").unwrap(),
            store.audit("acme").unwrap()
        ),
        before
    );
}

#[test]
fn reopening_a_migrated_file_keeps_its_data() {
    let (place, store) = seeded(Kind::Embedded);
    store
        .write("acme", &Principal::local(), &raise(9, None), false)
        .unwrap();
    drop(store);
    let store = place.open_existing();
    assert_eq!(store.snapshot("acme").unwrap().allocations[0].dedicated, 9);
}

fn idempotency_keys_are_kept_a_day_then_forgotten(kind: Kind) {
    let place = Place::new(kind);
    let store = place.open();
    let fixture: licensor::backend::Fixture = serde_yaml::from_str(
        "{account: acme, products: [{name: TestOps, total: 10}], organizations: [{id: a}]}",
    )
    .unwrap();
    store.seed(&Principal::local(), &fixture).unwrap();
    let write = AllocationWrite {
        organization: "a".into(),
        product: "TestOps".into(),
        target: Target::Count(2),
        managed_by: None,
        deletion_policy: Default::default(),
        expiry: None,
        allow_user_displacement: false,
        expected_version: None,
        idempotency_key: Some("k".into()),
    };
    store
        .write("acme", &Principal::local(), &write, false)
        .unwrap();
    assert_eq!(
        store
            .expire_idempotency_keys(chrono::TimeDelta::hours(24))
            .unwrap(),
        0
    );
    assert!(
        store
            .write("acme", &Principal::local(), &write, false)
            .unwrap()
            .replayed
    );
    std::thread::sleep(std::time::Duration::from_millis(5));
    assert_eq!(
        store
            .expire_idempotency_keys(chrono::TimeDelta::zero())
            .unwrap(),
        1
    );
}

fn observing_one_allocation_reads_its_pool_organization_and_row(kind: Kind) {
    let place = Place::new(kind);
    let store = place.open();
    let fixture: licensor::backend::Fixture = serde_yaml::from_str(
        "{account: acme, products: [{name: TestOps, total: 10, sharedInUse: 1}],
          organizations: [{id: a, allocations: [{product: TestOps, dedicated: 3, inUse: 2}]}, {id: b}]}",
    )
    .unwrap();
    store.seed(&Principal::local(), &fixture).unwrap();
    let seen = store.observe("acme", "a", "TestOps").unwrap();
    assert_eq!(seen.pools.len(), 1);
    assert_eq!(
        (
            seen.pools[0].total,
            seen.pools[0].dedicated,
            seen.pools[0].shared_in_use
        ),
        (10, 3, 1)
    );
    assert_eq!(seen.organizations, ["a"]);
    assert_eq!(
        (seen.allocations[0].dedicated, seen.allocations[0].in_use),
        (3, 2)
    );
    assert_eq!(
        seen.allocations[0],
        store.snapshot("acme").unwrap().allocations[0],
        "observe reads the same row, version included"
    );
    let none = store.observe("acme", "b", "TestOps").unwrap();
    assert_eq!((none.organizations.len(), none.allocations.len()), (1, 0));
    let ghost = store.observe("acme", "ghost", "Nope").unwrap();
    assert!(
        ghost.pools.is_empty() && ghost.organizations.is_empty() && ghost.allocations.is_empty()
    );
    // Another account's rows are not seen.
    assert!(
        store
            .observe("other", "a", "TestOps")
            .unwrap()
            .pools
            .is_empty()
    );
}

/// The write-ahead log is copied into the database file while the store
/// is open (by its checkpoint thread, not by a commit), and starts again
/// once copied: the file grows with what is written, the log does not
/// grow without end.
#[test]
fn the_log_is_copied_into_the_file_while_the_store_is_open() {
    let (place, store) = seeded(Kind::Embedded);
    let dir = place.dir.path();
    let (file, log) = (dir.join("l.db"), dir.join("l.db-wal"));
    let len = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.len());
    std::thread::sleep(std::time::Duration::from_millis(600));
    let before = len(&file);
    let who = Principal::local();
    for i in 0..2000 {
        store
            .write("acme", &who, &raise(6 + i % 50, None), false)
            .unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while len(&file) <= before {
        assert!(
            std::time::Instant::now() < deadline,
            "the file stayed at {before} bytes; the log is {} bytes",
            len(&log)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Written again after a checkpoint, the log starts from its beginning.
    let grown = len(&log);
    std::thread::sleep(std::time::Duration::from_millis(600));
    for _ in 0..5 {
        store.write("acme", &who, &raise(5, None), false).unwrap();
        store.write("acme", &who, &raise(6, None), false).unwrap();
    }
    assert_eq!(len(&log), grown, "the log did not grow past its size");
    assert_eq!(store.audit("acme").unwrap().len(), 2011);
}

/// Two handles on one store, as two processes have: one writes as fast as
/// it can while the other reads snapshots. Each snapshot is one read
/// transaction, so its pools always agree with its allocations.
fn snapshots_read_one_moment_while_another_handle_writes(kind: Kind) {
    let place = Place::new(kind);
    let writer = place.open();
    let orgs: String = (0..4).map(|i| format!("  - id: org-{i}\n")).collect();
    let fixture: Fixture = serde_yaml::from_str(&format!(
        "account: acme\nproducts: [{{name: TestOps, total: 2000}}]\norganizations:\n{orgs}"
    ))
    .unwrap();
    writer.seed(&Principal::local(), &fixture).unwrap();
    let reader = place.open_existing();
    let done = std::sync::atomic::AtomicBool::new(false);
    let (reads, torn) = std::thread::scope(|s| {
        s.spawn(|| {
            for i in 0..1500i64 {
                let w = AllocationWrite {
                    organization: format!("org-{}", i % 4),
                    target: Target::Count(i % 97 + 1),
                    ..raise(0, None)
                };
                writer
                    .write("acme", &Principal::local(), &w, false)
                    .unwrap();
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        let (mut reads, mut torn) = (0, 0);
        while !done.load(std::sync::atomic::Ordering::SeqCst) {
            let snapshot = reader.snapshot("acme").unwrap();
            let sum: i64 = snapshot.allocations.iter().map(|a| a.dedicated).sum();
            reads += 1;
            torn += usize::from(snapshot.pools[0].dedicated != sum);
        }
        (reads, torn)
    });
    assert!(reads >= 100, "only {reads} reads raced the writer");
    assert_eq!(torn, 0, "{torn} of {reads} snapshots tore");
}

/// A store written before deletion policies were kept migrates on open:
/// its managed allocations keep Revoke, what they were written with, and
/// nothing else moves.
#[test]
fn a_store_from_before_deletion_policies_migrates_with_revoke() {
    use licensor::backend::store::sqlite::schema::MIGRATIONS;
    use licensor::domain::DeletionPolicy;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    let before = MIGRATIONS
        .iter()
        .position(|m| *m == licensor::backend::store::migrations::DELETION_POLICY)
        .unwrap();
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        for sql in &MIGRATIONS[..before] {
            c.execute_batch(sql).unwrap();
        }
        c.execute_batch(&format!(
            "PRAGMA user_version = {before};
             INSERT INTO accounts (id, revision) VALUES ('acme', 3);
             INSERT INTO products (account, name, total, dedicated, revision) VALUES ('acme', 'TestOps', 200, 5, 2);
             INSERT INTO organizations (account, id) VALUES ('acme', 'qa-team');
             INSERT INTO allocations (account, organization, product, dedicated, in_use, managed_by, version)
                 VALUES ('acme', 'qa-team', 'TestOps', 5, 4, 'default/licenses/qa', 3);"
        ))
        .unwrap();
    }
    let store = Store::open_existing(&path).unwrap();
    let a = &store.snapshot("acme").unwrap().allocations[0];
    assert_eq!(
        (a.dedicated, a.in_use, a.managed_by.as_deref(), a.version),
        (5, 4, Some("default/licenses/qa"), 3)
    );
    assert_eq!(a.deletion_policy, DeletionPolicy::Revoke);
    // Its manager can now say Orphan; the count stays and a new version is
    // handed out.
    let w = AllocationWrite {
        target: Target::Count(5),
        deletion_policy: DeletionPolicy::Orphan,
        expiry: None,
        ..raise(5, None)
    };
    let written = store.write("acme", &Principal::local(), &w, false).unwrap();
    let a = written.allocation.unwrap();
    assert_eq!(
        (a.dedicated, a.deletion_policy),
        (5, DeletionPolicy::Orphan)
    );
    assert!(a.version > 3);
    let user_version: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(user_version as usize, MIGRATIONS.len());
}

/// A role in the store that this licensor does not know is a damaged store:
/// the token and the session that carry it are refused as unavailable,
/// never taken for some role.
#[test]
fn a_stored_role_this_licensor_does_not_know_is_a_damaged_store() {
    use licensor::domain::Role;
    let (place, store) = seeded(Kind::Embedded);
    let token = store
        .create_token("acme", Role::Viewer, "ci", None, "local")
        .unwrap();
    let (cookie, _) = store
        .open_session(&token, chrono::TimeDelta::hours(1), None, None)
        .unwrap();
    assert_eq!(
        store.authenticate("acme", &token).unwrap().role,
        Role::Viewer
    );
    let raw = rusqlite::Connection::open(place.dir.path().join("l.db")).unwrap();
    raw.execute_batch("UPDATE tokens SET role = 'Root'; UPDATE sessions SET role = 'Root';")
        .unwrap();
    for err in [
        store.authenticate("acme", &token).unwrap_err(),
        store.session(&cookie).unwrap_err(),
    ] {
        assert!(
            matches!(&err, BackendError::Unavailable(m) if m.contains("unknown role \"Root\"")),
            "{err:?}"
        );
    }
}

/// Tokens with a lifecycle (DESIGN §10): a name unique in its account, an
/// expiry, the last use noted; revoking or expiring one refuses it at once
/// and ends the page sessions opened with it; signing in again ends the
/// browser's previous session; each step audited, naming the token.
fn tokens_expire_are_revoked_and_end_their_sessions(kind: Kind) {
    use licensor::api::AuditAction;
    use licensor::backend::store::TokenError;
    use licensor::domain::Role;
    use std::time::Duration;
    let (_place, store) = seeded(kind);
    let hour = chrono::TimeDelta::hours(1);
    let audit_before = store.audit("acme").unwrap().len();
    let ci = store
        .create_token("acme", Role::Viewer, "ci", None, "local")
        .unwrap();
    let admin = store
        .create_token(
            "acme",
            Role::AccountAdmin,
            "alice",
            Some(Duration::from_secs(3600)),
            "local",
        )
        .unwrap();
    let brief = store
        .create_token(
            "acme",
            Role::Viewer,
            "brief",
            Some(Duration::from_millis(700)),
            "local",
        )
        .unwrap();

    // A name is unique in its account; the refused create writes nothing.
    let listed = store.list_tokens("acme").unwrap();
    let err = store
        .create_token("acme", Role::AccountAdmin, "ci", None, "local")
        .unwrap_err();
    assert!(matches!(err, TokenError::NameTaken { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("a token named \"ci\" exists in account acme"),
        "{err}"
    );
    assert_eq!(store.list_tokens("acme").unwrap(), listed);
    let names: Vec<&str> = listed.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["alice", "brief", "ci"]);
    assert!(listed[0].expires.is_some() && listed[2].expires.is_none());
    assert!(listed.iter().all(|t| t.last_used.is_none()));

    // Used: the last use is noted, once.
    assert_eq!(store.authenticate("acme", &ci).unwrap().actor, "token:ci");
    assert!(store.authenticate("other", &ci).is_err(), "another account");
    let used = store.list_tokens("acme").unwrap();
    assert!(
        used.iter()
            .find(|t| t.name == "ci")
            .unwrap()
            .last_used
            .is_some()
    );

    // Signing in again ends the browser's previous session.
    let (first, _) = store.open_session(&admin, hour, None, None).unwrap();
    let (second, _) = store
        .open_session(&admin, hour, Some(&first), None)
        .unwrap();
    assert!(store.session(&first).unwrap().is_none());
    assert!(store.session(&second).unwrap().is_some());

    // Revoked: refused at once, its sessions end, a second revoke is told.
    let (viewer, _) = store.open_session(&ci, hour, None, None).unwrap();
    assert!(store.session(&viewer).unwrap().is_some());
    store.revoke_token("acme", "ci", "local").unwrap();
    let err = store.authenticate("acme", &ci).unwrap_err();
    assert!(matches!(err, BackendError::Unauthorized(_)), "{err:?}");
    assert!(store.session(&viewer).unwrap().is_none());
    assert!(store.open_session(&ci, hour, None, None).is_err());
    let err = store.revoke_token("acme", "ci", "local").unwrap_err();
    assert!(matches!(err, TokenError::NoSuchToken { .. }), "{err:?}");
    assert!(
        store.session(&second).unwrap().is_some(),
        "another token's session"
    );

    // Expired: refused at once, its session ends, then removed and audited.
    let (brief_session, _) = store.open_session(&brief, hour, None, None).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let err = store.authenticate("acme", &brief).unwrap_err();
    assert!(err.to_string().contains("the token expired at"), "{err}");
    assert!(store.session(&brief_session).unwrap().is_none());
    let names: Vec<String> = store
        .list_tokens("acme")
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["alice"]);
    assert_eq!(store.expire_tokens().unwrap(), 0, "removed once");

    let audit = store.audit("acme").unwrap();
    let tokens: Vec<(AuditAction, &str, Option<&str>)> = audit[audit_before..]
        .iter()
        .map(|e| (e.action, e.actor.as_str(), e.subject.as_deref()))
        .collect();
    assert_eq!(
        tokens,
        [
            (AuditAction::TokenCreate, "local", Some("ci (Viewer)")),
            (
                AuditAction::TokenCreate,
                "local",
                Some("alice (AccountAdmin)")
            ),
            (AuditAction::TokenCreate, "local", Some("brief (Viewer)")),
            (AuditAction::TokenRevoke, "local", Some("ci (Viewer)")),
            (AuditAction::TokenExpire, "licensor", Some("brief (Viewer)")),
        ]
    );
}

/// A server checks a request's token without reading the store while the
/// store has not changed since it found the token good (SQLite says when a
/// file changed, by any process; PostgreSQL cannot, so there it is read
/// every time). Any commit, here another handle's write or revoke, sends
/// the next check to the store, so a revoked token is refused at once; a
/// token found good is still only good for its own account.
fn a_token_found_good_is_read_again_once_the_store_changes(kind: Kind) {
    use licensor::domain::Role;
    let (place, server) = seeded(kind);
    let token = server
        .create_token("acme", Role::Viewer, "ci", None, "local")
        .unwrap();
    let actor = |checked: Result<(Principal, bool), BackendError>| checked.unwrap().0.actor;
    // The first check finds its use due to be noted; once noted, the token
    // is found good (and, on SQLite, kept as such).
    let (who, due) = server.check_token("acme", &token).unwrap();
    assert!(due && who.actor == "token:ci");
    server.note_token_use(&token);
    for _ in 0..3 {
        assert_eq!(
            server.check_token("acme", &token).unwrap(),
            (who.clone(), false)
        );
    }
    let err = server.check_token("other", &token).unwrap_err();
    assert!(matches!(err, BackendError::Unauthorized(_)), "{err:?}");
    assert!(server.check_token("acme", "lsr_unknown").is_err());

    // Another process writes something else: still good.
    let elsewhere = place.open_existing();
    elsewhere
        .create_token("acme", Role::Viewer, "dashboard", None, "local")
        .unwrap();
    assert_eq!(actor(server.check_token("acme", &token)), "token:ci");
    assert_eq!(actor(server.check_token("acme", &token)), "token:ci");

    // Revoked by another process: refused at the next check, and after.
    elsewhere.revoke_token("acme", "ci", "local").unwrap();
    for _ in 0..2 {
        let err = server.check_token("acme", &token).unwrap_err();
        assert!(matches!(err, BackendError::Unauthorized(_)), "{err:?}");
    }
}
