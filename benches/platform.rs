//! Load benchmark of `licensor serve` on loopback: allocation writes and
//! reads per second with p50 and p99 latency, from a client with a pool of
//! keep-alive connections in this process (which shares the two cores with
//! the server).
//!
//! Then the same writes on a PostgreSQL store (Debian's server, started as
//! in the tests, TLS on), through one and through three `licensor serve`
//! replicas, next to the floor measured in the same run on the same server:
//! `pgbench`'s simple-update script at the same client count.
//!
//! Run with `make bench-platform` (or `cargo bench --bench platform`);
//! `WRITES`, `READS`, `PG_WRITES` and `CLIENTS` change the sizes
//! (`PG_WRITES=0` skips PostgreSQL).

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use serde_json::json;

use common::{Account, Kind};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const ORGS: usize = 2000;

fn fixture() -> String {
    let mut s = String::from(
        "account: acme\nproducts: [{name: TestOps, total: 100000000}]\norganizations:\n",
    );
    for i in 0..ORGS {
        s.push_str(&format!("  - {{id: org-{i}}}\n"));
    }
    s
}

/// Runs `n` requests built by `request`, `clients` at a time; returns the
/// wall time and the sorted latencies, and checks every answer was 200.
async fn load(
    n: usize,
    clients: usize,
    request: impl Fn(usize) -> reqwest::RequestBuilder,
) -> (Duration, Vec<Duration>) {
    let started = Instant::now();
    let mut latencies: Vec<Duration> = stream::iter(0..n)
        .map(|i| {
            let r = request(i);
            async move {
                let t = Instant::now();
                let response = r.send().await.expect("request");
                let status = response.status();
                let _ = response.bytes().await;
                assert!(status.is_success(), "answer {status}");
                t.elapsed()
            }
        })
        .buffer_unordered(clients)
        .collect()
        .await;
    let wall = started.elapsed();
    latencies.sort();
    (wall, latencies)
}

fn report(what: &str, n: usize, (wall, lat): &(Duration, Vec<Duration>), target: &str) {
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "  {what:<7} {n:>7} in {:>6.2} s  {:>8.0}/s (target {target})   p50 {:>6.2} ms   p99 {:>6.2} ms (target < 20)",
        wall.as_secs_f64(),
        n as f64 / wall.as_secs_f64(),
        pct(0.50).as_secs_f64() * 1000.0,
        pct(0.99).as_secs_f64() * 1000.0,
    );
}

#[tokio::main]
async fn main() {
    let writes = env("WRITES", 20_000);
    let reads = env("READS", 100_000);
    let clients = env("CLIENTS", 32);
    let account = Account::seeded_on(Kind::Http, &fixture());
    let token = account
        .env
        .iter()
        .find(|(k, _)| k == "LICENSOR_TOKEN")
        .unwrap()
        .1
        .clone();
    let base = Arc::new(format!(
        "{}/v1/accounts/acme/organizations",
        account.backend
    ));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()
        .unwrap();

    // Each write is a real change: org i % ORGS moves between 1 and 9 seats.
    let written = load(writes, clients, |i| {
        http.put(format!("{base}/org-{}/allocations/TestOps", i % ORGS))
            .bearer_auth(&token)
            .json(&json!({"dedicated": 1 + (i / ORGS) % 9, "managedBy": "bench"}))
    })
    .await;
    let read = load(reads, clients, |i| {
        http.get(format!("{base}/org-{}/allocations/TestOps", i % ORGS))
            .bearer_auth(&token)
    })
    .await;
    println!("licensor serve on loopback, {clients} concurrent clients, embedded store");
    report("writes", writes, &written, ">= 2,000/s");
    report("reads", reads, &read, ">= 20,000/s");
    let audit = account.audit().len();
    println!("  audit entries after the run: {audit}");

    match env("PG_WRITES", 20_000) {
        0 => println!("PostgreSQL: skipped (PG_WRITES=0)"),
        writes => postgres(writes, clients).await,
    }
}

/// Writes through `licensor serve` replicas on one PostgreSQL database,
/// against pgbench on the same server.
async fn postgres(writes: usize, clients: usize) {
    let account = tokio::task::spawn_blocking(|| Account::seeded_on(Kind::Postgres, &fixture()))
        .await
        .unwrap();
    let pg = common::postgres::server();
    let token = account.token("AccountAdmin", "bench");
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()
        .unwrap();
    let Floor {
        tps: floor,
        p50,
        p99,
    } = pgbench(pg, clients);
    println!(
        "PostgreSQL {} (TLS), {clients} concurrent clients",
        pg.address().1
    );
    println!(
        "  pgbench simple-update (the floor): {floor:.0} transactions/s   p50 {:>6.2} ms   p99 {:>6.2} ms",
        p50.as_secs_f64() * 1000.0,
        p99.as_secs_f64() * 1000.0,
    );
    for (round, n) in [1, 3].into_iter().enumerate() {
        let replicas: Vec<_> = (0..n)
            .map(|_| common::postgres::replica(&account, pg.password()))
            .collect();
        let urls: Vec<String> = replicas
            .iter()
            .map(|(_, u)| format!("{u}/organizations"))
            .collect();
        let written = load(writes, clients, |i| {
            http.put(format!(
                "{}/org-{}/allocations/TestOps",
                urls[i % n],
                i % ORGS
            ))
            .bearer_auth(&token)
            .json(&json!({"dedicated": 1 + (i + round) % 9, "managedBy": "bench"}))
        })
        .await;
        report(&format!("{n} x serve"), writes, &written, ">= floor / 2");
        println!(
            "    ratio to pgbench: {:.2} (target >= 0.5)",
            writes as f64 / written.0.as_secs_f64() / floor
        );
    }
}

/// What pgbench measured: transactions per second, and the latency of its
/// transactions (from its log of each one).
struct Floor {
    tps: f64,
    p50: Duration,
    p99: Duration,
}

/// pgbench's simple-update script for 10 s on a database of its own.
fn pgbench(pg: &common::postgres::Server, clients: usize) -> Floor {
    let database = pg.database();
    let (host, port) = pg.address();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(pg.tools().join("pgbench"))
            .args(["-h", &host, "-p", &port.to_string(), "-U", "licensor"])
            .args(args)
            .arg(&database)
            .env("PGPASSWORD", pg.password())
            .env("PGSSLMODE", "require")
            .output()
            .expect("run pgbench");
        assert!(
            out.status.success(),
            "pgbench: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&["-i", "-q", "-s", "1"]);
    let logs = tempfile::tempdir().unwrap();
    let prefix = logs.path().join("tx");
    let out = run(&[
        "-n",
        "-b",
        "simple-update",
        "-c",
        &clients.to_string(),
        "-j",
        "2",
        "-T",
        "10",
        "--log",
        &format!("--log-prefix={}", prefix.display()),
    ]);
    let tps = out
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no tps in pgbench's output:\n{out}"));
    // One line per transaction: client, number, latency in microseconds, ...
    let mut latencies: Vec<u64> = std::fs::read_dir(logs.path())
        .unwrap()
        .flat_map(|f| {
            std::fs::read_to_string(f.unwrap().path())
                .unwrap_or_default()
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter_map(|l| l.split_whitespace().nth(2).and_then(|us| us.parse().ok()))
        .collect();
    assert!(!latencies.is_empty(), "pgbench logged no transactions");
    latencies.sort_unstable();
    let pct = |p: f64| {
        let at = ((latencies.len() as f64 * p) as usize).min(latencies.len() - 1);
        Duration::from_micros(latencies[at])
    };
    Floor {
        tps,
        p50: pct(0.50),
        p99: pct(0.99),
    }
}
