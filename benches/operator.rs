//! Operator benchmark on a real kube-apiserver and etcd.
//!
//! 1. Floor: N status patches (server-side apply of the status the operator
//!    wrote for a sample object) sent by a plain kube client with the
//!    operator's concurrency.
//! 2. The operator: N DedicatedLicense objects exist (each for its own
//!    organization), created while the admission webhook ran, as in a
//!    cluster where licensor is installed (WEBHOOK=0: without it). The
//!    `licensor operator` process starts, and the clock runs until every
//!    object is Ready. That includes its start, the initial list, a backend
//!    read and write, a status patch and an event per object (and, without
//!    the webhook, a finalizer patch).
//!    The ratio to the floor is printed, and beside it the ratio to the floor
//!    plus N finalizer patches, the least a new object costs when the
//!    operator must write its finalizer itself.
//!    A second pair starts the clock at creation: the plain client creates N
//!    more objects and patches each one's status; with the operator running,
//!    N more objects are created (through the webhook) and the clock runs
//!    until all are Ready.
//! 3. Peak RSS (VmHWM) of the operator with N and then with BIG objects
//!    (the BIG ones with the image's binary when IMAGE_BIN is set), and after
//!    a restart with BIG objects.
//! 4. Admission latency: 1,000 server-side dry-run creates, one at a time,
//!    through the mutating webhook alone and then with the validating
//!    webhook too (a backend read and a plan each); the objects of 2. and 3.
//!    are created through both, as in a cluster where licensor is installed.
//!
//! 5. The converge pair of 2. again, `RUNS - 1` more times (five in all by
//!    default), each on namespaces and an account of its own, and the
//!    median of the ratios. They run before the BIG objects of 3. are
//!    created, so every pair works on an account of the same order.
//!
//! Run with `make bench-operator` (or `cargo bench --bench operator`).
//! `N`, `BIG`, `CONCURRENCY`, `WEBHOOK`, `RUNS` and `TENANTS` (1: the
//! account has tenants, a name, a selector and globs) change the run;
//! `IMAGE_BIN` (set by `make bench-operator`) names the static binary the
//! image ships, whose memory after the restart of 3. is measured too.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/controlplane/mod.rs"]
mod controlplane;

use std::sync::Arc;
use std::time::Instant;

use futures::{StreamExt, TryStreamExt, stream};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, ResourceExt};
use licensor::resource::{DedicatedLicense, DedicatedLicenseSpec};
use serde_json::json;

use common::Account;
use controlplane::{ControlPlane, Operator, free_port, webhook_certificate};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn client(cp: &ControlPlane) -> Client {
    let kubeconfig = Kubeconfig::read_from(&cp.kubeconfig).expect("kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("client config");
    Client::try_from(config).expect("client")
}

/// The account's products; object `i` is for `PRODUCTS[i % 3]`.
const PRODUCTS: [&str; 3] = ["TestOps", "Studio", "Runtime"];

/// The resync period of the measured operator.
const RESYNC: std::time::Duration = std::time::Duration::from_secs(30);

fn license(i: usize) -> DedicatedLicense {
    let mut dl = DedicatedLicense::new(
        &format!("l-{i:05}"),
        DedicatedLicenseSpec {
            organization: format!("org-{i:05}"),
            product: PRODUCTS[i % PRODUCTS.len()].into(),
            account_ref: None,
            count: 3,
            until: None,
            then_count: None,
            allow_user_displacement: false,
            deletion_policy: Default::default(),
            management_policy: Default::default(),
        },
    );
    dl.metadata.namespace = None;
    dl
}

/// Object `i` as `kubectl apply` leaves it: its manifest in the
/// last-applied-configuration annotation, and two labels.
fn applied(i: usize) -> DedicatedLicense {
    let mut dl = license(i);
    dl.metadata.namespace = Some("bench".into());
    let labels = [
        ("app.kubernetes.io/part-of", "licenses".to_string()),
        ("team", format!("org-{i:05}")),
    ];
    dl.metadata.labels = Some(
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
    );
    let manifest = serde_json::to_string(&dl).expect("manifest");
    dl.metadata.annotations = Some(
        [(
            "kubectl.kubernetes.io/last-applied-configuration".to_string(),
            manifest + "\n",
        )]
        .into(),
    );
    dl.metadata.namespace = None;
    dl
}

/// What the plain client does for object `i`: one server-side apply of its status.
async fn write_status(
    api: Api<DedicatedLicense>,
    i: usize,
    status: Arc<serde_json::Value>,
) -> Result<DedicatedLicense, kube::Error> {
    api.patch_status(
        &format!("l-{i:05}"),
        &PatchParams::apply("floor").force(),
        &Patch::Apply(&*status),
    )
    .await
}

/// Server-side dry-run creates timed for the admission benchmark.
const ADMISSION_RUNS: usize = 1000;

/// `runs` server-side dry-run creates of distinct valid objects, one after
/// another; their latencies, sorted.
async fn dry_runs(api: &Api<DedicatedLicense>, runs: usize) -> Vec<std::time::Duration> {
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let mut latencies = Vec::with_capacity(runs);
    for i in 0..runs {
        let started = Instant::now();
        api.create(&dry_run, &license(i))
            .await
            .expect("dry-run create");
        latencies.push(started.elapsed());
    }
    latencies.sort();
    latencies
}

/// The `p` quantile of sorted latencies, in milliseconds.
fn quantile_ms(sorted: &[std::time::Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p) as usize).min(sorted.len() - 1);
    sorted[i].as_secs_f64() * 1000.0
}

/// Creates objects `range` in `api`, `concurrency` at a time.
async fn create(api: &Api<DedicatedLicense>, range: std::ops::Range<usize>, concurrency: usize) {
    create_with(api, range, concurrency, license).await
}

async fn create_with(
    api: &Api<DedicatedLicense>,
    range: std::ops::Range<usize>,
    concurrency: usize,
    object: fn(usize) -> DedicatedLicense,
) {
    stream::iter(range)
        .map(|i| {
            let api = api.clone();
            async move { api.create(&PostParams::default(), &object(i)).await }
        })
        .buffer_unordered(concurrency)
        .try_for_each(|_| async { Ok(()) })
        .await
        .expect("create objects");
}

/// Watches `api` (no polling, which would load the API server the operator
/// is measured on) and resolves when `n` objects are Ready=True, with the
/// moment the first one was.
async fn ready_span(api: Api<DedicatedLicense>, n: usize) -> (Instant, Instant) {
    use kube::runtime::{WatchStreamExt, watcher};
    let mut ready = std::collections::HashSet::new();
    let mut first = None;
    let mut events = std::pin::pin!(watcher(api, watcher::Config::default()).applied_objects());
    while let Some(dl) = events.try_next().await.expect("watch") {
        let is_ready = dl.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        });
        if is_ready {
            let now = Instant::now();
            let first = *first.get_or_insert(now);
            ready.insert(dl.metadata.name.clone().unwrap_or_default());
            if ready.len() >= n {
                return (first, now);
            }
        }
    }
    panic!("the watch ended");
}

/// When `n` objects of `api` are Ready=True.
async fn wait_ready(api: Api<DedicatedLicense>, n: usize) -> Instant {
    ready_span(api, n).await.1
}

fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// CPU seconds the kube-apiserver process has used so far.
fn apiserver_cpu() -> f64 {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "kube-apiserver")
        })
        .map(cpu_seconds)
        .sum()
}

/// User + system CPU seconds a process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    // utime and stime are fields 14 and 15; after ")" they are 12 and 13.
    (ticks(11) + ticks(12)) / 100.0
}

/// Time from creating object `i` to its Ready, with the operator running.
async fn one_new_object(api: &Api<DedicatedLicense>, i: usize) -> std::time::Duration {
    use kube::runtime::{WatchStreamExt, watcher};
    let name = format!("l-{i:05}");
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = std::pin::pin!(watcher(api.clone(), config).applied_objects());
    let started = Instant::now();
    api.create(&PostParams::default(), &license(i))
        .await
        .expect("create one object");
    while let Some(dl) = events.try_next().await.expect("watch") {
        let ready = dl.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        });
        if ready {
            return started.elapsed();
        }
    }
    panic!("the watch ended before {name} was Ready")
}

fn fixture(n: usize) -> String {
    let mut s = String::from("account: acme\nproducts:\n");
    for p in PRODUCTS {
        s.push_str(&format!("  - {{name: {p}, total: {}}}\n", (n + 1) * 3));
    }
    s.push_str("organizations:\n  - {id: sample}\n");
    for i in 0..n {
        s.push_str(&format!("  - {{id: org-{i:05}}}\n"));
    }
    s
}

/// What the plain client's writes took.
struct Floor {
    /// N status patches of existing objects.
    patches: std::time::Duration,
    /// N finalizer patches, for scale.
    finalizers: std::time::Duration,
    /// N objects created and then given their status.
    created: std::time::Duration,
    /// The API server's CPU seconds during the patches.
    api_cpu: f64,
}

/// The floor in `api`'s namespace: N objects created, then timed: their N
/// status patches (`status`, the one the operator wrote for a sample), N
/// finalizer patches, and N more objects created and patched, each with
/// the operator's concurrency and ended when a watcher sees all Ready.
async fn floor_run(
    api: &Api<DedicatedLicense>,
    n: usize,
    concurrency: usize,
    status: &Arc<serde_json::Value>,
) -> Floor {
    create(api, 0..n, concurrency).await;
    let watch = tokio::spawn(wait_ready(api.clone(), n));
    let started = Instant::now();
    let api_cpu = apiserver_cpu();
    stream::iter(0..n)
        .map(|i| write_status(api.clone(), i, status.clone()))
        .buffer_unordered(concurrency)
        .try_for_each(|_| async { Ok(()) })
        .await
        .expect("floor patches");
    let patches = watch.await.expect("watch task") - started;
    let api_cpu = apiserver_cpu() - api_cpu;
    // And the finalizer patch every managed object needs before its first
    // backend write, for scale.
    let started = Instant::now();
    stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let patch: json_patch::Patch = serde_json::from_value(json!([
                    {"op": "test", "path": "/metadata/finalizers", "value": null},
                    {"op": "add", "path": "/metadata/finalizers", "value": ["licensor.dev/cleanup"]}
                ]))
                .expect("patch");
                api.patch(
                    &format!("l-{i:05}"),
                    &PatchParams::default(),
                    &Patch::Json::<()>(patch),
                )
                .await
            }
        })
        .buffer_unordered(concurrency)
        .try_for_each(|_| async { Ok(()) })
        .await
        .expect("finalizer patches");
    let finalizers = started.elapsed();
    // A second floor that starts the clock at creation: N more objects, each
    // created and then given its status by the plain client.
    let watch = tokio::spawn(wait_ready(api.clone(), 2 * n));
    let started = Instant::now();
    stream::iter(n..2 * n)
        .map(|i| {
            let (api, status) = (api.clone(), status.clone());
            async move {
                api.create(&PostParams::default(), &license(i)).await?;
                write_status(api, i, status).await
            }
        })
        .buffer_unordered(concurrency)
        .try_for_each(|_| async { Ok(()) })
        .await
        .expect("floor creates and patches");
    let created = watch.await.expect("watch task") - started;
    Floor {
        patches,
        finalizers,
        created,
        api_cpu,
    }
}

/// What the operator's converge took, and what it was like after the first N.
struct Converged {
    /// Still running, on the 2 N objects.
    operator: Operator,
    /// From its start to the N existing objects Ready.
    took: std::time::Duration,
    first_ready: std::time::Duration,
    /// N more created with it running, to the last Ready.
    created: std::time::Duration,
    api_cpu: f64,
    /// Of the first N, how many admission gave the finalizer.
    with_finalizer: usize,
    rss: f64,
    cpu: f64,
    metrics: String,
}

/// The operator in `namespace`: objects `base..base + n` (each for
/// its own organization) are created while `serving` answers the admission
/// webhook (then it stops, freeing the port for the measured operator),
/// `licensor operator` starts with `common` flags and the clock runs until
/// all are Ready; then `base + n..base + 2n` are created with it running,
/// timed to the last Ready.
#[allow(clippy::too_many_arguments)]
async fn converge(
    cp: &ControlPlane,
    account: &Account,
    client: &Client,
    namespace: &str,
    base: usize,
    n: usize,
    concurrency: usize,
    common: &[&str],
    serving: Option<Operator>,
) -> Converged {
    let api: &Api<DedicatedLicense> = &Api::namespaced(client.clone(), namespace);
    let creates_before = creates(account);
    create(api, base..base + n, concurrency).await;
    if let Some(mut serving) = serving {
        serving.terminate();
    }
    let with_finalizer = api
        .list(&Default::default())
        .await
        .expect("list")
        .items
        .iter()
        .filter(|o| !o.finalizers().is_empty())
        .count();
    let mut flags = vec![
        "--leader-elect=false".to_string(),
        format!("--namespace={namespace}"),
    ];
    flags.extend(common.iter().map(|f| f.to_string()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let watch = tokio::spawn(ready_span(api.clone(), n));
    let started = Instant::now();
    let api_cpu = apiserver_cpu();
    let operator = Operator::start(cp, namespace, &account.backend, &flags);
    let (first, last) = watch.await.expect("watch task");
    let (took, first_ready) = (last - started, first - started);
    let api_cpu = apiserver_cpu() - api_cpu;
    let rss = peak_rss_mib(operator.pid());
    let cpu = cpu_seconds(operator.pid());
    let metrics = operator.get("/metrics").unwrap_or_default();
    let created = creates(account) - creates_before;
    if created != n {
        let audit = account.audit();
        let mut by_org: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for e in audit.iter().filter(|e| e["action"] == "create") {
            by_org
                .entry(e["organization"].as_str().unwrap_or_default().to_string())
                .or_default()
                .push(format!("{} by {}", e["time"], e["actor"]));
        }
        by_org.retain(|_, v| v.len() > 1);
        panic!(
            "every object allocated exactly once: {created} creates for {n} objects; twice: {by_org:?}"
        );
    }
    // With the operator running: N more objects, from the first create to
    // the last Ready (the second floor's clock).
    let watch = tokio::spawn(wait_ready(api.clone(), 2 * n));
    let started = Instant::now();
    create(api, base + n..base + 2 * n, concurrency).await;
    let created = watch.await.expect("watch task") - started;
    Converged {
        operator,
        took,
        first_ready,
        created,
        api_cpu,
        with_finalizer,
        rss,
        cpu,
        metrics,
    }
}

/// Waits until `operator` checked `n` objects in sync (two minutes at most).
async fn all_checked(operator: &Operator, n: usize) {
    let checked = Instant::now();
    while operator
        .get("/metrics")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("licensor_quiet_checks_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        < n as f64
        && checked.elapsed() < std::time::Duration::from_secs(120)
    {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Allocations the store created so far.
fn creates(account: &Account) -> usize {
    account
        .audit()
        .iter()
        .filter(|e| e["action"] == "create")
        .count()
}

#[tokio::main]
async fn main() {
    let n = env("N", 1000);
    let big = env("BIG", 10_000).max(2 * n);
    let concurrency = env("CONCURRENCY", 16);
    let webhook = env("WEBHOOK", 1) != 0;
    let tenants = env("TENANTS", 0) != 0;
    let cp = ControlPlane::start();
    for ns in ["floor", "bench", "elsewhere"] {
        cp.ok(&["create", "namespace", ns]);
    }
    if tenants {
        // One account with tenants, as a shared cluster has it: every pass
        // and every admission review decides the tenant rule (a label
        // selector and a glob) before anything else.
        cp.apply(
            "apiVersion: licensor.dev/v1alpha1
kind: LicenseAccount
metadata: {name: default}
spec:
  tenants:
    - namespaces: [elsewhere]
      organizations: [sample, 'org-*']
    - namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: Exists}]}
      organizations: ['org-*']
      maxCount: 1000
",
        );
    }
    let client = client(&cp).await;
    let runs = env("RUNS", 5).max(1);
    // Two more organizations for the single objects created at the end.
    let account = Account::seeded(&fixture(big + 2));
    assert!(big >= 2 * n, "BIG must be at least 2 N");

    // The status the floor writes is one the operator wrote: an operator
    // watching another namespace (it serves the admission webhook later)
    // reconciles one object there first.
    let certs = cp.dir.path().join("webhook-certs");
    let webhook_port = free_port();
    let listen = format!("--webhook-listen=127.0.0.1:{webhook_port}");
    let cert_dir = format!("--webhook-cert-dir={}", certs.display());
    let ca = webhook_certificate(&certs);
    let elsewhere = Operator::start(
        &cp,
        "elsewhere",
        &account.backend,
        &[
            listen.as_str(),
            cert_dir.as_str(),
            "--leader-elect=false",
            "--namespace=elsewhere",
        ],
    );
    let sample_api: Api<DedicatedLicense> = Api::namespaced(client.clone(), "elsewhere");
    let mut sample = license(0);
    sample.metadata.name = Some("sample".into());
    sample.spec.organization = "sample".into();
    let sample_ready = tokio::spawn(wait_ready(sample_api.clone(), 1));
    sample_api
        .create(&PostParams::default(), &sample)
        .await
        .expect("create the sample");
    sample_ready.await.expect("sample Ready");
    let sample = sample_api.get("sample").await.expect("the sample");

    // The floor: a plain client writing the same number of statuses.
    let status = Arc::new(json!({
        "apiVersion": "licensor.dev/v1alpha1", "kind": "DedicatedLicense",
        "status": sample.status,
    }));
    let floor_api: Api<DedicatedLicense> = Api::namespaced(client.clone(), "floor");
    let Floor {
        patches: floor,
        finalizers,
        created: created_floor,
        api_cpu: floor_api_cpu,
    } = floor_run(&floor_api, n, concurrency, &status).await;

    // The operator, from process start to every object Ready. The objects
    // were created while the admission webhook ran (an operator watching
    // another namespace served it), as they are in a cluster where licensor
    // is installed; WEBHOOK=0 measures without it.
    let api: Api<DedicatedLicense> = Api::namespaced(client.clone(), "bench");
    let concurrency_flag = format!("--concurrency={concurrency}");
    let resync_flag = format!("--resync={}s", RESYNC.as_secs());
    // What every measured operator runs with, beside its namespace.
    let mut common = vec![concurrency_flag.as_str(), resync_flag.as_str()];
    if webhook {
        common.extend([listen.as_str(), cert_dir.as_str()]);
    }
    let mut flags = vec!["--leader-elect=false", "--namespace=bench"];
    flags.extend(&common);
    if webhook {
        cp.register_webhook(webhook_port, &ca);
        // The API server picks the configuration up from its own watch.
        let dry_run = PostParams {
            dry_run: true,
            ..Default::default()
        };
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        while api
            .create(&dry_run, &license(0))
            .await
            .map_or(true, |o| o.finalizers().is_empty())
        {
            assert!(Instant::now() < deadline, "the webhook never answered");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    // Admission latency: server-side dry-run creates, one at a time, with
    // the mutating webhook alone and then with the validating one too (a
    // backend read and a plan per request, on the embedded store).
    let admission = if webhook {
        let base = dry_runs(&api, ADMISSION_RUNS).await;
        cp.register_validating_webhook(webhook_port, &ca);
        let mut ghost = license(0);
        ghost.spec.organization = "no-such-organization".into();
        let dry_run = PostParams {
            dry_run: true,
            ..Default::default()
        };
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        while api.create(&dry_run, &ghost).await.is_ok() {
            assert!(
                Instant::now() < deadline,
                "the validating webhook never answered"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        Some((base, dry_runs(&api, ADMISSION_RUNS).await))
    } else {
        None
    };
    let Converged {
        operator,
        took,
        first_ready,
        created: created_operator,
        api_cpu: operator_api_cpu,
        with_finalizer,
        rss: rss_n,
        cpu: cpu_n,
        metrics,
    } = converge(
        &cp,
        &account,
        &client,
        "bench",
        0,
        n,
        concurrency,
        &common,
        webhook.then_some(elsewhere),
    )
    .await;
    let metric = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let passes = metric("licensor_reconcile_duration_seconds_count");
    let mean_pass = metric("licensor_reconcile_duration_seconds_sum") / passes;

    // The converge pair again, RUNS - 1 more times (five in all by
    // default), each on namespaces and organizations of its own, for the
    // median: the floors move by up to 40% between runs. Each on an account
    // of its own, as the first one's was (before the big batch).
    let mut operator = operator;
    operator.terminate();
    let mut pairs = vec![(
        took.as_secs_f64() / floor.as_secs_f64(),
        created_operator.as_secs_f64() / created_floor.as_secs_f64(),
        with_finalizer,
    )];
    for k in 1..runs {
        let (floor_ns, bench_ns) = (format!("floor-{k}"), format!("bench-{k}"));
        cp.ok(&["create", "namespace", &floor_ns]);
        cp.ok(&["create", "namespace", &bench_ns]);
        let f = floor_run(
            &Api::namespaced(client.clone(), &floor_ns),
            n,
            concurrency,
            &status,
        )
        .await;
        // An account of its own, as the first pair's was when it ran.
        let account = Account::seeded(&fixture(2 * n));
        let serving = webhook.then(|| {
            Operator::start(
                &cp,
                &format!("elsewhere-{k}"),
                &account.backend,
                &[
                    listen.as_str(),
                    cert_dir.as_str(),
                    "--leader-elect=false",
                    "--namespace=elsewhere",
                ],
            )
        });
        let c = converge(
            &cp,
            &account,
            &client,
            &bench_ns,
            0,
            n,
            concurrency,
            &common,
            serving,
        )
        .await;
        drop(c.operator);
        pairs.push((
            c.took.as_secs_f64() / f.patches.as_secs_f64(),
            c.created.as_secs_f64() / f.created.as_secs_f64(),
            c.with_finalizer,
        ));
    }

    // Memory with BIG objects: an operator on the first pair's 2 N
    // objects, and BIG - 2 N more created; the image's binary when
    // IMAGE_BIN names it, as that is what a cluster runs.
    let image = std::env::var_os("IMAGE_BIN").map(std::path::PathBuf::from);
    let operator = match &image {
        Some(binary) => Operator::start_binary(
            &cp,
            binary,
            &cp.kubeconfig,
            "bench-big",
            &account.backend,
            &flags,
        ),
        None => Operator::start(&cp, "bench-big", &account.backend, &flags),
    };
    let watch = tokio::spawn(wait_ready(api.clone(), big));
    let started = Instant::now();
    // Created as `kubectl apply` leaves them: their manifest in an
    // annotation, and two labels.
    create_with(&api, 2 * n..big, concurrency, applied).await;
    let took_big = watch.await.expect("watch task") - started;
    let rss_big = peak_rss_mib(operator.pid());

    // One resync period with BIG objects in sync: what it reads.
    let reads = |op: &Operator| {
        let metrics = op.get("/metrics").unwrap_or_default();
        let read = |what: &str| -> f64 {
            metrics
                .lines()
                .find(|l| {
                    l.starts_with(&format!("licensor_backend_reads_total{{read=\"{what}\"}}"))
                })
                .and_then(|l| l.rsplit(' ').next()?.parse().ok())
                .unwrap_or(0.0)
        };
        (read("account"), read("allocation"))
    };
    tokio::time::sleep(RESYNC).await;
    let before = reads(&operator);
    tokio::time::sleep(RESYNC).await;
    let after = reads(&operator);
    let (account_reads, allocation_reads) = (after.0 - before.0, after.1 - before.1);
    // On the HTTP backend: 3 requests per account read, 2 per allocation.
    let resync_requests = 3.0 * account_reads + 2.0 * allocation_reads;
    // A new object while BIG are resynced (their passes run all the time,
    // spread over the period).
    let new_during_resync = one_new_object(&api, big).await;

    // A restart with BIG objects in sync, and a new object right after.
    let mut operator = operator;
    operator.terminate();
    let restarted_at = Instant::now();
    let restarted = Operator::start(&cp, "bench-restarted", &account.backend, &flags);
    let up = restarted_at.elapsed();
    let new_after_restart = one_new_object(&api, big + 1).await;
    all_checked(&restarted, big).await;
    let after = reads(&restarted);
    let restart_requests = 3.0 * after.0 + 2.0 * after.1;
    let rss_restarted = peak_rss_mib(restarted.pid());
    drop(restarted);
    // The same restart with the binary the image ships (static, musl's
    // allocator), when IMAGE_BIN names it (`make bench-operator` builds it).
    let rss_image = match &image {
        Some(binary) => {
            let image = Operator::start_binary(
                &cp,
                binary,
                &cp.kubeconfig,
                "bench-image",
                &account.backend,
                &flags,
            );
            all_checked(&image, big).await;
            Some(peak_rss_mib(image.pid()))
        }
        None => None,
    };

    println!(
        "operator benchmark (real kube-apiserver + etcd on loopback, concurrency {concurrency}, webhook {})",
        if webhook { "on" } else { "off" }
    );
    println!("  objects created with the finalizer by admission: {with_finalizer} of {n}");
    println!(
        "  the floor writes the status the operator wrote for a new object ({} bytes of JSON)",
        status["status"].to_string().len()
    );
    println!(
        "  floor: {n} status patches by a plain client   {:>8.2} s  ({:.0}/s)",
        floor.as_secs_f64(),
        n as f64 / floor.as_secs_f64()
    );
    let both = floor + finalizers;
    println!(
        "  floor + {n} finalizer patches (the writes a new managed object needs) {:>6.2} s",
        both.as_secs_f64()
    );
    println!(
        "  operator: {n} objects to Ready                {:>8.2} s  ({:.0}/s)",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );
    println!(
        "    of which until the first object is Ready     {:>8.2} s",
        first_ready.as_secs_f64()
    );
    println!(
        "  ratio operator / floor                        {:>8.2}    (target <= 1.5)",
        took.as_secs_f64() / floor.as_secs_f64()
    );
    println!(
        "  ratio operator / (floor + finalizers)         {:>8.2}",
        took.as_secs_f64() / both.as_secs_f64()
    );
    println!(
        "  floor: {n} objects created, then patched      {:>8.2} s",
        created_floor.as_secs_f64()
    );
    println!(
        "  operator: {n} objects created, to Ready       {:>8.2} s",
        created_operator.as_secs_f64()
    );
    println!(
        "  ratio, clock from creation                    {:>8.2}",
        created_operator.as_secs_f64() / created_floor.as_secs_f64()
    );
    println!(
        "  API server CPU: floor {floor_api_cpu:.2} s, operator {operator_api_cpu:.2} s (up to all Ready)"
    );
    println!(
        "  operator passes: {passes:.0}, mean pass {:.1} ms, operator CPU {cpu_n:.2} s",
        mean_pass * 1000.0
    );
    println!(
        "  operator: {} more created and Ready         {:>8.2} s",
        big - 2 * n,
        took_big.as_secs_f64()
    );
    println!("  peak RSS with {n:>6} objects                  {rss_n:>8.1} MiB");
    println!(
        "  peak RSS with {big:>6} objects                  {rss_big:>8.1} MiB (created as kubectl apply leaves them, with two labels each; {}) (target < 50)",
        if image.is_some() {
            "the image's static (musl) binary"
        } else {
            "this build; IMAGE_BIN not set"
        }
    );
    println!(
        "  peak RSS after a restart with {big} objects    {rss_restarted:>8.1} MiB (target < 50)"
    );
    match rss_image {
        Some(rss) => {
            println!("  the same, the image's static (musl) binary    {rss:>8.1} MiB (target < 50)")
        }
        None => println!("  the same, the image's static (musl) binary    (IMAGE_BIN not set)"),
    }
    println!(
        "  one resync period ({}s) with {big} objects in sync over {} products: {account_reads:.0} account reads, {allocation_reads:.0} allocation reads = {resync_requests:.0} requests on the HTTP backend (target <= 10)",
        RESYNC.as_secs(),
        PRODUCTS.len()
    );
    println!(
        "  restart with {big} objects in sync: up in {:.2} s, {restart_requests:.0} backend requests",
        up.as_secs_f64()
    );
    println!(
        "  one new object to Ready: while {big} are resynced {:.2} s, right after a restart {:.2} s (target < 1 s)",
        new_during_resync.as_secs_f64(),
        new_after_restart.as_secs_f64()
    );
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let list = |v: &[f64]| {
        v.iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (existing, from_creation): (Vec<f64>, Vec<f64>) =
        pairs.iter().map(|&(a, b, _)| (a, b)).unzip();
    println!(
        "  converge ratio over {} runs (operator / floor): {}; median {:.2} (target <= 1.5)",
        pairs.len(),
        list(&existing),
        median(existing.clone())
    );
    println!(
        "  clock from creation, same runs: {}; median {:.2}",
        list(&from_creation),
        median(from_creation.clone())
    );
    println!(
        "  objects created with the finalizer by admission, per run: {:?} of {n}",
        pairs.iter().map(|p| p.2).collect::<Vec<_>>()
    );
    if let Some((base, validating)) = admission {
        println!(
            "  admission, {ADMISSION_RUNS} dry-run creates one at a time: mutating only p50 {:.1} ms p99 {:.1} ms; with validation p50 {:.1} ms p99 {:.1} ms (target p99 < 20)",
            quantile_ms(&base, 0.5),
            quantile_ms(&base, 0.99),
            quantile_ms(&validating, 0.5),
            quantile_ms(&validating, 0.99),
        );
    }
}
