//! The operator end to end: a real kube-apiserver and etcd, the `licensor
//! operator` binary against an embedded store, driven with `kubectl apply` and
//! `kubectl delete` as a user would, asserting on status, events and the
//! backend afterwards.

mod common;
mod controlplane;

use std::time::{Duration, Instant};

use common::{Account, Kind, license_yaml};
use controlplane::{ControlPlane, Operator, free_port, wait_for, webhook_certificate};
use serde_json::Value;

const ACCOUNT: &str = "
account: acme
products:
  - {name: TestOps, total: 200}
  - {name: Studio, total: 10}
  - {name: Runtime, total: 10}
organizations:
  - id: qa-team
    allocations:
      - {product: TestOps, dedicated: 5, inUse: 4}
  - id: dev-team
    allocations:
      - {product: Studio, dedicated: 8}
  - id: web-team
  - id: ops-team
    allocations:
      - {product: Runtime, dedicated: 6, inUse: 5}
";

const SOON: Duration = Duration::from_secs(30);

/// A control plane with the `licenses` namespace, a seeded account and an
/// operator for it.
struct Cluster {
    cp: ControlPlane,
    account: Account,
    operator: Operator,
}

impl Cluster {
    fn start(fixture: &str, flags: &[&str]) -> Cluster {
        let cp = ControlPlane::start();
        cp.ok(&["create", "namespace", "licenses"]);
        let account = Account::seeded(fixture);
        let operator = Operator::start(&cp, "main", &account.backend, flags);
        Cluster {
            cp,
            account,
            operator,
        }
    }

    fn license(&self, name: &str, org: &str, product: &str, count: i64, extra: &str) {
        self.cp
            .apply(&license_yaml(name, org, product, count, extra));
    }

    fn object(&self, name: &str) -> Value {
        self.cp.json(&["get", "dl", name, "-n", "licenses"])
    }

    /// Waits until the object's Ready condition has `status` and `reason`
    /// for its current generation, and returns the object.
    fn wait(&self, name: &str, status: &str, reason: &str) -> Value {
        let what = format!("{name} Ready={status} reason={reason}");
        let mut last = Value::Null;
        let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_for(&what, SOON, || {
                let o = self.object(name);
                last = o.clone();
                let c = condition(&o, "Ready")?;
                let current = o["status"]["observedGeneration"] == o["metadata"]["generation"];
                (current && c["status"] == status && c["reason"] == reason).then_some(o)
            })
        }));
        found.unwrap_or_else(|_| {
            panic!(
                "{what}: last seen {:#}\noperator log:\n{}",
                last["status"],
                tail(&self.operator.logs())
            )
        })
    }

    /// Reasons of the events about one object, oldest first.
    fn events(&self, name: &str) -> Vec<(String, String, String)> {
        let list = self.cp.json(&[
            "get",
            "events.events.k8s.io",
            "-n",
            "licenses",
            "--field-selector",
            &format!("regarding.name={name}"),
        ]);
        let mut items: Vec<Value> = list["items"].as_array().cloned().unwrap_or_default();
        items.sort_by_key(|e| e["eventTime"].as_str().unwrap_or_default().to_string());
        items
            .iter()
            .map(|e| {
                (
                    e["type"].as_str().unwrap_or_default().to_string(),
                    e["reason"].as_str().unwrap_or_default().to_string(),
                    e["note"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    fn has_event(&self, name: &str, kind: &str, reason: &str) -> bool {
        self.events(name)
            .iter()
            .any(|(t, r, _)| t == kind && r == reason)
    }

    fn wait_event(&self, name: &str, kind: &str, reason: &str) {
        wait_for(&format!("{kind} event {reason} on {name}"), SOON, || {
            self.has_event(name, kind, reason).then_some(())
        });
    }
}

fn condition<'a>(o: &'a Value, kind: &str) -> Option<&'a Value> {
    o["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
}

fn message(o: &Value) -> String {
    condition(o, "Ready").map_or_else(String::new, |c| {
        c["message"].as_str().unwrap_or_default().to_string()
    })
}

/// Asserts that the Ready message contains `fragment`.
fn says(o: &Value, fragment: impl AsRef<str>) {
    let m = message(o);
    assert!(
        m.contains(fragment.as_ref()),
        "{:?} not in {m:?}",
        fragment.as_ref()
    );
}

fn diff(o: &Value) -> &str {
    o["status"]["diff"].as_str().unwrap_or_default()
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[test]
fn the_documented_scenario_and_every_refusal_show_in_status() {
    // A long resync: everything below must happen because of watch events
    // and wake-ups, not because of the periodic pass.
    let c = Cluster::start(ACCOUNT, &["--leader-elect=false", "--resync=10m"]);

    // 5 -> 10 takes 5 of the 195 free seats.
    c.license("qa", "qa-team", "TestOps", 10, "");
    let r = c.cp.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "dl/qa",
        "-n",
        "licenses",
        "--timeout=30s",
    ]);
    assert_eq!(
        r.code,
        0,
        "kubectl wait: {r:?}\n{}",
        tail(&c.operator.logs())
    );
    let o = c.wait("qa", "True", "Reconciled");
    assert_eq!(o["status"]["allocated"], 10);
    assert_eq!(o["status"]["inUse"], 4);
    assert_eq!(o["status"]["pool"]["free"], 190);
    says(&o, "qa-team holds 10 TestOps licenses (4 in use)");
    assert_eq!(c.account.allocation("qa-team", "TestOps"), Some((10, 4)));
    c.wait_event("qa", "Normal", "Adopted");
    c.wait_event("qa", "Normal", "Increased");
    let row =
        c.cp.ok(&["get", "dl", "qa", "-n", "licenses", "--no-headers"]);
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cols[..8],
        [
            "qa",
            "qa-team",
            "TestOps",
            "10",
            "10",
            "4",
            "True",
            "Reconciled"
        ],
        "{row}"
    );

    // 10 -> 3 is below the 4 seats in use: stalled, the backend keeps 10.
    c.license("qa", "qa-team", "TestOps", 3, "");
    let o = c.wait("qa", "False", "BelowInUse");
    let stalled = condition(&o, "Stalled").expect("Stalled condition");
    assert_eq!(
        (&stalled["status"], &stalled["reason"]),
        (&"True".into(), &"BelowInUse".into())
    );
    assert!(
        condition(&o, "Reconciling").is_none(),
        "never both Stalled and Reconciling"
    );
    assert!(
        message(&o).contains('4'),
        "says how many are in use: {}",
        message(&o)
    );
    assert_eq!(o["status"]["failures"][0]["reason"], "BelowInUse");
    // The real `kubectl wait`: Ready is not coming (a health gate times
    // out), and waiting for Stalled says at once that a person must act.
    let wait = |condition: &str| {
        c.cp.kubectl(&[
            "wait",
            &format!("--for=condition={condition}"),
            "dl/qa",
            "-n",
            "licenses",
            "--timeout=2s",
        ])
    };
    let r = wait("Ready");
    assert_ne!(r.code, 0, "a stalled object is never Ready: {r:?}");
    let r = wait("Stalled");
    assert_eq!(r.code, 0, "kubectl wait --for=condition=Stalled: {r:?}");
    assert!(diff(&o).contains("+dedicated: 3"), "{}", diff(&o));
    assert_eq!(c.account.allocation("qa-team", "TestOps"), Some((10, 4)));
    c.wait_event("qa", "Warning", "BelowInUse");

    // 4 is allowed.
    c.license("qa", "qa-team", "TestOps", 4, "");
    let o = c.wait("qa", "True", "Reconciled");
    assert!(condition(&o, "Stalled").is_none());
    assert_eq!(o["status"]["failures"], Value::Array(vec![]));
    assert_eq!(c.account.allocation("qa-team", "TestOps"), Some((4, 4)));
    c.wait_event("qa", "Normal", "Decreased");

    // 0 revokes all, the 4 in-use seats move to the account pool.
    c.license("qa", "qa-team", "TestOps", 0, "");
    let o = c.wait("qa", "True", "Reconciled");
    let last = &o["status"]["lastChange"];
    assert_eq!(
        (last["from"].as_i64(), last["to"].as_i64()),
        (Some(4), Some(0))
    );
    assert_eq!(
        (last["rehomed"].as_i64(), last["displaced"].as_i64()),
        (Some(4), Some(0))
    );
    let diff = o["status"]["diff"].as_str().unwrap();
    assert!(
        diff.contains("-dedicated: 4") && diff.contains("+dedicated: 0"),
        "{diff}"
    );
    assert_eq!(c.account.pool("TestOps"), (200, 0, 4, 196));
    c.wait_event("qa", "Normal", "Revoked");

    // InsufficientPool stalls, and turns Ready as soon as another object
    // frees seats of the same product (the resync is 10 minutes away).
    c.license("dev", "dev-team", "Studio", 8, "");
    c.wait("dev", "True", "Reconciled");
    c.license("web", "web-team", "Studio", 5, "");
    let o = c.wait("web", "False", "InsufficientPool");
    says(&o, "only 2 are free");
    c.wait_event("web", "Warning", "InsufficientPool");
    c.license("dev", "dev-team", "Studio", 3, "");
    c.wait("dev", "True", "Reconciled");
    let freed = Instant::now();
    c.wait("web", "True", "Reconciled");
    assert!(
        freed.elapsed() < Duration::from_secs(5),
        "woke after {:?}",
        freed.elapsed()
    );
    assert_eq!(c.account.pool("Studio"), (10, 8, 0, 2));

    // Seats freed outside the cluster wake a stalled object too, within
    // seconds (the operator reads the account every --pool-poll, 5s,
    // while objects wait), with no annotation and no resync: a CLI of
    // another instance takes the last 2 seats, web asks for 3 more and
    // stalls; a raised total frees 1 (still too few: the status says so);
    // the CLI then gives its 2 back, and web is Ready.
    let elsewhere = c.account.write(
        "elsewhere/ops.yaml",
        &license_yaml("ops-studio", "ops-team", "Studio", 2, ""),
    );
    let cli = |file: &std::path::Path| {
        c.account
            .run(&["--instance", "ci", "apply", "-f", file.to_str().unwrap()])
    };
    assert_eq!(cli(&elsewhere).code, 0);
    c.license("web", "web-team", "Studio", 8, "");
    let o = c.wait("web", "False", "InsufficientPool");
    assert_eq!(o["status"]["pool"]["free"], 0, "{o}");
    let raise = c
        .account
        .run(&["backend", "total", "--product", "Studio", "--total", "11"]);
    assert_eq!(raise.code, 0, "{raise:?}");
    let raised = Instant::now();
    wait_for("web sees the raised total", Duration::from_secs(15), || {
        (c.object("web")["status"]["pool"]["free"] == 1).then_some(())
    });
    assert!(
        raised.elapsed() < Duration::from_secs(12),
        "woke after {:?}",
        raised.elapsed()
    );
    c.wait("web", "False", "InsufficientPool");
    let elsewhere = c.account.write(
        "elsewhere/ops.yaml",
        &license_yaml("ops-studio", "ops-team", "Studio", 0, ""),
    );
    assert_eq!(cli(&elsewhere).code, 0);
    let freed = Instant::now();
    c.wait("web", "True", "Reconciled");
    assert!(
        freed.elapsed() < Duration::from_secs(12),
        "woke after {:?}",
        freed.elapsed()
    );
    assert_eq!(c.account.pool("Studio"), (11, 11, 0, 0));
    assert_eq!(
        c.account
            .run(&["backend", "total", "--product", "Studio", "--total", "10"])
            .code,
        0
    );
    c.license("web", "web-team", "Studio", 5, "");
    let o = c.wait("web", "True", "Reconciled");
    assert_eq!(o["status"]["pool"]["free"], 2, "{o}");
    assert_eq!(c.account.pool("Studio"), (10, 8, 0, 2));

    // An over-committed pool: the revoke would leave 2 users without a
    // license, so it needs allowUserDisplacement.
    c.license("ops", "ops-team", "Runtime", 6, "");
    c.wait("ops", "True", "Reconciled");
    assert_eq!(
        c.account
            .run(&["backend", "total", "--product", "Runtime", "--total", "3"])
            .code,
        0
    );
    c.license("ops", "ops-team", "Runtime", 0, "");
    let o = c.wait("ops", "False", "WouldDisplaceUsers");
    says(&o, "would leave 2 of its 5 users without a license");
    assert_eq!(c.account.allocation("ops-team", "Runtime"), Some((6, 5)));
    c.license(
        "ops",
        "ops-team",
        "Runtime",
        0,
        "  allowUserDisplacement: true\n",
    );
    let o = c.wait("ops", "True", "Reconciled");
    assert_eq!(o["status"]["lastChange"]["rehomed"], 3);
    assert_eq!(o["status"]["lastChange"]["displaced"], 2);

    // Two objects for one organization and product: the second names the first.
    c.license("qa-again", "qa-team", "TestOps", 2, "");
    let o = c.wait("qa-again", "False", "Conflict");
    says(&o, "default/licenses/qa");

    // An organization the account does not have.
    c.license("ghost", "ghost-team", "TestOps", 1, "");
    let o = c.wait("ghost", "False", "UnknownOrganization");
    says(&o, "ghost-team");
    assert_eq!(c.account.allocation("ghost-team", "TestOps"), None);

    let metrics = c.operator.get("/metrics").expect("/metrics");
    for line in [
        "licensor_pool_free{account=\"default\",product=\"Studio\"} 2",
        "licensor_allocation_dedicated{namespace=\"licenses\",name=\"dev\",account=\"default\",organization=\"dev-team\",product=\"Studio\"} 3",
        "licensor_reconcile_errors_total{reason=\"UnknownOrganization\"}",
        // What the alerts read: each stalled object, with its reason.
        "licensor_object_stalled{namespace=\"licenses\",name=\"ghost\",account=\"default\",organization=\"ghost-team\",product=\"TestOps\",reason=\"UnknownOrganization\"} 1",
        "licensor_object_stalled{namespace=\"licenses\",name=\"qa-again\",account=\"default\",organization=\"qa-team\",product=\"TestOps\",reason=\"Conflict\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
    let stalled = metrics
        .lines()
        .filter(|l| l.starts_with("licensor_object_stalled{"))
        .count();
    assert_eq!(stalled, 2, "only the stalled objects: {metrics}");
    assert!(
        c.operator
            .get("/readyz")
            .is_some_and(|b| b.contains("leading"))
    );
}

/// Runs SQL on the account's file, as the license platform's own UI would
/// change it behind licensor's back.
fn out_of_band(account: &Account, sql: &str) {
    let conn = rusqlite::Connection::open(account.db()).unwrap();
    conn.execute_batch(sql).unwrap();
}

#[test]
fn deletion_revokes_or_orphans_and_waits_out_an_unavailable_backend() {
    let fixture = "
account: acme
products: [{name: TestOps, total: 20}]
organizations: [{id: a}, {id: b}, {id: c}]
";
    let c = Cluster::start(
        fixture,
        &[
            "--leader-elect=false",
            "--backoff=500ms",
            "--max-backoff=2s",
            "--log-format=json",
        ],
    );
    c.license("kept", "a", "TestOps", 3, "  deletionPolicy: Orphan\n");
    c.license("gone", "b", "TestOps", 4, "");
    c.license("late", "c", "TestOps", 5, "");
    for name in ["kept", "gone", "late"] {
        let o = c.wait(name, "True", "Reconciled");
        assert_eq!(o["metadata"]["finalizers"][0], "licensor.dev/cleanup");
    }
    assert_eq!(c.account.pool("TestOps"), (20, 12, 0, 8));
    // The store keeps each object's deletion policy with its allocation,
    // so the CLI's --prune does what deleting the object does.
    let policies: Vec<_> = c.account.status()["allocations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["organization"].clone(), a["deletionPolicy"].clone()))
        .collect();
    assert_eq!(
        policies,
        [("a", "Orphan"), ("b", "Revoke"), ("c", "Revoke")].map(|(o, p)| (o.into(), p.into()))
    );

    // Orphan leaves the licenses with the organization, unmanaged.
    c.cp.ok(&["delete", "dl", "kept", "-n", "licenses", "--timeout=30s"]);
    assert_eq!(c.account.allocation("a", "TestOps"), Some((3, 0)));
    let owner = &c.account.status()["allocations"][0]["managedBy"];
    assert!(owner.is_null(), "ownership released: {owner}");
    c.wait_event("kept", "Normal", "Orphaned");

    // Revoke gives them back to the pool.
    c.cp.ok(&["delete", "dl", "gone", "-n", "licenses", "--timeout=30s"]);
    assert_eq!(c.account.allocation("b", "TestOps"), None);
    assert_eq!(c.account.pool("TestOps"), (20, 8, 0, 12));
    c.wait_event("gone", "Normal", "Revoked");

    // The store is locked by someone else: the revoke cannot be written, the
    // object stays with a status that says why, and nothing is lost.
    let lock = rusqlite::Connection::open(c.account.db()).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    c.cp.ok(&["delete", "dl", "late", "-n", "licenses", "--wait=false"]);
    let o = c.wait("late", "False", "BackendUnavailable");
    let reconciling = condition(&o, "Reconciling").expect("Reconciling while retrying");
    assert_eq!(reconciling["status"], "True");
    assert!(condition(&o, "Stalled").is_none());
    says(&o, "database is locked");
    assert!(o["metadata"]["deletionTimestamp"].is_string());
    c.wait_event("late", "Warning", "BackendUnavailable");
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);
    wait_for("the late revoke", SOON, || {
        let r = c.cp.kubectl(&["get", "dl", "late", "-n", "licenses"]);
        (r.code != 0 && r.stderr.contains("NotFound")).then_some(())
    });
    assert_eq!(c.account.allocation("c", "TestOps"), None);
    assert_eq!(c.account.pool("TestOps"), (20, 3, 0, 17));
    let revokes = c
        .account
        .audit()
        .iter()
        .filter(|e| e["organization"] == "c" && e["action"] == "revoke")
        .count();
    assert_eq!(revokes, 1);

    // --log-format=json: every line is a JSON object.
    let logs = c.operator.logs();
    for line in logs.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
    assert!(logs.contains("BackendUnavailable"), "the retry is logged");
}

/// Write identity on the real control plane (DESIGN §6): an object deleted
/// and created again under the same name is a new intent, and so is the
/// same object after a prune elsewhere revoked its allocation; both are
/// written, never "replayed". And nothing of nobody's wedges a deletion.
#[test]
fn a_recreated_object_is_a_new_intent_and_nothing_wedges_a_deletion() {
    let fixture = "
account: acme
products: [{name: TestOps, total: 20}, {name: Studio, total: 5}]
organizations:
  - {id: ops}
  - {id: spare, allocations: [{product: TestOps, dedicated: 4, inUse: 2}]}
";
    let c = Cluster::start(fixture, &["--leader-elect=false", "--resync=2s"]);
    let delete = |name: &str| {
        let started = Instant::now();
        c.cp.ok(&["delete", "dl", name, "-n", "licenses", "--timeout=30s"]);
        started.elapsed()
    };
    let converged = |count: i64, what: &str| {
        let o = c.wait("x", "True", "Reconciled");
        assert_eq!(
            c.account.allocation("ops", "TestOps"),
            Some((count, 0)),
            "{what}"
        );
        assert_eq!(o["status"]["allocated"], count, "{what}");
        says(&o, format!("ops holds {count} TestOps licenses"));
    };

    c.license("x", "ops", "TestOps", 3, "");
    converged(3, "first create");
    delete("x");
    assert_eq!(c.account.allocation("ops", "TestOps"), None);
    c.license("x", "ops", "TestOps", 3, "");
    converged(3, "re-created with the same count");
    delete("x");
    c.license("x", "ops", "TestOps", 2, "");
    converged(2, "re-created with another count");

    // A typo in the product never wrote anything: deleting it is immediate.
    c.license("typo", "ops", "studio", 1, "");
    let o = c.wait("typo", "False", "UnknownProduct");
    assert_eq!(condition(&o, "Stalled").unwrap()["status"], "True");
    says(&o, r#"did you mean "Studio"?"#);
    let rows = c.account.rows();
    assert!(delete("typo") < Duration::from_secs(10));
    // An object that never owned its allocation (stalled before adopting
    // the unmanaged one) has nothing to revoke either.
    c.license("greedy", "spare", "TestOps", 30, "");
    c.wait("greedy", "False", "InsufficientPool");
    assert!(delete("greedy") < Duration::from_secs(10));
    assert_eq!(c.account.allocation("spare", "TestOps"), Some((4, 2)));
    assert_eq!(
        c.account.rows(),
        rows,
        "deleting what was never written wrote something"
    );

    // A prune elsewhere revokes x; the next resync writes it again. (The
    // manifests elsewhere name only spare's allocation, which they adopt.)
    let other = c.account.write(
        "elsewhere/spare.yaml",
        &license_yaml("spare", "spare", "TestOps", 4, ""),
    );
    let run = c.account.run(&[
        "apply",
        "--prune",
        "-f",
        other.parent().unwrap().to_str().unwrap(),
    ]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(c.account.allocation("ops", "TestOps"), None, "pruned");
    wait_for("the resync writes x again", SOON, || {
        (c.account.allocation("ops", "TestOps") == Some((2, 0))).then_some(())
    });
    converged(2, "after a prune elsewhere");
    let creates = c
        .account
        .audit()
        .iter()
        .filter(|e| e["organization"] == "ops" && e["action"] == "create")
        .count();
    assert_eq!(creates, 4, "every intent written once");

    // A wrong --account is a mistake a person fixes (Stalled, naming the
    // closest account), not an outage retried forever.
    let mut c = c;
    c.operator.kill();
    c.operator = Operator::start(
        &c.cp,
        "typo",
        &c.account.backend,
        &["--leader-elect=false", "--account=acmee"],
    );
    c.license("wrong-account", "ops", "Studio", 1, "");
    let o = c.wait("wrong-account", "False", "UnknownAccount");
    assert_eq!(condition(&o, "Stalled").unwrap()["status"], "True");
    assert!(condition(&o, "Reconciling").is_none());
    says(&o, r#"did you mean "acme"?"#);
}

#[test]
fn pause_observe_and_drift_correction() {
    let fixture = "
account: acme
products: [{name: TestOps, total: 50}]
organizations:
  - {id: a}
  - id: b
    allocations: [{product: TestOps, dedicated: 7, inUse: 2}]
  - {id: c}
";
    let c = Cluster::start(fixture, &["--leader-elect=false", "--resync=2s"]);

    // Paused: nothing is written until the annotation goes.
    c.license("p", "a", "TestOps", 3, "");
    c.wait("p", "True", "Reconciled");
    c.cp.ok(&[
        "annotate",
        "dl",
        "p",
        "-n",
        "licenses",
        "licensor.dev/paused=true",
    ]);
    c.license("p", "a", "TestOps", 5, "");
    let o = c.wait("p", "False", "Paused");
    says(&o, "the spec asks for 5");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(c.account.allocation("a", "TestOps"), Some((3, 0)));
    c.cp.ok(&[
        "annotate",
        "dl",
        "p",
        "-n",
        "licenses",
        "licensor.dev/paused-",
    ]);
    c.wait("p", "True", "Reconciled");
    assert_eq!(c.account.allocation("a", "TestOps"), Some((5, 0)));

    // Observe reports and never writes or adopts.
    let audit_before = c.account.audit().len();
    c.license("w", "b", "TestOps", 7, "  managementPolicy: Observe\n");
    let o = c.wait("w", "True", "Observed");
    assert_eq!(o["status"]["inUse"], 2);
    assert!(
        o["metadata"]["finalizers"].is_null(),
        "Observe needs no finalizer"
    );
    c.license("w", "b", "TestOps", 9, "  managementPolicy: Observe\n");
    let o = c.wait("w", "False", "OutOfSync");
    assert!(diff(&o).contains("+dedicated: 9"), "{}", diff(&o));
    // A difference observed is for a person to act on: Stalled, so that
    // kstatus and Argo CD say so instead of waiting for Ready.
    let stalled = o["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Stalled")
        .cloned();
    assert_eq!(
        stalled.map(|c| (c["status"].clone(), c["reason"].clone())),
        Some((serde_json::json!("True"), serde_json::json!("OutOfSync")))
    );
    assert_eq!(c.account.allocation("b", "TestOps"), Some((7, 2)));
    assert!(
        c.account.status()["allocations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["organization"] == "b" && a["managedBy"].is_null())
    );
    c.cp.ok(&["delete", "dl", "w", "-n", "licenses", "--timeout=30s"]);
    assert_eq!(c.account.allocation("b", "TestOps"), Some((7, 2)));

    // Someone changes the allocation in the platform: the next resync puts
    // it back and says so.
    c.license("d", "c", "TestOps", 4, "");
    c.wait("d", "True", "Reconciled");
    out_of_band(
        &c.account,
        "UPDATE allocations SET dedicated = 9, version = version + 1 WHERE organization = 'c';
         UPDATE products SET dedicated = dedicated + 5 WHERE name = 'TestOps';",
    );
    c.wait_event("d", "Normal", "DriftCorrected");
    assert_eq!(c.account.allocation("c", "TestOps"), Some((4, 0)));
    let written: Vec<(String, String)> = c.account.audit()[audit_before..]
        .iter()
        .map(|e| {
            (
                e["organization"].as_str().unwrap().into(),
                e["action"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        written,
        [
            ("c".into(), "create".into()),
            ("c".into(), "decrease".into())
        ],
        "Observe wrote nothing; the drift was undone once"
    );

    // Idle and stuck objects are looked at every resync, but not written.
    c.wait("d", "True", "Reconciled");
    c.license("stuck", "c", "TestOps", 1000, "");
    c.wait("stuck", "False", "Conflict");
    let passes = |op: &Operator| -> f64 {
        let m = op.get("/metrics").unwrap_or_default();
        m.lines()
            .find(|l| l.starts_with("licensor_reconcile_duration_seconds_count"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    };
    let versions = || -> Vec<String> {
        ["p", "d", "stuck"]
            .iter()
            .map(|n| {
                c.object(n)["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    let (before, passes_before) = (versions(), passes(&c.operator));
    let status_before = c.object("d")["status"].clone();
    std::thread::sleep(Duration::from_millis(4500));
    assert_eq!(
        versions(),
        before,
        "an idle object was written: {status_before:#} -> {:#}",
        c.object("d")["status"]
    );
    assert!(
        passes(&c.operator) >= passes_before + 3.0,
        "the resyncs should have passed over each of the three objects"
    );
}

#[test]
fn a_sigkilled_operator_converges_on_restart_without_applying_twice() {
    let mut fixture =
        String::from("account: acme\nproducts: [{name: TestOps, total: 10000}]\norganizations:\n");
    let mut manifests = String::new();
    for i in 0..100 {
        fixture.push_str(&format!("  - {{id: org-{i:03}}}\n"));
        manifests.push_str(&license_yaml(
            &format!("l-{i:03}"),
            &format!("org-{i:03}"),
            "TestOps",
            1 + i % 7,
            "",
        ));
        manifests.push_str("---\n");
    }
    let mut c = Cluster::start(&fixture, &["--leader-elect=false", "--concurrency=1"]);
    c.cp.apply(&manifests);
    let creates = |a: &Account| a.audit().iter().filter(|e| e["action"] == "create").count();
    let at_kill = wait_for("some creates", SOON, || {
        let n = creates(&c.account);
        (n >= 20).then_some(n)
    });
    c.operator.kill();
    assert!(
        at_kill < 100,
        "the kill came after everything was done ({at_kill})"
    );
    let after_kill = creates(&c.account);

    c.operator = Operator::start(
        &c.cp,
        "restarted",
        &c.account.backend,
        &["--leader-elect=false"],
    );
    wait_for("all 100 Ready", Duration::from_secs(60), || {
        let list = c.cp.json(&["get", "dl", "-n", "licenses"]);
        let ready = list["items"]
            .as_array()?
            .iter()
            .filter(|o| condition(o, "Ready").is_some_and(|r| r["status"] == "True"))
            .count();
        (ready == 100).then_some(())
    });
    let audit = c.account.audit();
    let mut orgs: Vec<&str> = audit
        .iter()
        .filter(|e| e["action"] == "create")
        .map(|e| e["organization"].as_str().unwrap())
        .collect();
    orgs.sort();
    let before = orgs.len();
    orgs.dedup();
    assert_eq!((before, orgs.len()), (100, 100), "each create exactly once");
    assert!(
        audit
            .iter()
            .all(|e| e["action"] == "create" || e["action"] == "seed"),
        "nothing but creates: {audit:#?}"
    );
    for i in [0, 42, 99] {
        assert_eq!(
            c.account.allocation(&format!("org-{i:03}"), "TestOps"),
            Some((1 + i % 7, 0))
        );
    }
    eprintln!("killed with {at_kill} (then {after_kill}) of 100 creates written");
}

// Two operator replicas on one store, the embedded file or a PostgreSQL
// database (real server, TLS): the leader is killed mid-way through a
// batch, the standby takes over, everything converges with each write
// applied once, no revoke is lost.
on_every_store!(a_standby_takes_over_and_nothing_is_applied_twice);

fn a_standby_takes_over_and_nothing_is_applied_twice(kind: Kind) {
    const BATCH: i64 = 60;
    let mut fixture = String::from(
        "account: acme\nproducts: [{name: TestOps, total: 200}]\norganizations: [{id: a}, {id: b}]\n",
    );
    for i in 0..BATCH {
        fixture.push_str(&format!("  - {{id: batch-{i}}}\n"));
    }
    let fixture = fixture.replace(
        "organizations: [{id: a}, {id: b}]\n",
        "organizations:\n  - {id: a}\n  - {id: b}\n",
    );
    let lease = [
        "--leader-elect=true",
        "--lease-duration=4s",
        "--lease-namespace=default",
    ];
    let cp = ControlPlane::start();
    cp.ok(&["create", "namespace", "licenses"]);
    let account = Account::seeded_on(kind, &fixture);
    let backend = account.backend_with_credentials();
    let with = |id: &'static str| [&lease[..], &["--identity", id]].concat();
    // The first leader works one object at a time, so it can be killed in
    // the middle of the batch below.
    let first_flags = [&with("first")[..], &["--concurrency=1"]].concat();
    let mut first = Operator::start(&cp, "first", &backend, &first_flags);
    wait_for("first leads", SOON, || {
        first.get("/readyz").filter(|b| b.contains("leading"))
    });
    let mut second = Operator::start(&cp, "second", &backend, &with("second"));
    std::thread::sleep(Duration::from_secs(2));
    assert!(second.get("/readyz").is_some_and(|b| b.contains("standby")));
    let holder = |cp: &ControlPlane| {
        cp.json(&["get", "lease", "licensor-operator", "-n", "default"])["spec"]["holderIdentity"]
            .clone()
    };
    assert_eq!(holder(&cp), "first");

    cp.apply(&license_yaml("one", "a", "TestOps", 2, ""));
    wait_for("one allocated by the leader", SOON, || {
        (account.allocation("a", "TestOps") == Some((2, 0))).then_some(())
    });
    wait_for("the leader's log of it", SOON, || {
        first.logs().contains("licenses/one").then_some(())
    });
    assert!(
        !second.logs().contains("licenses/one"),
        "the standby reconciled"
    );

    // A batch, and the leader killed while it works through it (large
    // enough that the kill lands in it: 60 passes take about 2 s).
    let batch: String = (0..BATCH)
        .map(|i| {
            format!(
                "{}---\n",
                license_yaml(
                    &format!("batch-{i}"),
                    &format!("batch-{i}"),
                    "TestOps",
                    1 + i % 3,
                    ""
                )
            )
        })
        .collect();
    cp.apply(&batch);
    let written = |account: &Account| {
        account.status()["allocations"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| {
                a["organization"]
                    .as_str()
                    .is_some_and(|o| o.starts_with("batch-"))
            })
            .count()
    };
    // The leader's log says what it has applied (cheap to read at once).
    wait_for("the leader into the batch", SOON, || {
        let logs = first.logs();
        let applied = (0..BATCH)
            .filter(|i| {
                logs.lines().any(|l| {
                    l.contains("create 0 -> ")
                        && (l.contains(&format!("licenses/batch-{i} "))
                            || l.contains(&format!("licenses/batch-{i}\"")))
                })
            })
            .count();
        (applied >= 2).then_some(())
    });
    first.kill();
    let killed = Instant::now();
    let at_kill = written(&account);
    assert!(
        (at_kill as i64) < BATCH,
        "the kill came after the whole batch ({at_kill})"
    );
    wait_for("second leads", Duration::from_secs(15), || {
        second.get("/readyz").filter(|b| b.contains("leading"))
    });
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(4 + 3), "takeover took {took:?}");
    assert_eq!(holder(&cp), "second");
    cp.apply(&license_yaml("two", "b", "TestOps", 3, ""));
    wait_for("two allocated by the new leader", SOON, || {
        (account.allocation("b", "TestOps") == Some((3, 0))).then_some(())
    });
    wait_for("the whole batch", SOON, || {
        (0..BATCH)
            .all(|i| account.allocation(&format!("batch-{i}"), "TestOps") == Some((1 + i % 3, 0)))
            .then_some(())
    });
    // No revoke lost: deleting a leader-era object revokes it, once.
    cp.ok(&["delete", "dl", "one", "-n", "licenses", "--timeout=30s"]);
    assert_eq!(account.allocation("a", "TestOps"), None);
    let audit = account.audit();
    let count = |org: &str, action: &str| {
        audit
            .iter()
            .filter(|e| e["organization"] == org && e["action"] == action)
            .count()
    };
    for i in 0..BATCH {
        assert_eq!(
            count(&format!("batch-{i}"), "create"),
            1,
            "batch-{i} applied once"
        );
    }
    assert_eq!((count("a", "create"), count("a", "revoke")), (1, 1));
    eprintln!("leader killed with {at_kill} of {BATCH} written; takeover after {took:?}");

    // SIGTERM: a clean stop hands the lease back.
    assert_eq!(second.terminate(), Some(0), "{}", tail(&second.logs()));
    let h = holder(&cp);
    assert!(h.is_null() || h == "", "lease released: {h}");
}

/// An account behind `licensor serve` (the remote backend): the account,
/// the server's port, and a file holding an admin token for `--token-file`.
/// Where an operator serves the admission webhooks: a free port, a
/// certificate from a CA of its own, and the flags that say so.
struct Webhooks {
    port: u16,
    ca: String,
    certs: std::path::PathBuf,
    flags: [String; 2],
}

impl Webhooks {
    fn new(cp: &ControlPlane) -> Webhooks {
        let certs = cp.dir.path().join("webhook-certs");
        let ca = webhook_certificate(&certs);
        let port = free_port();
        let flags = [
            format!("--webhook-listen=127.0.0.1:{port}"),
            format!("--webhook-cert-dir={}", certs.display()),
        ];
        Webhooks {
            port,
            ca,
            certs,
            flags,
        }
    }

    /// `flags` and the webhooks' own.
    fn with<'a>(&'a self, flags: &[&'a str]) -> Vec<&'a str> {
        [flags, &[self.flags[0].as_str(), self.flags[1].as_str()]].concat()
    }
}

fn remote_account(fixture: &str) -> (Account, u16, std::path::PathBuf) {
    let account = Account::seeded_on(Kind::Http, fixture);
    let port: u16 = account.backend.rsplit(':').next().unwrap().parse().unwrap();
    let token = account.path("token");
    std::fs::write(&token, account.var("LICENSOR_TOKEN")).unwrap();
    (account, port, token)
}

#[test]
fn a_remote_platform_that_is_down_shows_in_status_until_it_is_back() {
    let fixture = "
account: acme
products: [{name: TestOps, total: 20}]
organizations: [{id: a}]
";
    let cp = ControlPlane::start();
    cp.ok(&["create", "namespace", "licenses"]);
    let (mut account, port, token) = remote_account(fixture);
    account.server().unwrap().kill().unwrap();

    let token_flag = format!("--token-file={}", token.display());
    let operator = Operator::start(
        &cp,
        "remote",
        &account.backend,
        &[
            "--leader-elect=false",
            "--account=acme",
            &token_flag,
            "--backend-timeout=300ms",
            "--backoff=500ms",
            "--max-backoff=2s",
        ],
    );
    let c = Cluster {
        cp,
        account,
        operator,
    };
    c.license("remote", "a", "TestOps", 4, "");
    let o = c.wait("remote", "False", "BackendUnavailable");
    assert_eq!(condition(&o, "Reconciling").unwrap()["status"], "True");
    says(&o, format!("127.0.0.1:{port}"));
    c.wait_event("remote", "Warning", "BackendUnavailable");

    let mut c = c;
    c.account.serve_on(port, &[]);
    c.wait("remote", "True", "Reconciled");
    assert_eq!(c.account.allocation("a", "TestOps"), Some((4, 0)));
    let audit = c.account.audit();
    assert_eq!(audit.last().unwrap()["actor"], "token:ci");
}

/// Who wrote the finalizer list, by the object's managedFields: the field
/// managers whose entry owns `metadata.finalizers`.
fn finalizer_owners(o: &Value) -> Vec<String> {
    o["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| !m["fieldsV1"]["f:metadata"]["f:finalizers"].is_null())
        .map(|m| m["manager"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn the_webhook_adds_the_finalizer_at_creation_and_the_operator_does_without_it() {
    let fixture = "
account: acme
products: [{name: TestOps, total: 50}]
organizations: [{id: a}, {id: b}, {id: c}, {id: d}, {id: e}]
";
    let cp = ControlPlane::start();
    cp.ok(&["create", "namespace", "licenses"]);
    let account = Account::seeded(fixture);
    let webhooks = Webhooks::new(&cp);
    let (port, ca, certs) = (webhooks.port, &webhooks.ca, &webhooks.certs);
    let flags = webhooks.with(&["--leader-elect=false"]);
    let mut operator = Operator::start(&cp, "webhook", &account.backend, &flags);
    cp.register_webhook(port, ca);
    let create = |yaml: &str| -> Value {
        let r = cp.kubectl_stdin(&["create", "-f", "-", "-o", "json"], Some(yaml));
        assert_eq!(r.code, 0, "kubectl create: {r:?}");
        serde_json::from_str(&r.stdout).expect("created object")
    };
    // Whether admission adds the finalizer now, asked with a dry run.
    let dry_run = || {
        let r = cp.kubectl_stdin(
            &["create", "--dry-run=server", "-f", "-", "-o", "json"],
            Some(&license_yaml("probe", "a", "TestOps", 1, "")),
        );
        r.stdout.contains("licensor.dev/cleanup")
    };
    // The API server picks the configuration up from its own watch.
    wait_for("the webhook in the admission chain", SOON, || {
        dry_run().then_some(())
    });

    // The create's own answer carries the finalizer: admission added it, no
    // later write did (the operator owns no part of the list).
    let a = create(&license_yaml("a", "a", "TestOps", 3, ""));
    assert_eq!(
        a["metadata"]["finalizers"],
        serde_json::json!(["licensor.dev/cleanup"])
    );
    let paused = license_yaml("c", "c", "TestOps", 2, "").replace(
        "  namespace: licenses\n",
        "  namespace: licenses\n  annotations: {licensor.dev/paused: \"true\"}\n",
    );
    // Paused: its deletion waits for the release, as with the operator's.
    let c = create(&paused);
    assert_eq!(
        c["metadata"]["finalizers"],
        serde_json::json!(["licensor.dev/cleanup"])
    );
    let observe = "  managementPolicy: Observe\n";
    let b = create(&license_yaml("b", "b", "TestOps", 2, observe));
    assert!(b["metadata"]["finalizers"].is_null(), "{:#}", b["metadata"]);
    // The schema still speaks for a bad object.
    let r = cp.kubectl_stdin(
        &["create", "-f", "-"],
        Some(&license_yaml("bad", "d", "TestOps", -1, "")),
    );
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("spec.count"), "{}", r.stderr);

    let wait_ready = |name: &str| -> Value {
        wait_for(&format!("{name} Ready"), SOON, || {
            let o = cp.json(&["get", "dl", name, "-n", "licenses", "--show-managed-fields"]);
            let ready = condition(&o, "Ready").is_some_and(|c| c["status"] == "True");
            let current = o["status"]["observedGeneration"] == o["metadata"]["generation"];
            (ready && current).then_some(o)
        })
    };
    let a = wait_ready("a");
    assert_eq!(
        finalizer_owners(&a),
        Vec::<String>::new(),
        "{:#}",
        a["metadata"]
    );
    assert_eq!(account.allocation("a", "TestOps"), Some((3, 0)));

    // A GitOps tool applying with server-side apply, twice (the second with a
    // new count and still no finalizer in its manifest), keeps the finalizer.
    let ssa = |count: i64| {
        let r = cp.kubectl_stdin(
            &[
                "apply",
                "--server-side",
                "--field-manager=gitops",
                "-f",
                "-",
            ],
            Some(&license_yaml("d", "d", "TestOps", count, "")),
        );
        assert_eq!(r.code, 0, "{r:?}");
    };
    ssa(4);
    wait_ready("d");
    ssa(6);
    wait_for("d at 6", SOON, || {
        (account.allocation("d", "TestOps") == Some((6, 0))).then_some(())
    });
    let d = wait_ready("d");
    assert_eq!(
        d["metadata"]["finalizers"],
        serde_json::json!(["licensor.dev/cleanup"])
    );

    // The finalizer does its job: deletion revokes.
    cp.ok(&["delete", "dl", "a", "d", "-n", "licenses", "--timeout=30s"]);
    assert_eq!(account.allocation("a", "TestOps"), None);
    assert_eq!(account.allocation("d", "TestOps"), None);

    // Who added the finalizers, for whoever runs the operator: the webhook
    // (a, c, d and the refused one; dry runs are not counted), never the
    // operator.
    let metrics = operator.get("/metrics").expect("metrics");
    assert!(
        metrics.contains("licensor_finalizers_added_total{by=\"webhook\"} 4\n"),
        "{metrics}"
    );
    assert!(!metrics.contains("by=\"operator\""), "{metrics}");

    // The webhook is down (failurePolicy Ignore): creation still works, and
    // the operator, once back, writes the finalizer itself before the backend.
    operator.kill();
    let started = Instant::now();
    let e = create(&license_yaml("e", "e", "TestOps", 5, ""));
    assert!(e["metadata"]["finalizers"].is_null());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let mut operator = Operator::start(&cp, "webhook-again", &account.backend, &flags);
    let e = wait_ready("e");
    assert_eq!(
        e["metadata"]["finalizers"],
        serde_json::json!(["licensor.dev/cleanup"])
    );
    assert_eq!(finalizer_owners(&e), vec!["licensor-operator".to_string()]);
    assert_eq!(account.allocation("e", "TestOps"), Some((5, 0)));
    let metrics = operator.get("/metrics").expect("metrics");
    assert!(
        metrics.contains("licensor_finalizers_added_total{by=\"operator\"} 1\n"),
        "{metrics}"
    );

    // A renewed certificate from a new CA, trusted by the API server from
    // now on, is served without a restart.
    let ca = webhook_certificate(certs);
    cp.register_webhook(port, &ca);
    let deadline = Instant::now() + SOON;
    while !(dry_run() && operator.logs().contains("certificate reloaded")) {
        assert!(
            Instant::now() < deadline,
            "the renewed certificate is not served:\n{}",
            tail(&operator.logs())
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(500));
        assert!(dry_run(), "{}", tail(&operator.logs()));
    }

    // The API server keeps its connection to the webhook open; SIGTERM still
    // stops the operator promptly and cleanly.
    let started = Instant::now();
    assert_eq!(operator.terminate(), Some(0), "{}", tail(&operator.logs()));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

/// The validating webhook on the real API server, through `kubectl apply`:
/// warnings with the numbers for what depends on the moment, a refusal for
/// what can never succeed as written, the same on a server-side dry run
/// (which leaves nothing behind), an allowed apply with a warning when the
/// backend is down, and warnings only with `--admission warn`.
#[test]
fn kubectl_apply_warns_with_the_numbers_and_refuses_what_cannot_succeed() {
    // Studio is over-committed (20 dedicated of 10): revoking a's 5 would
    // leave its 4 users no seat to fall back on.
    let fixture = "
account: acme
products: [{name: TestOps, total: 20}, {name: Studio, total: 10}]
organizations:
  - id: a
    allocations:
      - {product: TestOps, dedicated: 5, inUse: 4}
      - {product: Studio, dedicated: 5, inUse: 4}
  - id: b
    allocations: [{product: Studio, dedicated: 15, inUse: 0}]
";
    let cp = ControlPlane::start();
    cp.ok(&["create", "namespace", "licenses"]);
    let (mut account, backend_port, token) = remote_account(fixture);
    let token_flag = format!("--token-file={}", token.display());
    let webhooks = Webhooks::new(&cp);
    let (port, ca) = (webhooks.port, &webhooks.ca);
    let flags = webhooks.with(&[
        "--leader-elect=false",
        "--account=acme",
        token_flag.as_str(),
        "--backend-timeout=300ms",
    ]);
    let mut operator = Operator::start(&cp, "admission", &account.backend, &flags);
    cp.register_webhook(port, ca);
    cp.register_validating_webhook(port, ca);
    let apply = |yaml: &str, extra: &[&str]| {
        cp.kubectl_stdin(&[&["apply", "-f", "-"][..], extra].concat(), Some(yaml))
    };
    let exists = |name: &str| cp.kubectl(&["get", "dl", name, "-n", "licenses"]).code == 0;
    let ghost = license_yaml("ghost", "nope", "TestOps", 1, "");
    wait_for(
        "the validating webhook in the admission chain",
        SOON,
        || (apply(&ghost, &["--dry-run=server"]).code != 0).then_some(()),
    );

    // Never as written: refused with the reason and the closest names;
    // nothing is created.
    let r = apply(&ghost, &[]);
    assert_ne!(r.code, 0, "{r:?}");
    assert!(
        r.stderr.contains("denied the request")
            && r.stderr.contains("UnknownOrganization")
            && r.stderr.contains("nope"),
        "{r:?}"
    );
    assert!(!exists("ghost"));
    let metrics = operator.get("/metrics").expect("metrics");
    for line in [
        "licensor_webhook_requests_total{webhook=\"validate\",result=\"denied\"} ",
        "licensor_webhook_requests_total{webhook=\"mutate\",result=\"allowed\"} ",
        "licensor_webhook_duration_seconds_count{webhook=\"validate\"} ",
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
    assert!(!metrics.contains("result=\"error\""), "{metrics}");
    // A body that is no AdmissionReview is an error, which the
    // LicensorWebhookErrors alert counts.
    let garbage = tokio::runtime::Runtime::new().unwrap().block_on(async {
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
            .build()
            .unwrap()
            .post(format!("https://127.0.0.1:{port}/validate"))
            .json(&serde_json::json!({"kind": "NotAReview"}))
            .send()
            .await
            .unwrap()
            .status()
    });
    assert!(garbage.is_client_error(), "{garbage}");
    let metrics = operator.get("/metrics").expect("metrics");
    assert!(
        metrics
            .contains("licensor_webhook_requests_total{webhook=\"validate\",result=\"error\"} 1\n"),
        "{metrics}"
    );

    // Beyond the pool: created, with a warning that has the numbers.
    let r = apply(&license_yaml("big", "b", "TestOps", 30, ""), &[]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stderr.contains("Warning: licensor: InsufficientPool") && r.stderr.contains("15"),
        "{r:?}"
    );
    assert!(exists("big"));
    wait_for("big stalled", SOON, || {
        let o = cp.json(&["get", "dl", "big", "-n", "licenses"]);
        let ready = o["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "Ready")?
            .clone();
        (ready["reason"] == "InsufficientPool").then_some(())
    });
    // An update that leaves the spec as it was is never judged.
    let r = cp.kubectl(&["label", "dl", "big", "-n", "licenses", "team=b"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(!r.stderr.contains("Warning"), "{r:?}");

    // A server-side dry run shows the same and writes nothing.
    let r = apply(
        &license_yaml("dry", "b", "TestOps", 40, ""),
        &["--dry-run=server"],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains("InsufficientPool"), "{r:?}");
    assert!(!exists("dry"));

    // An until that has passed, or comes within the margin (1h by
    // default), is allowed with a warning saying what the object asks for.
    let temporary = |until: &str| {
        apply(
            &license_yaml(
                "lent",
                "b",
                "TestOps",
                3,
                &format!("  until: {until}\n  thenCount: 1\n"),
            ),
            &["--dry-run=server"],
        )
    };
    let r = temporary("2020-01-01T00:00:00Z");
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stderr.contains(
            "Warning: licensor: until 2020-01-01T00:00:00Z has passed: this object asks for thenCount 1, not count 3"
        ),
        "{r:?}"
    );
    let at = |minutes| {
        (chrono::Utc::now() + chrono::TimeDelta::minutes(minutes))
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    };
    let soon = at(10);
    let r = temporary(&soon);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stderr
            .contains(&format!("Warning: licensor: until {soon} is in 9m "))
            && r.stderr.contains("sooner than 1h: count 3 becomes 1 then"),
        "{r:?}"
    );
    let r = temporary(&at(24 * 60));
    assert_eq!(r.code, 0, "{r:?}");
    assert!(!r.stderr.contains("Warning"), "{r:?}");
    assert!(!exists("lent"));

    // Another manager's allocation: refused, naming the owner.
    let r = apply(&license_yaml("a", "a", "TestOps", 5, ""), &[]);
    assert_eq!(r.code, 0, "{r:?}");
    wait_for("a adopted", SOON, || {
        let o = cp.json(&["get", "dl", "a", "-n", "licenses"]);
        let ready = o["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "Ready")?
            .clone();
        (ready["reason"] == "Reconciled").then_some(())
    });
    let r = apply(&license_yaml("a-again", "a", "TestOps", 6, ""), &[]);
    assert_ne!(r.code, 0, "{r:?}");
    assert!(
        r.stderr.contains("Conflict") && r.stderr.contains("default/licenses/a"),
        "{r:?}"
    );
    assert!(!exists("a-again"));

    // Below the seats in use.
    let r = apply(&license_yaml("a", "a", "TestOps", 2, ""), &[]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stderr.contains("Warning: licensor: BelowInUse") && r.stderr.contains('4'),
        "{r:?}"
    );
    // A revoke that would displace users, in an over-committed pool.
    let r = apply(
        &license_yaml("a-studio", "a", "Studio", 0, ""),
        &["--dry-run=server"],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stderr.contains("Warning: licensor: WouldDisplaceUsers")
            && r.stderr.contains("Warning: licensor: OverCommitted")
            && r.stderr.contains("10 seats more than its total of 10"),
        "{r:?}"
    );
    let backend_state = account.allocation("a", "TestOps");
    assert_eq!(backend_state, Some((5, 4)), "a dry run or a warning wrote");

    // The backend is down: allowed, saying the check was skipped.
    account.server().unwrap().kill().unwrap();
    let r = apply(&license_yaml("later", "b", "TestOps", 1, ""), &[]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stderr
            .contains("check against the license backend was skipped"),
        "{r:?}"
    );
    assert!(exists("later"));

    // --admission warn: what would be refused is a warning.
    account.serve_on(backend_port, &[]);
    let _ = operator.terminate();
    let warn_flags = [&flags[..], &["--admission=warn"]].concat();
    let _operator = Operator::start(&cp, "admission-warn", &account.backend, &warn_flags);
    let ghost = license_yaml("ghost", "nope", "TestOps", 1, "");
    let r = wait_for("the warning-only webhook", SOON, || {
        let r = apply(&ghost, &["--dry-run=server"]);
        (r.code == 0).then_some(r)
    });
    assert!(
        r.stderr.contains("Warning: licensor: UnknownOrganization"),
        "{r:?}"
    );
}

/// `kubectl get licensepools` is the account's License Management table:
/// every product (one with no managed object too), figures that follow a
/// raise, a revoke, a seat claim and a total change made outside the
/// cluster (after a resync), each allocation's manager and object, and no
/// writes at all while nothing changes.
#[test]
fn kubectl_get_licensepools_shows_the_account_and_follows_it() {
    let fixture = "
account: acme
products: [{name: TestOps, total: 20}, {name: Studio, total: 10}]
organizations:
  - {id: a, allocations: [{product: TestOps, dedicated: 5, inUse: 4}]}
  - {id: b}
";
    let cp = ControlPlane::start();
    cp.ok(&["create", "namespace", "licenses"]);
    let account = Account::seeded(fixture);
    let operator = Operator::start(
        &cp,
        "pools",
        &account.backend,
        &["--leader-elect=false", "--resync=2s"],
    );
    let pool = |name: &str| -> Option<Value> {
        let r = cp.kubectl(&["get", "lp", name, "-o", "json"]);
        (r.code == 0).then(|| serde_json::from_str::<Value>(&r.stdout).unwrap()["status"].clone())
    };
    let figures = |s: &Value| {
        [
            &s["total"],
            &s["dedicated"],
            &s["sharedInUse"],
            &s["free"],
            &s["overCommitted"],
        ]
        .map(|v| v.as_i64().unwrap_or(-1))
    };
    let until = |what: &str, name: &'static str, want: [i64; 5]| {
        wait_for(what, SOON, || {
            let s = pool(name)?;
            (figures(&s) == want).then_some(s)
        })
    };
    let s = until("the TestOps pool", "testops", [20, 5, 0, 15, 0]);
    assert_eq!(s["product"], "TestOps");
    assert_eq!(
        s["allocations"],
        serde_json::json!([{"organization": "a", "dedicated": 5, "inUse": 4, "resource": null}])
    );
    // A pool no object manages anything of is there all the same.
    until("the Studio pool", "studio", [10, 0, 0, 10, 0]);
    let table = cp.ok(&["get", "licensepools"]);
    for column in [
        "PRODUCT",
        "TOTAL",
        "DEDICATED",
        "SHARED-IN-USE",
        "FREE",
        "OVERCOMMITTED",
        "ORGANIZATIONS",
    ] {
        assert!(table.contains(column), "{table}");
    }
    assert!(
        table.contains("TestOps") && table.contains("Studio"),
        "{table}"
    );

    // A raise through a DedicatedLicense: the pool follows, naming it.
    cp.apply(&license_yaml("b-testops", "b", "TestOps", 3, ""));
    let s = until("the raise", "testops", [20, 8, 0, 12, 0]);
    assert_eq!(
        s["allocations"][1],
        serde_json::json!({"organization": "b", "dedicated": 3, "inUse": 0,
            "managedBy": "default/licenses/b-testops",
            "resource": {"namespace": "licenses", "name": "b-testops"}})
    );
    assert_eq!(s["organizations"], 2);
    // The revoke when it is deleted.
    cp.ok(&[
        "delete",
        "dl",
        "b-testops",
        "-n",
        "licenses",
        "--timeout=30s",
    ]);
    until("the revoke", "testops", [20, 5, 0, 15, 0]);

    // Outside the cluster: users sign in, the contract shrinks (a resync
    // catches both); then over-committed.
    let run = account.run(&[
        "backend",
        "claim",
        "--org",
        "b",
        "--product",
        "TestOps",
        "--count",
        "2",
    ]);
    assert_eq!(run.code, 0, "{run:?}");
    until("the seat claim", "testops", [20, 5, 2, 13, 0]);
    let run = account.run(&["backend", "total", "--product", "TestOps", "--total", "4"]);
    assert_eq!(run.code, 0, "{run:?}");
    until("the total change", "testops", [4, 5, 2, 0, 3]);

    // A second instance in the same cluster, on an account of its own:
    // its pools sit beside the first one's, and neither touches the other's.
    let other = Account::seeded("account: acme\nproducts: [{name: TestOps, total: 50}]\n");
    let prod = Operator::start(
        &cp,
        "pools-prod",
        &other.backend,
        &["--instance", "prod", "--leader-elect=false", "--resync=2s"],
    );
    until(
        "the prod instance's pool",
        "prod-testops",
        [50, 0, 0, 50, 0],
    );
    let labelled = cp.ok(&[
        "get",
        "lp",
        "-l",
        "licensor.dev/instance=prod",
        "-o",
        "name",
    ]);
    assert_eq!(labelled.trim(), "licensepool.licensor.dev/prod-testops");
    assert!(
        pool("studio").is_some(),
        "the prod instance removed another's pool"
    );

    // Idle: several resync periods, not one write by either instance.
    let writes = |op: &Operator| {
        op.get("/metrics")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("licensor_licensepool_writes_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    let version = |name: &str| cp.json(&["get", "lp", name])["metadata"]["resourceVersion"].clone();
    let seen = || {
        (
            [writes(&operator), writes(&prod)],
            ["testops", "studio", "prod-testops"].map(version),
        )
    };
    let before = seen();
    assert!(
        before.0.iter().all(|n| n.is_some_and(|n| n > 0.0)),
        "no pool writes counted: {before:?}"
    );
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(seen(), before, "an idle account caused LicensePool writes");
    assert_eq!(figures(&pool("testops").unwrap()), [4, 5, 2, 0, 3]);
}

/// A `Conflict` refusal is woken when the object that holds the allocation
/// goes (revoked, or released with `deletionPolicy: Orphan`), not at the
/// next resync.
#[test]
fn a_conflict_is_woken_when_the_holder_goes() {
    let fixture = "
account: acme
products: [{name: TestOps, total: 50}]
organizations: [{id: a}, {id: b}]
";
    let c = Cluster::start(fixture, &["--leader-elect=false", "--resync=10m"]);
    let reason = |name: &str| {
        let o = c.cp.json(&["get", "dl", name, "-n", "licenses"]);
        o["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready").cloned())
            .map(|c| c["reason"].as_str().unwrap_or_default().to_string())
    };
    let until = |name: &str, want: &str| {
        wait_for(&format!("{name} {want}"), Duration::from_secs(15), || {
            (reason(name).as_deref() == Some(want)).then_some(())
        })
    };
    for (holder, policy, org) in [("holder-a", "Revoke", "a"), ("holder-b", "Orphan", "b")] {
        c.cp.apply(&license_yaml(
            holder,
            org,
            "TestOps",
            3,
            &format!("  deletionPolicy: {policy}\n"),
        ));
        until(holder, "Reconciled");
        let second = format!("second-{org}");
        c.cp.apply(&license_yaml(&second, org, "TestOps", 4, ""));
        until(&second, "Conflict");
        c.cp.ok(&["delete", "dl", holder, "-n", "licenses", "--timeout=30s"]);
        // Well inside the 10-minute resync.
        until(&second, "Reconciled");
        assert_eq!(
            c.account.allocation(org, "TestOps"),
            Some((4, 0)),
            "{policy}"
        );
    }
}

/// `--local-webhooks`: one flag gives a local cluster both webhooks, with a
/// certificate and configurations the operator makes itself, answered
/// through `kubectl apply`; at exit the configurations are gone.
#[test]
fn local_webhooks_are_registered_answer_kubectl_and_are_removed_at_exit() {
    let cp = ControlPlane::start();
    cp.ok(&["create", "namespace", "licenses"]);
    let account = Account::seeded(ACCOUNT);
    let port = free_port();
    let local = format!("--local-webhooks=127.0.0.1:{port}");
    let mut operator = Operator::start(
        &cp,
        "local-webhooks",
        &account.backend,
        &["--leader-elect=false", local.as_str()],
    );
    let apply = |yaml: &str| cp.kubectl_stdin(&["apply", "-f", "-"], Some(yaml));
    let ghost = license_yaml("ghost", "nope", "TestOps", 1, "");
    wait_for("the local webhooks in the admission chain", SOON, || {
        (apply(&ghost).code != 0).then_some(())
    });
    for kind in [
        "mutatingwebhookconfiguration",
        "validatingwebhookconfiguration",
    ] {
        let c = cp.json(&["get", kind, "licensor-local"]);
        let url = c["webhooks"][0]["clientConfig"]["url"].as_str().unwrap();
        assert!(
            url.starts_with(&format!("https://127.0.0.1:{port}/")),
            "{c}"
        );
    }
    // Denied, as written, with the reason.
    let r = apply(&ghost);
    assert!(
        r.stderr.contains("denied the request") && r.stderr.contains("UnknownOrganization"),
        "{r:?}"
    );
    // Admitted with a warning that has the numbers.
    let r = apply(&license_yaml("big", "web-team", "Studio", 5, ""));
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stderr.contains("Warning: licensor: InsufficientPool") && r.stderr.contains('2'),
        "{r:?}"
    );
    // The mutating webhook added the finalizer at creation.
    let o = cp.json(&["get", "dl", "big", "-n", "licenses"]);
    assert_eq!(
        o["metadata"]["finalizers"][0], "licensor.dev/cleanup",
        "{o}"
    );

    assert_eq!(operator.terminate(), Some(0), "{}", operator.logs());
    for kind in [
        "mutatingwebhookconfiguration",
        "validatingwebhookconfiguration",
    ] {
        let r = cp.kubectl(&["get", kind, "licensor-local"]);
        assert_ne!(r.code, 0, "{kind} left behind: {r:?}");
    }
    assert!(
        operator
            .logs()
            .contains("removed the local admission webhooks"),
        "{}",
        operator.logs()
    );
}

/// The operator starts while its PostgreSQL store cannot be reached (as in
/// a cluster where both restart at once): it serves its health checks,
/// objects say `BackendUnavailable`, and once the database answers they
/// converge, with no restart of the operator. The database is "down"
/// behind a port of the test's own that closes every connection at once
/// (as a database that is starting up or restarting does), then "up" as
/// that port forwards to the shared server.
#[test]
fn the_operator_starts_while_postgres_is_down_and_converges_when_it_is_up() {
    let cp = ControlPlane::start();
    cp.ok(&["create", "namespace", "licenses"]);
    let account = Account::seeded_on(Kind::Postgres, ACCOUNT);
    let (_, pg_port) = common::postgres::server().address();
    // Held from the start, so no other test can take the port meanwhile.
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let is_up = up.clone();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            if !is_up.load(std::sync::atomic::Ordering::SeqCst) {
                continue; // dropped: the connection closes at once
            }
            let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", pg_port)) else {
                continue;
            };
            let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let (mut c, mut s) = (client, server);
            std::thread::spawn(move || std::io::copy(&mut c, &mut s2));
            std::thread::spawn(move || std::io::copy(&mut s, &mut c2));
        }
    });
    let backend = account
        .backend_with_credentials()
        .replace(&format!(":{pg_port}/"), &format!(":{port}/"));
    assert!(backend.contains(&format!(":{port}/")), "{backend}");
    let mut operator = Operator::start(
        &cp,
        "db-down",
        &backend,
        &[
            "--leader-elect=false",
            "--backoff=300ms",
            "--max-backoff=1s",
        ],
    );
    wait_for("the operator's health checks", SOON, || {
        operator.get("/healthz")
    });
    cp.apply(&license_yaml("qa", "qa-team", "TestOps", 7, ""));
    wait_for("qa waits for the store", SOON, || {
        let o = cp.json(&["get", "dl", "qa", "-n", "licenses"]);
        let ready = condition(&o, "Ready")?;
        (ready["reason"] == "BackendUnavailable").then_some(())
    });
    assert!(operator.is_running(), "{}", tail(&operator.logs()));
    // Ready (it leads, its webhooks would admit with a warning), and it
    // says which part is not: the backend, and why.
    let ready = operator.get("/readyz").expect("/readyz answers 200");
    assert!(
        ready.starts_with("ready: leading; the backend cannot be reached:"),
        "{ready}"
    );
    let metrics = operator.get("/metrics").expect("metrics");
    assert!(metrics.contains("licensor_backend_up 0\n"), "{metrics}");

    // The database comes up: the port forwards to the real server.
    up.store(true, std::sync::atomic::Ordering::SeqCst);
    wait_for("qa converges once the store is up", SOON, || {
        let o = cp.json(&["get", "dl", "qa", "-n", "licenses"]);
        let ready = condition(&o, "Ready")?;
        (ready["reason"] == "Reconciled").then_some(())
    });
    assert_eq!(account.allocation("qa-team", "TestOps"), Some((7, 4)));
    assert!(operator.is_running());
    assert_eq!(operator.get("/readyz").as_deref(), Some("ready: leading\n"));
    let metrics = operator.get("/metrics").expect("metrics");
    assert!(metrics.contains("licensor_backend_up 1\n"), "{metrics}");
}

/// Tenants on the real control plane: a namespace by name and one by
/// label, the webhook denying what they forbid (a ceiling included), the
/// operator stalling what gets past it with nothing written, a tenant
/// change turning a Ready object forbidden without a write, and its
/// deletion changing no count.
#[test]
fn tenants_decide_which_namespace_manages_which_organization() {
    let cp = ControlPlane::start();
    cp.ok(&["create", "namespace", "qa"]);
    cp.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: dev, labels: {team: dev}}\n");
    let account = Account::seeded(ACCOUNT);
    let webhooks = Webhooks::new(&cp);
    let flags = webhooks.with(&["--leader-elect=false"]);
    let operator = Operator::start(&cp, "tenants", &account.backend, &flags);
    cp.register_validating_webhook(webhooks.port, &webhooks.ca);
    let tenants = |qa_organizations: &str| {
        cp.apply(&format!(
            "apiVersion: licensor.dev/v1alpha1
kind: LicenseAccount
metadata: {{name: default}}
spec:
  tenants:
    - namespaces: [qa]
      organizations: [{qa_organizations}]
      maxCount: 10
    - namespaceSelector: {{matchLabels: {{team: dev}}}}
      organizations: [dev-*]
"
        ))
    };
    tenants("qa-team");
    let dl = |name: &str, namespace: &str, org: &str, product: &str, count: i64| {
        format!(
            "apiVersion: licensor.dev/v1alpha1\nkind: DedicatedLicense\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {{organization: {org}, product: {product}, count: {count}}}\n"
        )
    };
    let apply = |yaml: &str| cp.kubectl_stdin(&["apply", "-f", "-"], Some(yaml));
    let steal = dl("steal", "qa", "dev-team", "Studio", 1);
    wait_for("the webhook reading the tenants", SOON, || {
        let r = cp.kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], Some(&steal));
        (r.code != 0 && r.stderr.contains("Forbidden")).then_some(())
    });
    let ready = |namespace: &str, name: &str, reason: &str| {
        wait_for(&format!("{namespace}/{name} {reason}"), SOON, || {
            let o = cp.json(&["get", "dl", name, "-n", namespace]);
            let c = condition(&o, "Ready")?;
            (o["status"]["observedGeneration"] == o["metadata"]["generation"]
                && c["reason"] == reason)
                .then_some(o)
        })
    };

    // Allowed by name and by label: written.
    assert_eq!(apply(&dl("qa", "qa", "qa-team", "TestOps", 6)).code, 0);
    assert_eq!(apply(&dl("dev", "dev", "dev-team", "Studio", 9)).code, 0);
    ready("qa", "qa", "Reconciled");
    ready("dev", "dev", "Reconciled");
    assert_eq!(account.allocation("qa-team", "TestOps"), Some((6, 4)));
    // An object's account is fixed: moving it is refused by the schema.
    let r = cp.kubectl(&[
        "patch",
        "dl",
        "qa",
        "-n",
        "qa",
        "--type=merge",
        "-p",
        r#"{"spec": {"accountRef": "beta"}}"#,
    ]);
    assert!(
        r.code != 0 && r.stderr.contains("accountRef is immutable"),
        "{r:?}"
    );
    assert_eq!(account.allocation("dev-team", "Studio"), Some((9, 0)));

    // Another team's organization, and a count over the ceiling: denied,
    // naming the namespace, the organization, the account and what is
    // allowed; nothing is created.
    let r = apply(&steal);
    assert_ne!(r.code, 0, "{r:?}");
    assert!(
        r.stderr.contains("licensor: Forbidden: namespace qa may not manage 1 Studio licenses for organization dev-team on account default: its tenant entries allow organizations qa-team; count up to 10"),
        "{r:?}"
    );
    let r = apply(&dl("qa", "qa", "qa-team", "TestOps", 11));
    assert!(r.code != 0 && r.stderr.contains("count up to 10"), "{r:?}");
    assert_eq!(account.allocation("qa-team", "TestOps"), Some((6, 4)));

    // With the webhook out of the way, the operator refuses it: Stalled,
    // Forbidden, nothing written.
    cp.ok(&["delete", "validatingwebhookconfiguration", "licensor"]);
    assert_eq!(apply(&steal).code, 0);
    let o = ready("qa", "steal", "Forbidden");
    assert_eq!(condition(&o, "Stalled").unwrap()["status"], "True");
    assert_eq!(account.allocation("dev-team", "Studio"), Some((9, 0)));

    // The tenants change: qa's object turns Forbidden, and no count moves.
    tenants("other-*");
    let o = ready("qa", "qa", "Forbidden");
    says(&o, "its tenant entries allow organizations other-*");
    assert_eq!(account.allocation("qa-team", "TestOps"), Some((6, 4)));
    // Deleting it gives up ownership; the count stays.
    cp.ok(&["delete", "dl", "qa", "-n", "qa", "--timeout=30s"]);
    let qa = account.status()["allocations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["organization"] == "qa-team" && a["product"] == "TestOps")
        .cloned()
        .unwrap();
    assert_eq!(
        (qa["dedicated"].as_i64(), qa["managedBy"].as_str()),
        (Some(6), None),
        "{qa}"
    );
    drop(operator);
}

/// Two accounts on two backends served by one operator: `default` on its
/// own embedded store, `beta` on a `licensor serve` over HTTP with its token
/// in a Secret of the operator's namespace. Each object's count lands in
/// its own backend; a wrong token stalls beta (its objects and its
/// LicenseAccount) while default keeps working; the right token, rotated in
/// through the Secret, is used without a restart.
#[test]
fn two_accounts_on_two_backends_with_a_token_rotated_through_its_secret() {
    let cp = ControlPlane::start();
    cp.ok(&["create", "namespace", "licenses"]);
    cp.ok(&["create", "namespace", "licensor-system"]);
    let own = Account::seeded(ACCOUNT);
    let (beta, port, token_file) = remote_account(
        "account: beta-co\nproducts: [{name: TestOps, total: 50}]\norganizations: [{id: beta-qa}]\n",
    );
    let good = std::fs::read_to_string(&token_file).unwrap();
    let secret = |token: &str| {
        use base64::Engine;
        let token = base64::engine::general_purpose::STANDARD.encode(token);
        cp.apply(&format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: beta-token, namespace: licensor-system}}\ndata: {{token: {token}}}\n"
        ));
    };
    secret("lsr_not-a-token");
    cp.apply(&format!(
        "apiVersion: licensor.dev/v1alpha1
kind: LicenseAccount
metadata: {{name: beta}}
spec:
  backend:
    url: http://127.0.0.1:{port}
    account: beta-co
    credentialsSecretRef: {{name: beta-token, key: token}}
"
    ));
    let operator = Operator::start(
        &cp,
        "accounts",
        &own.backend,
        &["--leader-elect=false", "--lease-namespace=licensor-system"],
    );
    let account_ready = |status: &str, reason: &str| {
        wait_for(
            &format!("LicenseAccount beta Ready={status} {reason}"),
            SOON,
            || {
                let o = cp.json(&["get", "licenseaccount", "beta"]);
                let c = condition(&o, "Ready")?;
                (c["status"] == status && c["reason"] == reason).then_some(o)
            },
        )
    };
    let object_ready = |name: &str, reason: &str| {
        wait_for(&format!("{name} {reason}"), SOON, || {
            let o = cp.json(&["get", "dl", name, "-n", "licenses"]);
            let c = condition(&o, "Ready")?;
            (o["status"]["observedGeneration"] == o["metadata"]["generation"]
                && c["reason"] == reason)
                .then_some(o)
        })
    };

    // A wrong token: beta is stalled, and so is its object; default works.
    let o = account_ready("False", "Forbidden");
    says(&o, "check the Secret");
    cp.apply(&license_yaml("a", "qa-team", "TestOps", 6, ""));
    cp.apply(&license_yaml(
        "b",
        "beta-qa",
        "TestOps",
        3,
        "  accountRef: beta\n",
    ));
    object_ready("a", "Reconciled");
    let b = object_ready("b", "Forbidden");
    says(&b, "check the token");
    assert_eq!(own.allocation("qa-team", "TestOps"), Some((6, 4)));
    assert_eq!(beta.allocation("beta-qa", "TestOps"), None);

    // The right token through the Secret, no restart: beta connects and
    // its object's count lands in its own backend, not in default's.
    secret(&good);
    let o = account_ready("True", "Connected");
    assert_eq!(o["status"]["products"], serde_json::json!(["TestOps"]));
    let b = object_ready("b", "Reconciled");
    assert_eq!(b["status"]["account"], "beta");
    assert_eq!(beta.allocation("beta-qa", "TestOps"), Some((3, 0)));
    // Events of beta's objects name the account.
    wait_for("an event naming the account", SOON, || {
        let list = cp.json(&[
            "get",
            "events.events.k8s.io",
            "-n",
            "licenses",
            "--field-selector",
            "regarding.name=b,reason=Allocated",
        ]);
        list["items"]
            .as_array()?
            .iter()
            .any(|e| {
                e["note"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("account beta: "))
            })
            .then_some(())
    });
    assert_eq!(own.allocation("beta-qa", "TestOps"), None);
    assert!(
        operator
            .logs()
            .matches("the account's backend client was made anew")
            .count()
            >= 2,
        "{}",
        tail(&operator.logs())
    );
}

/// Accounts that are wrong never hold up the others: malformed tenants
/// stall their account (Invalid) and its objects (Forbidden, nothing
/// written), while another account works; an account deleted under its
/// objects stalls them with UnknownAccount, and nothing is revoked, not
/// even when they are deleted.
#[test]
fn a_malformed_or_deleted_account_stalls_its_objects_and_revokes_nothing() {
    let c = Cluster::start(ACCOUNT, &["--leader-elect=false"]);
    c.cp.apply(
        "apiVersion: licensor.dev/v1alpha1
kind: LicenseAccount
metadata: {name: default}
spec:
  tenants:
    - namespaces: [licenses]
      organizations: ['qa-?']
---
apiVersion: licensor.dev/v1alpha1
kind: LicenseAccount
metadata: {name: beta}
spec: {}
---
apiVersion: licensor.dev/v1alpha1
kind: LicenseAccount
metadata: {name: down}
spec:
  backend: {url: 'http://127.0.0.1:9', account: nobody}
",
    );
    let account = |name: &str, reason: &str| {
        wait_for(&format!("LicenseAccount {name} {reason}"), SOON, || {
            let o = c.cp.json(&["get", "licenseaccount", name]);
            (condition(&o, "Ready")?["reason"] == reason).then_some(o)
        })
    };
    let o = account("default", "Invalid");
    says(&o, "is not a glob");
    account("beta", "Connected");
    let o = account("down", "BackendUnavailable");
    says(&o, "backend http://127.0.0.1:9");
    c.license("a", "qa-team", "TestOps", 7, "");
    c.license("b", "web-team", "TestOps", 2, "  accountRef: beta\n");
    let a = c.wait("a", "False", "Forbidden");
    says(&a, "LicenseAccount default has malformed tenants");
    c.wait("b", "True", "Reconciled");
    assert_eq!(c.account.allocation("qa-team", "TestOps"), Some((5, 4)));
    assert_eq!(c.account.allocation("web-team", "TestOps"), Some((2, 0)));

    c.cp.ok(&["delete", "licenseaccount", "beta"]);
    let b = c.wait("b", "False", "UnknownAccount");
    says(&b, "there is no LicenseAccount beta");
    c.cp.ok(&["delete", "dl", "b", "-n", "licenses", "--timeout=30s"]);
    assert_eq!(
        c.account.allocation("web-team", "TestOps"),
        Some((2, 0)),
        "nothing is revoked for an account that is gone"
    );
}

/// An account on a PostgreSQL store of its own (the real server, TLS
/// verified against the CA from a Secret, the password from another): it
/// is Stalled, naming the Secret, until its Secrets are there, then
/// connects, and its object's count lands in that database.
#[test]
fn an_account_on_postgres_connects_once_its_secrets_are_there() {
    let c = Cluster::start(
        ACCOUNT,
        &["--leader-elect=false", "--lease-namespace=licensor-system"],
    );
    c.cp.ok(&["create", "namespace", "licensor-system"]);
    let gamma = Account::seeded_on(
        Kind::Postgres,
        "account: gamma-co\nproducts: [{name: TestOps, total: 30}]\norganizations: [{id: gamma-qa}]\n",
    );
    // The URL as a LicenseAccount names it: no password, and the CA from a
    // Secret rather than a file of this machine.
    let mut url = reqwest::Url::parse(&gamma.backend).unwrap();
    let ca_file = url
        .query_pairs()
        .find(|(k, _)| k == "sslrootcert")
        .map(|(_, v)| v.to_string())
        .unwrap();
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| k != "sslrootcert")
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    url.query_pairs_mut().clear().extend_pairs(kept);
    c.cp.apply(&format!(
        "apiVersion: licensor.dev/v1alpha1
kind: LicenseAccount
metadata: {{name: gamma}}
spec:
  backend:
    url: '{url}'
    account: gamma-co
    credentialsSecretRef: {{name: gamma-pg, key: password}}
    caSecretRef: {{name: gamma-ca, key: ca.crt}}
"
    ));
    let account = |reason: &str| {
        wait_for(&format!("LicenseAccount gamma {reason}"), SOON, || {
            let o = c.cp.json(&["get", "licenseaccount", "gamma"]);
            (condition(&o, "Ready")?["reason"] == reason).then_some(o)
        })
    };
    let o = account("BackendUnavailable");
    says(&o, "Secret licensor-system/gamma-pg is not there");
    let password = gamma.var("PGPASSWORD").to_string();
    c.cp.ok(&[
        "create",
        "secret",
        "generic",
        "gamma-pg",
        "-n",
        "licensor-system",
        &format!("--from-literal=password={password}"),
    ]);
    c.cp.ok(&[
        "create",
        "secret",
        "generic",
        "gamma-ca",
        "-n",
        "licensor-system",
        &format!("--from-file=ca.crt={ca_file}"),
    ]);
    let o = account("Connected");
    assert_eq!(o["status"]["products"], serde_json::json!(["TestOps"]));
    c.license("g", "gamma-qa", "TestOps", 4, "  accountRef: gamma\n");
    c.wait("g", "True", "Reconciled");
    assert_eq!(gamma.allocation("gamma-qa", "TestOps"), Some((4, 0)));
    assert_eq!(c.account.allocation("gamma-qa", "TestOps"), None);
}

/// DESIGN §11 on a real control plane, with the resync at 5 minutes: a
/// temporary allocation reaches its thenCount within seconds of its until
/// (a timer, not the resync) with one `Expired` event; one whose until
/// passes while the operator is down is acted on once by the restarted
/// operator; one whose thenCount is below the seats in use is Stalled
/// `BelowInUse` at that moment, with the numbers.
#[test]
fn a_temporary_allocation_ends_at_its_until_once_across_a_restart() {
    let fixture = "account: acme
products: [{name: TestOps, total: 100}]
organizations:
  - id: qa-team
    allocations:
      - {product: TestOps, dedicated: 5, inUse: 4}
  - id: web-team
  - id: ops-team
";
    let mut c = Cluster::start(fixture, &["--leader-elect=false", "--resync=5m"]);
    let at = |secs| {
        (chrono::Utc::now() + chrono::TimeDelta::seconds(secs))
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    };
    let (soon, later) = (at(20), at(40));
    c.license(
        "web",
        "web-team",
        "TestOps",
        3,
        &format!("  until: {soon}\n  thenCount: 1\n"),
    );
    c.license(
        "qa",
        "qa-team",
        "TestOps",
        6,
        &format!("  until: {soon}\n  thenCount: 2\n"),
    );
    c.license(
        "ops",
        "ops-team",
        "TestOps",
        2,
        &format!("  until: {later}\n"),
    );
    for name in ["web", "qa", "ops"] {
        let o = c.wait(name, "True", "Reconciled");
        let until = if name == "ops" { &later } else { &soon };
        assert_eq!(o["status"]["expiresAt"], until.as_str(), "{name}");
    }
    let listed = c.cp.ok(&["get", "dl", "-n", "licenses", "web"]);
    assert!(
        listed.contains("EXPIRES") && listed.contains(&soon),
        "{listed}"
    );
    assert_eq!(c.account.allocation("web-team", "TestOps"), Some((3, 0)));
    // The backend keeps each expiry with its allocation, for the page and
    // `licensor status`.
    let status = c.account.status();
    let kept = |org: &str| {
        status["allocations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["organization"] == org)
            .map(|a| a["expiry"].clone())
    };
    assert_eq!(
        kept("web-team"),
        Some(serde_json::json!({"until": soon, "thenCount": 1})),
        "{status}"
    );
    assert_eq!(
        kept("ops-team"),
        Some(serde_json::json!({"until": later, "thenCount": 0})),
        "{status}"
    );

    // At the until: web-team goes to 1 within seconds; qa-team's 2 is
    // below its 4 users, so it stays at 6 and says why.
    let until: chrono::DateTime<chrono::Utc> = soon.parse().unwrap();
    let reached = wait_for("web-team at 1", Duration::from_secs(40), || {
        (c.account.allocation("web-team", "TestOps") == Some((1, 0))).then(chrono::Utc::now)
    });
    let late = (reached - until).num_milliseconds();
    assert!((0..5000).contains(&late), "acted {late} ms after the until");
    c.wait_event("web", "Normal", "Expired");
    let qa = c.wait("qa", "False", "BelowInUse");
    says(
        &qa,
        format!(
            "at its expiry ({soon}, then 2): cannot lower qa-team/TestOps to 2: 4 seats are in use"
        ),
    );
    assert_eq!(condition(&qa, "Stalled").unwrap()["status"], "True");
    assert_eq!(c.account.allocation("qa-team", "TestOps"), Some((6, 4)));

    // The operator is down across ops-team's until, and restarted after.
    c.operator.kill();
    let until: chrono::DateTime<chrono::Utc> = later.parse().unwrap();
    while chrono::Utc::now() < until + chrono::TimeDelta::seconds(2) {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(c.account.allocation("ops-team", "TestOps"), Some((2, 0)));
    c.operator = Operator::start(
        &c.cp,
        "restarted",
        &c.account.backend,
        &["--leader-elect=false", "--resync=5m"],
    );
    wait_for("ops-team revoked", SOON, || {
        (c.account
            .allocation("ops-team", "TestOps")
            .is_none_or(|a| a.0 == 0))
        .then_some(())
    });
    c.wait_event("ops", "Normal", "Expired");
    // Settled: each expiry written once, each told once.
    std::thread::sleep(Duration::from_secs(3));
    let expired = |name| {
        c.events(name)
            .iter()
            .filter(|(_, r, _)| r == "Expired")
            .count()
    };
    assert_eq!((expired("web"), expired("ops"), expired("qa")), (1, 1, 0));
    let audit = c.account.audit();
    let written = |org: &str| {
        audit
            .iter()
            .filter(|e| e["organization"] == org && e["action"] != "seed")
            .count()
    };
    // web: create, then decrease; ops: create, then revoke; qa: increase.
    assert_eq!(
        (written("web-team"), written("ops-team"), written("qa-team")),
        (2, 2, 1),
        "{audit:#?}"
    );
}

/// Prometheus, from Debian's prometheus package.
fn prometheus() -> String {
    common::prometheus_program("LICENSOR_TEST_PROMETHEUS", "prometheus")
}

/// The chart's Grafana dashboard against a real Prometheus scraping the
/// operator (with its webhooks) and `licensor serve`, labelled as the
/// chart's ServiceMonitor would be: every panel's every query parses and
/// returns series, with the dashboard's variables set as Grafana would.
#[test]
fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    let fixture = "
account: acme
products: [{name: TestOps, total: 20}, {name: Studio, total: 10}]
organizations:
  - id: a
    allocations: [{product: TestOps, dedicated: 5, inUse: 4}]
  - id: b
";
    let cp = ControlPlane::start();
    cp.ok(&["create", "namespace", "licenses"]);
    let (account, platform_port, token) = remote_account(fixture);
    let token_flag = format!("--token-file={}", token.display());
    let webhooks = Webhooks::new(&cp);
    let flags = webhooks.with(&["--leader-elect=false", "--account=acme", &token_flag]);
    let operator = Operator::start(&cp, "dashboard", &account.backend, &flags);
    cp.register_webhook(webhooks.port, &webhooks.ca);
    cp.register_validating_webhook(webhooks.port, &webhooks.ca);
    // One object applied, one stalled (more than the pool has): webhooks
    // called, passes made, the backend read and written.
    let apply = |yaml: &str| cp.kubectl_stdin(&["apply", "-f", "-"], Some(yaml));
    wait_for("the webhooks in the admission chain", SOON, || {
        let r = apply(&license_yaml("a", "a", "TestOps", 6, ""));
        (r.code == 0 && r.stderr.is_empty()).then_some(())
    });
    assert_eq!(apply(&license_yaml("big", "b", "TestOps", 50, "")).code, 0);
    wait_for("big stalled", SOON, || {
        operator
            .get("/metrics")?
            .contains("reason=\"InsufficientPool\"} 1")
            .then_some(())
    });

    // Prometheus scrapes both every second, with the labels a
    // ServiceMonitor's relabelling gives (namespace, pod).
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: licensor
    static_configs:
      - targets: ['127.0.0.1:{}']
        labels: {{namespace: licensor-system, pod: licensor-0}}
  - job_name: licensor-platform
    static_configs:
      - targets: ['127.0.0.1:{platform_port}']
        labels: {{namespace: licensor-system, pod: licensor-platform-0}}
",
        operator.port
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _prometheus = Killed(
        std::process::Command::new(prometheus())
            .arg(format!(
                "--config.file={}/prometheus.yml",
                dir.path().display()
            ))
            .arg(format!("--storage.tsdb.path={}/data", dir.path().display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
            .spawn()
            .expect("start prometheus"),
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let http = reqwest::Client::new();
    let query = |expr: &str| -> Value {
        runtime
            .block_on(async {
                http.get(format!("http://127.0.0.1:{port}/api/v1/query"))
                    .query(&[("query", expr)])
                    .send()
                    .await?
                    .json()
                    .await
            })
            .unwrap_or_default()
    };

    wait_for("prometheus ready", SOON, || {
        runtime
            .block_on(http.get(format!("http://127.0.0.1:{port}/-/ready")).send())
            .ok()
            .filter(|r| r.status() == 200)
            .map(drop)
    });

    // The dashboard's queries, with its variables as Grafana sets them.
    let dashboard: Value =
        serde_json::from_str(include_str!("../charts/licensor/dashboards/licensor.json")).unwrap();
    let queries: Vec<(String, String)> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap().to_string();
            p["targets"].as_array().unwrap().iter().map(move |t| {
                let expr = t["expr"]
                    .as_str()
                    .unwrap()
                    .replace("$namespace", "licensor-system")
                    .replace("$account", ".+")
                    .replace("$__rate_interval", "15s");
                (title.clone(), expr)
            })
        })
        .collect();
    assert!(queries.len() >= 10, "{queries:?}");
    // A query that parses but names nothing returns no series: the check
    // below can fail.
    assert_eq!(
        query("licensor_no_such_metric")["data"]["result"],
        serde_json::json!([])
    );
    let started = Instant::now();
    loop {
        let empty: Vec<String> = queries
            .iter()
            .filter_map(|(title, expr)| {
                let answer = query(expr);
                let some = answer["status"] == "success"
                    && answer["data"]["result"]
                        .as_array()
                        .is_some_and(|r| !r.is_empty());
                (!some).then(|| format!("{title}: {expr}\n  -> {answer}"))
            })
            .collect();
        if empty.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "queries without series after a minute:\n{}",
            empty.join("\n")
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "{} dashboard queries returned series {:?} after Prometheus started",
        queries.len(),
        started.elapsed()
    );
    // What the figures say is what the account holds: TestOps has 20, 6
    // dedicated to a (big's 50 do not fit), 14 free.
    let free = query(
        "max by (account, product) (licensor_pool_free{namespace=~\"licensor-system\", account=~\".+\", product=\"TestOps\"})",
    );
    assert_eq!(free["data"]["result"][0]["value"][1], "14", "{free}");
    let stalled =
        query("sum by (reason) (licensor_object_stalled{namespace=~\"licensor-system\"})");
    assert_eq!(
        stalled["data"]["result"][0]["metric"]["reason"], "InsufficientPool",
        "{stalled}"
    );
    drop(account);
}
