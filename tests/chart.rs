//! The Helm chart: lint, golden templates for three value sets, bad values,
//! and `helm install` / `upgrade` / `uninstall` on the real control plane with
//! the operator running as the chart's ServiceAccount.
//!
//! `LICENSOR_UPDATE_GOLDEN=1 cargo test --test chart` rewrites the golden files.

mod common;
mod controlplane;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Account, license_yaml};
use controlplane::{ControlPlane, Operator, helm, wait_for};
use serde::Deserialize;
use serde_json::Value;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/licensor");
/// The Kubernetes release the control plane runs, for offline rendering.
const KUBE: &str = "1.35.4";

fn here(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// helm without a cluster.
fn helm_offline(args: &[&str]) -> (i32, String, String) {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(helm())
        .args(args)
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .output()
        .expect("run helm");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const VALUE_SETS: [(&str, Option<&str>); 3] = [
    ("default", None),
    ("remote-ha", Some("tests/chart/remote-ha.yaml")),
    ("namespaced", Some("tests/chart/namespaced.yaml")),
];

#[test]
fn the_chart_lints_clean_and_renders_the_golden_files() {
    let update = std::env::var("LICENSOR_UPDATE_GOLDEN").is_ok_and(|v| v == "1");
    for (name, values) in VALUE_SETS {
        let mut extra = vec![];
        let values = values.map(|v| here(v).display().to_string());
        if let Some(v) = &values {
            extra = vec!["-f", v.as_str()];
        }
        let lint = [
            &["lint", "--strict", CHART, "--kube-version", KUBE][..],
            &extra,
        ]
        .concat();
        let (code, out, err) = helm_offline(&lint);
        assert_eq!(code, 0, "helm lint --strict ({name}): {out}{err}");
        assert!(out.contains("0 chart(s) failed"), "{out}");

        let template = [
            &[
                "template",
                "licensor",
                CHART,
                "--namespace",
                "licensor-system",
                "--kube-version",
                KUBE,
            ][..],
            &extra,
        ]
        .concat();
        let (code, rendered, err) = helm_offline(&template);
        assert_eq!(code, 0, "helm template ({name}): {err}");
        let golden = here(&format!("tests/chart/golden/{name}.yaml"));
        if update {
            std::fs::write(&golden, &rendered).unwrap();
        }
        let expected = std::fs::read_to_string(&golden).unwrap_or_default();
        assert!(
            rendered == expected,
            "helm template ({name}) differs from {}; rerun with LICENSOR_UPDATE_GOLDEN=1 and review the diff",
            golden.display()
        );
    }
}

#[test]
fn every_deployment_is_locked_down() {
    for (name, values) in VALUE_SETS {
        let values = values.map(|v| here(v).display().to_string());
        let mut args = vec![
            "template",
            "licensor",
            CHART,
            "-n",
            "licensor-system",
            "--kube-version",
            KUBE,
        ];
        if let Some(v) = &values {
            args.extend(["-f", v.as_str()]);
        }
        let (code, rendered, err) = helm_offline(&args);
        assert_eq!(code, 0, "{err}");
        let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&rendered)
            .filter_map(|d| Value::deserialize(d).ok())
            .filter(|v| !v.is_null())
            .collect();
        let deployment = docs
            .iter()
            .find(|d| d["kind"] == "Deployment")
            .expect("a Deployment");
        let pod = &deployment["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
            "{name}"
        );
        let c = &pod["containers"][0];
        assert_eq!(
            c["securityContext"]["readOnlyRootFilesystem"], true,
            "{name}"
        );
        assert_eq!(
            c["securityContext"]["allowPrivilegeEscalation"], false,
            "{name}"
        );
        assert_eq!(
            c["securityContext"]["capabilities"]["drop"][0], "ALL",
            "{name}"
        );
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert!(
            docs.iter().all(|d| d["kind"] != "Secret"),
            "{name}: the chart never holds a token"
        );
        for d in docs
            .iter()
            .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
        {
            for rule in d["rules"].as_array().unwrap() {
                let resources = rule["resources"].to_string();
                assert!(
                    !resources.contains("secrets") && !resources.contains('*'),
                    "{name}: {rule}"
                );
                assert!(!rule["verbs"].to_string().contains('*'), "{name}: {rule}");
            }
        }
    }
}

#[test]
fn bad_values_fail_with_a_readable_message() {
    let cases: [(&[&str], &str); 7] = [
        (
            &["--set", "networkPolicy.enabled=true"],
            "needs networkPolicy.egressCIDRs",
        ),
        (
            &["--set", "replicaCount=-1"],
            "at '/replicaCount': minimum: got -1, want 1",
        ),
        (
            &["--set", "backend.kind=ftp"],
            "at '/backend/kind': value must be one of 'embedded', 'remote'",
        ),
        (
            &["--set", "replicaCount=2"],
            "replicaCount > 1 needs backend.kind: remote",
        ),
        (
            &["--set", "backend.kind=remote"],
            "needs backend.remote.url",
        ),
        (&["--set", "replicas=2"], "replicas"),
        (&["--set", "resync=soon"], "resync"),
    ];
    for (set, message) in cases {
        let args = [
            &["template", "licensor", CHART, "--kube-version", KUBE][..],
            set,
        ]
        .concat();
        let (code, _, err) = helm_offline(&args);
        assert_ne!(code, 0, "{set:?} was accepted");
        assert!(
            err.contains(message),
            "{set:?}: expected {message:?} in {err}"
        );
    }
}

#[test]
fn the_charts_crd_is_the_generated_one() {
    let chart = std::fs::read_to_string(here(
        "charts/licensor/crds/dedicatedlicenses.licensor.dev.yaml",
    ))
    .unwrap();
    let generated =
        std::fs::read_to_string(here("crds/dedicatedlicenses.licensor.dev.yaml")).unwrap();
    assert!(
        chart == generated,
        "charts/licensor/crds/ is stale: run `make crd`"
    );
}

/// A kubeconfig whose user is the chart's ServiceAccount, with a token from
/// the TokenRequest API.
fn service_account_kubeconfig(cp: &ControlPlane, namespace: &str, name: &str) -> PathBuf {
    let token = cp.ok(&["create", "token", name, "-n", namespace, "--duration=1h"]);
    let admin = std::fs::read_to_string(&cp.kubeconfig).unwrap();
    let path = cp.dir.path().join("sa-kubeconfig");
    std::fs::write(
        &path,
        admin.replace(
            "token: licensor-admin-token",
            &format!("token: {}", token.trim()),
        ),
    )
    .unwrap();
    path
}

#[test]
fn install_run_as_the_service_account_upgrade_and_uninstall() {
    let cp = ControlPlane::start_without_crds();
    let r = cp.helm(&[
        "install",
        "licensor",
        CHART,
        "--namespace",
        "licensor-system",
        "--create-namespace",
    ]);
    assert_eq!(r.code, 0, "helm install: {r:?}");
    assert!(
        r.stdout.contains("Seed the embedded store"),
        "NOTES.txt: {}",
        r.stdout
    );
    for object in [
        "deployment/licensor",
        "serviceaccount/licensor",
        "service/licensor-metrics",
        "persistentvolumeclaim/licensor",
        "role/licensor-leader-election",
        "rolebinding/licensor-leader-election",
    ] {
        cp.ok(&["get", object, "-n", "licensor-system"]);
    }
    cp.ok(&["get", "clusterrole/licensor", "clusterrolebinding/licensor"]);
    cp.ok(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/dedicatedlicenses.licensor.dev",
    ]);

    // Least privilege: what the operator needs, and nothing more.
    let sa = "system:serviceaccount:licensor-system:licensor";
    for (args, allowed) in [
        (
            &["patch", "dedicatedlicenses.licensor.dev/status", "-A"][..],
            true,
        ),
        (&["watch", "dedicatedlicenses.licensor.dev", "-A"][..], true),
        (
            &["create", "events.events.k8s.io", "-n", "licenses"][..],
            true,
        ),
        (
            &[
                "patch",
                "leases.coordination.k8s.io/licensor",
                "-n",
                "licensor-system",
            ][..],
            true,
        ),
        (
            &["create", "dedicatedlicenses.licensor.dev", "-n", "licenses"][..],
            false,
        ),
        (
            &["delete", "dedicatedlicenses.licensor.dev", "-n", "licenses"][..],
            false,
        ),
        (&["list", "secrets", "-A"][..], false),
        (&["get", "secrets", "-n", "licensor-system"][..], false),
        (&["delete", "namespaces"][..], false),
        (
            &[
                "patch",
                "leases.coordination.k8s.io/kube-scheduler",
                "-n",
                "kube-system",
            ][..],
            false,
        ),
        (&["create", "pods", "-n", "licensor-system"][..], false),
    ] {
        let r = cp.kubectl(&[&["auth", "can-i", "--as", sa][..], args].concat());
        assert_eq!(r.stdout.trim() == "yes", allowed, "can-i {args:?}: {r:?}");
    }

    // The operator, run outside the cluster with the ServiceAccount's token,
    // passes a subset of the end-to-end scenarios.
    cp.ok(&["create", "namespace", "licenses"]);
    let account = Account::seeded(
        "
account: acme
products: [{name: TestOps, total: 200}]
organizations:
  - id: qa-team
    allocations: [{product: TestOps, dedicated: 5, inUse: 4}]
  - id: dev-team
",
    );
    let kubeconfig = service_account_kubeconfig(&cp, "licensor-system", "licensor");
    let operator = Operator::start_as(
        &cp,
        &kubeconfig,
        "as-sa",
        &account.backend,
        &[
            "--lease-namespace=licensor-system",
            "--lease-name=licensor",
            "--lease-duration=4s",
        ],
    );
    let ready = |name: &str, reason: &str| {
        wait_for(&format!("{name} {reason}"), Duration::from_secs(30), || {
            let o = cp.json(&["get", "dl", name, "-n", "licenses"]);
            let c = o["status"]["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == "Ready")?
                .clone();
            (o["status"]["observedGeneration"] == o["metadata"]["generation"]
                && c["reason"] == reason)
                .then_some(())
        })
    };
    cp.apply(&license_yaml("qa", "qa-team", "TestOps", 10, ""));
    cp.apply(&license_yaml("dev", "dev-team", "TestOps", 3, ""));
    ready("qa", "Reconciled");
    ready("dev", "Reconciled");
    cp.apply(&license_yaml("qa", "qa-team", "TestOps", 2, ""));
    ready("qa", "BelowInUse");
    cp.ok(&["delete", "dl", "dev", "-n", "licenses", "--timeout=30s"]);
    assert_eq!(account.allocation("qa-team", "TestOps"), Some((10, 4)));
    assert_eq!(account.allocation("dev-team", "TestOps"), None);
    let events = cp.json(&["get", "events.events.k8s.io", "-n", "licenses"]);
    let reasons = events["items"].to_string();
    for reason in ["Increased", "Allocated", "BelowInUse", "Revoked"] {
        assert!(reasons.contains(reason), "event {reason} missing");
    }
    let logs = operator.logs();
    assert!(
        !logs.contains("forbidden") && !logs.contains("Forbidden"),
        "RBAC refused something:\n{logs}"
    );
    drop(operator);

    // Upgrade with changed values.
    let r = cp.helm(&[
        "upgrade",
        "licensor",
        CHART,
        "-n",
        "licensor-system",
        "--set",
        "concurrency=4",
        "--set",
        "resync=1m",
    ]);
    assert_eq!(r.code, 0, "helm upgrade: {r:?}");
    let d = cp.json(&["get", "deployment/licensor", "-n", "licensor-system"]);
    let args = d["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(
        args.contains("--concurrency=4") && args.contains("--resync=1m"),
        "{args}"
    );

    // Uninstall: the operator goes; the CRD, the licenses and the store's claim stay.
    let r = cp.helm(&["uninstall", "licensor", "-n", "licensor-system"]);
    assert_eq!(r.code, 0, "helm uninstall: {r:?}");
    assert_ne!(
        cp.kubectl(&["get", "deployment/licensor", "-n", "licensor-system"])
            .code,
        0
    );
    cp.ok(&["get", "crd/dedicatedlicenses.licensor.dev"]);
    cp.ok(&["get", "dl/qa", "-n", "licenses"]);
    cp.ok(&[
        "get",
        "persistentvolumeclaim/licensor",
        "-n",
        "licensor-system",
    ]);
}
