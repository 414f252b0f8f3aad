//! The License Management page in a real browser: Debian's Chromium,
//! headless, driven through chromedriver (WebDriver) against `licensor
//! serve` on loopback. One chromedriver serves every test; each test has a
//! browser session of its own. axe-core (from npm, `tests/page/axe.sh`) runs
//! in the same Chromium.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use fantoccini::key::Key;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use common::browser::{
    csrf_field, no_redirects, page_of, set_cookie, sign_in_attempt, sign_in_over_http,
};
use common::{Account, Kind};

/// The example account with one allocation managed from Git.
const FIXTURE: &str = "
account: acme
products:
  - {name: TestOps, total: 200}
  - {name: Studio, total: 50, sharedInUse: 3}
  - {name: Lab, total: 10}
organizations:
  - id: qa-team
    allocations:
      - {product: TestOps, dedicated: 5, inUse: 4}
  - id: dev-team
    allocations:
      - {product: Studio, dedicated: 10, inUse: 7}
      - {product: Lab, dedicated: 6, inUse: 6}
  - id: platform-team
    allocations:
      - {product: TestOps, dedicated: 3, inUse: 1, managedBy: default/licenses/platform}
      - {product: Lab, dedicated: 4, inUse: 0}
";

/// chromedriver on a loopback port, started once for the whole binary.
struct Driver {
    _child: Child,
    url: String,
}

fn driver() -> &'static Driver {
    static DRIVER: OnceLock<Driver> = OnceLock::new();
    DRIVER.get_or_init(|| {
        // Port 0: chromedriver binds a free port itself and says which. A
        // port chosen here first could be taken by a server of another
        // test before chromedriver binds it, and the check below would
        // then have found that server instead.
        let mut child = common::ends_with_this_process("TERM", "")
            .arg("chromedriver")
            .arg("--port=0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver; `make test` installs it)");
        let stdout = child.stdout.take().expect("chromedriver's stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(port) = line
                    .strip_prefix("ChromeDriver was started successfully on port ")
                    .and_then(|rest| rest.trim_end_matches('.').parse::<u16>().ok())
                {
                    let _ = tx.send(port);
                }
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("chromedriver did not say on which port it started");
        Driver {
            _child: child,
            url: format!("http://127.0.0.1:{port}"),
        }
    })
}

/// axe-core's script.
fn axe() -> &'static str {
    static AXE: OnceLock<String> = OnceLock::new();
    AXE.get_or_init(|| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/page/axe.sh");
        let out = Command::new("bash")
            .arg(script)
            .stderr(Stdio::inherit())
            .output()
            .expect("run tests/page/axe.sh");
        assert!(out.status.success(), "tests/page/axe.sh failed");
        let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    })
}

/// A headless Chromium session, with no network but loopback.
async fn browser(dir: &std::path::Path) -> Client {
    let profile = dir.join(format!(
        "chromium-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                "--window-size=1280,900",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    // chromedriver is on loopback: plain HTTP, no TLS stack.
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&driver().url)
        .await
        .expect("a Chromium session from chromedriver")
}

/// An account served by `licensor serve` replicas on `store` (the
/// embedded file or a PostgreSQL database).
struct Served {
    account: Account,
    /// Each replica's base URL.
    urls: Vec<String>,
    _replicas: Vec<common::postgres::Replica>,
}

impl Served {
    fn url(&self) -> &str {
        &self.urls[0]
    }
}

fn served(store: Kind, account: Account, replicas: usize) -> Served {
    match store {
        Kind::Embedded | Kind::Http => {
            assert_eq!(replicas, 1, "one process per embedded store");
            let url = account.backend.clone();
            Served {
                account,
                urls: vec![url],
                _replicas: Vec::new(),
            }
        }
        Kind::Postgres => {
            let password = common::postgres::server().password();
            let (replicas, urls) = (0..replicas)
                .map(|_| {
                    let (r, url) = common::postgres::replica(&account, password);
                    (r, url.trim_end_matches("/v1/accounts/acme").to_string())
                })
                .unzip();
            Served {
                account,
                urls,
                _replicas: replicas,
            }
        }
    }
}

/// `fixture` seeded on `store`, served by one replica.
fn seeded(store: Kind, fixture: &str) -> Served {
    let kind = match store {
        Kind::Embedded | Kind::Http => Kind::Http,
        Kind::Postgres => Kind::Postgres,
    };
    served(store, Account::seeded_on(kind, fixture), 1)
}

async fn text(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css}: {e}"))
        .text()
        .await
        .unwrap()
}

async fn count(c: &Client, css: &str) -> usize {
    c.find_all(Locator::Css(css)).await.unwrap().len()
}

/// Clicks what `css` finds and waits for the next page: the current one's
/// root element goes stale once the browser has left it.
async fn click(c: &Client, css: &str) {
    let root = c.find(Locator::Css("html")).await.unwrap();
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css}: {e}"))
        .click()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while root.tag_name().await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "no new page after clicking {css}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Signs in through the form, as a person would.
async fn sign_in(c: &Client, url: &str, token: &str) {
    c.goto(url).await.unwrap();
    c.find(Locator::Id("token"))
        .await
        .unwrap()
        .send_keys(token)
        .await
        .unwrap();
    click(c, "form.sign-in button").await;
    let h1 = text(c, "h1").await;
    assert_eq!(h1, "Account acme", "after signing in");
}

/// `fixture` served on `store`, a token of `role` for `name`, and a browser
/// signed in with it through the form.
async fn signed_in(store: Kind, fixture: &str, role: &str, name: &str) -> (Served, String, Client) {
    let served = seeded(store, fixture);
    let token = served.account.token(role, name);
    let c = browser(served.account.dir.path()).await;
    sign_in(&c, served.url(), &token).await;
    (served, token, c)
}

/// axe-core's serious and critical violations on the current page.
async fn serious_violations(c: &Client) -> Vec<String> {
    c.execute(axe(), vec![]).await.expect("load axe-core");
    let result = c
        .execute_async(
            "const done = arguments[arguments.length - 1];
             axe.run(document, {resultTypes: ['violations']})
                .then(r => done(r.violations.map(v => ({id: v.id, impact: v.impact,
                    nodes: v.nodes.map(n => n.target.join(' '))}))))
                .catch(e => done([{id: 'axe failed: ' + e, impact: 'critical', nodes: []}]));",
            vec![],
        )
        .await
        .expect("run axe-core");
    result
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| matches!(v["impact"].as_str(), Some("serious" | "critical")))
        .map(|v| format!("{} ({}) at {}", v["id"], v["impact"], v["nodes"]))
        .collect()
}

/// The session cookie and the CSRF secret of the signed-in page.
async fn session_of(c: &Client) -> (String, String) {
    let cookie = c
        .get_named_cookie("licensor_session")
        .await
        .expect("the session cookie");
    assert!(cookie.http_only().unwrap_or(false), "HttpOnly");
    assert_eq!(
        cookie.same_site().map(|s| format!("{s:?}")).as_deref(),
        Some("Strict")
    );
    let csrf = c
        .find(Locator::Css("form[action='/sign-out'] input[name=csrf]"))
        .await
        .unwrap()
        .attr("value")
        .await
        .unwrap()
        .unwrap();
    (cookie.value().to_string(), csrf)
}

/// A POST a page did not send: a form body with the given cookie. A form
/// answers with a redirect to the account (post/redirect/get), which is
/// followed with the cookie it set, so the body is what the account then
/// shows; the status is the form's own.
async fn forged(url: &str, cookie: &str, form: &[(&str, &str)]) -> (u16, String) {
    let http = no_redirects();
    let session = format!("licensor_session={cookie}");
    let r = http
        .post(url)
        .header("cookie", &session)
        .form(form)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    if status != 303 {
        return (status, r.text().await.unwrap());
    }
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let flash = set_cookie(&r, "licensor_flash=").unwrap_or_default();
    let base = url.split("/allocations").next().unwrap();
    let page = http
        .get(format!("{base}{location}"))
        .header("cookie", format!("{session}; {flash}"))
        .send()
        .await
        .unwrap();
    (status, page.text().await.unwrap())
}

/// The figures of every pool and row of the table, as the page shows them,
/// in the shape of `status -o json`.
async fn shown(c: &Client) -> Value {
    let mut pools = Vec::new();
    for p in c.find_all(Locator::Css("section.pool")).await.unwrap() {
        let product = p.attr("data-product").await.unwrap().unwrap();
        let mut pool = json!({"product": product});
        for f in ["total", "dedicated", "sharedInUse", "free"] {
            let v = p
                .find(Locator::Css(&format!("dd[data-figure={f}]")))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            pool[f] = json!(v.parse::<i64>().unwrap());
        }
        pools.push(pool);
    }
    let mut allocations = Vec::new();
    for row in c
        .find_all(Locator::Css("#allocations tbody tr"))
        .await
        .unwrap()
    {
        let cell = async |f: &str| {
            row.find(Locator::Css(&format!("td[data-field={f}]")))
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        };
        let managed = cell("managedBy").await;
        // A temporary allocation's end: the moment its <time> names, and
        // the count the words say it becomes then.
        let expiry = match row.find(Locator::Css("td[data-field=expiry] time")).await {
            Ok(time) => {
                let words = time.text().await.unwrap();
                let then = words.rsplit_once(", then ").unwrap().1;
                json!({
                    "until": time.attr("datetime").await.unwrap().unwrap(),
                    "thenCount": then.parse::<i64>().unwrap(),
                })
            }
            Err(_) => Value::Null,
        };
        allocations.push(json!({
            "organization": row.attr("data-organization").await.unwrap().unwrap(),
            "product": row.attr("data-product").await.unwrap().unwrap(),
            "dedicated": cell("dedicated").await.parse::<i64>().unwrap(),
            "inUse": cell("inUse").await.parse::<i64>().unwrap(),
            "managedBy": managed.lines().next().unwrap().to_string(),
            "expiry": expiry,
        }));
    }
    json!({"pools": pools, "allocations": allocations})
}

/// `status -o json` with `managedBy` as the page words it (the page says
/// who manages an allocation, not what deleting that manager would do).
fn status_as_shown(account: &Account) -> Value {
    let mut status = account.status();
    for a in status["allocations"].as_array_mut().unwrap() {
        a["managedBy"] = match a["managedBy"].as_str() {
            Some(m) => json!(m.replace('/', " / ")),
            None => json!("unmanaged"),
        };
        a.as_object_mut().unwrap().remove("deletionPolicy");
    }
    status
}

/// The example account with the example manifests applied, the
/// temporary allocation among them.
fn example(store: Kind) -> Served {
    let served = seeded(store, include_str!("../examples/account.yaml"));
    for dir in ["licenses", "temporary"] {
        let dir = format!("{}/examples/{dir}", env!("CARGO_MANIFEST_DIR"));
        let run = served.account.run(&["apply", "-f", &dir]);
        assert_eq!(run.code, 0, "{run:?}");
    }
    served
}

async fn the_page_shows_what_status_shows_and_passes_axe(store: Kind) {
    let served = example(store);
    let (account, url) = (&served.account, served.url().to_string());
    let admin = account.token("AccountAdmin", "alice");
    let c = browser(account.dir.path()).await;

    // Signed out: the sign-in form, and nothing of the account.
    c.goto(&url).await.unwrap();
    assert_eq!(text(&c, "h1").await, "Sign in");
    assert_eq!(
        serious_violations(&c).await,
        Vec::<String>::new(),
        "signed out"
    );
    // The checker finds what it should: a field without its label.
    c.execute(
        "document.querySelector('label[for=token]').remove();",
        vec![],
    )
    .await
    .unwrap();
    let found = serious_violations(&c).await;
    assert!(
        found.iter().any(|v| v.starts_with("\"label\"")),
        "{found:?}"
    );

    sign_in(&c, &url, &admin).await;
    assert_eq!(shown(&c).await, status_as_shown(account));
    // The temporary example is shown with its end (status's `expiry`).
    let ends = text(
        &c,
        "tr[data-organization=mobile-team] td[data-field=expiry]",
    )
    .await;
    assert!(
        ends.starts_with("expires 2027-03-31T17:00:00Z (in ") && ends.ends_with("), then 0"),
        "{ends}"
    );
    assert!(
        text(&c, "header .who")
            .await
            .contains("token:alice (Account Admin)"),
        "{}",
        text(&c, "header .who").await
    );
    // The token is in neither the URL nor the HTML, nor is it the cookie.
    // Neither the token nor the session id is in the URL or the HTML, and
    // the cookie is not the token.
    let source = c.source().await.unwrap();
    let address = c.current_url().await.unwrap().to_string();
    let (cookie, _) = session_of(&c).await;
    assert_ne!(cookie, admin);
    for secret in [&admin, &cookie] {
        assert!(!source.contains(secret.as_str()) && !address.contains(secret.as_str()));
    }
    assert_eq!(
        serious_violations(&c).await,
        Vec::<String>::new(),
        "Account Admin"
    );

    // The screenshot the README shows, kept as a test artefact.
    let png = c.screenshot().await.unwrap();
    let artefacts = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("page");
    std::fs::create_dir_all(&artefacts).unwrap();
    std::fs::write(artefacts.join("account.png"), &png).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000);

    // A narrow screen: the page itself never scrolls sideways (the tables
    // scroll in their own boxes).
    c.set_window_size(375, 800).await.unwrap();
    c.refresh().await.unwrap();
    let overflow = c
        .execute(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(overflow, json!(0), "sideways scroll on a narrow screen");

    // Sign-out ends the session in the store: the old cookie signs in no more.
    c.set_window_size(1280, 900).await.unwrap();
    click(&c, "form[action='/sign-out'] button").await;
    assert_eq!(text(&c, "h1").await, "Sign in");
    let page = reqwest::Client::new()
        .get(&url)
        .header("cookie", format!("licensor_session={cookie}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("<h1>Sign in</h1>"), "{page}");
    c.close().await.unwrap();
}

/// The audit log downloads as CSV, through the API and from the page's
/// link, streamed a page of records at a time: Python's csv module reads
/// back the log the API answers as JSON, with a field a spreadsheet would
/// run (a token named like a formula) written as text.
async fn the_audit_log_downloads_as_csv_that_python_reads_back(store: Kind) {
    use licensor::backend::store::Principal;
    use licensor::domain::SeatChange;
    let served = seeded(store, FIXTURE);
    let (account, url) = (&served.account, served.url().to_string());
    let admin = account.token("AccountAdmin", "alice");
    account.token("Viewer", "=HYPERLINK(\"x\")");
    // More records than one page of the download (1,000), written to the
    // store itself (on PostgreSQL, with its password).
    let at = match store {
        Kind::Postgres => account.backend_with_credentials(),
        _ => account.store().to_string(),
    };
    tokio::task::spawn_blocking(move || {
        let st = licensor::cli::open_store_at(&at, licensor::cli::Open::Existing).unwrap();
        for n in [1, 2].repeat(300) {
            for change in [SeatChange::Claim(n), SeatChange::Release(n)] {
                st.seats(
                    "acme",
                    &Principal::local(),
                    "platform-team",
                    "TestOps",
                    change,
                )
                .unwrap();
            }
        }
    })
    .await
    .unwrap();
    let http = reqwest::Client::new();
    let api = format!("{url}/v1/accounts/acme/audit");
    let get = |query: &str| http.get(format!("{api}{query}")).bearer_auth(&admin).send();
    let json: Vec<Value> = get("").await.unwrap().json().await.unwrap();
    assert!(json.len() > 1200, "{}", json.len());
    let response = get("?format=csv").await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/csv; charset=utf-8"
    );
    assert_eq!(
        response.headers()["content-disposition"],
        "attachment; filename=\"acme-audit.csv\""
    );
    let csv = response.bytes().await.unwrap();

    // The page's link gives the same file to a signed-in browser.
    let page = no_redirects();
    let session = sign_in_over_http(&page, &url, &admin, None).await;
    let html = page_of(&page, &url, &session).await;
    assert!(html.contains("href=\"/audit.csv\""), "{html}");
    let linked = page
        .get(format!("{url}/audit.csv"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(linked, csv);
    // And `licensor backend audit -o csv` prints it too.
    let printed = account.run(&["backend", "audit", "-o", "csv"]);
    assert_eq!(printed.code, 0, "{printed:?}");
    assert_eq!(printed.stdout.as_bytes(), &csv[..]);
    // Signed out, the link answers with the sign-in problem, not the log.
    let r = page.get(format!("{url}/audit.csv")).send().await.unwrap();
    assert_eq!(r.status(), 401);

    // A part of the log: the records after one, at most so many, as JSON
    // and as CSV (across a page of the stream); nothing else is a page.
    let after = json[99]["id"].as_i64().unwrap();
    let part: Vec<Value> = get(&format!("?after={after}&limit=1100"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(part, json[100..1200].to_vec());
    let part_csv = get(&format!("?format=csv&after={after}&limit=1100"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lines: Vec<&str> = std::str::from_utf8(&csv).unwrap().lines().collect();
    assert_eq!(part_csv.lines().count(), 1101);
    assert_eq!(part_csv.lines().nth(1), Some(lines[101]));
    assert_eq!(part_csv.lines().last(), Some(lines[1200]));
    for bad in ["?limit=0", "?after=-1", "?limit=many"] {
        let r = get(bad).await.unwrap();
        assert_eq!(r.status(), 400, "{bad}");
    }

    let file = account.write("audit.csv", std::str::from_utf8(&csv).unwrap());
    let read = std::process::Command::new("python3")
        .args([
            "-c",
            "import csv, json, sys; print(json.dumps(list(csv.DictReader(open(sys.argv[1], newline='')))))",
        ])
        .arg(&file)
        .output()
        .unwrap();
    assert!(read.status.success(), "{read:?}");
    let rows: Vec<Value> = serde_json::from_slice(&read.stdout).unwrap();
    let as_text = |v: &Value| match v {
        Value::Null => String::new(),
        Value::String(s) if s.starts_with(['=', '+', '-', '@']) => format!("'{s}"),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let expected: Vec<Value> = json
        .iter()
        .map(|e| {
            let columns = licensor::api::audit_csv::COLUMNS;
            let row = columns
                .iter()
                .map(|c| (c.to_string(), json!(as_text(&e[*c]))));
            Value::Object(row.collect())
        })
        .collect();
    assert_eq!(rows.len(), expected.len());
    assert_eq!(rows, expected);
    assert!(
        rows.iter()
            .any(|r| r["subject"] == "'=HYPERLINK(\"x\") (Viewer)"),
        "the token named like a formula is written as text"
    );
}

/// The history section draws what the audit log recorded: the account
/// seeded twenty days ago, qa-team raised ten days ago, a seat claimed five
/// days ago, the total raised two days ago (the records' times set back in
/// the file). Each pool's chart says so in its summary and its table; an
/// organization's filter adds its allocations' charts; axe finds nothing;
/// an account whose log is empty shows an empty state.
#[tokio::test]
async fn the_history_draws_what_the_audit_log_recorded() {
    use licensor::backend::store::Principal;
    use licensor::domain::{AllocationWrite, SeatChange};
    let served = seeded(Kind::Embedded, FIXTURE);
    let (account, url) = (&served.account, served.url().to_string());
    let admin = account.token("AccountAdmin", "alice");
    let db = account.db();
    {
        let st = licensor::backend::store::Store::open_existing(&db).unwrap();
        let who = Principal::local();
        let raise = AllocationWrite::count("qa-team", "TestOps", 8);
        st.write("acme", &who, &raise, false).unwrap();
        st.seats("acme", &who, "qa-team", "TestOps", SeatChange::Claim(1))
            .unwrap();
        st.set_total("acme", &who, "TestOps", 240).unwrap();
    }
    let ago = |days: i64| {
        (chrono::Utc::now() - chrono::TimeDelta::days(days) - chrono::TimeDelta::hours(1))
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    };
    let c = rusqlite::Connection::open(&db).unwrap();
    for (action, days) in [("seed", 20), ("increase", 10), ("claim", 5), ("total", 2)] {
        let n = c
            .execute(
                "UPDATE audit SET time = ?1 WHERE account = 'acme' AND action = ?2",
                [ago(days), action.to_string()],
            )
            .unwrap();
        assert_eq!(n, 1, "{action}");
    }

    let c = browser(account.dir.path()).await;
    sign_in(&c, &url, &admin).await;
    c.goto(&format!("{url}/?range=30d#history")).await.unwrap();
    assert_eq!(count(&c, "#history div.history-chart").await, 3);
    let summary = text(&c, "#history-pool-2-summary").await;
    let summary = if summary.is_empty() {
        c.execute(
            "return document.getElementById('history-pool-2-summary').textContent",
            vec![],
        )
        .await
        .unwrap()
        .as_str()
        .unwrap()
        .to_string()
    } else {
        summary
    };
    assert_eq!(
        summary,
        "TestOps over the last 30 days: total 200 to 240, dedicated 8 to 11, in use 5 to 6, free 192 to 229"
    );
    // The table beside it: the seed's day, each change, and today.
    let rows = c
        .execute(
            "return [...document.querySelectorAll('#history div.history-chart')[2].querySelectorAll('tbody tr')]
                .map(r => [...r.cells].map(c => c.textContent.trim()).slice(1).join(' '))",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        rows,
        json!([
            "200 8 5 192",
            "200 11 5 189",
            "200 11 6 189",
            "240 11 6 229",
            "240 11 6 229"
        ]),
    );
    let current = c
        .execute(
            "return document.querySelector('nav.ranges a[aria-current=page]').textContent",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(current, "the last 30 days");
    assert_eq!(
        serious_violations(&c).await,
        Vec::<String>::new(),
        "the history"
    );
    let history = c
        .find(Locator::Css("#history"))
        .await
        .unwrap()
        .screenshot()
        .await
        .unwrap();
    let artefacts = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("page");
    std::fs::create_dir_all(&artefacts).unwrap();
    std::fs::write(artefacts.join("history.png"), &history).unwrap();
    assert!(history.starts_with(b"\x89PNG"));

    // An organization's allocations, over 90 days.
    c.goto(&format!("{url}/?organization=qa-team&range=90d#history"))
        .await
        .unwrap();
    let summary = c
        .execute(
            "return document.getElementById('history-allocation-0-summary').textContent",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        summary,
        "qa-team: TestOps over the last 90 days: dedicated 5 to 8, in use 4 to 5"
    );
    assert_eq!(
        serious_violations(&c).await,
        Vec::<String>::new(),
        "an organization's history"
    );

    // No records at all: an empty state, not an error.
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute("DELETE FROM audit", [])
        .unwrap();
    c.goto(&format!("{url}/?range=all")).await.unwrap();
    assert!(
        text(&c, "#history p.empty")
            .await
            .starts_with("No changes recorded yet"),
        "{}",
        c.source().await.unwrap()
    );
    assert_eq!(count(&c, "#history div.history-chart").await, 0);
    c.close().await.unwrap();
}

async fn a_viewer_sees_no_controls_and_a_forged_post_is_refused(store: Kind) {
    let served = seeded(store, FIXTURE);
    let account = &served.account;
    let viewer = account.token("Viewer", "victor");
    let url = served.url().to_string();
    let c = browser(account.dir.path()).await;
    // With the keyboard only: the skip link comes first, then the token
    // field; Enter signs in.
    c.goto(&url).await.unwrap();
    let root = c.find(Locator::Css("html")).await.unwrap();
    let active = async || {
        c.active_element()
            .await
            .unwrap()
            .attr("id")
            .await
            .unwrap()
            .unwrap_or_default()
    };
    let body = c.find(Locator::Css("body")).await.unwrap();
    body.send_keys(&Key::Tab.to_string()).await.unwrap();
    assert_eq!(
        c.active_element().await.unwrap().text().await.unwrap(),
        "Skip to content"
    );
    c.active_element()
        .await
        .unwrap()
        .send_keys(&Key::Tab.to_string())
        .await
        .unwrap();
    assert_eq!(active().await, "token");
    c.active_element()
        .await
        .unwrap()
        .send_keys(&format!("{viewer}{}", Key::Enter))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while root.tag_name().await.is_ok() {
        assert!(Instant::now() < deadline, "Enter did not sign in");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(text(&c, "h1").await, "Account acme");
    assert_eq!(count(&c, "form.edit").await, 0);
    assert_eq!(count(&c, "a.revoke").await, 0);
    assert!(
        text(&c, "#organizations")
            .await
            .contains("Signed in as a Viewer")
    );
    assert_eq!(serious_violations(&c).await, Vec::<String>::new(), "Viewer");

    let (cookie, csrf) = session_of(&c).await;
    let before = account.rows();
    let (status, body) = forged(
        &format!("{url}/allocations/edit"),
        &cookie,
        &[
            ("csrf", &csrf),
            ("organization", "qa-team"),
            ("product", "TestOps"),
            ("dedicated", "9"),
            ("version", "0"),
        ],
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("Forbidden"), "{body}");
    assert_eq!(account.rows(), before, "a refused POST changed the store");
    c.close().await.unwrap();
}

async fn edit_and_revoke_through_the_page_land_in_the_store(store: Kind) {
    let (served, admin, c) = signed_in(store, FIXTURE, "AccountAdmin", "alice").await;
    let (account, url) = (&served.account, served.url().to_string());

    // Edit within the pool: 5 -> 8.
    let edit = |org: &str, product: &str, n: i64| {
        let (org, product, c) = (org.to_string(), product.to_string(), c.clone());
        async move {
            let input = c
                .find(Locator::Css(&format!(
                    "tr[data-organization='{org}'][data-product='{product}'] input[name=dedicated]"
                )))
                .await
                .unwrap();
            input.clear().await.unwrap();
            input.send_keys(&n.to_string()).await.unwrap();
            click(
                &c,
                &format!(
                    "tr[data-organization='{org}'][data-product='{product}'] form.edit button"
                ),
            )
            .await;
        }
    };
    edit("qa-team", "TestOps", 8).await;
    assert_eq!(text(&c, ".done").await, "qa-team TestOps: 5 → 8");
    assert_eq!(account.allocation("qa-team", "TestOps"), Some((8, 4)));

    // Below the 4 in use: refused with the API's reason and numbers.
    let before = account.rows();
    edit("qa-team", "TestOps", 2).await;
    let problem = text(&c, ".problem").await;
    assert!(
        problem.contains("BelowInUse") && problem.contains('4') && problem.contains('2'),
        "{problem}"
    );
    assert_eq!(account.rows(), before);
    assert_eq!(account.allocation("qa-team", "TestOps"), Some((8, 4)));

    // Revoke with room in the pool: the box says 7 in-use seats move.
    click(&c, "a[aria-label='Revoke dev-team Studio']").await;
    assert_eq!(
        text(&c, "[data-figure=rehomed]").await,
        "7 in-use licenses move to the account pool"
    );
    assert!(
        text(&c, "[data-figure=displaced]")
            .await
            .starts_with("0 users")
    );
    assert_eq!(count(&c, "#displace").await, 0);
    click(&c, ".confirm button.danger").await;
    assert!(
        text(&c, ".done")
            .await
            .starts_with("dev-team Studio: 10 → 0; 7 in-use licenses moved")
    );
    assert_eq!(account.allocation("dev-team", "Studio"), None);
    assert_eq!(account.pool("Studio"), (50, 0, 10, 40));

    // The contract shrinks below what is handed out: a revoke now leaves
    // users without a license, and needs the explicit choice.
    let run = account.run(&["backend", "total", "--product", "Lab", "--total", "6"]);
    assert_eq!(run.code, 0, "{run:?}");
    c.goto(&format!("{url}/revoke?organization=dev-team&product=Lab"))
        .await
        .unwrap();
    assert_eq!(
        text(&c, "[data-figure=rehomed]").await,
        "2 in-use licenses move to the account pool"
    );
    assert!(
        text(&c, "[data-figure=displaced]")
            .await
            .starts_with("4 users")
    );
    assert_eq!(text(&c, "label[for=displace]").await, "Displace 4 users");
    // Without the choice the browser does not send it (the box is
    // required); sent anyway, the rules refuse it.
    let (cookie, csrf) = session_of(&c).await;
    let version = c
        .find(Locator::Css(".confirm input[name=version]"))
        .await
        .unwrap()
        .attr("value")
        .await
        .unwrap()
        .unwrap();
    let before = account.rows();
    let form = [
        ("csrf", csrf.as_str()),
        ("organization", "dev-team"),
        ("product", "Lab"),
        ("version", version.as_str()),
    ];
    let (status, body) = forged(&format!("{url}/allocations/revoke"), &cookie, &form).await;
    assert_eq!(status, 303, "{body}");
    assert!(body.contains("WouldDisplaceUsers"), "{body}");
    // In the page's words: the page has no allowUserDisplacement field.
    assert!(
        !body.contains("allowUserDisplacement") && body.contains("which asks before displacing"),
        "{body}"
    );
    assert_eq!(account.rows(), before);
    c.find(Locator::Id("displace"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    click(&c, ".confirm button.danger").await;
    let done = text(&c, ".done").await;
    assert_eq!(
        done,
        "dev-team Lab: 6 → 0; 2 in-use licenses moved to the account pool; 4 users displaced"
    );
    assert_eq!(account.allocation("dev-team", "Lab"), None);
    let audit = account.audit();
    let last = audit.last().unwrap();
    assert_eq!(
        (&last["actor"], &last["organization"], &last["displaced"]),
        (&json!("token:alice"), &json!("dev-team"), &json!(4))
    );

    // The audit log, newest first, filtered through its form.
    c.goto(&url).await.unwrap();
    c.find(Locator::Id("filter-organization"))
        .await
        .unwrap()
        .select_by_value("dev-team")
        .await
        .unwrap();
    click(&c, "form.filter button").await;
    let rows = c
        .find_all(Locator::Css("#audit-log tbody tr"))
        .await
        .unwrap();
    let mut ids = Vec::new();
    for row in &rows {
        let cells: Vec<String> = {
            let mut v = Vec::new();
            for td in row.find_all(Locator::Css("td")).await.unwrap() {
                v.push(td.text().await.unwrap());
            }
            v
        };
        assert_eq!(cells[3], "dev-team", "{cells:?}");
        ids.push(
            row.attr("data-id")
                .await
                .unwrap()
                .unwrap()
                .parse::<i64>()
                .unwrap(),
        );
    }
    assert_eq!(ids.len(), 2, "the two revokes");
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first: {ids:?}");
    let newest = rows[0].text().await.unwrap();
    assert!(
        newest.contains("Lab") && newest.contains("6 → 0"),
        "{newest}"
    );

    // Paged: 60 more entries make a second page.
    let http = reqwest::Client::new();
    for i in 0..60 {
        let body = if i % 2 == 0 {
            json!({"claim": 1})
        } else {
            json!({"release": 1})
        };
        let r = http
            .post(format!(
                "{url}/v1/accounts/acme/organizations/qa-team/seats/TestOps"
            ))
            .bearer_auth(&admin)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.status());
    }
    c.goto(&url).await.unwrap();
    assert_eq!(count(&c, "#audit-log tbody tr").await, 50);
    let pager = text(&c, ".pager").await;
    let entries = account.audit().len();
    assert!(
        pager.contains(&format!("Page 1 of 2 ({entries} entries)")),
        "{pager}"
    );
    click(&c, ".pager a[rel=next]").await;
    assert_eq!(count(&c, "#audit-log tbody tr").await, entries - 50);
    c.close().await.unwrap();
}

async fn managed_allocations_and_forms_without_csrf_are_refused(store: Kind) {
    let (served, admin, c) = signed_in(store, FIXTURE, "AccountAdmin", "alice").await;
    let (account, url) = (&served.account, served.url().to_string());

    // Managed from Git: the owner, and no controls.
    let row = "tr[data-organization='platform-team'][data-product='TestOps']";
    assert_eq!(
        text(&c, &format!("{row} td[data-field=managedBy]")).await,
        "default / licenses / platform\nchanged in Git"
    );
    assert_eq!(count(&c, &format!("{row} form")).await, 0);
    assert_eq!(count(&c, &format!("{row} a.revoke")).await, 0);

    let (cookie, csrf) = session_of(&c).await;
    let before = account.rows();
    // A forged edit of the managed allocation, with its current version,
    // so that only its ownership stands in the way.
    let answer = reqwest::Client::new()
        .get(format!(
            "{url}/v1/accounts/acme/organizations/platform-team/allocations/TestOps"
        ))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    let version = answer.headers()["etag"]
        .to_str()
        .unwrap()
        .trim_matches('"')
        .to_string();
    let form = |csrf: &str| {
        [
            ("csrf", csrf.to_string()),
            ("organization", "platform-team".into()),
            ("product", "TestOps".into()),
            ("dedicated", "1".into()),
            ("version", version.clone()),
        ]
    };
    let post = async |path: &str, fields: &[(&str, String)]| {
        let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        forged(&format!("{url}{path}"), &cookie, &fields).await
    };
    let (status, body) = post("/allocations/edit", &form(&csrf)).await;
    assert_eq!(status, 303, "{body}");
    assert!(
        body.contains("Conflict") && body.contains("default/licenses/platform"),
        "{body}"
    );
    let (status, body) = post("/allocations/revoke", &form(&csrf)).await;
    assert_eq!(status, 303, "{body}");
    assert!(body.contains("Conflict"), "{body}");

    // Without the CSRF secret, or with another one: refused before anything.
    let (status, body) = post("/allocations/edit", &form(&csrf)[1..]).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("CSRF"), "{body}");
    let (status, _) = post("/allocations/edit", &form(&"0".repeat(48))).await;
    assert_eq!(status, 403);
    // Sign-in without the double-submit secret: refused too.
    let (status, body) = forged(&format!("{url}/sign-in"), "", &[("token", &admin)]).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(account.rows(), before, "a refused POST changed the store");
    c.close().await.unwrap();
}

/// A session lives in the store: one replica signs in, another serves the
/// page to that cookie, and a sign-out at either ends it at both.
#[tokio::test]
async fn sessions_are_the_stores_not_a_replicas() {
    let account = Account::seeded_on(Kind::Postgres, FIXTURE);
    let served = served(Kind::Postgres, account, 2);
    let admin = served.account.token("AccountAdmin", "alice");
    let http = no_redirects();
    let session = sign_in_over_http(&http, &served.urls[0], &admin, None).await;
    let other = page_of(&http, &served.urls[1], &session).await;
    assert!(other.contains("<h1>Account acme</h1>"), "{other}");
    let csrf = csrf_field(&other);
    let out = http
        .post(format!("{}/sign-out", served.urls[1]))
        .header("cookie", &session)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), 303);
    for url in &served.urls {
        let after = page_of(&http, url, &session).await;
        assert!(after.contains("<h1>Sign in</h1>"), "{url}: {after}");
    }
}

/// A token revoked with `licensor token revoke` (another process) is
/// refused by every replica at its next request, on the API and the page,
/// though each has just let it in (on SQLite, from the tokens it found good
/// since the file last changed): its page sessions end, and another
/// token's do not. An expired token is refused the same way. Signing in
/// again ends the browser's previous session.
async fn a_revoked_or_expired_token_stops_working_on_every_replica_at_once(store: Kind) {
    let served = match store {
        Kind::Postgres => served(store, Account::seeded_on(store, FIXTURE), 2),
        _ => seeded(store, FIXTURE),
    };
    let laptop = served.account.token("AccountAdmin", "laptop");
    let other = served.account.token("Viewer", "dashboard");
    let http = no_redirects();
    let api = async |url: &str, token: &str| {
        http.get(format!("{url}/v1/accounts/acme"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    };
    let lost = sign_in_over_http(&http, &served.urls[0], &laptop, None).await;
    let last = served.urls.last().unwrap();
    let kept = sign_in_over_http(&http, last, &other, None).await;
    for url in &served.urls {
        // Three times: the first notes the token's use, the third finds it
        // among the tokens checked since.
        for _ in 0..3 {
            assert_eq!(api(url, &laptop).await.status(), 200);
        }
        assert!(
            page_of(&http, url, &lost)
                .await
                .contains("<h1>Account acme</h1>")
        );
    }

    let run = served
        .account
        .run_local(&["token", "revoke", "--name", "laptop"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        run.stdout,
        "revoked token \"laptop\" of account acme: refused from now on, its page sessions ended\n"
    );
    for url in &served.urls {
        let answer = api(url, &laptop).await;
        assert_eq!(answer.status(), 401, "{url}");
        let page = page_of(&http, url, &lost).await;
        assert!(page.contains("<h1>Sign in</h1>"), "{url}: {page}");
        assert!(
            page_of(&http, url, &kept)
                .await
                .contains("<h1>Account acme</h1>")
        );
    }
    // The edit form of the ended session is refused, and nothing is written.
    let before = served.account.rows();
    let post = http
        .post(format!("{last}/allocations/edit"))
        .header("cookie", &lost)
        .form(&[
            ("csrf", "0"),
            ("organization", "qa-team"),
            ("product", "TestOps"),
            ("count", "9"),
        ])
        .send()
        .await
        .unwrap();
    assert!(post.status().is_client_error(), "{}", post.status());
    assert_eq!(served.account.rows(), before);

    // Expired: refused at once on both.
    let run = served.account.run_local(&[
        "token",
        "create",
        "--role",
        "Viewer",
        "--name",
        "brief",
        "--expires",
        "2s",
    ]);
    assert_eq!(run.code, 0, "{run:?}");
    let brief = run.stdout.trim().to_string();
    for _ in 0..3 {
        assert_eq!(api(&served.urls[0], &brief).await.status(), 200);
    }
    tokio::time::sleep(Duration::from_millis(2300)).await;
    for url in &served.urls {
        let answer = api(url, &brief).await;
        assert_eq!(answer.status(), 401);
        let body = answer.text().await.unwrap();
        assert!(body.contains("the token expired at"), "{body}");
    }

    // Signing in again ends the browser's previous session.
    let again = sign_in_over_http(&http, &served.urls[0], &other, Some(&kept)).await;
    assert_ne!(again, kept);
    for url in &served.urls {
        assert!(
            page_of(&http, url, &kept)
                .await
                .contains("<h1>Sign in</h1>")
        );
        assert!(
            page_of(&http, url, &again)
                .await
                .contains("<h1>Account acme</h1>")
        );
    }
}

/// Login CSRF and cross-origin writes: a page on another port of this host
/// (another origin) that plants the sign-in cookie and field, or posts a
/// form with a session's cookie and secret, or calls the API with a token,
/// is refused (403), and nothing is written; the same requests from the
/// page's own origin, or from a client that is no browser, go through.
#[tokio::test]
async fn requests_from_another_origin_are_refused_and_write_nothing() {
    let served = seeded(Kind::Embedded, FIXTURE);
    let (url, account) = (served.url().to_string(), &served.account);
    let admin = account.token("AccountAdmin", "alice");
    let http = no_redirects();
    let evil = format!("http://127.0.0.1:{}", common::free_port());

    // The sign-in form's cookie and field, as an attacker would plant them.
    let form = http.get(&url).send().await.unwrap();
    let planted = set_cookie(&form, "licensor_sign_in=").expect("the sign-in form's cookie");
    let csrf = csrf_field(&form.text().await.unwrap());
    let sign_in = |headers: Vec<(&'static str, String)>| {
        let mut request = http
            .post(format!("{url}/sign-in"))
            .header("cookie", &planted)
            .form(&[("token", admin.as_str()), ("csrf", csrf.as_str())]);
        for (k, v) in headers {
            request = request.header(k, v);
        }
        request.send()
    };
    for headers in [
        vec![("origin", evil.clone())],
        vec![("origin", "null".to_string())],
        vec![("sec-fetch-site", "same-site".to_string())],
        vec![
            ("sec-fetch-site", "cross-site".to_string()),
            ("origin", url.clone()),
        ],
    ] {
        let answer = sign_in(headers.clone()).await.unwrap();
        assert_eq!(answer.status(), 403, "{headers:?}");
        assert!(
            set_cookie(&answer, "licensor_session=").is_none(),
            "{headers:?}: a session was opened"
        );
        let page = answer.text().await.unwrap();
        assert!(page.contains("came from another origin"), "{page}");
    }
    let own = sign_in(vec![
        ("origin", url.clone()),
        ("sec-fetch-site", "same-origin".to_string()),
    ])
    .await
    .unwrap();
    assert_eq!(own.status(), 303, "the page's own origin signs in");
    let session = set_cookie(&own, "licensor_session=").expect("a session cookie");
    // The session's own form secret, posted from another origin.
    let secret = csrf_field(&page_of(&http, &url, &session).await);
    let edit = [
        ("csrf", secret.as_str()),
        ("organization", "qa-team"),
        ("product", "TestOps"),
        ("count", "9"),
    ];
    let before_edit = account.rows();
    let answer = http
        .post(format!("{url}/allocations/edit"))
        .header("cookie", &session)
        .header("origin", &evil)
        .form(&edit)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 403);
    assert_eq!(account.rows(), before_edit, "a cross-origin form wrote");

    // The API's writes: a browser on another origin is refused; a client
    // that is no browser (no Origin, no Sec-Fetch-Site) is not.
    let put = |origin: Option<&str>| {
        let mut request = http
            .put(format!(
                "{url}/v1/accounts/acme/organizations/qa-team/allocations/TestOps"
            ))
            .bearer_auth(&admin)
            .json(&serde_json::json!({"dedicated": 7}));
        if let Some(o) = origin {
            request = request.header("origin", o);
        }
        request.send()
    };
    for origin in [evil.as_str(), "null"] {
        let answer = put(Some(origin)).await.unwrap();
        assert_eq!(answer.status(), 403, "{origin}");
        let problem: serde_json::Value = answer.json().await.unwrap();
        assert_eq!(problem["reason"], "Forbidden", "{problem}");
    }
    assert_eq!(account.rows(), before_edit, "a cross-origin API call wrote");
    assert_eq!(put(None).await.unwrap().status(), 200);
    assert_eq!(put(Some(url.as_str())).await.unwrap().status(), 200);
}

/// Failed sign-ins are logged (never the token) and counted; past ten a
/// minute from one address, that address is answered 429 with
/// Retry-After, even with a good token, while another address signs in.
#[tokio::test]
async fn failed_sign_ins_are_logged_counted_and_throttled_per_address() {
    let served = seeded(Kind::Embedded, FIXTURE);
    let (url, account) = (served.url().to_string(), &served.account);
    let admin = account.token("AccountAdmin", "alice");
    let from = |address: &str| {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .local_address(address.parse::<std::net::IpAddr>().unwrap())
            .build()
            .unwrap()
    };
    let (here, elsewhere) = (from("127.0.0.1"), from("127.0.0.2"));
    let attempt =
        async |http: &reqwest::Client, token: &str| sign_in_attempt(http, &url, token, None).await;
    for i in 0..10 {
        let wrong = format!("lsr_wrong_guess_{i}");
        let answer = attempt(&here, &wrong).await;
        assert_eq!(answer.status(), 401, "attempt {i}");
    }
    let answer = attempt(&here, &admin).await;
    assert_eq!(answer.status(), 429, "the eleventh, with a good token");
    let wait: u64 = answer.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "Retry-After: {wait}");
    let page = answer.text().await.unwrap();
    assert!(
        page.contains("too many failed sign-ins from this address"),
        "{page}"
    );
    assert_eq!(
        attempt(&elsewhere, &admin).await.status(),
        303,
        "another address"
    );

    let metrics = reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("licensor_http_sign_in_failures_total 10"),
        "{metrics}"
    );
    assert!(
        metrics.contains("licensor_http_sign_ins_throttled_total 1"),
        "{metrics}"
    );
    let log = std::fs::read_to_string(account.path("serve.log")).unwrap();
    let failures = log.lines().filter(|l| l.contains("sign-in failed")).count();
    assert_eq!(failures, 10, "{log}");
    assert!(
        log.contains("127.0.0.1") && log.contains("too many failures"),
        "{log}"
    );
    assert!(!log.contains("lsr_"), "a token in the log:\n{log}");
}

/// axe-core's violations of any impact on the current page.
async fn violations(c: &Client) -> Vec<String> {
    c.execute(axe(), vec![]).await.expect("load axe-core");
    let result = c
        .execute_async(
            "const done = arguments[arguments.length - 1];
             axe.run(document, {resultTypes: ['violations']})
                .then(r => done(r.violations.map(v => v.id + ' (' + v.impact + ') at ' +
                    v.nodes.map(n => n.target.join(' ')).join(', '))))
                .catch(e => done(['axe failed: ' + e]));",
            vec![],
        )
        .await
        .expect("run axe-core");
    serde_json::from_value(result).unwrap()
}

/// Where the browser is, as a path.
async fn at(c: &Client) -> String {
    c.current_url().await.unwrap().path().to_string()
}

/// The count box of one row, typed into and submitted with its Edit button.
async fn type_count(c: &Client, org: &str, product: &str, typed: &str) {
    let row = format!("tr[data-organization='{org}'][data-product='{product}']");
    let input = c
        .find(Locator::Css(&format!("{row} input[name=dedicated]")))
        .await
        .unwrap();
    input.clear().await.unwrap();
    input.send_keys(typed).await.unwrap();
    click(c, &format!("{row} form.edit button")).await;
}

/// No page element shares an id, and every id a label or an ARIA
/// attribute names exists, once.
async fn ids_are_sound(c: &Client) {
    let broken = c
        .execute(
            "const ids = [...document.querySelectorAll('[id]')].map(e => e.id);
             const dup = ids.filter((id, i) => ids.indexOf(id) !== i);
             const refs = [...document.querySelectorAll('[for],[aria-labelledby],[aria-describedby]')]
               .flatMap(e => [e.getAttribute('for'), e.getAttribute('aria-labelledby'),
                              e.getAttribute('aria-describedby')])
               .filter(v => v).flatMap(v => v.split(' '))
               .filter(id => document.querySelectorAll('[id=\"' + CSS.escape(id) + '\"]').length !== 1);
             return dup.concat(refs);",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(broken, json!([]), "duplicate or dangling ids");
}

/// The page as a person uses it (issue findings): every form redirects to
/// the account (a reload never posts again); a count that is no number is
/// told in the page's words and stays in its box; 0 goes through the Revoke
/// confirmation, which takes focus; a form's address loaded by itself and a
/// bad page number show the account; "Give licenses" creates an allocation
/// the page did not offer before, and Edit never creates one; hostile names
/// make sound ids and stay isolated; on a phone the organizations table
/// does not scroll sideways; axe-core finds nothing at either size.
async fn the_page_works_as_a_person_uses_it(store: Kind) {
    let hostile = "
account: acme
products:
  - {name: TestOps, total: 200}
  - {name: Studio, total: 50}
  - {name: Lab, total: 10}
  - {name: Edge, total: 5}
  - {name: Mobile Suite, total: 40}
organizations:
  - id: qa-team
    allocations:
      - {product: TestOps, dedicated: 5, inUse: 4}
  - id: a
    allocations:
      - {product: Lab, dedicated: 1, inUse: 0}
  - id: a-b
    allocations:
      - {product: Mobile Suite, dedicated: 2, inUse: 1}
  - id: \"x\\u202Ey\"
    allocations:
      - {product: Edge, dedicated: 1, inUse: 1}
  - id: dev-team
";
    let (served, _admin, c) = signed_in(store, hostile, "AccountAdmin", "alice").await;
    let (account, url) = (&served.account, served.url().to_string());
    ids_are_sound(&c).await;
    for (w, h) in [(1280, 900), (390, 844)] {
        c.set_window_size(w, h).await.unwrap();
        c.refresh().await.unwrap();
        assert_eq!(violations(&c).await, Vec::<String>::new(), "admin at {w}px");
    }
    // On a phone, each row a card: nothing scrolls sideways.
    let overflow = c
        .execute(
            "const t = document.querySelector('#allocations');
             return t.scrollWidth - t.parentElement.clientWidth;",
            vec![],
        )
        .await
        .unwrap();
    assert!(
        overflow.as_i64().unwrap() <= 0,
        "the table overflows by {overflow}px at 390px"
    );
    c.set_window_size(1280, 900).await.unwrap();
    // The right-to-left override in a name stays inside its own box.
    let isolated = c
        .execute(
            "return [...document.querySelectorAll('th[scope=row] bdi')].some(b => b.textContent.includes('\\u202E'));",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(isolated, json!(true));

    // An edit, then a reload: the address is the account's, and nothing is
    // posted again.
    type_count(&c, "qa-team", "TestOps", "8").await;
    assert_eq!(at(&c).await, "/");
    assert_eq!(text(&c, ".done").await, "qa-team TestOps: 5 → 8");
    // The outcome is shown once: this page, at both sizes, not a reload.
    for (w, h) in [(390, 844), (1280, 900)] {
        c.set_window_size(w, h).await.unwrap();
        assert_eq!(
            violations(&c).await,
            Vec::<String>::new(),
            "an edit at {w}px"
        );
    }
    let audit = account.audit().len();
    c.refresh().await.unwrap();
    assert_eq!(account.audit().len(), audit, "a reload posted again");
    assert_eq!(count(&c, ".done").await, 0, "the outcome is shown once");

    // No number: the page's words, what was typed kept in its box.
    let before = account.rows();
    type_count(&c, "qa-team", "TestOps", "1e3").await;
    assert_eq!(at(&c).await, "/");
    let problem = text(&c, ".problem").await;
    assert!(
        problem.contains("the count is a whole number from 0 to 1,000,000; “1e3” is not"),
        "{problem}"
    );
    let typed = c
        .find(Locator::Css(
            "tr[data-organization='qa-team'][data-product='TestOps'] input[name=dedicated]",
        ))
        .await
        .unwrap()
        .prop("value")
        .await
        .unwrap();
    assert_eq!(typed.as_deref(), Some("1e3"));
    assert_eq!(account.rows(), before);
    assert_eq!(violations(&c).await, Vec::<String>::new(), "an error");
    // Below the seats in use: its reason once, not twice.
    type_count(&c, "qa-team", "TestOps", "2").await;
    let problem = text(&c, ".problem").await;
    assert!(
        problem.contains("BelowInUse") && !problem.contains("(BelowInUse)"),
        "{problem}"
    );

    // 0 goes through the Revoke confirmation, which has the focus.
    type_count(&c, "qa-team", "TestOps", "0").await;
    assert_eq!(at(&c).await, "/revoke");
    let focused = c
        .active_element()
        .await
        .unwrap()
        .attr("role")
        .await
        .unwrap();
    assert_eq!(focused.as_deref(), Some("alertdialog"));
    assert_eq!(
        violations(&c).await,
        Vec::<String>::new(),
        "the confirmation"
    );
    assert_eq!(account.allocation("qa-team", "TestOps"), Some((8, 4)));

    // A form's address by itself, and a page number that is none.
    for path in [
        "/allocations/edit",
        "/allocations/revoke",
        "/allocations/give",
        "/?page=abc",
    ] {
        c.goto(&format!("{url}{path}")).await.unwrap();
        assert_eq!(text(&c, "h1").await, "Account acme", "{path}");
    }

    // Give licenses: to an organization holding none of a product.
    c.find(Locator::Id("give-organization"))
        .await
        .unwrap()
        .select_by_value("dev-team")
        .await
        .unwrap();
    c.find(Locator::Id("give-product"))
        .await
        .unwrap()
        .select_by_value("Studio")
        .await
        .unwrap();
    let count_box = c.find(Locator::Id("give-count")).await.unwrap();
    count_box.clear().await.unwrap();
    count_box.send_keys("3").await.unwrap();
    click(&c, "form.give button").await;
    assert_eq!(text(&c, ".done").await, "dev-team Studio: 0 → 3");
    assert_eq!(account.allocation("dev-team", "Studio"), Some((3, 0)));
    assert_eq!(account.audit().last().unwrap()["action"], "create");

    // Edit never creates, and Give never changes what exists.
    let (cookie, csrf) = session_of(&c).await;
    let before = account.rows();
    let (status, page) = forged(
        &format!("{url}/allocations/edit"),
        &cookie,
        &[
            ("csrf", &csrf),
            ("organization", "dev-team"),
            ("product", "Lab"),
            ("dedicated", "2"),
            ("version", "0"),
        ],
    )
    .await;
    assert_eq!(status, 303);
    assert!(
        page.contains("dev-team holds no Lab licenses to edit"),
        "{page}"
    );
    let (_, page) = forged(
        &format!("{url}/allocations/give"),
        &cookie,
        &[
            ("csrf", &csrf),
            ("organization", "qa-team"),
            ("product", "TestOps"),
            ("dedicated", "9"),
        ],
    )
    .await;
    assert!(
        page.contains("qa-team already holds TestOps licenses"),
        "{page}"
    );
    assert_eq!(account.rows(), before);

    // The seed in the audit log, and the icon.
    c.goto(&format!("{url}/?page=9")).await.unwrap();
    assert!(
        text(&c, "#audit-log")
            .await
            .contains("account loaded from a fixture")
    );
    let icon = reqwest::get(format!("{url}/favicon.svg")).await.unwrap();
    assert_eq!(icon.headers()["content-type"], "image/svg+xml");
    assert_eq!(count(&c, "link[rel=icon][href='/favicon.svg']").await, 1);
    c.close().await.unwrap();
}

/// axe-core finds nothing, of any impact, at a desktop and a phone size.
async fn no_violations_at_both_sizes(c: &Client, state: &str) {
    for (w, h) in [(1280, 900), (390, 844)] {
        c.set_window_size(w, h).await.unwrap();
        c.refresh().await.unwrap();
        assert_eq!(
            violations(c).await,
            Vec::<String>::new(),
            "{state} at {w}px"
        );
    }
    c.set_window_size(1280, 900).await.unwrap();
    c.refresh().await.unwrap();
}

/// Every state the page has, on a big account (40 organizations over 5
/// products, one pool over-committed), passes axe-core at 1280 and 390
/// pixels: signed out, a Viewer, an Account Admin, an error, a
/// confirmation. At 1280 the five pools' labels stay on one line each.
async fn every_state_passes_axe_on_a_big_account_at_both_sizes(store: Kind) {
    let products = ["TestOps", "Studio", "Lab", "Edge", "Mobile Suite"];
    let mut fixture = String::from("account: acme\nproducts:\n");
    for (i, p) in products.iter().enumerate() {
        fixture.push_str(&format!("  - {{name: {p}, total: {}}}\n", 1000 * (i + 1)));
    }
    fixture.push_str("organizations:\n");
    for o in 0..40 {
        fixture.push_str(&format!("  - id: team-{o:02}\n    allocations:\n"));
        for (i, p) in products
            .iter()
            .enumerate()
            .filter(|(i, _)| (o + i) % 2 == 0)
        {
            fixture.push_str(&format!(
                "      - {{product: {p}, dedicated: {}, inUse: {}}}\n",
                3 + i,
                i
            ));
        }
    }
    let served = seeded(store, &fixture);
    let account = &served.account;
    // Lower a total below what is handed out: over-committed.
    let run = account.run(&["backend", "total", "--product", "Lab", "--total", "5"]);
    assert_eq!(run.code, 0, "{run:?}");
    let url = served.url().to_string();
    let c = browser(account.dir.path()).await;
    c.goto(&url).await.unwrap();
    no_violations_at_both_sizes(&c, "signed out").await;

    let viewer = account.token("Viewer", "victor");
    sign_in(&c, &url, &viewer).await;
    no_violations_at_both_sizes(&c, "a Viewer").await;
    click(&c, "form[action='/sign-out'] button").await;

    let admin = account.token("AccountAdmin", "alice");
    sign_in(&c, &url, &admin).await;
    assert_eq!(count(&c, "#allocations tbody tr").await, 100);
    assert_eq!(count(&c, ".over-committed").await, 1);
    let lab = c
        .find(Locator::Css("section.pool[data-product=Lab] svg"))
        .await
        .unwrap()
        .attr("aria-label")
        .await
        .unwrap()
        .unwrap();
    let free = text(&c, "section.pool[data-product=Lab] dd[data-figure=free]").await;
    assert!(
        lab.contains(&format!("{free} free of 5")),
        "the bar says {lab}, the figure {free}"
    );
    let wrapped = c
        .execute(
            "return [...document.querySelectorAll('.figures dt')]
                .filter(dt => dt.getClientRects().length !== 1 || dt.getBoundingClientRect().height > 30)
                .map(dt => dt.textContent);",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(wrapped, json!([]), "labels wrapped at 1280px");
    no_violations_at_both_sizes(&c, "an Account Admin").await;

    type_count(&c, "team-00", "TestOps", "999999").await;
    assert_eq!(count(&c, ".problem").await, 1);
    // The error is shown once; check this page, not a reload.
    for (w, h) in [(1280, 900), (390, 844)] {
        c.set_window_size(w, h).await.unwrap();
        assert_eq!(
            violations(&c).await,
            Vec::<String>::new(),
            "an error at {w}px"
        );
    }
    c.set_window_size(1280, 900).await.unwrap();

    c.goto(&format!(
        "{url}/revoke?organization=team-00&product=TestOps"
    ))
    .await
    .unwrap();
    no_violations_at_both_sizes(&c, "a confirmation").await;
    c.close().await.unwrap();
}

/// What a browser can send that no form of the page would: a token far too
/// long, a form missing its fields, a form's address by GET. Each answer
/// is a page in the page's words (or the account), never the API's JSON.
#[tokio::test]
async fn what_no_form_sends_is_answered_with_a_page() {
    let served = seeded(Kind::Embedded, FIXTURE);
    let url = served.url().to_string();
    let http = no_redirects();
    let form = http.get(&url).send().await.unwrap();
    let cookie = set_cookie(&form, "licensor_sign_in=").unwrap();
    let csrf = csrf_field(&form.text().await.unwrap());
    let long = "x".repeat(70 * 1024);
    let answer = http
        .post(format!("{url}/sign-in"))
        .header("cookie", &cookie)
        .form(&[("token", long.as_str()), ("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 413);
    assert!(
        answer.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let page = answer.text().await.unwrap();
    assert!(page.contains("far too long"), "{page}");

    let answer = http
        .post(format!("{url}/allocations/edit"))
        .form(&[("csrf", "x")])
        .send()
        .await
        .unwrap();
    assert!(answer.status().is_client_error(), "{}", answer.status());
    assert!(
        answer.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let page = answer.text().await.unwrap();
    assert!(page.contains("the form could not be read"), "{page}");

    for path in [
        "/allocations/edit",
        "/allocations/revoke",
        "/allocations/give",
        "/sign-in",
        "/sign-out",
    ] {
        let answer = http.get(format!("{url}{path}")).send().await.unwrap();
        assert_eq!(answer.status(), 303, "{path}");
        assert_eq!(answer.headers()["location"], "/", "{path}");
    }
}

// Each case on every store `licensor serve` runs on: `embedded::<case>`
// and `postgres::<case>`.
on_every_store!(
    async
    the_page_shows_what_status_shows_and_passes_axe,
    a_viewer_sees_no_controls_and_a_forged_post_is_refused,
    edit_and_revoke_through_the_page_land_in_the_store,
    managed_allocations_and_forms_without_csrf_are_refused,
    the_page_works_as_a_person_uses_it,
    every_state_passes_axe_on_a_big_account_at_both_sizes,
    a_revoked_or_expired_token_stops_working_on_every_replica_at_once,
    the_audit_log_downloads_as_csv_that_python_reads_back,
);
