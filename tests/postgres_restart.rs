//! Losing parts under load, on a real PostgreSQL server: in the middle of a
//! burst of writes from eight clients through two `licensor serve`
//! replicas, the database server restarts and then one replica is
//! SIGKILLed. While the database is
//! down clients get `backend-unavailable` (503 with `Retry-After`); they
//! retry with the same idempotency key, through whichever replica is left,
//! and licensor recovers without a restart. Every acknowledged write is
//! there exactly once afterwards. (Its own test binary: it restarts the
//! server its process shares.)

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{StreamExt, stream};

use common::postgres::{Replica, replica};
use common::{Account, Kind};
use reqwest::StatusCode;
use serde_json::{Value, json};

const WRITES: usize = 60;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_and_a_killed_replica_lose_no_acknowledged_write() {
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
