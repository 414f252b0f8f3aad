//! The operator end to end: a real kube-apiserver and etcd, the `licensor
//! operator` binary against an embedded store, driven with `kubectl apply` and
//! `kubectl delete` as a user would, asserting on status, events and the
//! backend afterwards.

mod common;
mod controlplane;

use std::time::{Duration, Instant};

use common::{Account, license_yaml};
use controlplane::{ControlPlane, Operator, wait_for};
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
    assert!(
        message(&o).contains("qa-team holds 10 TestOps licenses (4 in use)"),
        "{}",
        message(&o)
    );
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
    assert!(
        o["status"]["diff"]
            .as_str()
            .unwrap()
            .contains("+dedicated: 3")
    );
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
    assert!(message(&o).contains("only 2 are free"), "{}", message(&o));
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
    assert!(message(&o).contains('2'), "{}", message(&o));
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
    assert!(
        message(&o).contains("default/licenses/qa"),
        "{}",
        message(&o)
    );

    // An organization the account does not have.
    c.license("ghost", "ghost-team", "TestOps", 1, "");
    let o = c.wait("ghost", "False", "UnknownOrganization");
    assert!(message(&o).contains("ghost-team"), "{}", message(&o));
    assert_eq!(c.account.allocation("ghost-team", "TestOps"), None);

    let metrics = c.operator.get("/metrics").expect("/metrics");
    for line in [
        "licensor_pool_free{product=\"Studio\"} 2",
        "licensor_allocation_dedicated{namespace=\"licenses\",name=\"dev\",organization=\"dev-team\",product=\"Studio\"} 3",
        "licensor_reconcile_errors_total{reason=\"UnknownOrganization\"}",
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
    assert!(
        c.operator
            .get("/readyz")
            .is_some_and(|b| b.contains("leading"))
    );
}
