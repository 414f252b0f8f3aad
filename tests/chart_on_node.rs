//! The chart on a real node: `make image`'s image imported into containerd;
//! the chart README's embedded install run as written (`helm install` with
//! the chart's defaults, the rollout, seeding through `kubectl exec`, a
//! token from the platform container, a plan through `kubectl
//! port-forward`); the pod's containers Ready by their own probes; the
//! commands NOTES prints run as printed; the examples Ready through the
//! pod; the webhooks answered through their Service; `helm upgrade` to two
//! replicas on PostgreSQL with the leader's pod deleted; and `helm
//! uninstall` leaving the claim. Needs root and the node's parts
//! (tests/node/mod.rs).

mod common;
mod controlplane;
mod node;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::chart_readme::{self, Install};
use common::{Account, license_yaml};
use controlplane::wait_for;
use node::Node;

const SOON: Duration = Duration::from_secs(120);
/// The namespace the chart README installs into.
const NS: &str = "licensor-system";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `make image`'s archive (LICENSOR_TEST_IMAGE names another).
fn image() -> PathBuf {
    let path = std::env::var_os("LICENSOR_TEST_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/image/licensor.oci.tar"));
    assert!(
        path.exists(),
        "{}: no image; `make image` builds it",
        path.display()
    );
    path
}

/// Runs one line NOTES printed, as printed, with bash in `dir`; its
/// stdout, or the node's account of its pods.
fn run_as_printed(node: &Node, line: &str, dir: &Path) -> String {
    let out = node.cp.shell(dir).args(["-c", line]).output().unwrap();
    assert!(
        out.status.success(),
        "{line}: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        node.diagnose()
    );
    eprintln!(
        "$ {line}\n{}",
        String::from_utf8_lossy(&out.stdout).trim_end()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_chart_installs_and_runs_on_a_real_node() {
    let node = Node::start();
    node.import(&image());
    let cp = &node.cp;
    let volume = node.persistent_volume("licensor-data", "1Gi");

    // The chart README's embedded install, as written: `helm install` with
    // the defaults (the embedded store on a claim, the image the chart
    // names, imported above, so never pulled), the rollout, the account
    // seeded through the operator's container, a Viewer token from the
    // platform container, and a plan through `kubectl port-forward`.
    let reader = chart_readme::reader_dir(Install::Embedded);
    let notes = chart_readme::run(Install::Embedded, cp.shell(reader.path()), || {
        node.diagnose()
    });
    eprintln!("{notes}");
    assert!(
        notes.contains("Plan against http://127.0.0.1:8081 (account acme): 4 to change"),
        "the plan through the forwarded platform API:\n{notes}"
    );
    let token = std::fs::read_to_string(reader.path().join("ci.token")).unwrap();
    assert!(token.starts_with("lsr_"), "ci.token: {token}");

    // Then what NOTES (printed by that `helm install`) says to do.
    let printed: Vec<&str> = notes
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("kubectl -n licensor-system"))
        .collect();
    let step = |what: &str| -> &str {
        printed
            .iter()
            .find(|l| l.contains(what))
            .unwrap_or_else(|| panic!("NOTES prints no `{what}` command:\n{notes}"))
    };
    // 1. Wait for the operator, as printed.
    run_as_printed(
        &node,
        &format!("timeout 180 {}", step("rollout status")),
        repo(),
    );
    let pod = cp.json(&[
        "get",
        "pods",
        "-n",
        NS,
        "-l",
        "app.kubernetes.io/instance=licensor",
    ]);
    let pod = &pod["items"][0];
    let statuses = pod["status"]["containerStatuses"].as_array().unwrap();
    for c in statuses {
        assert_eq!(c["ready"], true, "container not Ready: {c}");
        eprintln!(
            "pod {} container {} Ready (image {})",
            pod["metadata"]["name"], c["name"], c["image"]
        );
    }
    let mut names: Vec<&str> = statuses
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["operator", "platform"], "{pod}");
    let logs = cp.ok(&["logs", "-n", NS, "deploy/licensor", "-c", "operator"]);
    eprintln!("the operator's log, from inside the pod:\n{logs}");
    assert!(logs.contains("\"leading\""), "{logs}");
    assert!(logs.contains("sqlite:/data/licensor.db"), "{logs}");

    // 2. Seed the store, as printed, from the examples' directory.
    let seeded = run_as_printed(&node, step("backend seed"), &repo().join("examples"));
    assert!(seeded.contains("seeded account acme"), "{seeded}");
    // The store is on the volume the test provided, owned by the pod's user.
    let db = volume.join("licensor.db");
    assert!(db.exists(), "no store on the volume: {}", volume.display());
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&db).unwrap().uid(), 65532);

    // 3. The examples become Ready through the pod.
    cp.ok(&[
        "apply",
        "-f",
        repo().join("examples/licenses").to_str().unwrap(),
    ]);
    let r = cp.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "dl",
        "--all",
        "-n",
        "licenses",
        "--timeout=120s",
    ]);
    assert_eq!(r.code, 0, "{r:?}\n{}", cp.ok(&["get", "dl", "-A"]));
    eprintln!("{}", cp.ok(&["get", "dl", "-A"]));

    // The webhooks, through their Service: a denial and a warning, as
    // kubectl shows them.
    let apply = |yaml: &str| cp.kubectl_stdin(&["apply", "-f", "-"], Some(yaml));
    let r = apply(&license_yaml("ghost", "nope", "TestOps", 1, ""));
    assert_ne!(r.code, 0, "{r:?}");
    assert!(
        r.stderr.contains("denied the request") && r.stderr.contains("UnknownOrganization"),
        "{r:?}"
    );
    let r = apply(&license_yaml("big", "mobile-team", "Studio", 500, ""));
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stderr.contains("Warning: licensor: InsufficientPool"),
        "{r:?}"
    );
    let o = cp.json(&["get", "dl", "big", "-n", "licenses"]);
    assert!(
        o["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f == "licensor.dev/cleanup")),
        "the mutating webhook added no finalizer: {o}"
    );

    // 4. A token for CI, as printed, then the platform API through a port
    // forward to the pod's platform container. The README's steps above
    // made a token named `ci` already: names are unique, so it is revoked
    // first, in the pod, as the refusal says to.
    let revoke = step("token create")
        .split(" token create")
        .next()
        .unwrap()
        .to_string()
        + " token revoke --name ci";
    let revoked = run_as_printed(&node, &revoke, repo());
    assert!(revoked.contains("revoked token \"ci\""), "{revoked}");
    let token = run_as_printed(&node, step("token create"), repo());
    let token = token.trim().to_string();
    assert!(token.starts_with("lsr_"), "not a token: {token}");
    let port = common::free_port();
    let mut forward = Command::new(node.cp.bin.join("kubectl"))
        .arg("--kubeconfig")
        .arg(&node.cp.kubeconfig)
        .args([
            "port-forward",
            "-n",
            NS,
            "svc/licensor-platform",
            &format!("{port}:80"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pools = wait_for("the platform API through port-forward", SOON, || {
        let out = Command::new("curl")
            .args(["-sf", "--max-time", "5", "-H"])
            .arg(format!("Authorization: Bearer {token}"))
            .arg(format!("http://127.0.0.1:{port}/v1/accounts/acme"))
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    });
    let _ = forward.kill();
    let _ = forward.wait();
    let account: serde_json::Value = serde_json::from_str(&pools).unwrap();
    eprintln!("GET /v1/accounts/acme through port-forward: {account}");
    assert!(pools.contains("qa-team"), "{pools}");

    upgrade_to_postgres_and_lose_the_leader(&node);

    // Uninstalled: the claim, and the store on it, stay.
    let r = cp.helm(&["uninstall", "licensor", "-n", NS, "--wait"]);
    assert_eq!(r.code, 0, "{r:?}");
    let claim = cp.json(&["get", "pvc", "licensor", "-n", NS]);
    assert_eq!(claim["status"]["phase"], "Bound", "{claim}");
    assert!(db.exists());
}

/// Who holds the operator's Lease (the chart names it after the release).
fn leader(node: &Node) -> String {
    let lease = node.cp.json(&["get", "lease", "licensor", "-n", NS]);
    lease["spec"]["holderIdentity"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// `helm upgrade` of the running release to two replicas on PostgreSQL
/// (the chart README's way: the URL and the CA from Secrets), the database
/// reached from the pods at the host's address on the pod network. Then
/// the leader's pod is deleted: the standby takes the Lease, every object
/// is still there, and a change made after it reaches the database.
fn upgrade_to_postgres_and_lose_the_leader(node: &Node) {
    let cp = &node.cp;
    // The shared server, listening where pods reach it; the example account
    // seeded in a database of its own.
    let (pg, reached) = common::postgres::server_on(node::GATEWAY);
    let fixture = std::fs::read_to_string(repo().join("examples/account.yaml")).unwrap();
    let acct = Account::seeded_on(common::kind::postgres, &fixture);
    let db = reqwest::Url::parse(acct.store()).unwrap().path()[1..].to_string();
    let in_pod = format!(
        "{}/{db}?sslmode=verify-full&sslrootcert=/etc/licensor/postgres-ca/ca.crt",
        reached.replacen("licensor@", &format!("licensor:{}@", pg.password()), 1)
    );
    cp.ok(&[
        "-n",
        NS,
        "create",
        "secret",
        "generic",
        "licensor-postgres",
        &format!("--from-literal=url={in_pod}"),
    ]);
    cp.ok(&[
        "-n",
        NS,
        "create",
        "secret",
        "generic",
        "licensor-postgres-ca",
        &format!("--from-file=ca.crt={}", pg.ca().display()),
    ]);
    let objects = |cp: &controlplane::ControlPlane| {
        let mut names: Vec<String> = cp
            .ok(&[
                "get",
                "dl",
                "-A",
                "-o",
                "jsonpath={.items[*].metadata.name}",
            ])
            .split_whitespace()
            .map(str::to_string)
            .collect();
        names.sort();
        names
    };
    let before = objects(cp);
    let chart = repo().join("charts/licensor");
    let start = std::time::Instant::now();
    let r = cp.helm(&[
        "upgrade",
        "licensor",
        chart.to_str().unwrap(),
        "-n",
        NS,
        "--set",
        "backend.kind=postgres",
        "--set",
        "backend.postgres.urlSecret.name=licensor-postgres",
        "--set",
        "backend.postgres.caSecret=licensor-postgres-ca",
        "--set",
        "replicaCount=2",
        // A new leader checks the objects whose status says Ready over half
        // a resync period (src/operator/resync.rs): 15 s here, not 150 s.
        "--set",
        "resync=30s",
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    let r = cp.kubectl(&[
        "-n",
        NS,
        "rollout",
        "status",
        "deployment/licensor",
        "--timeout=180s",
    ]);
    assert_eq!(r.code, 0, "{r:?}\n{}", node.diagnose());

    // The objects are written into the database by the new pods.
    let managed = |dedicated_of_qa: i64| -> Option<()> {
        let status = acct.run(&["status", "-o", "json"]).json();
        let allocations = status["allocations"].as_array()?;
        let managed = allocations
            .iter()
            .filter(|a| {
                a["managedBy"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("default/licenses/"))
            })
            .count();
        let qa = allocations
            .iter()
            .find(|a| a["organization"] == "qa-team" && a["product"] == "TestOps")?;
        (managed == 4 && qa["dedicated"] == dedicated_of_qa).then_some(())
    };
    eprintln!("rolled out on PostgreSQL after {:?}", start.elapsed());
    node.wait_for("the examples written to PostgreSQL", SOON, || managed(10));
    eprintln!("the examples in PostgreSQL after {:?}", start.elapsed());
    let first = node.wait_for("a leader", SOON, || {
        Some(leader(node)).filter(|l| !l.is_empty())
    });
    eprintln!("leader on PostgreSQL: {first}");
    cp.ok(&["delete", "pod", "-n", NS, &first, "--wait=false"]);
    let second = node.wait_for("the standby leading", SOON, || {
        Some(leader(node)).filter(|l| !l.is_empty() && *l != first)
    });
    eprintln!(
        "after the leader's pod was deleted, {second} leads ({:?})",
        start.elapsed()
    );
    assert_eq!(objects(cp), before, "an object was lost");
    cp.ok(&[
        "patch",
        "dl",
        "qa-team-testops",
        "-n",
        "licenses",
        "--type=merge",
        "-p",
        "{\"spec\":{\"count\":12}}",
    ]);
    node.wait_for("the change written by the new leader", SOON, || managed(12));
    node.wait_for("the new leader's log saying so", SOON, || {
        let r = cp.kubectl(&["logs", "-n", NS, &second, "-c", "operator"]);
        r.stdout.contains("\"leading\"").then_some(())
    });
}
