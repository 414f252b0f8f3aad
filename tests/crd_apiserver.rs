//! The generated CRD on a real kube-apiserver: it installs, its schema bounds
//! and CEL immutability rules are enforced with readable messages, and
//! `kubectl get dl` shows the printer columns.

mod common;
mod controlplane;

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::license_yaml;
use controlplane::{ControlPlane, processes_in_group};

/// Set for the copy of this test binary that a test kills.
const KILLED_ROLE: &str = "LICENSOR_TEST_KILLED_ROLE";

/// A test process killed with SIGKILL (a CI job's timeout) drops nothing:
/// its control plane's etcd and kube-apiserver still end with it.
#[test]
fn a_control_plane_ends_with_its_test_process_even_when_that_is_killed() {
    const NAME: &str = "a_control_plane_ends_with_its_test_process_even_when_that_is_killed";
    if std::env::var_os(KILLED_ROLE).is_some() {
        // The copy: start a control plane, say where it runs, wait to be killed.
        let cp = ControlPlane::start_without_crds();
        let groups: Vec<String> = cp.process_groups().iter().map(u32::to_string).collect();
        println!("groups {}", groups.join(" "));
        std::thread::sleep(Duration::from_secs(120));
        return;
    }
    let mut copy = Killed(
        Command::new(std::env::current_exe().expect("this test binary"))
            .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
            .env(KILLED_ROLE, "1")
            .stdout(Stdio::piped())
            .spawn()
            .expect("start a copy of this test"),
    );
    let said = std::io::BufReader::new(copy.0.stdout.take().expect("stdout"))
        .lines()
        .map_while(Result::ok)
        // After libtest's "test <name> ... ", on the same line.
        .find_map(|l| l.split_once("groups ").map(|(_, g)| g.to_string()))
        .expect("the copy names its control plane's process groups");
    let groups: Vec<u32> = said.split(' ').map(|g| g.parse().expect("a pid")).collect();
    assert_eq!(groups.len(), 2, "etcd and kube-apiserver: {said}");
    for &group in &groups {
        assert!(
            processes_in_group(group) >= 2,
            "group {group}: a watchdog and its program"
        );
    }
    drop(copy);
    let deadline = Instant::now() + Duration::from_secs(10);
    while groups.iter().any(|&g| processes_in_group(g) > 0) {
        assert!(
            Instant::now() < deadline,
            "10 s after its test process was killed, the control plane still runs: {:?}",
            groups
                .iter()
                .map(|&g| (g, processes_in_group(g)))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A child killed with SIGKILL and reaped when dropped, so that a failed
/// assertion leaves no copy of the test behind either.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_crd_is_enforced_by_a_real_api_server() {
    let cp = ControlPlane::start();
    cp.ok(&["create", "namespace", "licenses"]);
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/licenses");
    cp.ok(&["apply", "-f", examples]);

    let table = cp.ok(&["get", "dl", "-n", "licenses"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "ORG",
            "PRODUCT",
            "DESIRED",
            "ALLOCATED",
            "IN-USE",
            "EXPIRES",
            "READY",
            "REASON",
            "AGE"
        ]
    );
    assert!(table.contains("qa-team-testops"), "{table}");
    // No operator has looked yet: the status the schema defaults says so,
    // so kstatus reads InProgress (generation 1 not observed), not Current.
    let unseen = cp.json(&["get", "dl", "qa-team-testops", "-n", "licenses"]);
    assert_eq!(unseen["metadata"]["generation"], 1, "{unseen:#}");
    assert_eq!(unseen["status"]["observedGeneration"], 0, "{unseen:#}");
    let names = cp.ok(&["get", "licensor", "-n", "licenses", "-o", "name"]);
    assert_eq!(
        names.lines().count(),
        4,
        "category licensor lists them: {names}"
    );
    // The temporary allocation's example passes the schema and its rules.
    let temporary = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/temporary");
    cp.ok(&["apply", "-f", temporary]);
    let lent = cp.json(&["get", "dl", "mobile-team-studio", "-n", "licenses"]);
    assert_eq!(
        (&lent["spec"]["until"], &lent["spec"]["thenCount"]),
        (
            &serde_json::json!("2027-03-31T17:00:00Z"),
            &serde_json::json!(0)
        )
    );

    let patch = |p: &str| {
        cp.kubectl(&[
            "patch",
            "dl",
            "qa-team-testops",
            "-n",
            "licenses",
            "--type",
            "merge",
            "-p",
            p,
        ])
    };
    for (body, message) in [
        (
            r#"{"spec":{"organization":"other-team"}}"#,
            "organization is immutable; create another DedicatedLicense",
        ),
        (r#"{"spec":{"product":"Studio"}}"#, "product is immutable"),
        (
            r#"{"spec":{"count":-1}}"#,
            "spec.count in body should be greater than or equal to 0",
        ),
        (
            r#"{"spec":{"count":10000000}}"#,
            "spec.count in body should be less than or equal to 1000000",
        ),
    ] {
        let r = patch(body);
        assert_ne!(r.code, 0, "{body} was accepted");
        assert!(r.stderr.contains(message), "{body}: {r:?}");
    }
    let r = patch(r#"{"spec":{"count":12}}"#);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        cp.ok(&[
            "get",
            "dl",
            "qa-team-testops",
            "-n",
            "licenses",
            "-o",
            "jsonpath={.spec.count}"
        ]),
        "12"
    );

    let unknown = format!(
        "{}  colour: red\n",
        license_yaml("x", "qa-team", "TestOps", 1, "")
    );
    let r = cp.kubectl_stdin(&["apply", "--validate=strict", "-f", "-"], Some(&unknown));
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("unknown field \"spec.colour\""), "{r:?}");

    // The identifier alphabet, as the API server (RE2) reads the pattern,
    // in characters: the same rule as the CLI, the store and the API.
    let create = |name: &str, org: &str| {
        let doc = license_yaml(name, "placeholder", "TestOps", 1, "")
            .replace("organization: placeholder", &format!("organization: {org}"));
        cp.kubectl_stdin(&["create", "-f", "-"], Some(&doc))
    };
    for (name, org) in [
        ("tab", "\"qa\\tteam\""),
        ("c1", "\"qa\\u0085team\""),
        ("spaced", "\" qa-team\""),
        ("long", &"x".repeat(254)),
    ] {
        let r = create(name, org);
        assert_ne!(r.code, 0, "{name} was accepted");
        assert!(r.stderr.contains("spec.organization"), "{name}: {r:?}");
    }
    for (name, org) in [
        ("unicode", "\"équipe qa\"".to_string()),
        ("wide", "é".repeat(253)),
    ] {
        let r = create(name, &org);
        assert_eq!(r.code, 0, "{name}: {r:?}");
    }

    let explain = cp.ok(&["explain", "dl.spec.count"]);
    assert!(
        explain.contains("Desired number of dedicated licenses, 0 to 1000000"),
        "{explain}"
    );

    // A temporary allocation: thenCount needs until, in range; until is a
    // time.
    for (name, extra, says) in [
        ("then-alone", "  thenCount: 2\n", "thenCount needs until"),
        (
            "then-huge",
            "  until: 2027-01-31T18:00:00Z\n  thenCount: 2000000\n",
            "spec.thenCount",
        ),
        ("until-words", "  until: next week\n", "spec.until"),
    ] {
        let doc = license_yaml(name, "qa-team", "TestOps", 1, extra);
        let r = cp.kubectl_stdin(&["create", "-f", "-"], Some(&doc));
        assert_ne!(r.code, 0, "{name} was accepted");
        assert!(r.stderr.contains(says), "{name}: {r:?}");
    }
    let doc = license_yaml(
        "contractor",
        "qa-team",
        "TestOps",
        1,
        "  until: 2027-01-31T18:00:00Z\n  thenCount: 0\n",
    );
    let r = cp.kubectl_stdin(&["create", "-f", "-"], Some(&doc));
    assert_eq!(r.code, 0, "{r:?}");
    let explain = cp.ok(&["explain", "dl.spec.until"]);
    assert!(explain.contains("When count ends"), "{explain}");
}
