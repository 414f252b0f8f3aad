//! The operator as a neighbour of the license platform: what a resync and a
//! restart cost the platform (counted by `licensor serve`'s own request
//! metrics), and a platform that asks for a pause (429 with `Retry-After`)
//! gets one from every call, not just the refused one. A real
//! kube-apiserver and etcd; the HTTP backend on loopback.

mod common;
mod controlplane;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Account, Kind, license_yaml};
use controlplane::{ControlPlane, Operator, wait_for};

/// The tests here are heavy for two cores: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Products of the account, and the objects' organizations.
const PRODUCTS: [&str; 3] = ["TestOps", "Studio", "Runtime"];

fn fixture(organizations: usize) -> String {
    let mut s = String::from("account: acme\nproducts:\n");
    for p in PRODUCTS {
        s.push_str(&format!("  - {{name: {p}, total: 100000}}\n"));
    }
    s.push_str("organizations:\n");
    for i in 0..organizations {
        s.push_str(&format!("  - {{id: org-{i}}}\n"));
    }
    s
}

/// Objects `from..to`: object i for organization i, over the products.
fn manifests(from: usize, to: usize, count: impl Fn(usize) -> i64) -> String {
    (from..to)
        .map(|i| {
            license_yaml(
                &format!("l-{i}"),
                &format!("org-{i}"),
                PRODUCTS[i % PRODUCTS.len()],
                count(i),
                "",
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// An HTTP GET on loopback: the body, if it answers 200.
fn get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.lines()
        .next()?
        .contains(" 200 ")
        .then(|| body.to_string())
}

/// Requests `licensor serve` on `port` has answered, by its own metrics
/// (its `/metrics` scrapes left out).
fn platform_requests(port: u16) -> u64 {
    get(port, "/metrics")
        .expect("the platform's /metrics")
        .lines()
        .filter(|l| l.starts_with("licensor_http_requests_total{") && !l.contains("/metrics"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// One counter of the operator's metrics.
fn metric(op: &Operator, name: &str) -> f64 {
    op.get("/metrics")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// How many objects are Ready for their current generation.
fn ready(cp: &ControlPlane) -> usize {
    let list = cp.json(&["get", "dl", "-n", "licenses"]);
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| {
            o["status"]["observedGeneration"] == o["metadata"]["generation"]
                && o["status"]["conditions"].as_array().is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
        })
        .count()
}

/// Every object's and LicensePool's resourceVersion, and the events:
/// anything the operator writes to Kubernetes moves one of them.
fn kubernetes_state(cp: &ControlPlane) -> (Vec<String>, usize) {
    let mut versions = Vec::new();
    for kind in ["dl", "lp"] {
        let list = cp.json(&["get", kind, "-A"]);
        for o in list["items"].as_array().unwrap() {
            versions.push(format!(
                "{}/{}@{}",
                kind,
                o["metadata"]["name"].as_str().unwrap(),
                o["metadata"]["resourceVersion"].as_str().unwrap()
            ));
        }
    }
    versions.sort();
    let events = cp.json(&["get", "events", "-n", "licenses"])["items"]
        .as_array()
        .unwrap()
        .len();
    (versions, events)
}

/// The account behind `licensor serve`, and a file with an admin token.
fn remote(fixture: &str) -> (Account, u16, std::path::PathBuf) {
    let account = Account::seeded_on(Kind::Http, fixture);
    let port: u16 = account.backend.rsplit(':').next().unwrap().parse().unwrap();
    let token = account.path("token");
    let admin = &account
        .env
        .iter()
        .find(|(k, _)| k == "LICENSOR_TOKEN")
        .unwrap()
        .1;
    std::fs::write(&token, admin).unwrap();
    (account, port, token)
}

#[test]
fn a_resync_or_a_restart_reads_the_account_not_each_object() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    const RESYNC: Duration = Duration::from_secs(8);
    // Reads of the whole account (3 requests each) per resync period: at
    // most 3, as the snapshot lives half a period; the pools ride along.
    const MOST: u64 = 3 * 3;
    let cp = ControlPlane::start();
    cp.ok(&["create", "namespace", "licenses"]);
    let (account, port, token) = remote(&fixture(1001));
    let token_flag = format!("--token-file={}", token.display());
    let flags = [
        "--leader-elect=false",
        "--account=acme",
        &token_flag,
        "--resync=8s",
        "--concurrency=8",
    ];
    let mut operator = Operator::start(&cp, "scale", &account.backend, &flags);

    for (from, to) in [(0, 100), (100, 1000)] {
        cp.apply(&manifests(from, to, |i| 1 + (i % 3) as i64));
        wait_for(
            &format!("{to} objects Ready"),
            Duration::from_secs(300),
            || (ready(&cp) == to).then_some(()),
        );
        // Let the writes' own reads pass, then count one whole period.
        std::thread::sleep(RESYNC);
        let before = platform_requests(port);
        std::thread::sleep(RESYNC);
        let cost = platform_requests(port) - before;
        eprintln!("{to} objects in sync: {cost} platform requests in one resync period");
        assert!(
            cost <= MOST,
            "{to} objects in sync cost {cost} requests in one resync period (at most {MOST})"
        );
    }

    // A restart with 1,000 objects in sync: no Kubernetes writes, and the
    // account read as a whole, not per object.
    operator.terminate();
    let state = kubernetes_state(&cp);
    let before = platform_requests(port);
    let restarted = Operator::start(&cp, "scale-restarted", &account.backend, &flags);
    wait_for(
        "1,000 objects checked after the restart",
        Duration::from_secs(120),
        || (metric(&restarted, "licensor_quiet_checks_total") >= 1000.0).then_some(()),
    );
    let reads = platform_requests(port) - before;
    eprintln!("restart with 1000 objects in sync: {reads} platform requests");
    assert!(reads <= MOST, "the restart cost {reads} platform requests");
    assert_eq!(
        kubernetes_state(&cp),
        state,
        "the restart wrote to Kubernetes"
    );

    // Another restart, and right after it, while the operator lists its
    // 1,000 objects, a new object and a changed one: both reconciled as
    // they are now, never from an older listed copy.
    drop(restarted);
    let _again = Operator::start(&cp, "scale-again", &account.backend, &flags);
    cp.apply(&manifests(1000, 1001, |_| 4));
    cp.apply(&manifests(0, 1, |_| 5));
    wait_for(
        "the new and the changed object Ready for their generation",
        Duration::from_secs(60),
        || (ready(&cp) == 1001).then_some(()),
    );
    assert_eq!(account.allocation("org-1000", "Studio"), Some((4, 0)));
    assert_eq!(account.allocation("org-0", "TestOps"), Some((5, 0)));
}

/// A platform in front of `licensor serve`: forwards every request, notes
/// when each arrived and how it was answered, and answers 429 with
/// `Retry-After: 5` while told to.
struct Platform {
    port: u16,
    arrivals: Arc<Mutex<Vec<(Instant, u16)>>>,
    refusing_until: Arc<Mutex<Option<Instant>>>,
    _runtime: tokio::runtime::Runtime,
}

impl Platform {
    fn start(upstream: String) -> Platform {
        use axum::body::{Body, to_bytes};
        use axum::extract::Request;
        use axum::response::Response;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let arrivals: Arc<Mutex<Vec<(Instant, u16)>>> = Arc::default();
        let refusing_until: Arc<Mutex<Option<Instant>>> = Arc::default();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let (arrived, refusing) = (arrivals.clone(), refusing_until.clone());
        let http = reqwest::Client::new();
        let app = axum::Router::new().fallback(move |request: Request| {
            let (arrived, refusing, http, upstream) =
                (arrived.clone(), refusing.clone(), http.clone(), upstream.clone());
            async move {
                let now = Instant::now();
                let refuse = refusing.lock().unwrap().is_some_and(|until| now < until);
                if refuse {
                    arrived.lock().unwrap().push((now, 429));
                    return Response::builder()
                        .status(429)
                        .header("retry-after", "5")
                        .header("content-type", "application/problem+json")
                        .body(Body::from(
                            r#"{"type":"https://licensor.dev/problems/rate-limited","title":"Too Many Requests","status":429,"detail":"slow down"}"#,
                        ))
                        .unwrap();
                }
                let (parts, body) = request.into_parts();
                let body = to_bytes(body, 1 << 20).await.unwrap();
                let mut forwarded = http.request(
                    parts.method.clone(),
                    format!("{upstream}{}", parts.uri.path_and_query().unwrap()),
                );
                for (k, v) in &parts.headers {
                    if k != "host" {
                        forwarded = forwarded.header(k, v);
                    }
                }
                let answer = forwarded.body(body).send().await.unwrap();
                arrived.lock().unwrap().push((now, answer.status().as_u16()));
                let mut response = Response::builder().status(answer.status());
                for (k, v) in answer.headers() {
                    response = response.header(k, v);
                }
                response
                    .body(Body::from(answer.bytes().await.unwrap()))
                    .unwrap()
            }
        });
        runtime.spawn(async move { axum::serve(listener, app).await });
        Platform {
            port,
            arrivals,
            refusing_until,
            _runtime: runtime,
        }
    }
}

#[test]
fn a_429_with_retry_after_pauses_every_call_then_everything_converges() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let cp = ControlPlane::start();
    cp.ok(&["create", "namespace", "licenses"]);
    let (account, serve_port, token) = remote(&fixture(20));
    let platform = Platform::start(format!("http://127.0.0.1:{serve_port}"));
    let token_flag = format!("--token-file={}", token.display());
    let backend = format!("http://127.0.0.1:{}", platform.port);
    let _operator = Operator::start(
        &cp,
        "paused",
        &backend,
        &[
            "--leader-elect=false",
            "--account=acme",
            &token_flag,
            "--resync=3s",
            "--backoff=500ms",
            "--max-backoff=2s",
        ],
    );
    cp.apply(&manifests(0, 20, |_| 1));
    wait_for("20 objects Ready", Duration::from_secs(60), || {
        (ready(&cp) == 20).then_some(())
    });

    // The platform refuses for 8 s; meanwhile every object asks for more.
    let started = Instant::now();
    *platform.refusing_until.lock().unwrap() = Some(started + Duration::from_secs(8));
    cp.apply(&manifests(0, 20, |_| 2));
    let said = wait_for(
        "a status that names the pause",
        Duration::from_secs(5),
        || {
            let list = cp.json(&["get", "dl", "-n", "licenses"]);
            list["items"].as_array().unwrap().iter().find_map(|o| {
                let conditions = o["status"]["conditions"].as_array()?;
                conditions
                    .iter()
                    .find(|c| {
                        c["type"] == "Reconciling"
                            && c["message"]
                                .as_str()
                                .is_some_and(|m| m.contains("asked for a pause"))
                    })
                    .map(|c| c["message"].as_str().unwrap().to_string())
            })
        },
    );
    eprintln!("while paused: {said}");
    wait_for("20 objects Ready at 2", Duration::from_secs(60), || {
        (ready(&cp) == 20).then_some(())
    });
    for i in 0..20 {
        assert_eq!(
            account.allocation(&format!("org-{i}"), PRODUCTS[i % 3]),
            Some((2, 0))
        );
    }

    // After the first refusal, nothing for the 5 seconds it asked for
    // (but what was already on its way when it was answered).
    let arrivals = platform.arrivals.lock().unwrap().clone();
    let first = arrivals
        .iter()
        .find(|(at, status)| *at >= started && *status == 429)
        .expect("a refusal")
        .0;
    let during: Vec<Duration> = arrivals
        .iter()
        .filter(|(at, _)| {
            *at > first + Duration::from_millis(100) && *at < first + Duration::from_millis(4900)
        })
        .map(|(at, _)| *at - first)
        .collect();
    assert!(
        during.is_empty(),
        "requests during the pause, after the first refusal: {during:?}"
    );
    let refused = arrivals.iter().filter(|(_, s)| *s == 429).count();
    eprintln!("{refused} requests refused in all; none in the 5 s after the first");
}

/// `licensor serve` and `licensor operator` with their default addresses
/// on one host both come up; a second of either names the address in use
/// and the flag that sets it, and logs no colour codes into a file.
#[test]
fn serve_and_operator_run_side_by_side_with_their_defaults() {
    use std::process::{Command, Stdio};
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let cp = ControlPlane::start();
    let account = Account::seeded(&fixture(1));
    let licensor = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_licensor"))
            .args(["--backend", account.store()])
            .args(args)
            .env("KUBECONFIG", &cp.kubeconfig)
            .env_remove("LICENSOR_LISTEN")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _serve = Killed(licensor(&["serve"]));
    let _operator = Killed(licensor(&["operator", "--leader-elect=false"]));
    wait_for("serve on 127.0.0.1:8080", Duration::from_secs(30), || {
        get(8080, "/healthz")
    });
    wait_for("the operator on 8081", Duration::from_secs(60), || {
        get(8081, "/healthz")
    });
    for (args, address) in [
        (&["serve"][..], "127.0.0.1:8080 (--listen)"),
        (
            &["operator", "--leader-elect=false"][..],
            "0.0.0.0:8081 (--listen)",
        ),
    ] {
        let second = licensor(args).wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&second.stderr);
        assert!(!second.status.success(), "{args:?}: {stderr}");
        assert!(
            stderr.contains(address) && stderr.contains("in use"),
            "{args:?}: {stderr}"
        );
        assert!(
            !stderr.contains('\u{1b}'),
            "colour codes in a log: {stderr}"
        );
    }
}
