//! Losing parts under load, on a real PostgreSQL server: in the middle of a
//! burst of writes from eight clients through two `licensor serve`
//! replicas, the database server restarts and then one replica is
//! SIGKILLed. While the database is
//! down clients get `backend-unavailable` (503 with `Retry-After`); they
//! retry with the same idempotency key, through whichever replica is left,
//! and licensor recovers without a restart. Every acknowledged write is
//! there exactly once afterwards. And `licensor serve` started while the
//! database is down serves anyway, says on `/readyz` that its store cannot
//! be read, and is ready once the database is up. (Its own test binary: it
//! restarts the server its process shares; its tests take turns.)

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{StreamExt, stream};

use common::postgres::{Replica, replica};
use common::{Account, Kind};
use reqwest::StatusCode;
use serde_json::{Value, json};

const WRITES: usize = 60;

/// The tests of this binary stop the database each process shares: one at a time.
static ONE_RESTART_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_and_a_killed_replica_lose_no_acknowledged_write() {
    let _turn = ONE_RESTART_AT_A_TIME.lock().await;
    let orgs: String = (0..WRITES).map(|i| format!("  - id: org-{i}\n")).collect();
    let fixture = format!(
        "account: acme\nproducts: [{{name: TestOps, total: 1000}}]\norganizations:\n{orgs}"
    );
    let acct = tokio::task::spawn_blocking(move || Account::seeded_on(Kind::Postgres, &fixture))
        .await
        .unwrap();
    let pg = common::postgres::server();
    let admin = acct.token("AccountAdmin", "ci");
    let replicas: Vec<(Replica, String)> = (0..2).map(|_| replica(&acct, pg.password())).collect();
    let urls: Vec<String> = replicas.iter().map(|(_, u)| u.clone()).collect();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    // Eight clients at once, so writes are in flight (and batched) when
    // the server goes and when the replica is killed.
    let replicas = std::sync::Mutex::new(replicas);
    let alive = [AtomicBool::new(true), AtomicBool::new(true)];
    let answers: Vec<(usize, i64, usize)> = stream::iter(0..WRITES)
        .map(|i| {
            let (http, urls, admin, alive, replicas) = (&http, &urls, &admin, &alive, &replicas);
            async move {
                if i == WRITES / 3 {
                    // The database restarts while the burst goes on.
                    std::thread::spawn(|| {
                        common::postgres::server().restart(Duration::from_millis(1500))
                    });
                }
                if i == 2 * WRITES / 3 {
                    alive[1].store(false, Ordering::SeqCst);
                    replicas.lock().unwrap()[1].0.0.kill().unwrap();
                }
                let mut unavailable = 0;
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    assert!(attempt < 200, "write {i} never went through");
                    let target = if alive[(i + attempt) % 2].load(Ordering::SeqCst) {
                        (i + attempt) % 2
                    } else {
                        0
                    };
                    let sent = http
                        .put(format!(
                            "{}/organizations/org-{i}/allocations/TestOps",
                            urls[target]
                        ))
                        .bearer_auth(admin)
                        .header("idempotency-key", format!("burst-{i}"))
                        .json(&json!({"dedicated": 1 + i % 3, "managedBy": "burst"}))
                        .send()
                        .await;
                    let Ok(r) = sent else {
                        // A killed replica: go to the other one.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let status = r.status();
                    let retry_after = r.headers().get("retry-after").cloned();
                    let body: Value = r.json().await.unwrap_or_default();
                    match status {
                        StatusCode::OK => {
                            return (i, body["effect"]["to"].as_i64().unwrap(), unavailable);
                        }
                        StatusCode::SERVICE_UNAVAILABLE => {
                            assert!(retry_after.is_some(), "503 without Retry-After: {body}");
                            assert_eq!(
                                body["type"], "https://licensor.dev/problems/backend-unavailable",
                                "{body}"
                            );
                            unavailable += 1;
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        other => panic!("write {i}: {other} {body}"),
                    }
                }
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let unavailable: usize = answers.iter().map(|(_, _, u)| u).sum();
    let acknowledged: Vec<(usize, i64)> = answers.iter().map(|(i, to, _)| (*i, *to)).collect();
    assert!(unavailable > 0, "the restart was never seen");
    assert_eq!(acknowledged.len(), WRITES);

    let audit = acct.audit();
    let status = acct.status();
    for (i, to) in &acknowledged {
        let org = format!("org-{i}");
        let creates = audit
            .iter()
            .filter(|e| e["organization"] == org && e["action"] == "create")
            .count();
        assert_eq!(creates, 1, "{org} was created {creates} times");
        let held = status["allocations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["organization"] == org)
            .map(|a| a["dedicated"].as_i64().unwrap());
        assert_eq!(held, Some(*to), "{org}");
    }
    eprintln!(
        "{WRITES} writes acknowledged; {unavailable} answers were 503 while the database was down"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_started_while_the_database_is_down_becomes_ready_when_it_is_up() {
    let _turn = ONE_RESTART_AT_A_TIME.lock().await;
    let (acct, fresh) = tokio::task::spawn_blocking(|| {
        let acct = Account::seeded_on(Kind::Postgres, common::DOCUMENTED);
        let pg = common::postgres::server();
        // A database that was never a store: the first connection migrates it.
        (acct, pg.url(&pg.database()))
    })
    .await
    .unwrap();
    let pg = common::postgres::server();
    let admin = acct.token("AccountAdmin", "ci");
    let (host, port) = pg.address();
    let down = std::thread::spawn(|| common::postgres::server().restart(Duration::from_secs(5)));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect((host.as_str(), port)).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "postgres did not stop"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Both start and listen while nothing answers on the database's port.
    let (seeded, url) = replica(&acct, pg.password());
    let mut other = Account::seeded(common::DOCUMENTED);
    let fresh_port = common::free_port();
    let fresh_serve = std::process::Command::new(env!("CARGO_BIN_EXE_licensor"))
        .args(["--backend", &fresh, "serve"])
        .args(["--listen", &format!("127.0.0.1:{fresh_port}")])
        .env("PGPASSWORD", pg.password())
        .stderr(std::fs::File::create(other.path("fresh.log")).unwrap())
        .spawn()
        .unwrap();
    let fresh_serve = Replica(fresh_serve);
    let base = url.trim_end_matches("/v1/accounts/acme").to_string();
    let http = reqwest::Client::new();
    let get = |path: &str| {
        let (http, url) = (&http, format!("{base}{path}"));
        async move {
            let r = http.get(url).send().await.unwrap();
            (r.status(), r.text().await.unwrap())
        }
    };
    assert_eq!(get("/healthz").await.0, StatusCode::OK);
    let (status, body) = get("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let problem: Value = serde_json::from_str(&body).unwrap();
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .starts_with("not ready: the store cannot be read:"),
        "/readyz says why: {body}"
    );
    let write = || {
        http.put(format!("{url}/organizations/qa-team/allocations/TestOps"))
            .bearer_auth(&admin)
            .json(&json!({"dedicated": 6, "managedBy": "ci"}))
            .send()
    };
    let r = write().await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);

    down.join().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = get("/readyz").await;
        if status == StatusCode::OK {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never ready: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = write().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{:?}", r.text().await);
    assert_eq!(acct.allocation("qa-team", "TestOps"), Some((6, 4)));
    drop(seeded);

    // The fresh database is migrated by the server's first connection once
    // it is up: its /readyz turns 200, and the CLI finds a store there (an
    // empty one, never seeded).
    let fresh_ready = format!("http://127.0.0.1:{fresh_port}/readyz");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let answer = http.get(&fresh_ready).send().await;
        if answer.as_ref().is_ok_and(|r| r.status() == StatusCode::OK) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never ready: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    other.backend = fresh.clone();
    other.env = vec![("PGPASSWORD".into(), pg.password().to_string())];
    let run = other.run(&["status"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("holds no account yet"), "{run:?}");
    drop(fresh_serve);
}
