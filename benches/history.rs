//! The page's history over a long audit log: an account with 100,000
//! records spread over about two years (seat claims and releases, raises
//! and lowerings, totals), served by `licensor serve` on its embedded
//! store. Prints, for each range, the time to answer the signed-in page
//! (reading the account and its log, undoing the log into the history,
//! drawing it) and the page's size, against the targets (200 ms, 1 MB);
//! and the time of the history alone, in this process.
//!
//! Run with `make bench-history` (or `cargo bench --bench history`);
//! `RECORDS` changes the size.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::browser::{no_redirects, sign_in_over_http};
use common::{Account, Kind};
use licensor::backend::store::{Principal, Store};
use licensor::domain::{AllocationWrite, SeatChange};
use licensor::history::{Range, history};

const ORGS: usize = 20;
const PRODUCTS: [&str; 3] = ["TestOps", "Studio", "RuntimeEngine"];

fn fixture() -> String {
    let mut s = String::from("account: acme\nproducts:\n");
    for p in PRODUCTS {
        s.push_str(&format!("  - {{name: {p}, total: 10000}}\n"));
    }
    s.push_str("organizations:\n");
    for i in 0..ORGS {
        s.push_str(&format!("  - id: org-{i}\n    allocations:\n"));
        for p in PRODUCTS {
            s.push_str(&format!(
                "      - {{product: {p}, dedicated: 100, inUse: 50}}\n"
            ));
        }
    }
    s
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let records: usize = std::env::var("RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let account = Account::seeded_on(Kind::Http, &fixture());
    let admin = account.token("AccountAdmin", "bench");
    let db = account.db();

    // The log: a claim and a release of a seat for every few records, a
    // raise or a lowering, now and then a new total.
    let started = Instant::now();
    let written = tokio::task::spawn_blocking(move || {
        let st = Store::open_existing(&db).expect("the store");
        let who = Principal::local();
        let mut n = 0;
        let mut i = 0usize;
        while n < records {
            let org = format!("org-{}", i % ORGS);
            let product = PRODUCTS[(i / ORGS) % PRODUCTS.len()];
            // Each organization and product goes through the ten steps in
            // turn: three claims and three releases, raises and a lowering,
            // a total.
            let step = (i / (ORGS * PRODUCTS.len())) % 10;
            match step {
                0..=5 => {
                    let change = match step % 2 {
                        0 => SeatChange::Claim(1),
                        _ => SeatChange::Release(1),
                    };
                    st.seats("acme", &who, &org, product, change)
                        .expect("seats");
                }
                6..=8 => {
                    let to = [110, 90, 100][step - 6];
                    let w = AllocationWrite::count(&org, product, to);
                    st.write("acme", &who, &w, false).expect("write");
                }
                _ => {
                    // Never the total it has: every record a change.
                    let total = 10_000 + (i % 1000) as i64;
                    st.set_total("acme", &who, product, total).expect("total");
                }
            }
            n += 1;
            i += 1;
        }
        db
    })
    .await
    .unwrap();
    let c = rusqlite::Connection::open(&written).unwrap();
    // Ten minutes apart, the newest now: about two years for 100,000.
    c.execute(
        "UPDATE audit SET time = strftime('%Y-%m-%dT%H:%M:%SZ', 'now',
             printf('-%d seconds', ((SELECT max(id) FROM audit) - id) * 600))",
        [],
    )
    .unwrap();
    let total: i64 = c
        .query_row("SELECT count(*) FROM audit", [], |r| r.get(0))
        .unwrap();
    println!(
        "account: {} products, {} allocations, {total} audit records (written in {:.1?})",
        PRODUCTS.len(),
        ORGS * PRODUCTS.len(),
        started.elapsed()
    );

    // The history alone, in this process.
    let st = Store::open_existing(&written).unwrap();
    let (snapshot, audit) = (st.snapshot("acme").unwrap(), st.audit("acme").unwrap());
    for range in Range::ALL {
        let times: Vec<Duration> = (0..5)
            .map(|_| {
                let t = Instant::now();
                let h = history(&snapshot, &audit, range, chrono::Utc::now(), Some("org-3"));
                std::hint::black_box(h);
                t.elapsed()
            })
            .collect();
        println!(
            "history {:>3} (undo the log, org-3's allocations too): {:>7.1?} median of 5",
            range.as_str(),
            median(times)
        );
    }

    // The page, signed in, over HTTP.
    let http = no_redirects();
    let url = account.backend.clone();
    let session = sign_in_over_http(&http, &url, &admin, None).await;
    let mut worst = (Duration::ZERO, 0usize);
    for (range, organization) in Range::ALL.into_iter().flat_map(|r| [(r, ""), (r, "org-3")]) {
        let mut times = Vec::new();
        let mut size = 0;
        for _ in 0..5 {
            let t = Instant::now();
            let page = http
                .get(format!(
                    "{url}/?range={}&organization={organization}",
                    range.as_str()
                ))
                .header("cookie", &session)
                .send()
                .await
                .unwrap();
            assert_eq!(page.status(), 200);
            size = page.bytes().await.unwrap().len();
            times.push(t.elapsed());
        }
        let m = median(times);
        worst = (worst.0.max(m), worst.1.max(size));
        println!(
            "page {:>3}{:<20} {:>7.1?} median of 5, {:>6} KB",
            range.as_str(),
            if organization.is_empty() {
                ""
            } else {
                " (org-3 filtered)"
            },
            m,
            size / 1024
        );
    }
    println!(
        "worst: {:.1?} (target 200 ms), {} KB (target 1024 KB): {}",
        worst.0,
        worst.1 / 1024,
        if worst.0 < Duration::from_millis(200) && worst.1 < 1024 * 1024 {
            "within both targets"
        } else {
            "OVER A TARGET"
        }
    );
}
