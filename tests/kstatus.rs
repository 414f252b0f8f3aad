//! How outside tools read the operator's statuses, for an object in every
//! state: kstatus itself (`sigs.k8s.io/cli-utils`' `status.Compute`, as
//! Flux health checks and kpt use it; a Go program built from pinned
//! modules by `tests/go-tool.sh tests/kstatus`), the Argo CD health check
//! (`examples/gitops/argocd-health.lua` in Lua 5.1, as Argo CD runs it),
//! and `kubectl wait --for=condition=Ready` (which waits for that
//! condition's status to be True). The statuses are the operator's own,
//! built by its pure status builder from the pass each state comes from.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use k8s_openapi::jiff::Timestamp;
use licensor::domain::{Action, Allocation, Reason};
use licensor::operator::status::{Applied, Pass, Seen, Verdict, build};
use licensor::resource::Hold;
use mlua::{Lua, LuaSerdeExt, Value as LuaValue};
use serde_json::{Value, json};

const ARGO_CD_CHECK: &str = include_str!("../examples/gitops/argocd-health.lua");

/// The kstatus judge: `LICENSOR_TEST_KSTATUS`, or built now.
fn judge() -> String {
    common::go_tool("LICENSOR_TEST_KSTATUS", "kstatus", ".")
}

/// kstatus' verdict on each object, with its message.
fn kstatus(objects: &[Value]) -> Vec<(String, String)> {
    let mut child = Command::new(judge())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run the kstatus judge");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(objects).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let (status, message) = l.split_once('\t').unwrap_or((l, ""));
            (status.to_string(), message.to_string())
        })
        .collect()
}

/// What the Argo CD health check says.
fn argo_cd(object: &Value) -> String {
    let lua = Lua::new();
    let obj: LuaValue = lua.to_value(object).unwrap();
    lua.globals().set("obj", obj).unwrap();
    let hs: mlua::Table = lua.load(ARGO_CD_CHECK).eval().unwrap();
    hs.get("status").unwrap()
}

/// Whether `kubectl wait --for=condition=Ready` returns.
fn ready(object: &Value) -> bool {
    object["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

fn pass(verdict: Verdict, seen: Seen, deleting: bool) -> Pass {
    Pass {
        deleting,
        seen,
        ..Pass::example(verdict)
    }
}

fn held(dedicated: i64) -> Seen {
    Seen::Allocation(Allocation {
        organization: "qa-team".into(),
        product: "TestOps".into(),
        dedicated,
        in_use: 4,
        managed_by: None,
        deletion_policy: Default::default(),
        expiry: None,
        version: 1,
    })
}

/// The object after a pass that held its writes (`hold`), with the backend
/// agreeing with the spec or not.
fn held_object(hold: Hold, in_sync: bool) -> Value {
    let verdict = Verdict::Held { hold, in_sync };
    object(
        &pass(verdict, held(if in_sync { 10 } else { 5 }), false),
        false,
    )
}

/// The object as the API server shows it after the operator wrote the
/// status of `pass` (generation 2 observed).
fn object(pass: &Pass, deleting: bool) -> Value {
    let status = build(None, pass, Timestamp::from_second(1_800_000_000).unwrap());
    let mut metadata = json!({"name": "qa", "namespace": "licenses", "generation": 2});
    if deleting {
        metadata["deletionTimestamp"] = json!("2027-01-15T08:00:00Z");
        metadata["finalizers"] = json!(["licensor.dev/cleanup"]);
    }
    json!({
        "apiVersion": "licensor.dev/v1alpha1",
        "kind": "DedicatedLicense",
        "metadata": metadata,
        "spec": {"organization": "qa-team", "product": "TestOps", "count": 10},
        "status": serde_json::to_value(status).unwrap(),
    })
}

#[test]
fn every_state_reads_the_same_to_kstatus_argo_cd_and_kubectl_wait() {
    let applied = Verdict::Applied(Applied {
        action: Action::Increase,
        from: 5,
        to: 10,
        rehomed: 0,
        displaced: 0,
        adopted: false,
        drift: false,
        message: "increase 5 -> 10".into(),
    });
    let refused = |reason: Reason| Verdict::Refused {
        reason,
        message: format!("{reason} message"),
    };
    // (state, object, kstatus, Argo CD, kubectl wait returns)
    let mut cases: Vec<(String, Value, &str, &str, bool)> = vec![
        (
            "new, not yet seen by the operator (the schema's default status)".into(),
            json!({
                "apiVersion": "licensor.dev/v1alpha1", "kind": "DedicatedLicense",
                "metadata": {"name": "qa", "namespace": "licenses", "generation": 1},
                "spec": {"organization": "qa-team", "product": "TestOps", "count": 10},
                "status": {"observedGeneration": 0, "conditions": []},
            }),
            "InProgress",
            "Progressing",
            false,
        ),
        (
            "a change made".into(),
            object(&pass(applied, held(10), false), false),
            "Current",
            "Healthy",
            true,
        ),
        (
            "in sync".into(),
            object(&pass(Verdict::InSync, held(10), false), false),
            "Current",
            "Healthy",
            true,
        ),
        (
            "paused, in sync".into(),
            held_object(Hold::Paused, true),
            "Current",
            "Healthy",
            true,
        ),
        (
            "paused, differing (waits for the annotation to go)".into(),
            held_object(Hold::Paused, false),
            "InProgress",
            "Suspended",
            false,
        ),
        (
            "Observe, in sync".into(),
            held_object(Hold::Observe, true),
            "Current",
            "Healthy",
            true,
        ),
        (
            "Observe, differing (a finding for a person)".into(),
            held_object(Hold::Observe, false),
            "Failed",
            "Degraded",
            false,
        ),
        (
            "backend down, retried".into(),
            object(
                &pass(
                    Verdict::Retrying {
                        reason: Reason::BackendUnavailable,
                        message: "connection refused".into(),
                    },
                    Seen::Unknown,
                    false,
                ),
                false,
            ),
            "InProgress",
            "Progressing",
            false,
        ),
        (
            "being deleted, the revoke waiting on displacement".into(),
            object(
                &pass(refused(Reason::WouldDisplaceUsers), held(10), true),
                true,
            ),
            "Terminating",
            "Degraded",
            false,
        ),
    ];
    // Every reason a pass can be refused for (the rest are a retry and a
    // pool condition).
    for reason in
        Reason::all().filter(|r| !matches!(r, Reason::BackendUnavailable | Reason::OverCommitted))
    {
        cases.push((
            format!("refused: {reason}"),
            object(&pass(refused(reason), held(5), false), false),
            "Failed",
            "Degraded",
            false,
        ));
    }
    let objects: Vec<Value> = cases.iter().map(|c| c.1.clone()).collect();
    let verdicts = kstatus(&objects);
    assert_eq!(verdicts.len(), cases.len());
    for ((state, object, want_kstatus, want_argo, want_ready), (got, message)) in
        cases.iter().zip(&verdicts)
    {
        assert_eq!(got, want_kstatus, "kstatus, {state}: {message}\n{object:#}");
        assert_eq!(argo_cd(object), *want_argo, "Argo CD, {state}\n{object:#}");
        assert_eq!(
            ready(object),
            *want_ready,
            "kubectl wait, {state}\n{object:#}"
        );
    }
}

/// kstatus before the schema default: a new object with no status at all
/// reads Current, which is why the CRD defaults the status.
#[test]
fn without_the_schema_default_a_new_object_would_read_current() {
    let bare = json!({
        "apiVersion": "licensor.dev/v1alpha1", "kind": "DedicatedLicense",
        "metadata": {"name": "qa", "namespace": "licenses", "generation": 1},
    });
    assert_eq!(kstatus(&[bare])[0].0, "Current");
}

/// A LicensePool (status only, no conditions) reads Current once its status
/// is written.
#[test]
fn a_license_pool_reads_current() {
    let pool = json!({
        "apiVersion": "licensor.dev/v1alpha1", "kind": "LicensePool",
        "metadata": {"name": "testops", "generation": 1, "labels": {"licensor.dev/instance": "default"}},
        "spec": {},
        "status": {"product": "TestOps", "total": 200, "dedicated": 10, "sharedInUse": 0,
                   "free": 190, "overCommitted": 0, "organizations": 1, "allocations": []},
    });
    assert_eq!(kstatus(&[pool])[0].0, "Current");
}

/// A LicenseAccount reads InProgress until the operator checked it, then
/// Current when its backend answers and Failed (stalled) when its
/// credentials are refused, to kstatus and to `kubectl wait`; the statuses
/// are the operator's own.
#[test]
fn a_license_account_reads_in_progress_then_current_or_failed() {
    use licensor::operator::backends::status;
    let now = Timestamp::from_second(1_800_000_000).unwrap();
    let account = |status: Value| {
        json!({
            "apiVersion": "licensor.dev/v1alpha1", "kind": "LicenseAccount",
            "metadata": {"name": "beta", "generation": 1},
            "spec": {}, "status": status,
        })
    };
    let connected = status(
        &Default::default(),
        Some(1),
        Ok(vec!["TestOps".into()]),
        now,
    );
    let refused = status(
        &connected,
        Some(1),
        Err((
            Reason::Forbidden,
            "the backend refused the credentials; check the Secret".into(),
        )),
        now,
    );
    let objects = [
        // What the schema's default leaves on a new account.
        account(json!({"observedGeneration": 0})),
        account(serde_json::to_value(&connected).unwrap()),
        account(serde_json::to_value(&refused).unwrap()),
    ];
    let verdicts: Vec<String> = kstatus(&objects).into_iter().map(|(s, _)| s).collect();
    assert_eq!(verdicts, ["InProgress", "Current", "Failed"]);
    assert_eq!(
        objects.iter().map(ready).collect::<Vec<_>>(),
        [false, true, false]
    );
}
