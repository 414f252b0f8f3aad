//! Every rule of DESIGN §1 through the CLI, with the documented numbers,
//! asserting exit codes, JSON output and backend state. One table of cases,
//! every backend: each case runs on the embedded store, through `licensor
//! serve` over HTTP on loopback, and on a real PostgreSQL server over TLS,
//! with the same expectations.

mod common;

use common::{Account, DOCUMENTED, Kind, change, only_change};

fn documented_scenario_raise_lower_and_revoke(kind: Kind) {
    let acct = Account::seeded_on(kind, DOCUMENTED);
    assert_eq!(acct.pool("TestOps"), (200, 5, 0, 195));

    // Raise 5 -> 10 takes 5 of the remaining 195.
    let m = acct.license("qa", "qa-team", "TestOps", 10, "");
    let run = acct.apply(&m);
    assert_eq!(run.code, 0, "{run:?}");
    let c = only_change(&run.json()).clone();
    assert_eq!(
        (c["action"].as_str(), c["outcome"].as_str()),
        (Some("increase"), Some("applied"))
    );
    assert_eq!((c["from"].as_i64(), c["to"].as_i64()), (Some(5), Some(10)));
    assert_eq!(acct.allocation("qa-team", "TestOps"), Some((10, 4)));
    assert_eq!(acct.pool("TestOps"), (200, 10, 0, 190));

    // Lower 10 -> 3 with 4 in use is refused, and nothing changes.
    let m = acct.license("qa", "qa-team", "TestOps", 3, "");
    acct.assert_refused(&m, "BelowInUse", "4 seats are in use");
    assert_eq!(acct.allocation("qa-team", "TestOps"), Some((10, 4)));

    // Lower to 4 (= in use) works and frees 6.
    let m = acct.license("qa", "qa-team", "TestOps", 4, "");
    assert_eq!(acct.apply(&m).code, 0);
    assert_eq!(acct.pool("TestOps"), (200, 4, 0, 196));

    // 0 revokes everything and rehomes the 4 in-use seats to the pool.
    let m = acct.license("qa", "qa-team", "TestOps", 0, "");
    let run = acct.apply(&m);
    assert_eq!(run.code, 0, "{run:?}");
    let c = only_change(&run.json()).clone();
    assert_eq!(c["action"], "revoke");
    assert_eq!(
        (c["rehomed"].as_i64(), c["displaced"].as_i64()),
        (Some(4), Some(0))
    );
    assert_eq!(acct.allocation("qa-team", "TestOps"), Some((0, 0)));
    assert_eq!(acct.pool("TestOps"), (200, 0, 4, 196));

    // R11: each change is in the audit log with its numbers and manager.
    let audit = acct.audit();
    let revoke = audit.last().unwrap();
    assert_eq!(revoke["action"], "revoke");
    assert_eq!(
        (revoke["from"].as_i64(), revoke["to"].as_i64()),
        (Some(4), Some(0))
    );
    assert_eq!(revoke["rehomed"], 4);
    assert_eq!(revoke["displaced"], 0);
    assert_eq!(revoke["organization"], "qa-team");
    assert_eq!(revoke["product"], "TestOps");
    assert_eq!(revoke["manager"], "default/licenses/qa");
    // Over HTTP the actor is the token's name, never the token.
    let actor = match kind {
        Kind::Embedded | Kind::Postgres => "local",
        Kind::Http => "token:ci",
    };
    assert_eq!(revoke["actor"], actor);
    assert!(
        revoke["idempotencyKey"]
            .as_str()
            .is_some_and(|k| !k.is_empty())
    );
    assert!(revoke["time"].as_str().is_some_and(|t| t.starts_with("20")));
    let actions: Vec<_> = audit
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    // Over HTTP the account's token was made for the run: audited too.
    let expected: &[&str] = match kind {
        Kind::Http => &["seed", "token-create", "increase", "decrease", "revoke"],
        Kind::Embedded | Kind::Postgres => &["seed", "increase", "decrease", "revoke"],
    };
    assert_eq!(actions, expected);
}

fn over_committed_pool_refuses_increases_allows_decreases_and_guards_displacement(kind: Kind) {
    let acct = Account::seeded_on(kind, DOCUMENTED);
    let m = acct.license("qa", "qa-team", "TestOps", 5, "");
    assert_eq!(acct.apply(&m).code, 0);

    // A contract shrink below what is handed out (R9).
    let run = acct.run(&["backend", "total", "--product", "TestOps", "--total", "3"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("OverCommitted"), "{}", run.stdout);
    assert_eq!(acct.pool("TestOps"), (3, 5, 0, -2));
    let plan = acct.run(&["plan", "-f", m.to_str().unwrap()]);
    assert!(plan.stdout.contains("OverCommitted"), "{}", plan.stdout);

    let m = acct.license("qa", "qa-team", "TestOps", 6, "");
    acct.assert_refused(&m, "InsufficientPool", "only -2 are free");

    let m = acct.license("qa", "qa-team", "TestOps", 4, "");
    assert_eq!(acct.apply(&m).code, 0);
    assert_eq!(acct.pool("TestOps"), (3, 4, 0, -1));

    // free -1 + dedicated 4 = room for 3 of the 4 users: 1 would be displaced.
    let m = acct.license("qa", "qa-team", "TestOps", 0, "");
    acct.assert_refused(&m, "WouldDisplaceUsers", "1 of its 4 users");

    let m = acct.license(
        "qa",
        "qa-team",
        "TestOps",
        0,
        "  allowUserDisplacement: true\n",
    );
    let run = acct.apply(&m);
    assert_eq!(run.code, 0, "{run:?}");
    let c = only_change(&run.json()).clone();
    assert_eq!(
        (c["rehomed"].as_i64(), c["displaced"].as_i64()),
        (Some(3), Some(1))
    );
    assert_eq!(acct.pool("TestOps"), (3, 0, 3, 0));
}

fn only_the_account_admin_may_write(kind: Kind) {
    let mut acct = Account::seeded_on(kind, DOCUMENTED);
    let viewer = acct.token("Viewer", "auditor");
    let admin = acct.token("AccountAdmin", "ci-admin");
    let m = acct.license("qa", "qa-team", "TestOps", 10, "");

    acct.set_token(&viewer);
    let before = acct.rows();
    let run = acct.apply(&m);
    assert_eq!(run.code, 1);
    assert_eq!(only_change(&run.json())["reason"], "Forbidden");
    assert!(!run.stdout.contains(&viewer) && !run.stderr.contains(&viewer));
    assert_eq!(acct.rows(), before);
    // Reading is allowed.
    assert_eq!(acct.allocation("qa-team", "TestOps"), Some((5, 4)));

    acct.set_token("lsr_not-a-token");
    let run = acct.apply(&m);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("unauthorized") || run.stdout.contains("Forbidden"),
        "{run:?}"
    );
    assert_eq!(acct.rows(), before);

    acct.set_token(&admin);
    assert_eq!(acct.apply(&m).code, 0);
    let last = acct.audit().last().unwrap().clone();
    assert_eq!(last["actor"], "token:ci-admin");
    assert!(!acct.rows().contains(&admin), "tokens are stored hashed");
}

fn unknown_product_and_unknown_organization_are_refused(kind: Kind) {
    let acct = Account::seeded_on(kind, DOCUMENTED);
    let before = acct.rows();
    for (org, product, reason, hint) in [
        ("qa-team", "Studio", "UnknownProduct", ""),
        (
            "qa-team",
            "testops",
            "UnknownProduct",
            r#"did you mean "TestOps"?"#,
        ),
        ("ghost-team", "TestOps", "UnknownOrganization", ""),
        (
            "qa-teem",
            "TestOps",
            "UnknownOrganization",
            r#"did you mean "qa-team"?"#,
        ),
    ] {
        let m = acct.license("x", org, product, 1, "");
        let plan = acct.plan(&m);
        assert_eq!(plan.code, 1, "{plan:?}");
        let c = only_change(&plan.json()).clone();
        assert_eq!(c["reason"], reason);
        let message = c["message"].as_str().unwrap();
        assert_eq!(
            message.contains("did you mean"),
            !hint.is_empty(),
            "{message}"
        );
        assert!(message.contains(hint), "{hint:?} not in {message:?}");
        let run = acct.apply(&m);
        assert_eq!(run.code, 1);
        assert_eq!(only_change(&run.json())["reason"], reason);
    }
    assert_eq!(acct.rows(), before);
    // A wrong account is a mistake to fix, named as such, not an outage.
    if kind == Kind::Embedded {
        let m = acct.license("x", "qa-team", "TestOps", 6, "");
        for command in ["plan", "apply", "status"] {
            let mut args = vec!["--account", "acmee", command];
            if command != "status" {
                args.extend(["-f", m.to_str().unwrap()]);
            }
            let run = acct.run(&args);
            assert_eq!(run.code, 1, "{run:?}");
            assert!(
                run.stderr.contains("UnknownAccount")
                    && run.stderr.contains(r#"did you mean "acme"?"#)
                    && !run.stderr.contains("unavailable"),
                "{command}: {}",
                run.stderr
            );
        }
        assert_eq!(acct.rows(), before);
    }
}

fn a_second_manager_is_a_conflict_naming_the_owner(kind: Kind) {
    let acct = Account::seeded_on(kind, DOCUMENTED);
    let first = acct.license("qa", "qa-team", "TestOps", 6, "");
    assert_eq!(acct.apply(&first).code, 0);
    std::fs::remove_file(&first).unwrap();

    let second = acct.license("qa-again", "qa-team", "TestOps", 7, "");
    acct.assert_refused(&second, "Conflict", "managed by default/licenses/qa");

    let before = acct.rows();
    // The same manifest from another instance is another manager too.
    let first = acct.license("qa", "qa-team", "TestOps", 7, "");
    let run = acct.run(&[
        "--instance",
        "staging",
        "apply",
        "-f",
        first.to_str().unwrap(),
        "-o",
        "json",
    ]);
    assert_eq!(run.code, 1);
    assert_eq!(only_change(&run.json())["reason"], "Conflict");
    assert_eq!(acct.rows(), before);
}

fn concurrent_applies_never_over_commit_the_pool(kind: Kind) {
    let orgs: String = (0..10).map(|i| format!("  - id: org-{i}\n")).collect();
    let acct = Account::seeded_on(
        kind,
        &format!(
            "account: acme\nproducts:\n  - {{name: TestOps, total: 35}}\norganizations:\n{orgs}"
        ),
    );
    let files: Vec<_> = (0..10)
        .map(|i| acct.license(&format!("l{i}"), &format!("org-{i}"), "TestOps", 10, ""))
        .collect();
    let runs: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = files.iter().map(|f| s.spawn(|| acct.apply(f))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = runs.iter().filter(|r| r.code == 0).count();
    assert_eq!(ok, 3, "exactly 3 x 10 seats fit in 35");
    for r in runs.iter().filter(|r| r.code != 0) {
        assert_eq!(
            only_change(&r.json())["reason"],
            "InsufficientPool",
            "{r:?}"
        );
    }
    assert_eq!(acct.pool("TestOps"), (35, 30, 0, 5));
}

/// `status` (a snapshot: pools, organizations, allocations) read while
/// eight processes apply: every read sees one moment, so each pool's
/// dedicated count is the sum of its allocations.
fn readers_racing_writers_never_see_pools_that_disagree_with_the_allocations(kind: Kind) {
    let orgs: String = (0..8).map(|i| format!("  - id: org-{i}\n")).collect();
    let acct = Account::seeded_on(
        kind,
        &format!(
            "account: acme\nproducts:\n  - {{name: TestOps, total: 2000}}\norganizations:\n{orgs}"
        ),
    );
    let writing = std::sync::atomic::AtomicUsize::new(8);
    let (reads, torn) = std::thread::scope(|s| {
        for w in 0..8 {
            let (acct, writing) = (&acct, &writing);
            s.spawn(move || {
                let dir = acct.path(&format!("writer-{w}"));
                for i in 0..12 {
                    let count = (i * 37 + w * 11) % 120 + 1;
                    std::fs::create_dir_all(&dir).unwrap();
                    let file = dir.join("license.yaml");
                    std::fs::write(
                        &file,
                        common::license_yaml(
                            &format!("l{w}"),
                            &format!("org-{w}"),
                            "TestOps",
                            count as i64,
                            "",
                        ),
                    )
                    .unwrap();
                    let run = acct.apply(&file);
                    assert_eq!(run.code, 0, "{run:?}");
                }
                writing.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
        let mut reads = 0;
        let mut torn = Vec::new();
        while writing.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            let run = acct.run(&["status", "-o", "json"]);
            assert_eq!(run.code, 0, "{run:?}");
            let status = run.json();
            let pool = status["pools"][0]["dedicated"].as_i64().unwrap();
            let sum: i64 = status["allocations"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a["dedicated"].as_i64().unwrap())
                .sum();
            reads += 1;
            if pool != sum {
                torn.push(format!("pool dedicated {pool} != sum of allocations {sum}"));
            }
        }
        (reads, torn)
    });
    assert!(reads >= 5, "only {reads} reads raced the writers");
    assert!(
        torn.is_empty(),
        "{} of {reads} reads tore: {torn:?}",
        torn.len()
    );
}

fn moving_seats_between_organizations_in_a_full_pool_applies_cleanly(kind: Kind) {
    let acct = Account::seeded_on(
        kind,
        "account: acme
products: [{name: TestOps, total: 20}]
organizations:
  - {id: a, allocations: [{product: TestOps, dedicated: 15, inUse: 2}]}
  - {id: b, allocations: [{product: TestOps, dedicated: 5}]}
",
    );
    acct.license("b", "b", "TestOps", 15, "");
    acct.license("a", "a", "TestOps", 5, "");
    let dir = acct.path("manifests");
    let plan = acct.plan(&dir);
    assert_eq!(plan.code, 2, "{plan:?}");
    let run = acct.apply(&dir);
    assert_eq!(run.code, 0, "{run:?}");
    let order: Vec<_> = run.json()["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["action"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(order, ["decrease", "increase"]);
    assert_eq!(acct.allocation("a", "TestOps"), Some((5, 2)));
    assert_eq!(acct.allocation("b", "TestOps"), Some((15, 0)));
    assert_eq!(acct.pool("TestOps"), (20, 20, 0, 0));
}

fn one_refusal_does_not_stop_the_other_resources(kind: Kind) {
    let acct = Account::seeded_on(kind, DOCUMENTED);
    acct.license("qa", "qa-team", "TestOps", 2, "");
    acct.license("dev", "dev-team", "TestOps", 50, "");
    let run = acct.apply(&acct.path("manifests"));
    assert_eq!(run.code, 1);
    let doc = run.json();
    let outcomes: Vec<_> = doc["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["resource"].as_str().unwrap().to_string(),
                c["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        outcomes.contains(&("licenses/qa".into(), "refused".into())),
        "{outcomes:?}"
    );
    assert!(
        outcomes.contains(&("licenses/dev".into(), "applied".into())),
        "{outcomes:?}"
    );
    assert_eq!(acct.allocation("dev-team", "TestOps"), Some((50, 0)));
}

fn prune_revokes_allocations_no_manifest_names_any_more(kind: Kind) {
    let acct = Account::seeded_on(kind, DOCUMENTED);
    let qa = acct.license("qa", "qa-team", "TestOps", 5, "");
    acct.license("dev", "dev-team", "TestOps", 7, "");
    assert_eq!(acct.apply(&acct.path("manifests")).code, 0);
    std::fs::remove_file(acct.path("manifests/dev.yaml")).unwrap();

    // Without --prune, an allocation that lost its manifest stays.
    assert_eq!(acct.plan(&qa).code, 0);
    let run = acct.run(&["plan", "--prune", "-f", qa.to_str().unwrap(), "-o", "json"]);
    assert_eq!(run.code, 2, "{run:?}");
    let doc = run.json();
    assert_eq!(change(&doc, "licenses/dev")["action"], "revoke");
    assert_eq!(change(&doc, "licenses/qa")["outcome"], "unchanged");
    let run = acct.run(&["apply", "--prune", "-f", qa.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(acct.allocation("dev-team", "TestOps"), None);
    assert_eq!(acct.allocation("qa-team", "TestOps"), Some((5, 4)));
}

/// `--prune` does what deleting the object would: an allocation whose
/// manifest said `deletionPolicy: Orphan` is orphaned (ownership released,
/// the count stays), as the operator would, and the plan says `orphan`.
fn prune_orphans_what_the_operator_would_orphan(kind: Kind) {
    let acct = Account::seeded_on(kind, DOCUMENTED);
    let qa = acct.license("qa", "qa-team", "TestOps", 5, "");
    acct.license(
        "dev",
        "dev-team",
        "TestOps",
        7,
        "  deletionPolicy: Orphan\n",
    );
    assert_eq!(acct.apply(&acct.path("manifests")).code, 0);
    let policy_of = |org: &str| {
        acct.status()["allocations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["organization"] == org)
            .map(|a| a["deletionPolicy"].clone())
    };
    assert_eq!(policy_of("dev-team"), Some("Orphan".into()));
    assert_eq!(policy_of("qa-team"), Some("Revoke".into()));

    // The policy changes on its own: a change to apply, with no count moved.
    acct.license("qa", "qa-team", "TestOps", 5, "  deletionPolicy: Orphan\n");
    let run = acct.run(&["plan", "-f", qa.to_str().unwrap(), "-o", "json"]);
    assert_eq!(run.code, 2, "{run:?}");
    let c = only_change(&run.json()).clone();
    assert_eq!((c["from"].as_i64(), c["to"].as_i64()), (Some(5), Some(5)));
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .contains("deletionPolicy Revoke -> Orphan"),
        "{c}"
    );
    assert_eq!(acct.apply(&qa).code, 0);
    assert_eq!(policy_of("qa-team"), Some("Orphan".into()));
    assert_eq!(acct.plan(&qa).code, 0, "in sync afterwards");
    acct.license("qa", "qa-team", "TestOps", 5, "");
    assert_eq!(acct.apply(&qa).code, 0);
    assert_eq!(policy_of("qa-team"), Some("Revoke".into()));

    std::fs::remove_file(acct.path("manifests/dev.yaml")).unwrap();
    let run = acct.run(&["plan", "--prune", "-f", qa.to_str().unwrap(), "-o", "json"]);
    assert_eq!(run.code, 2, "{run:?}");
    let doc = run.json();
    let dev = change(&doc, "licenses/dev");
    assert_eq!(
        (dev["action"].as_str(), dev["outcome"].as_str()),
        (Some("orphan"), Some("planned")),
        "{dev}"
    );
    assert_eq!(
        (dev["from"].as_i64(), dev["to"].as_i64()),
        (Some(7), Some(7))
    );
    let text = acct.run(&["plan", "--prune", "-f", qa.to_str().unwrap()]);
    assert!(
        text.stdout.contains("orphan: releases ownership (deletionPolicy: Orphan); the 7 TestOps seats stay with dev-team"),
        "{text:?}"
    );
    assert!(text.stdout.contains("+managedBy: (unmanaged)"), "{text:?}");
    let pool_before = acct.pool("TestOps");
    let run = acct.run(&["apply", "--prune", "-f", qa.to_str().unwrap(), "-o", "json"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(change(&run.json(), "licenses/dev")["outcome"], "applied");
    assert_eq!(acct.allocation("dev-team", "TestOps"), Some((7, 0)));
    assert_eq!(policy_of("dev-team"), Some(serde_json::Value::Null));
    assert_eq!(acct.pool("TestOps"), pool_before, "no seat moved");
    let audit = acct.audit();
    assert_eq!(audit.last().unwrap()["action"], "orphan");
    // Released, it is no longer this instance's: nothing left to prune.
    let run = acct.run(&["plan", "--prune", "-f", qa.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{run:?}");
}

fn seats_claims_respect_the_dedicated_count(kind: Kind) {
    let acct = Account::seeded_on(kind, DOCUMENTED);
    let seats = |verb: &str, org: &str, n: &str| {
        acct.run(&[
            "backend",
            verb,
            "--org",
            org,
            "--product",
            "TestOps",
            "--count",
            n,
        ])
    };
    let run = seats("claim", "qa-team", "1");
    assert_eq!(run.code, 0, "{run:?}");
    let before = acct.rows();
    let run = seats("claim", "qa-team", "1");
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("InsufficientPool"), "{run:?}");
    assert_eq!(acct.rows(), before);
    let run = seats("release", "qa-team", "5");
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(acct.allocation("qa-team", "TestOps"), Some((5, 0)));
    // An organization without an allocation claims from the shared pool.
    let run = seats("claim", "dev-team", "3");
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(acct.pool("TestOps"), (200, 5, 3, 192));
}

/// Write identity (DESIGN §6): an allocation pruned and then declared again
/// is a new intent, written again; so is one declared again after a
/// re-seed. Neither is answered as a replay of the first create.
fn a_new_intent_after_a_prune_or_a_reseed_is_written_not_replayed(kind: Kind) {
    let acct = Account::seeded_on(kind, DOCUMENTED);
    let dev = acct.license("dev", "dev-team", "TestOps", 3, "");
    let qa_dir = acct.path("qa-only");
    std::fs::create_dir_all(&qa_dir).unwrap();
    std::fs::write(
        qa_dir.join("qa.yaml"),
        common::license_yaml("qa", "qa-team", "TestOps", 5, ""),
    )
    .unwrap();
    let applied_once = |what: &str| {
        let run = acct.apply(&dev);
        assert_eq!(run.code, 0, "{what}: {run:?}");
        let c = only_change(&run.json()).clone();
        assert_eq!(
            (c["action"].as_str(), c["outcome"].as_str()),
            (Some("create"), Some("applied")),
            "{what}: {c}"
        );
        assert!(
            !c["message"].as_str().unwrap().contains("replayed"),
            "{what}: a new intent was answered as a replay: {c}"
        );
        assert_eq!(
            acct.allocation("dev-team", "TestOps"),
            Some((3, 0)),
            "{what}"
        );
        assert_eq!(acct.plan(&dev).code, 0, "{what}: nothing left to change");
    };
    applied_once("first create");

    let run = acct.run(&["apply", "--prune", "-f", qa_dir.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(acct.allocation("dev-team", "TestOps"), None);
    applied_once("the same manifest after a prune");

    let fixture = acct.path("account.yaml");
    let run = acct.run_local(&["backend", "seed", "-f", fixture.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(acct.allocation("dev-team", "TestOps"), None);
    applied_once("the same manifest after a re-seed");
    let creates = acct
        .audit()
        .iter()
        .filter(|e| e["action"] == "create" && e["organization"] == "dev-team")
        .count();
    assert_eq!(creates, 3, "three intents, three creates");
}

/// The repository's own LicenseAccount and Namespace documents decide, as
/// the cluster would, which namespace may ask for what: a pull request
/// shows the refusal (Forbidden, UnknownAccount) and apply writes nothing
/// for it, while the allowed manifests are written.
fn tenants_in_the_repository_refuse_what_the_cluster_would(kind: Kind) {
    let acct = Account::seeded_on(
        kind,
        "
account: acme
products:
  - {name: TestOps, total: 200}
  - {name: Studio, total: 20}
organizations:
  - id: qa-team
  - id: qa-perf
  - id: dev-team
",
    );
    acct.write(
        "repo/accounts.yaml",
        "apiVersion: licensor.dev/v1alpha1
kind: LicenseAccount
metadata: {name: default}
spec:
  tenants:
    - namespaces: [qa]
      organizations: [qa-*]
      maxCount: 10
    - namespaceSelector: {matchLabels: {team: dev}}
      organizations: [dev-team]
---
apiVersion: licensor.dev/v1alpha1
kind: LicenseAccount
metadata: {name: beta}
spec:
  backend: {url: 'https://licenses.example.com'}
---
apiVersion: v1
kind: Namespace
metadata: {name: dev-ns, labels: {team: dev}}
",
    );
    let doc = |name: &str, namespace: &str, org: &str, count: i64, extra: &str| {
        format!(
            "---\napiVersion: licensor.dev/v1alpha1\nkind: DedicatedLicense\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {{organization: {org}, product: TestOps, count: {count}{extra}}}\n"
        )
    };
    let manifests = [
        doc("qa", "qa", "qa-team", 5, ""),
        doc("steal", "qa", "dev-team", 1, "").replace("TestOps", "Studio"),
        doc("big", "qa", "qa-perf", 11, ""),
        doc("dev", "dev-ns", "dev-team", 7, ""),
        doc("typo", "qa", "qa-perf", 1, ", accountRef: gamma"),
        doc("other", "qa", "qa-team", 1, ", accountRef: beta"),
    ]
    .concat();
    acct.write("repo/licenses.yaml", &manifests);
    let repo = acct.path("repo");
    let run = acct.run(&["apply", "-f", repo.to_str().unwrap(), "-o", "json"]);
    assert_eq!(run.code, 1, "{run:?}");
    let out = run.json();
    let by_resource = |resource: &str| {
        out["changes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["resource"] == resource)
            .cloned()
    };
    for (resource, outcome) in [("qa/qa", "applied"), ("dev-ns/dev", "applied")] {
        assert_eq!(by_resource(resource).unwrap()["outcome"], outcome, "{out}");
    }
    for (resource, reason, fragment) in [
        (
            "qa/steal",
            "Forbidden",
            "namespace qa may not manage 1 Studio licenses for organization dev-team on account default: its tenant entries allow organizations qa-*; count up to 10",
        ),
        ("qa/big", "Forbidden", "count up to 10"),
        (
            "qa/typo",
            "UnknownAccount",
            "there is no LicenseAccount gamma",
        ),
    ] {
        let change = by_resource(resource).unwrap();
        assert_eq!(
            (change["outcome"].as_str(), change["reason"].as_str()),
            (Some("refused"), Some(reason)),
            "{change}"
        );
        assert!(
            change["message"].as_str().unwrap().contains(fragment),
            "{change}"
        );
    }
    assert!(
        by_resource("qa/other").is_none(),
        "beta's manifest is beta's run"
    );
    assert!(
        run.stderr
            .contains("qa/other is for LicenseAccount beta, planned with --account-ref beta"),
        "{}",
        run.stderr
    );
    assert_eq!(acct.allocation("qa-team", "TestOps"), Some((5, 0)));
    assert_eq!(acct.allocation("dev-team", "TestOps"), Some((7, 0)));
    assert_eq!(
        acct.allocation("qa-perf", "TestOps"),
        None,
        "nothing written for a refusal"
    );
}

/// A LicenseAccount whose tenants cannot be read is an error with its file
/// and line, and nothing is planned or written.
fn malformed_tenants_are_an_error_with_file_and_line(kind: Kind) {
    let acct = Account::seeded_on(kind, DOCUMENTED);
    acct.write(
        "repo/accounts.yaml",
        "apiVersion: licensor.dev/v1alpha1\nkind: LicenseAccount\nmetadata: {name: default}\nspec:\n  tenants:\n    - namespaces: [qa]\n      organizations: ['qa-?']\n",
    );
    acct.license("qa", "qa-team", "TestOps", 6, "");
    let run = acct.run(&[
        "apply",
        "-f",
        acct.path("repo").to_str().unwrap(),
        "-f",
        acct.path("manifests").to_str().unwrap(),
    ]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains(
            "accounts.yaml:5: spec.tenants[0]: organization pattern \"qa-?\" is not a glob"
        ),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("nothing was changed"), "{}", run.stderr);
    assert_eq!(acct.allocation("qa-team", "TestOps"), Some((5, 4)));
}

// Each case on every backend: `embedded::<case>`, `http::<case>` and
// `postgres::<case>`.
on_every_store!(
    [embedded, http, postgres]
    documented_scenario_raise_lower_and_revoke,
    over_committed_pool_refuses_increases_allows_decreases_and_guards_displacement,
    only_the_account_admin_may_write,
    unknown_product_and_unknown_organization_are_refused,
    a_second_manager_is_a_conflict_naming_the_owner,
    concurrent_applies_never_over_commit_the_pool,
    readers_racing_writers_never_see_pools_that_disagree_with_the_allocations,
    moving_seats_between_organizations_in_a_full_pool_applies_cleanly,
    one_refusal_does_not_stop_the_other_resources,
    prune_revokes_allocations_no_manifest_names_any_more,
    prune_orphans_what_the_operator_would_orphan,
    seats_claims_respect_the_dedicated_count,
    a_new_intent_after_a_prune_or_a_reseed_is_written_not_replayed,
    tenants_in_the_repository_refuse_what_the_cluster_would,
    malformed_tenants_are_an_error_with_file_and_line,
);
