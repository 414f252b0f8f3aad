//! The PostgreSQL store's own guarantees, on a real server over TLS:
//! migrations raced by several processes apply once; and `licensor serve`
//! scaled out to three replicas on one database answers as one (no replica
//! keeps state that changes an answer).

mod common;

use std::process::{Child, Command};
use std::sync::Arc;

use common::postgres::{Replica, replica};
use common::{Account, Kind};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// An account seeded from `fixture` on PostgreSQL, an Account Admin token,
/// and three `licensor serve` replicas on its database with their URLs.
async fn three_replicas(
    fixture: String,
) -> (Account, String, Vec<(Replica, String)>, Arc<Vec<String>>) {
    let acct = tokio::task::spawn_blocking(move || Account::seeded_on(Kind::Postgres, &fixture))
        .await
        .unwrap();
    let password = common::postgres::server().password().to_string();
    let admin = acct.token("AccountAdmin", "ci");
    let replicas: Vec<(Replica, String)> = (0..3).map(|_| replica(&acct, &password)).collect();
    let urls = Arc::new(replicas.iter().map(|(_, u)| u.clone()).collect());
    (acct, admin, replicas, urls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_one_database_answer_as_one() {
    let orgs: String = (0..64).map(|i| format!("  - id: org-{i}\n")).collect();
    let fixture = format!(
        "account: acme\nproducts: [{{name: TestOps, total: 105}}]\norganizations:\n  - {{id: qa, allocations: [{{product: TestOps, dedicated: 0}}]}}\n{orgs}"
    );
    let (_acct, admin, _replicas, urls) = three_replicas(fixture).await;
    let http = reqwest::Client::new();

    // 64 clients over three replicas raise 64 organizations to 10 each in a
    // pool of 105: exactly ten fit.
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let (http, urls, admin) = (http.clone(), urls.clone(), admin.clone());
            tokio::spawn(async move {
                let r = http
                    .put(format!(
                        "{}/organizations/org-{i}/allocations/TestOps",
                        urls[i % 3]
                    ))
                    .bearer_auth(&admin)
                    .json(&json!({"dedicated": 10, "managedBy": format!("client-{i}")}))
                    .send()
                    .await
                    .unwrap();
                let status = r.status();
                (status, r.json::<Value>().await.unwrap_or_default())
            })
        })
        .collect();
    let mut winners = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let (status, body) = t.await.unwrap();
        match status {
            StatusCode::OK => winners.push(i),
            _ => assert_eq!(body["reason"], "InsufficientPool", "{status} {body}"),
        }
    }
    assert_eq!(
        winners.len(),
        10,
        "exactly ten 10-seat allocations fit in 105"
    );
    for url in urls.iter() {
        let pools: Value = http
            .get(format!("{url}/products"))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            (&pools[0]["dedicated"], &pools[0]["free"]),
            (&json!(100), &json!(5)),
            "{url}"
        );
    }

    // 32 writers with the same If-Match, over three replicas: one wins.
    let qa = "/organizations/qa/allocations/TestOps";
    let etag = http
        .get(format!("{}{qa}", urls[0]))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .headers()["etag"]
        .to_str()
        .unwrap()
        .to_string();
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let (http, urls, admin, etag) =
                (http.clone(), urls.clone(), admin.clone(), etag.clone());
            tokio::spawn(async move {
                http.put(format!("{}{qa}", urls[i % 3]))
                    .bearer_auth(&admin)
                    .header("if-match", etag)
                    .json(&json!({"dedicated": i % 5, "managedBy": "racer"}))
                    .send()
                    .await
                    .unwrap()
                    .status()
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    let won = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    let stale = statuses
        .iter()
        .filter(|s| **s == StatusCode::PRECONDITION_FAILED)
        .count();
    assert_eq!((won, stale), (1, 31), "{statuses:?}");

    // An idempotency key used on one replica replays on another (a
    // decrease of an organization that got its 10, so it always fits).
    let w = winners[0];
    let raise = json!({"dedicated": 5, "managedBy": format!("client-{w}")});
    let send = |url: String| {
        let (http, admin, raise) = (http.clone(), admin.clone(), raise.clone());
        async move {
            http.put(format!("{url}/organizations/org-{w}/allocations/TestOps"))
                .bearer_auth(&admin)
                .header("idempotency-key", "lower-a-winner")
                .json(&raise)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let first = send(urls[0].clone()).await;
    let again = send(urls[2].clone()).await;
    assert_eq!(
        (&first["replayed"], &again["replayed"]),
        (&json!(false), &json!(true))
    );
    assert_eq!(first["effect"], again["effect"]);
}

/// Writes that share transactions (48 clients over three replicas, on four
/// organizations, removals among them) leave an audit log that replays to
/// what the store holds: for each organization, every record goes from
/// where the one before it left the count, and the last leaves it where it
/// is. Records out of order, or an allocation saved over a later removal,
/// break the chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_transactions_leave_an_audit_log_that_replays() {
    const ORGS: usize = 4;
    let orgs: String = (0..ORGS).map(|i| format!("  - id: org-{i}\n")).collect();
    let fixture = format!(
        "account: acme\nproducts: [{{name: TestOps, total: 1000}}]\norganizations:\n{orgs}"
    );
    let (acct, admin, _replicas, urls) = three_replicas(fixture).await;
    let http = reqwest::Client::new();
    let tasks: Vec<_> = (0..48)
        .map(|c| {
            let (http, urls, admin) = (http.clone(), urls.clone(), admin.clone());
            tokio::spawn(async move {
                for j in 0..10 {
                    let path = format!(
                        "{}/organizations/org-{}/allocations/TestOps",
                        urls[c % 3],
                        (c + j) % ORGS
                    );
                    let request = if (c + j) % 7 == 0 {
                        http.delete(format!("{path}?managedBy=replay"))
                    } else {
                        http.put(path)
                            .json(&json!({"dedicated": 1 + (c * 3 + j) % 9, "managedBy": "replay"}))
                    };
                    let r = request.bearer_auth(&admin).send().await.unwrap();
                    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let (status, audit) = tokio::task::spawn_blocking(move || (acct.status(), acct.audit()))
        .await
        .unwrap();
    let mut held = 0;
    for i in 0..ORGS {
        let org = format!("org-{i}");
        let records: Vec<&Value> = audit
            .iter()
            .filter(|e| e["organization"] == json!(org))
            .collect();
        assert!(records.len() > 10, "{org}: {} records", records.len());
        let mut count = 0;
        for r in &records {
            assert_eq!(r["from"], json!(count), "{org}: a record out of order: {r}");
            count = r["to"].as_i64().unwrap();
        }
        let now = status["allocations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["organization"] == json!(org))
            .map_or(0, |a| a["dedicated"].as_i64().unwrap());
        assert_eq!(now, count, "{org}: the log replays to what is held");
        held += now;
    }
    assert_eq!(status["pools"][0]["dedicated"], json!(held), "{status}");
    let ids: Vec<i64> = audit.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "the log is in id order"
    );
}

/// Four processes opening a new database at once: the schema is created
/// exactly once, and all four go on to work.
#[test]
fn migrations_raced_by_four_processes_apply_once() {
    let pg = common::postgres::server();
    let database = pg.database();
    let url = pg.url(&database);
    let dir = tempfile::tempdir().unwrap();
    let fixture = dir.path().join("account.yaml");
    std::fs::write(&fixture, common::DOCUMENTED).unwrap();
    let children: Vec<Child> = (0..4)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_licensor"))
                .args(["--backend", &url, "backend", "seed", "-f"])
                .arg(&fixture)
                .env("PGPASSWORD", pg.password())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Every migration, once.
    let migrations = licensor::backend::store::postgres::MIGRATIONS.len();
    assert_eq!(
        pg.sql(&database, "SELECT version FROM licensor_schema"),
        [migrations.to_string()]
    );
    let seeds = pg.sql(
        &database,
        "SELECT count(*) FROM audit WHERE action = 'seed'",
    );
    assert_eq!(seeds, ["4"]);
}

/// `backend copy` SQLite -> PostgreSQL -> SQLite is the same account, row
/// for row (the command itself reads every row back, idempotency keys and
/// hashed tokens included): `status -o json` and `backend audit -o json`
/// read the same, the tokens still authenticate, the sequence goes on past
/// every version copied, and a non-empty target is refused unless told.
#[test]
fn backend_copy_round_trips_an_account_exactly() {
    let acct = Account::seeded_on(Kind::Embedded, common::DOCUMENTED);
    let viewer = acct.token("Viewer", "auditor");
    let m = acct.license("qa", "qa-team", "TestOps", 9, "");
    assert_eq!(acct.apply(&m).code, 0);
    let run = acct.run(&[
        "backend",
        "claim",
        "--org",
        "dev-team",
        "--product",
        "TestOps",
        "--count",
        "2",
    ]);
    assert_eq!(run.code, 0, "{run:?}");
    let pg = common::postgres::server();
    let database = pg.database();
    let postgres = pg.url(&database);
    let second = acct.path("second.db");
    let sqlite_again = format!("sqlite:{}", second.display());
    let cli = |backend: &str, args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_licensor"))
            .args(["--backend", backend])
            .args(args)
            .env("PGPASSWORD", pg.password())
            .env_remove("LICENSOR_TOKEN")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let views = |backend: &str| {
        let (c1, status, e1) = cli(backend, &["status", "-o", "json"]);
        let (c2, audit, e2) = cli(backend, &["backend", "audit", "-o", "json"]);
        assert_eq!((c1, c2), (Some(0), Some(0)), "{e1}{e2}");
        (status, audit)
    };
    let original = views(acct.store());
    let copied_max: i64 = rusqlite::Connection::open(acct.db())
        .unwrap()
        .query_row("SELECT max(version) FROM allocations", [], |r| r.get(0))
        .unwrap();

    let copy = |from: &str, to: &str, replace: bool| {
        let mut args = vec!["backend", "copy", "--from", from, "--to", to];
        if replace {
            args.push("--replace");
        }
        cli(from, &args)
    };
    let (code, out, err) = copy(acct.store(), &postgres, false);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("copied account acme"), "{out}");
    assert!(!out.contains(pg.password()) && !err.contains(pg.password()));
    assert_eq!(views(&postgres), original, "SQLite -> PostgreSQL");
    let (code, _, err) = copy(&postgres, &sqlite_again, false);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(views(&sqlite_again), original, "PostgreSQL -> SQLite");

    // The copy is the account: its tokens work, its keys replay, and its
    // sequence goes on past every version it holds.
    let out = Command::new(env!("CARGO_BIN_EXE_licensor"))
        .args(["--backend", &postgres, "status", "-o", "json"])
        .env("PGPASSWORD", pg.password())
        .env("LICENSOR_TOKEN", &viewer)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = acct.license("qa", "qa-team", "TestOps", 10, "");
    let (code, _, err) = cli(&postgres, &["apply", "-f", m.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    let versions = pg.sql(&database, "SELECT max(version) FROM allocations");
    assert!(
        versions[0].parse::<i64>().unwrap() > copied_max,
        "{versions:?} vs {copied_max}"
    );

    // A target that holds the account is refused, untouched, unless --replace.
    let before = views(&sqlite_again);
    let (code, _, err) = copy(&postgres, &sqlite_again, false);
    assert_eq!(code, Some(1));
    assert!(err.contains("already holds account \"acme\""), "{err}");
    assert_eq!(views(&sqlite_again), before);
    let (code, _, err) = copy(&postgres, &sqlite_again, true);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(views(&sqlite_again), views(&postgres));
}

/// The password from a libpq password file; a database with no store is
/// not created by a read; one with a newer schema is refused untouched.
#[test]
fn passwords_from_a_file_and_schemas_checked_before_anything_is_written() {
    let pg = common::postgres::server();
    let database = pg.database();
    let dir = tempfile::tempdir().unwrap();
    let (host, port) = pg.address();
    let passfile = dir.path().join("pgpass");
    std::fs::write(
        &passfile,
        format!("{host}:{port}:*:licensor:{}\n", pg.password()),
    )
    .unwrap();
    let cli = |backend: &str, args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_licensor"))
            .args(["--backend", backend])
            .args(args)
            .env_remove("PGPASSWORD")
            .env_remove("PGPASSFILE")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let url = format!("{}&passfile={}", pg.url(&database), passfile.display());

    let (code, err) = cli(&url, &["status"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no store here"), "{err}");
    let tables = |db: &str| {
        pg.sql(
            db,
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
        )
    };
    assert_eq!(tables(&database), ["0"], "a read created tables");

    let fixture = dir.path().join("account.yaml");
    std::fs::write(&fixture, common::DOCUMENTED).unwrap();
    let (code, err) = cli(&url, &["backend", "seed", "-f", fixture.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = cli(&pg.url(&database), &["status"]);
    assert_eq!(code, Some(1), "no password anywhere");
    assert!(err.contains("password"), "{err}");

    pg.sql(&database, "UPDATE licensor_schema SET version = 99");
    let before = pg.sql(&database, "SELECT t::text FROM allocations t ORDER BY 1");
    for args in [
        &["status"][..],
        &["backend", "seed", "-f", fixture.to_str().unwrap()][..],
    ] {
        let (code, err) = cli(&url, args);
        assert_eq!(code, Some(1), "{args:?}");
        assert!(
            err.contains("schema version 99 is newer than this licensor"),
            "{err}"
        );
    }
    assert_eq!(
        pg.sql(&database, "SELECT version FROM licensor_schema"),
        ["99"]
    );
    assert_eq!(
        pg.sql(&database, "SELECT t::text FROM allocations t ORDER BY 1"),
        before
    );
}
