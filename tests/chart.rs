//! The Helm chart: lint, golden templates for four value sets, every
//! Deployment locked down, bad values, and `helm install` / `upgrade` / `uninstall` on the real control plane with
//! the operator running as the chart's ServiceAccount and serving its
//! admission webhook with the chart's certificate; and the chart README's
//! commands, run as written.
//!
//! `LICENSOR_UPDATE_GOLDEN=1 cargo test --test chart` rewrites the golden files.

mod common;
mod controlplane;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::chart_readme::{self, Install};
use common::{Account, license_yaml};
use controlplane::{ControlPlane, Operator, free_port, helm, wait_for};
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

const VALUE_SETS: [(&str, Option<&str>); 4] = [
    ("default", None),
    ("remote-ha", Some("tests/chart/remote-ha.yaml")),
    ("postgres-ha", Some("tests/chart/postgres-ha.yaml")),
    ("namespaced", Some("tests/chart/namespaced.yaml")),
];

/// The rendering with the webhook's generated certificates and keys (new at
/// every offline render) replaced by a placeholder.
fn without_generated_keys(rendered: &str) -> String {
    let mut out = String::new();
    for line in rendered.lines() {
        let key = line.trim_start().split(':').next().unwrap_or_default();
        if ["ca.crt", "tls.crt", "tls.key", "caBundle"].contains(&key) {
            let indent = &line[..line.len() - line.trim_start().len()];
            out.push_str(&format!("{indent}{key}: (generated)\n"));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

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
        let rendered = without_generated_keys(&rendered);
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
        let docs = rendered(values);
        let deployments: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "Deployment").collect();
        assert!(!deployments.is_empty(), "{name}: no Deployment");
        for deployment in deployments {
            let which = format!(
                "{name} {}",
                deployment["metadata"]["name"].as_str().unwrap_or("")
            );
            let pod = &deployment["spec"]["template"]["spec"];
            assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{which}");
            assert_eq!(
                pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
                "{which}"
            );
            let c = &pod["containers"][0];
            assert_eq!(
                c["securityContext"]["readOnlyRootFilesystem"], true,
                "{which}"
            );
            assert_eq!(
                c["securityContext"]["allowPrivilegeEscalation"], false,
                "{which}"
            );
            assert_eq!(
                c["securityContext"]["capabilities"]["drop"][0], "ALL",
                "{which}"
            );
            assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz", "{which}");
            assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{which}");
            // The database URL reaches a process only from a Secret.
            for a in c["args"].as_array().into_iter().flatten() {
                assert!(
                    !a.as_str().unwrap_or("").contains("postgres"),
                    "{which}: {a:?}"
                );
            }
        }
        // The only Secret is the webhook's serving certificate; a token is
        // never in the chart.
        for secret in docs.iter().filter(|d| d["kind"] == "Secret") {
            assert_eq!(secret["type"], "kubernetes.io/tls", "{name}");
            assert_eq!(
                secret["metadata"]["name"], "licensor-webhook-tls",
                "{name}: the chart never holds a token"
            );
        }
        for d in docs
            .iter()
            .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
        {
            for rule in d["rules"].as_array().unwrap() {
                let resources = rule["resources"].to_string();
                assert!(!resources.contains('*'), "{name}: {rule}");
                assert!(!rule["verbs"].to_string().contains('*'), "{name}: {rule}");
                // Secrets: only `get`, only by name, only in a Role of the
                // release's namespace (those the accounts name).
                if resources.contains("secrets") {
                    assert_eq!(d["kind"], "Role", "{name}: {rule}");
                    assert_eq!(
                        d["metadata"]["namespace"], "licensor-system",
                        "{name}: {rule}"
                    );
                    assert_eq!(rule["verbs"], serde_json::json!(["get"]), "{name}: {rule}");
                    assert!(
                        rule["resourceNames"]
                            .as_array()
                            .is_some_and(|n| !n.is_empty()),
                        "{name}: {rule}"
                    );
                }
            }
        }
    }
}

#[test]
fn bad_values_fail_with_a_readable_message() {
    let cases: [(&[&str], &str); 12] = [
        (
            &["--set", "webhook.certificate.source=secret"],
            "webhook.certificate.source secret needs webhook.certificate.secretName",
        ),
        (
            &["--set", "webhook.timeoutSeconds=60"],
            "at '/webhook/timeoutSeconds': maximum: got 60, want 30",
        ),
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
            "at '/backend/kind': value must be one of 'embedded', 'postgres', 'remote'",
        ),
        (
            &["--set", "replicaCount=2"],
            "replicaCount > 1 needs backend.kind: postgres or remote",
        ),
        (
            &["--set", "backend.kind=remote"],
            "needs backend.remote.url",
        ),
        (
            &["--set", "backend.kind=postgres"],
            "backend.kind postgres needs backend.postgres.urlSecret.name",
        ),
        (
            &["--set", "platform.port=8080"],
            "platform.port and metrics.port must differ",
        ),
        (&["--set", "replicas=2"], "replicas"),
        (&["--set", "resync=soon"], "resync"),
        (
            &["--set", "webhook.expiryWarning=an hour"],
            "at '/webhook/expiryWarning'",
        ),
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

/// promtool, from Debian's prometheus package.
fn promtool() -> PathBuf {
    common::prometheus_program("LICENSOR_TEST_PROMTOOL", "promtool").into()
}

/// The one object `template` renders, in the namespace licensor-system,
/// with `sets` (`--set` values).
fn one_template(template: &str, sets: &[&str]) -> Value {
    let mut args = vec![
        "template",
        "licensor",
        CHART,
        "--namespace",
        "licensor-system",
        "--kube-version",
        KUBE,
        "--show-only",
        template,
    ];
    for set in sets {
        args.extend(["--set", set]);
    }
    let (code, rendered, err) = helm_offline(&args);
    assert_eq!(code, 0, "helm template {template}: {err}");
    serde_yaml::from_str(&rendered).unwrap()
}

/// The chart's alerts as Prometheus loads them: `promtool check rules` on
/// the rendered PrometheusRule's groups, and `promtool test rules` with
/// tests/chart/alerts.test.yaml, where every alert fires where it should
/// (with its summary, description and routing labels) and not before its
/// `for` or on another namespace.
#[test]
fn the_alerts_pass_promtool_check_and_their_unit_tests() {
    let rule = one_template(
        "templates/prometheusrule.yaml",
        &[
            "metrics.prometheusRule.enabled=true",
            "metrics.prometheusRule.alertLabels.team=platform",
        ],
    );
    assert_eq!(rule["kind"], "PrometheusRule");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rules.yaml"),
        serde_yaml::to_string(&rule["spec"]).unwrap(),
    )
    .unwrap();
    let tests = std::fs::read_to_string(here("tests/chart/alerts.test.yaml")).unwrap();
    std::fs::write(dir.path().join("alerts.test.yaml"), &tests).unwrap();
    let promtool = promtool();
    let run = |args: &[&str]| {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let alerts: Vec<String> = rule["spec"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .map(|r| r["alert"].as_str().unwrap().to_string())
        .collect();
    let (ok, text) = run(&["check", "rules", "rules.yaml"]);
    assert!(ok, "promtool check rules: {text}");
    assert!(
        text.contains(&format!("SUCCESS: {} rules found", alerts.len())),
        "{text}"
    );
    let (ok, text) = run(&["test", "rules", "alerts.test.yaml"]);
    assert!(ok, "promtool test rules: {text}");
    // Each alert has a case where it fires.
    let cases: Value = serde_yaml::from_str(&tests).unwrap();
    for alert in &alerts {
        let fires = cases["tests"].as_array().unwrap().iter().any(|t| {
            t["alert_rule_test"].as_array().unwrap().iter().any(|c| {
                c["alertname"] == alert.as_str()
                    && c["exp_alerts"].as_array().is_some_and(|a| !a.is_empty())
            })
        });
        assert!(fires, "no case where {alert} fires");
    }
    // The tests can fail: an alert that says something else is caught.
    let changed = tests.replacen("nearly all handed out", "nearly gone", 1);
    std::fs::write(dir.path().join("alerts.test.yaml"), changed).unwrap();
    let (ok, text) = run(&["test", "rules", "alerts.test.yaml"]);
    assert!(!ok && text.contains("LicensePoolNearlyExhausted"), "{text}");
}

/// The dashboard ConfigMap carries the dashboard file as it is, with the
/// label the Grafana sidecar selects by, and every panel's query names a
/// metric licensor exports (the end-to-end test in tests/operator.rs runs
/// them against a real Prometheus).
#[test]
fn the_dashboard_renders_as_a_configmap_the_grafana_sidecar_loads() {
    let map = one_template(
        "templates/dashboard.yaml",
        &[
            "metrics.dashboard.enabled=true",
            "metrics.dashboard.annotations.grafana_folder=Licenses",
        ],
    );
    assert_eq!(map["kind"], "ConfigMap");
    assert_eq!(map["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(map["metadata"]["annotations"]["grafana_folder"], "Licenses");
    let file = std::fs::read_to_string(here("charts/licensor/dashboards/licensor.json")).unwrap();
    let shipped: Value = serde_json::from_str(map["data"]["licensor.json"].as_str().unwrap())
        .expect("the ConfigMap holds JSON");
    assert_eq!(shipped, serde_json::from_str::<Value>(&file).unwrap());
    assert_eq!(shipped["uid"], "licensor");
    let (code, off, _) = helm_offline(&["template", "licensor", CHART, "--kube-version", KUBE]);
    assert_eq!(code, 0);
    assert!(!off.contains("grafana_dashboard"), "off by default");
}

#[test]
fn the_charts_crds_are_the_generated_ones() {
    let chart = std::fs::read_to_string(here("charts/licensor/crds/licensor.dev.yaml")).unwrap();
    let generated = std::fs::read_to_string(here("crds/licensor.dev.yaml")).unwrap();
    assert!(
        chart == generated,
        "charts/licensor/crds/ is stale: run `make crd`"
    );
}

/// A base64 string field, decoded.
fn decoded(field: &Value) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(field.as_str().expect("a base64 string"))
        .expect("base64")
}

/// POSTs a CREATE AdmissionReview to the webhook on 127.0.0.1:`port` as the
/// API server would call the Service `host`: over TLS, verifying the name
/// against a certificate signed by `ca` (PEM), and nothing else trusted.
fn admission_review(host: &str, port: u16, ca: &[u8]) -> Value {
    let review = serde_json::json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "1b1d8a55-3c0e-4a43-9d4b-5d3f7e0f2a11",
            "kind": {"group": "licensor.dev", "version": "v1alpha1", "kind": "DedicatedLicense"},
            "resource": {"group": "licensor.dev", "version": "v1alpha1", "resource": "dedicatedlicenses"},
            "name": "probe", "namespace": "licenses", "operation": "CREATE",
            "userInfo": {"username": "admin"},
            "object": serde_json::from_str::<Value>(&serde_json::to_string(
                &serde_yaml::from_str::<Value>(&license_yaml("probe", "qa-team", "TestOps", 1, "")).unwrap()
            ).unwrap()).unwrap(),
            "dryRun": false
        }
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(ca).expect("caBundle PEM"))
            .resolve(host, std::net::SocketAddr::from(([127, 0, 0, 1], port)))
            .build()
            .unwrap();
        client
            .post(format!("https://{host}:{port}/mutate"))
            .json(&review)
            .send()
            .await
            .expect("the webhook answers over TLS with the chart's certificate")
            .json()
            .await
            .expect("an AdmissionReview")
    })
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
        // A second account whose token is in a Secret: the operator may read
        // that one, by name, and no other.
        "--set",
        "accounts[0].name=default",
        "--set",
        "accounts[1].name=beta",
        "--set",
        "accounts[1].backend.url=https://licenses.beta.example",
        "--set",
        "accounts[1].backend.credentialsSecretRef.name=beta-licensor",
        "--set",
        "accounts[1].backend.credentialsSecretRef.key=token",
    ]);
    assert_eq!(r.code, 0, "helm install: {r:?}");
    assert!(
        r.stdout.contains("Seed the embedded store"),
        "NOTES.txt: {}",
        r.stdout
    );
    // What to look at when the pod does not start: the command runs as
    // typed, and the two common causes are named with what to set.
    let describe = r
        .stdout
        .lines()
        .find(|l| {
            l.trim_start()
                .starts_with("kubectl -n licensor-system describe pod")
        })
        .expect("a describe command in NOTES")
        .trim();
    let args: Vec<&str> = describe.split_whitespace().skip(1).collect();
    let described = cp.kubectl(&args);
    assert_eq!(described.code, 0, "{describe}: {described:?}");
    for hint in [
        "ErrImagePull / ImagePullBackOff",
        "set image.repository",
        "backend.embedded.persistence.storageClass",
    ] {
        assert!(r.stdout.contains(hint), "NOTES.txt: {}", r.stdout);
    }
    // What NOTES says to type suits the shipped image: a static binary at
    // /licensor and no tar (so no `kubectl cp`); the fixture on stdin. The
    // install test on a real node runs it (tests/chart_on_node.rs).
    let seed = r
        .stdout
        .lines()
        .find(|l| l.contains("backend seed"))
        .expect("a seed command in NOTES")
        .trim();
    assert!(
        seed.starts_with(
            "kubectl -n licensor-system exec -i deploy/licensor -c operator -- /licensor "
        ) && seed.ends_with(" < account.yaml"),
        "{seed}"
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
    let webhook = cp.json(&[
        "get",
        "mutatingwebhookconfiguration/licensor-licensor-system",
    ]);
    let secret = cp.json(&[
        "get",
        "secret/licensor-webhook-tls",
        "-n",
        "licensor-system",
    ]);
    cp.ok(&["get", "service/licensor-webhook", "-n", "licensor-system"]);
    assert_eq!(
        webhook["webhooks"][0]["clientConfig"]["caBundle"], secret["data"]["ca.crt"],
        "the webhook trusts the CA that signed the Secret's certificate"
    );
    assert_eq!(webhook["webhooks"][0]["failurePolicy"], "Ignore");
    let validating = cp.json(&[
        "get",
        "validatingwebhookconfiguration/licensor-licensor-system",
    ]);
    assert_eq!(
        validating["webhooks"][0]["clientConfig"]["caBundle"], secret["data"]["ca.crt"],
        "the validating webhook trusts the same CA"
    );
    assert_eq!(
        validating["webhooks"][0]["clientConfig"]["service"]["path"],
        "/validate"
    );
    assert_eq!(validating["webhooks"][0]["failurePolicy"], "Ignore");
    assert_eq!(validating["webhooks"][0]["sideEffects"], "None");
    // Here the API server cannot call a Service (no kube-proxy, and a
    // ClusterIP would leave loopback), so this test points the webhook at no
    // namespace and calls the operator's webhook itself, below, as the API
    // server would: by the Service's name, trusting only the caBundle.
    for configuration in [
        "mutatingwebhookconfiguration/licensor-licensor-system",
        "validatingwebhookconfiguration/licensor-licensor-system",
    ] {
        cp.ok(&[
            "patch",
            configuration,
            "--type=json",
            "-p",
            r#"[{"op": "add", "path": "/webhooks/0/namespaceSelector", "value": {"matchLabels": {"test.licensor.dev/none": "none"}}}]"#,
        ]);
    }
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
            &[
                "patch",
                "dedicatedlicenses.licensor.dev",
                "--subresource=status",
                "-A",
            ][..],
            true,
        ),
        (&["watch", "dedicatedlicenses.licensor.dev", "-A"][..], true),
        (&["list", "licensepools.licensor.dev"][..], true),
        (&["create", "licensepools.licensor.dev"][..], true),
        (&["delete", "licensepools.licensor.dev"][..], true),
        (
            &["patch", "licensepools.licensor.dev", "--subresource=status"][..],
            true,
        ),
        (&["update", "licensepools.licensor.dev"][..], false),
        (&["watch", "licenseaccounts.licensor.dev"][..], true),
        (&["list", "namespaces"][..], true),
        (&["update", "licenseaccounts.licensor.dev"][..], false),
        (&["patch", "namespaces"][..], false),
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
        // Nothing it does not call.
        (&["get", "dedicatedlicenses.licensor.dev", "-A"][..], false),
        (
            &[
                "update",
                "dedicatedlicenses.licensor.dev",
                "--subresource=finalizers",
                "-A",
            ][..],
            false,
        ),
        (&["list", "secrets", "-A"][..], false),
        (&["get", "secrets", "-n", "licensor-system"][..], false),
        (
            &["get", "secrets/beta-licensor", "-n", "licensor-system"][..],
            true,
        ),
        (
            &[
                "get",
                "secrets/licensor-webhook-tls",
                "-n",
                "licensor-system",
            ][..],
            false,
        ),
        (
            &["get", "secrets/beta-licensor", "-n", "default"][..],
            false,
        ),
        (&["list", "secrets", "-n", "licensor-system"][..], false),
        (&["watch", "licenseaccounts.licensor.dev"][..], true),
        (
            &[
                "patch",
                "licenseaccounts.licensor.dev",
                "--subresource=status",
            ][..],
            true,
        ),
        (&["delete", "licenseaccounts.licensor.dev"][..], false),
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
    // The webhook's certificate, as the Secret volume would hold it.
    let certs = cp.dir.path().join("webhook-certificate");
    std::fs::create_dir_all(&certs).unwrap();
    for file in ["tls.crt", "tls.key"] {
        std::fs::write(certs.join(file), decoded(&secret["data"][file])).unwrap();
    }
    let port = free_port();
    let listen = format!("--webhook-listen=127.0.0.1:{port}");
    let cert_dir = format!("--webhook-cert-dir={}", certs.display());
    let operator = Operator::start_as(
        &cp,
        &kubeconfig,
        "as-sa",
        &account.backend,
        &[
            "--lease-namespace=licensor-system",
            "--lease-name=licensor",
            "--lease-duration=4s",
            listen.as_str(),
            cert_dir.as_str(),
        ],
    );
    let answer = admission_review(
        "licensor-webhook.licensor-system.svc",
        port,
        &decoded(&webhook["webhooks"][0]["clientConfig"]["caBundle"]),
    );
    assert_eq!(answer["response"]["allowed"], true, "{answer:#}");
    assert_eq!(answer["response"]["patchType"], "JSONPatch", "{answer:#}");
    // kube-rs sends the patch bytes as a JSON array of numbers, which the
    // API server's decoder reads as []byte like a base64 string.
    let patch: Vec<u8> = serde_json::from_value(answer["response"]["patch"].clone()).unwrap();
    let patch: Value = serde_json::from_slice(&patch).unwrap();
    assert_eq!(
        patch,
        serde_json::json!([{"op": "add", "path": "/metadata/finalizers", "value": ["licensor.dev/cleanup"]}])
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

    // Upgrade with changed values; the webhook keeps its certificate.
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
    let after = cp.json(&[
        "get",
        "secret/licensor-webhook-tls",
        "-n",
        "licensor-system",
    ]);
    assert_eq!(
        after["data"], secret["data"],
        "the upgrade regenerated the certificate"
    );

    // Uninstall: the operator goes; the CRD, the licenses and the store's claim stay.
    let r = cp.helm(&["uninstall", "licensor", "-n", "licensor-system"]);
    assert_eq!(r.code, 0, "helm uninstall: {r:?}");
    assert_ne!(
        cp.kubectl(&["get", "deployment/licensor", "-n", "licensor-system"])
            .code,
        0
    );
    for configuration in [
        "mutatingwebhookconfiguration/licensor-licensor-system",
        "validatingwebhookconfiguration/licensor-licensor-system",
    ] {
        assert_ne!(
            cp.kubectl(&["get", configuration]).code,
            0,
            "{configuration} stayed"
        );
    }
    cp.ok(&["get", "crd/dedicatedlicenses.licensor.dev"]);
    cp.ok(&["get", "dl/qa", "-n", "licenses"]);
    cp.ok(&[
        "get",
        "persistentvolumeclaim/licensor",
        "-n",
        "licensor-system",
    ]);
}

/// The objects of the chart rendered offline with a value set (a file
/// under the repository), or the defaults.
fn rendered(values: Option<&str>) -> Vec<Value> {
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
    serde_yaml::Deserializer::from_str(&rendered)
        .filter_map(|d| Value::deserialize(d).ok())
        .filter(|v| !v.is_null())
        .collect()
}

/// The default install (embedded store) serves the platform API beside
/// the operator, on the same file: a pull-request pipeline plans through
/// it with a Viewer token and sees exactly what the operator then applies.
/// No kubelet runs here, so the test starts the two processes the pod
/// would, with the chart's rendered arguments, on one file.
#[test]
fn the_default_install_serves_the_plan_the_operator_then_applies() {
    let docs = rendered(None);
    let deployment = docs
        .iter()
        .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "licensor")
        .expect("the operator's Deployment");
    let pod = &deployment["spec"]["template"];
    let container = |name: &str| {
        pod["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {name} container"))
            .clone()
    };
    let (operator, platform) = (container("operator"), container("platform"));
    let env = |c: &Value, name: &str| -> String {
        c["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
            .unwrap_or_else(|| panic!("{name} not set in {}", c["name"]))
            .to_string()
    };
    let args = |c: &Value| -> Vec<String> {
        c["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect()
    };
    let data_mount = |c: &Value| {
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "data")
            .map(|m| m["mountPath"].clone())
    };
    // One store: the same file, on the same volume at the same path.
    let store_url = env(&operator, "LICENSOR_BACKEND");
    assert_eq!(env(&platform, "LICENSOR_BACKEND"), store_url);
    assert!(data_mount(&operator).is_some());
    assert_eq!(data_mount(&platform), data_mount(&operator));
    // The Service reaches the platform container of the operator's pod.
    let service = docs
        .iter()
        .find(|d| d["kind"] == "Service" && d["metadata"]["name"] == "licensor-platform")
        .expect("the platform Service");
    for (k, v) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(
            &pod["metadata"]["labels"][k], v,
            "the Service selects {k}={v}"
        );
    }
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "api");
    assert_eq!(platform["ports"][0]["name"], "api");

    // The pod's two processes, on one file in place of the volume.
    let cp = ControlPlane::start();
    let volume = cp.dir.path().join("data");
    std::fs::create_dir_all(&volume).unwrap();
    let store = store_url.replace("/data/", &format!("{}/", volume.display()));
    let licensor = |args: &[&str], env: &[(&str, &str)]| {
        let out = Command::new(env!("CARGO_BIN_EXE_licensor"))
            .args(args)
            .env_remove("LICENSOR_TOKEN")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let example = |path: &str| format!("{}/examples/{path}", env!("CARGO_MANIFEST_DIR"));
    // As the chart's NOTES say: seed, then a Viewer token for CI (README).
    let (code, _, err) = licensor(
        &[
            "--backend",
            &store,
            "backend",
            "seed",
            "-f",
            &example("account.yaml"),
        ],
        &[],
    );
    assert_eq!(code, 0, "seed: {err}");
    let (code, token, err) = licensor(
        &[
            "--backend",
            &store,
            "token",
            "create",
            "--role",
            "Viewer",
            "--name",
            "ci",
        ],
        &[],
    );
    assert_eq!(code, 0, "token create: {err}");
    let token = token.trim().to_string();

    let port = free_port();
    let serve_args: Vec<String> = args(&platform)
        .into_iter()
        .map(|a| {
            if a.starts_with("--listen=") {
                format!("--listen=127.0.0.1:{port}")
            } else {
                a
            }
        })
        .collect();
    let serve_log = std::fs::File::create(cp.dir.path().join("platform.log")).unwrap();
    let mut serve = Command::new(env!("CARGO_BIN_EXE_licensor"))
        .args(&serve_args)
        .env("LICENSOR_BACKEND", &store)
        .env_remove("LICENSOR_TOKEN")
        .stderr(serve_log)
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _serve = Kill(&mut serve);
    wait_for("the platform API", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .map(drop)
    });
    // The operator with its rendered flags, less what needs a kubelet's pod
    // (its listen address, the webhook's certificate).
    let mut flags: Vec<String> = args(&operator)
        .into_iter()
        .skip(1)
        .filter(|a| !a.starts_with("--listen=") && !a.starts_with("--webhook-"))
        .collect();
    flags.push("--lease-namespace=default".into());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let _operator = Operator::start(&cp, "chart-default", &store, &flags);

    // CI: plan through the platform API with the Viewer token.
    let api = format!("http://127.0.0.1:{port}");
    let ci = [
        ("LICENSOR_BACKEND", api.as_str()),
        ("LICENSOR_ACCOUNT", "acme"),
        ("LICENSOR_TOKEN", token.as_str()),
        ("LICENSOR_INSTANCE", "default"),
    ];
    let licenses = example("licenses");
    let (code, planned, err) = licensor(&["plan", "-f", &licenses, "-o", "json"], &ci);
    assert_eq!(code, 2, "plan through the API: {err}");
    let planned: Value = serde_json::from_str(&planned).unwrap();
    let changes = planned["changes"].as_array().unwrap();
    assert!(changes.len() >= 3, "{planned:#}");
    // A Viewer token plans and cannot apply.
    let (code, out, err) = licensor(&["apply", "-f", &licenses], &ci);
    assert_eq!(code, 1, "a Viewer applied: {out}{err}");
    assert!(
        out.contains("0 applied") && out.contains("refused Forbidden"),
        "{out}"
    );

    // The merge: the operator applies the same manifests.
    cp.ok(&["apply", "-f", &licenses]);
    for change in changes {
        let name = change["resource"]
            .as_str()
            .unwrap()
            .split('/')
            .nth(1)
            .unwrap();
        wait_for(
            &format!("{name} Reconciled"),
            Duration::from_secs(60),
            || {
                let o = cp.json(&["get", "dl", name, "-n", "licenses"]);
                let ready = o["status"]["conditions"]
                    .as_array()?
                    .iter()
                    .find(|c| c["type"] == "Ready")?
                    .clone();
                (o["status"]["observedGeneration"] == o["metadata"]["generation"]
                    && ready["reason"] == "Reconciled")
                    .then_some(())
            },
        );
    }
    // The store holds what the plan said, owned by the objects it named.
    let path = store.strip_prefix("sqlite:").unwrap();
    let snapshot = licensor::backend::store::Store::open_existing(Path::new(path))
        .unwrap()
        .snapshot("acme")
        .unwrap();
    for change in changes {
        let (org, product) = (
            change["organization"].as_str().unwrap(),
            change["product"].as_str().unwrap(),
        );
        let allocation = snapshot
            .allocations
            .iter()
            .find(|a| a.organization == org && a.product == product)
            .unwrap_or_else(|| panic!("{org}/{product} missing: {snapshot:?}"));
        assert_eq!(allocation.dedicated, change["to"], "{change:#}");
        assert_eq!(
            allocation.managed_by.as_deref(),
            Some(format!("default/{}", change["resource"].as_str().unwrap()).as_str())
        );
    }
    // And the next pull request's plan has nothing left to do.
    let (code, after, err) = licensor(&["plan", "-f", &licenses], &ci);
    assert_eq!(code, 0, "plan after the operator applied: {after}{err}");
}

/// The chart README's PostgreSQL and remote installs, run as written
/// (`common::chart_readme`), each on a fresh control plane; the embedded
/// install runs on a real node (tests/chart_on_node.rs).
#[test]
fn the_chart_readme_runs_on_the_control_plane() {
    for install in [Install::Postgres, Install::Remote] {
        let cp = ControlPlane::start_without_crds();
        let dir = chart_readme::reader_dir(install);
        let shell = cp.shell(dir.path());
        chart_readme::run(install, shell, String::new);
    }
}
