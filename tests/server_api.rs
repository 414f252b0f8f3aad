//! `licensor serve` over real HTTP on loopback: access, problem details,
//! ETag/If-Match, idempotency, dry runs, racing clients, bad input, a
//! SIGKILL in the middle of a burst; and the HTTP backend against servers
//! that are down, slow, or answering 429 and 500.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Account, DOCUMENTED, Kind};
use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};

struct Api {
    acct: Account,
    base: String,
    admin: String,
    http: Client,
}

impl Api {
    fn start(fixture: &str) -> Api {
        let acct = Account::seeded_on(Kind::Http, fixture);
        let admin = acct
            .env
            .iter()
            .find(|(k, _)| k == "LICENSOR_TOKEN")
            .map(|(_, v)| v.clone())
            .unwrap();
        Api {
            base: format!("{}/v1/accounts/acme", acct.backend),
            acct,
            admin,
            http: Client::new(),
        }
    }

    /// The HTTP backend as the Account Admin, without a rate.
    fn client(&self) -> licensor::backend::http::HttpBackend {
        licensor::backend::http::HttpBackend::new(
            &self.acct.backend,
            "acme",
            Some(&self.admin),
            Duration::from_secs(5),
            licensor::backend::http::Retry::default(),
            None,
        )
        .unwrap()
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends a request; returns status, headers and the JSON body (or Null).
    async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut r = self.http.request(method, self.url(path));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        let response = r.send().await.expect("request");
        let (status, headers) = (response.status(), response.headers().clone());
        let text = response.text().await.unwrap();
        (
            status,
            headers,
            serde_json::from_str(&text).unwrap_or(Value::Null),
        )
    }

    async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let (s, _, v) = self.send(method, path, Some(&self.admin), body, &[]).await;
        (s, v)
    }
}

const QA: &str = "/organizations/qa-team/allocations/TestOps";

fn is_problem(headers: &reqwest::header::HeaderMap) -> bool {
    headers
        .get("content-type")
        .is_some_and(|v| v == "application/problem+json")
}

#[tokio::test]
async fn the_access_matrix() {
    let api = Api::start(DOCUMENTED);
    let viewer = api.acct.token("Viewer", "auditor");
    let put = json!({"dedicated": 6, "managedBy": "test"});
    let cases = [
        (None, StatusCode::UNAUTHORIZED, StatusCode::UNAUTHORIZED),
        (
            Some("lsr_bad"),
            StatusCode::UNAUTHORIZED,
            StatusCode::UNAUTHORIZED,
        ),
        (Some(viewer.as_str()), StatusCode::OK, StatusCode::FORBIDDEN),
        (Some(api.admin.as_str()), StatusCode::OK, StatusCode::OK),
    ];
    for (token, read, write) in cases {
        let before = api.acct.rows();
        // The account as one read, and one of its lists.
        for path in ["", "/products"] {
            let (s, h, body) = api.send(Method::GET, path, token, None, &[]).await;
            assert_eq!(s, read, "GET {path:?} with {token:?}: {body}");
            if s != StatusCode::OK {
                assert!(is_problem(&h));
            }
        }
        let (s, h, body) = api
            .send(Method::PUT, QA, token, Some(put.clone()), &[])
            .await;
        assert_eq!(s, write, "write with {token:?}: {body}");
        if s == StatusCode::UNAUTHORIZED {
            assert_eq!(h["www-authenticate"], "Bearer");
            assert!(body["type"].as_str().unwrap().ends_with("/unauthorized"));
        }
        if s == StatusCode::FORBIDDEN {
            assert_eq!(body["reason"], "Forbidden");
        }
        if s != StatusCode::OK {
            assert_eq!(api.acct.rows(), before, "a refused write changed the store");
        }
        if let Some(t) = token {
            assert!(!body.to_string().contains(t), "the token was echoed");
        }
    }
    // The caller is checked before anything else: without a valid token
    // every route answers 401, and a Viewer's write 403, whatever the body,
    // its media type, the query or the idempotency key.
    let key = [("idempotency-key", "admins-key")];
    let (s, _, _) = api
        .send(Method::PUT, QA, Some(&api.admin), Some(put.clone()), &key)
        .await;
    assert_eq!(s, StatusCode::OK);
    let writes: [(Method, &str); 6] = [
        (Method::PUT, QA),
        (Method::DELETE, QA),
        (Method::PUT, "/products/TestOps"),
        (Method::POST, "/organizations"),
        (Method::POST, "/organizations/qa-team/seats/TestOps"),
        (
            Method::POST,
            "/organizations/qa-team/allocations/TestOps/release",
        ),
    ];
    let reads = [
        "",
        "/products",
        "/organizations",
        "/allocations?product=TestOps",
        QA,
        "/audit",
    ];
    for (token, status) in [
        (None, StatusCode::UNAUTHORIZED),
        (Some("lsr_bad"), StatusCode::UNAUTHORIZED),
        (Some(viewer.as_str()), StatusCode::FORBIDDEN),
    ] {
        let before = api.acct.rows();
        for (method, path) in &writes {
            for (body, content_type) in [
                ("[6]", "application/json"),
                ("{not json", "text/plain"),
                (
                    r#"{"dedicated": 6, "managedBy": "test"}"#,
                    "application/json",
                ),
            ] {
                let mut r = api
                    .http
                    .request(method.clone(), api.url(&format!("{path}?dryRun=maybe")))
                    .header("content-type", content_type)
                    .header("idempotency-key", "admins-key")
                    .body(body);
                if let Some(t) = token {
                    r = r.bearer_auth(t);
                }
                let r = r.send().await.unwrap();
                assert_eq!(r.status(), status, "{method} {path} {body} with {token:?}");
                assert!(is_problem(r.headers()), "{method} {path}");
            }
        }
        if token.is_none() {
            for path in reads {
                let (s, _, _) = api.send(Method::GET, path, None, None, &[]).await;
                assert_eq!(s, StatusCode::UNAUTHORIZED, "GET {path}");
            }
        }
        assert_eq!(api.acct.rows(), before, "{token:?} changed the store");
    }
    // The page's forms answer to a session cookie and its CSRF secret,
    // never to a bearer token: without a session each is refused (401) and
    // writes nothing.
    let before = api.acct.rows();
    for path in ["/allocations/edit", "/allocations/revoke"] {
        for token in [None, Some(viewer.as_str()), Some(api.admin.as_str())] {
            let mut r = api.http.post(format!("{}{path}", api.acct.backend)).form(&[
                ("csrf", "x"),
                ("organization", "qa-team"),
                ("product", "TestOps"),
                ("dedicated", "7"),
                ("version", "0"),
            ]);
            if let Some(t) = token {
                r = r.bearer_auth(t);
            }
            let r = r.send().await.unwrap();
            assert_eq!(
                r.status(),
                StatusCode::UNAUTHORIZED,
                "POST {path} with {token:?}"
            );
        }
    }
    assert_eq!(
        api.acct.rows(),
        before,
        "a page form without a session wrote"
    );

    // The scheme name is case-insensitive (RFC 9110 §11.1).
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let r = api
            .http
            .get(api.url("/products"))
            .header("authorization", format!("{scheme} {}", api.admin))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{scheme}");
    }

    let audit = api.admin(Method::GET, "/audit", None).await.1;
    assert_eq!(
        audit.as_array().unwrap().last().unwrap()["actor"],
        "token:ci"
    );
    let log = std::fs::read_to_string(api.acct.path("serve.log")).unwrap();
    let rows = api.acct.rows();
    for t in [&viewer, &api.admin] {
        assert!(!log.contains(t.as_str()) && !rows.contains(t.as_str()));
        assert!(!audit.to_string().contains(t.as_str()));
    }
}

#[tokio::test]
async fn every_refusal_is_a_problem_with_its_numbers() {
    let fixture = "
account: acme
products: [{name: TestOps, total: 20}, {name: Studio, total: 5}]
organizations:
  - id: qa-team
    allocations: [{product: TestOps, dedicated: 10, inUse: 4, managedBy: owner/a/b}]
  - id: dev-team
    allocations: [{product: Studio, dedicated: 5, inUse: 3}]
  - id: web-team
";
    let api = Api::start(fixture);
    let put = |dedicated: i64, manager: &str, allow: bool| json!({"dedicated": dedicated, "managedBy": manager, "allowUserDisplacement": allow});
    let o = "owner/a/b";
    let cases: Vec<(&str, Value, u16, &str, Value)> = vec![
        (
            QA,
            put(25, o, false),
            409,
            "insufficient-pool",
            json!({"requested": 15, "free": 10}),
        ),
        (
            QA,
            put(2, o, false),
            409,
            "below-in-use",
            json!({"inUse": 4}),
        ),
        (
            QA,
            put(3, "someone/else", false),
            409,
            "conflict",
            json!({"owner": o}),
        ),
        (
            "/organizations/ghost/allocations/TestOps",
            put(1, o, false),
            404,
            "unknown-organization",
            json!({}),
        ),
        (
            "/organizations/qa-team/allocations/Nope",
            put(1, o, false),
            404,
            "unknown-product",
            json!({}),
        ),
        (QA, put(10_000_000, o, false), 422, "invalid", json!({})),
        (QA, put(-1, o, false), 422, "invalid", json!({})),
    ];
    for (path, body, status, kind, numbers) in cases {
        let before = api.acct.rows();
        let (s, h, p) = api
            .send(Method::PUT, path, Some(&api.admin), Some(body), &[])
            .await;
        assert_eq!(s.as_u16(), status, "{kind}: {p}");
        assert!(is_problem(&h), "{kind}");
        assert_eq!(p["type"], format!("https://licensor.dev/problems/{kind}"));
        assert_eq!(p["status"], status);
        assert!(p["detail"].as_str().is_some_and(|d| !d.is_empty()));
        for (k, v) in numbers.as_object().unwrap() {
            assert_eq!(&p[k], v, "{kind}: {k} in {p}");
        }
        assert_eq!(api.acct.rows(), before, "{kind} changed the store");
    }
    // Over-committed: a revoke that would displace users needs consent.
    api.admin(Method::PUT, "/products/Studio", Some(json!({"total": 1})))
        .await;
    let (s, p) = api
        .admin(
            Method::DELETE,
            "/organizations/dev-team/allocations/Studio",
            None,
        )
        .await;
    assert_eq!(
        (s.as_u16(), &p["reason"], &p["displaced"]),
        (409, &json!("WouldDisplaceUsers"), &json!(2)),
        "{p}"
    );
    let (s, p) = api
        .admin(
            Method::DELETE,
            "/organizations/dev-team/allocations/Studio?allowUserDisplacement=true",
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{p}");
    assert_eq!(
        (&p["effect"]["rehomed"], &p["effect"]["displaced"]),
        (&json!(1), &json!(2))
    );
    let viewer = api.acct.token("Viewer", "v");
    let (s, _, p) = api
        .send(
            Method::PUT,
            "/products/TestOps",
            Some(&viewer),
            Some(json!({"total": 1})),
            &[],
        )
        .await;
    assert_eq!(
        (s.as_u16(), &p["type"]),
        (403, &json!("https://licensor.dev/problems/forbidden"))
    );
}

/// A manager's expiry is kept with its allocation (DESIGN §11): the API
/// answers it, a new one alone is a write (a new ETag), and `licensor
/// status` through the HTTP backend shows it.
#[tokio::test]
async fn an_expiry_is_kept_with_its_manager_and_shown_by_status() {
    let api = Api::start(DOCUMENTED);
    let expiry = json!({"until": "2027-03-31T17:00:00.250Z", "thenCount": 2});
    let body = json!({"dedicated": 8, "managedBy": "m", "expiry": expiry});
    let (s, h, w) = api
        .send(Method::PUT, QA, Some(&api.admin), Some(body), &[])
        .await;
    assert_eq!(s, StatusCode::OK, "{w}");
    assert_eq!(w["allocation"]["expiry"], expiry, "{w}");
    let tag = h["etag"].to_str().unwrap().to_string();
    let (_, a) = api.admin(Method::GET, QA, None).await;
    assert_eq!(a["expiry"], expiry, "{a}");

    // The same count with another until: written, with a new version.
    let moved = json!({"until": "2027-04-30T17:00:00Z", "thenCount": 2});
    let body = json!({"dedicated": 8, "managedBy": "m", "expiry": moved});
    let (s, h, w) = api
        .send(
            Method::PUT,
            QA,
            Some(&api.admin),
            Some(body),
            &[("if-match", &tag)],
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{w}");
    assert_ne!(h["etag"].to_str().unwrap(), tag);
    assert_eq!(w["effect"]["expiryChanged"], true, "{w}");
    let status = api.acct.status();
    let qa = &status["allocations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["organization"] == "qa-team")
        .unwrap()
        .clone();
    assert_eq!(qa["expiry"], moved, "{status}");

    // Without one, the manager's write clears it.
    let body = json!({"dedicated": 8, "managedBy": "m"});
    let (_, w) = api.admin(Method::PUT, QA, Some(body)).await;
    assert!(w["allocation"].get("expiry").is_none(), "{w}");
}

#[tokio::test]
async fn etags_idempotency_keys_and_dry_runs() {
    let api = Api::start(DOCUMENTED);
    let (s, h, a) = api.send(Method::GET, QA, Some(&api.admin), None, &[]).await;
    assert_eq!((s, &a["dedicated"]), (StatusCode::OK, &json!(5)));
    let first_tag = h["etag"].to_str().unwrap().to_string();
    let first_version: i64 = first_tag.trim_matches('"').parse().unwrap();
    assert_eq!(a["version"], first_version, "the ETag is the version");

    let body = json!({"dedicated": 6, "managedBy": "m"});
    let (s, h, w) = api
        .send(
            Method::PUT,
            QA,
            Some(&api.admin),
            Some(body.clone()),
            &[("if-match", &first_tag)],
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let second_tag = h["etag"].to_str().unwrap().to_string();
    assert_ne!(second_tag, first_tag, "a write changes the ETag");
    assert_eq!(
        second_tag,
        format!("\"{}\"", w["allocation"]["version"]),
        "{w}"
    );
    let before = api.acct.rows();
    let (s, h, p) = api
        .send(
            Method::PUT,
            QA,
            Some(&api.admin),
            Some(json!({"dedicated": 7, "managedBy": "m"})),
            &[("if-match", &first_tag)],
        )
        .await;
    assert_eq!(s, StatusCode::PRECONDITION_FAILED, "{p}");
    assert!(is_problem(&h));
    assert_eq!(
        (&p["expectedVersion"], &p["actualVersion"]),
        (&json!(first_version), &w["allocation"]["version"])
    );
    assert_eq!(api.acct.rows(), before);
    let (s, _, _) = api
        .send(
            Method::PUT,
            "/organizations/dev-team/allocations/TestOps",
            Some(&api.admin),
            Some(json!({"dedicated": 1, "managedBy": "m"})),
            &[("if-none-match", "*")],
        )
        .await;
    assert_eq!(s, StatusCode::OK, "If-None-Match: * creates");

    // The same key and body replays the first answer; nothing is written twice.
    let key = [("idempotency-key", "raise-qa-to-8")];
    let raise = json!({"dedicated": 8, "managedBy": "m"});
    let (s1, _, first) = api
        .send(Method::PUT, QA, Some(&api.admin), Some(raise.clone()), &key)
        .await;
    let audit_len = api
        .admin(Method::GET, "/audit", None)
        .await
        .1
        .as_array()
        .unwrap()
        .len();
    let (s2, _, again) = api
        .send(Method::PUT, QA, Some(&api.admin), Some(raise), &key)
        .await;
    assert_eq!((s1, s2), (StatusCode::OK, StatusCode::OK));
    assert_eq!(
        (&first["effect"], &again["effect"]),
        (&again["effect"], &first["effect"])
    );
    assert_eq!(again["replayed"], true);
    assert_eq!(
        api.admin(Method::GET, "/audit", None)
            .await
            .1
            .as_array()
            .unwrap()
            .len(),
        audit_len
    );
    let (s, _, p) = api
        .send(
            Method::PUT,
            QA,
            Some(&api.admin),
            Some(json!({"dedicated": 9, "managedBy": "m"})),
            &key,
        )
        .await;
    assert_eq!(
        (s.as_u16(), &p["type"]),
        (
            422,
            &json!("https://licensor.dev/problems/idempotency-key-reused")
        )
    );

    // A dry run answers and writes nothing, audit included.
    let before = api.acct.rows();
    let (s, _, p) = api
        .send(
            Method::PUT,
            &format!("{QA}?dryRun=true"),
            Some(&api.admin),
            Some(json!({"dedicated": 4, "managedBy": "m"})),
            &[],
        )
        .await;
    assert_eq!(
        (s, &p["effect"]["action"], &p["effect"]["to"]),
        (StatusCode::OK, &json!("decrease"), &json!(4))
    );
    let (s, _, p) = api
        .send(
            Method::PUT,
            &format!("{QA}?dryRun=true"),
            Some(&api.admin),
            Some(json!({"dedicated": 1, "managedBy": "m"})),
            &[],
        )
        .await;
    assert_eq!((s.as_u16(), &p["reason"]), (409, &json!("BelowInUse")));
    assert_eq!(api.acct.rows(), before);
}

/// DESIGN §6 over HTTP: an ETag never repeats (not after a delete and a
/// re-create), so an If-Match from before a delete never matches; a key's
/// first answer, a no-op included, is what its retry gets.
#[tokio::test]
async fn an_etag_from_before_a_delete_never_matches_and_noop_answers_are_kept() {
    let api = Api::start(DOCUMENTED);
    const DEV: &str = "/organizations/dev-team/allocations/TestOps";
    let put = |n: i64| Some(json!({"dedicated": n, "managedBy": "m"}));
    let (s, h, _) = api
        .send(Method::PUT, DEV, Some(&api.admin), put(1), &[])
        .await;
    assert_eq!(s, StatusCode::OK);
    let first = h["etag"].to_str().unwrap().to_string();
    let (s, _, _) = api
        .send(
            Method::DELETE,
            &format!("{DEV}?managedBy=m"),
            Some(&api.admin),
            None,
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, h, _) = api
        .send(Method::PUT, DEV, Some(&api.admin), put(1), &[])
        .await;
    assert_eq!(s, StatusCode::OK);
    let recreated = h["etag"].to_str().unwrap().to_string();
    assert_ne!(recreated, first, "the re-created allocation has a new ETag");
    let before = api.acct.rows();
    let (s, h, p) = api
        .send(
            Method::PUT,
            DEV,
            Some(&api.admin),
            put(2),
            &[("if-match", &first)],
        )
        .await;
    assert_eq!(
        (s, is_problem(&h)),
        (StatusCode::PRECONDITION_FAILED, true),
        "{p}"
    );
    assert_eq!(api.acct.rows(), before, "a lost update");

    // A no-op answer is remembered: the retry of a key whose first answer
    // was "none" replays it, even after another writer moved the count.
    let key = [("idempotency-key", "dev-stays-at-1")];
    let (s, _, first) = api
        .send(Method::PUT, DEV, Some(&api.admin), put(1), &key)
        .await;
    assert_eq!(
        (s, &first["effect"]["action"]),
        (StatusCode::OK, &json!("none"))
    );
    let (s, _, _) = api
        .send(Method::PUT, DEV, Some(&api.admin), put(3), &[])
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, again) = api
        .send(Method::PUT, DEV, Some(&api.admin), put(1), &key)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(again["replayed"], true, "{again}");
    assert_eq!(again["effect"], first["effect"]);
    assert_eq!(
        api.acct.allocation("dev-team", "TestOps"),
        Some((3, 0)),
        "the retry wrote"
    );

    // A Viewer never gets the answer stored for an admin's key.
    let viewer = api.acct.token("Viewer", "auditor");
    let (s, _, p) = api
        .send(Method::PUT, DEV, Some(&viewer), put(1), &key)
        .await;
    assert_eq!(
        (s, &p["reason"]),
        (StatusCode::FORBIDDEN, &json!("Forbidden")),
        "{p}"
    );
}

#[tokio::test]
async fn racing_clients_never_hand_out_more_than_the_pool() {
    let orgs: String = (0..32).map(|i| format!("  - id: org-{i}\n")).collect();
    let api = Arc::new(Api::start(&format!(
        "account: acme\nproducts: [{{name: TestOps, total: 105}}]\norganizations:\n{orgs}"
    )));
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let api = api.clone();
            tokio::spawn(async move {
                let path = format!("/organizations/org-{i}/allocations/TestOps");
                let body = json!({"dedicated": 10, "managedBy": format!("client-{i}")});
                let (s, _, p) = api
                    .send(Method::PUT, &path, Some(&api.admin), Some(body), &[])
                    .await;
                (s, p)
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        let (s, p) = t.await.unwrap();
        match s {
            StatusCode::OK => ok += 1,
            _ => assert_eq!(p["reason"], "InsufficientPool", "{p}"),
        }
    }
    assert_eq!(ok, 10, "exactly ten 10-seat allocations fit in 105");
    let pools = api.admin(Method::GET, "/products", None).await.1;
    assert_eq!(
        (&pools[0]["dedicated"], &pools[0]["free"]),
        (&json!(100), &json!(5))
    );
}

#[tokio::test]
async fn garbage_in_gets_a_problem_and_writes_nothing() {
    let api = Api::start(DOCUMENTED);
    let before = api.acct.rows();
    let huge = format!(
        "{{\"dedicated\": 5, \"managedBy\": \"{}\"}}",
        "x".repeat(100_000)
    );
    let cases: Vec<(&str, &str, String, u16)> = vec![
        ("application/json", "not json", "{not json".into(), 400),
        (
            "application/json",
            "truncated",
            "{\"dedicated\": 5".into(),
            400,
        ),
        ("application/json", "empty", String::new(), 400),
        (
            "text/plain",
            "wrong content type",
            "{\"dedicated\": 5}".into(),
            415,
        ),
        (
            "application/json",
            "string count",
            "{\"dedicated\": \"5\"}".into(),
            400,
        ),
        (
            "application/json",
            "absurd count",
            "{\"dedicated\": 1e30}".into(),
            400,
        ),
        (
            "application/json",
            "count past i64",
            "{\"dedicated\": 99999999999999999999}".into(),
            400,
        ),
        (
            "application/json",
            "unknown field",
            "{\"dedicated\": 5, \"owner\": \"me\"}".into(),
            400,
        ),
        ("application/json", "oversized", huge, 413),
        (
            "application/json",
            "an array, not an object",
            "[6]".into(),
            400,
        ),
        ("application/json", "a bare number", "6".into(), 400),
        (
            "application/json",
            "an expiry that is not a time",
            r#"{"dedicated": 6, "managedBy": "m", "expiry": {"until": "soon", "thenCount": 0}}"#.into(),
            400,
        ),
        (
            "application/json",
            "an expiry with a field it does not have",
            r#"{"dedicated": 6, "managedBy": "m", "expiry": {"until": "2027-01-01T00:00:00Z", "thenCount": 0, "then": 1}}"#.into(),
            400,
        ),
        (
            "application/json",
            "an expiry without a manager to act on it",
            r#"{"dedicated": 6, "expiry": {"until": "2027-01-01T00:00:00Z", "thenCount": 0}}"#.into(),
            422,
        ),
        (
            "application/json",
            "a thenCount out of range",
            r#"{"dedicated": 6, "managedBy": "m", "expiry": {"until": "2027-01-01T00:00:00Z", "thenCount": -1}}"#.into(),
            422,
        ),
    ];
    for (content_type, what, body, status) in cases {
        let r = api
            .http
            .put(api.url(QA))
            .bearer_auth(&api.admin)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{what}");
        assert!(is_problem(r.headers()), "{what}");
        let p: Value = r.json().await.unwrap();
        assert!(p["detail"].as_str().is_some(), "{what}: {p}");
    }
    // A member named twice is refused on every body the server reads, at
    // any depth: parsers disagree on which of the two counts.
    for (method, path, body) in [
        (Method::PUT, QA, r#"{"dedicated": 6, "dedicated": 7}"#),
        (
            Method::PUT,
            QA,
            r#"{"dedicated": 6, "managedBy": "a", "managedBy": "b"}"#,
        ),
        (
            Method::PUT,
            "/products/TestOps",
            r#"{"total": 300, "total": 1}"#,
        ),
        (Method::POST, "/organizations", r#"{"id": "x", "id": "y"}"#),
        (
            Method::POST,
            "/organizations/qa-team/seats/TestOps",
            r#"{"claim": 1, "claim": 2}"#,
        ),
        (
            Method::POST,
            "/organizations/qa-team/allocations/TestOps/release",
            r#"{"managedBy": "a", "managedBy": "b"}"#,
        ),
    ] {
        let r = api
            .http
            .request(method.clone(), api.url(path))
            .bearer_auth(&api.admin)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::BAD_REQUEST,
            "{method} {path} {body}"
        );
        assert!(is_problem(r.headers()), "{method} {path}");
        let p: Value = r.json().await.unwrap();
        assert!(
            p["detail"].as_str().unwrap().contains("named twice"),
            "{method} {path}: {p}"
        );
    }
    let seats = "/organizations/qa-team/seats/TestOps";
    let (s, _) = api
        .admin(Method::POST, seats, Some(json!({"claim": 1, "release": 1})))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _, _) = api
        .send(
            Method::PUT,
            QA,
            Some(&api.admin),
            Some(json!({"dedicated": 5})),
            &[("if-match", "yesterday")],
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // The key's documented pattern has no space in it.
    let (s, _, p) = api
        .send(
            Method::PUT,
            QA,
            Some(&api.admin),
            Some(json!({"dedicated": 5})),
            &[("idempotency-key", "two words")],
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{p}");
    // Every error is problem details: unknown routes, a method a route
    // does not answer (with Allow), a query that does not parse.
    let (s, h, p) = api
        .send(Method::GET, "/no/such/route", Some(&api.admin), None, &[])
        .await;
    assert_eq!((s, is_problem(&h)), (StatusCode::NOT_FOUND, true), "{p}");
    let (s, h, p) = api
        .send(Method::PATCH, QA, Some(&api.admin), None, &[])
        .await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED, "{p}");
    assert!(is_problem(&h), "{h:?}");
    assert!(p["type"].as_str().unwrap().ends_with("/method-not-allowed"));
    assert!(h["allow"].to_str().unwrap().contains("PUT"), "{h:?}");
    for query in ["?dryRun=maybe", "?dryRun=true&dryRun=false", "?bogus=1"] {
        let (s, h, p) = api
            .send(
                Method::PUT,
                &format!("{QA}{query}"),
                Some(&api.admin),
                Some(json!({"dedicated": 5})),
                &[],
            )
            .await;
        assert_eq!(
            (s, is_problem(&h)),
            (StatusCode::BAD_REQUEST, true),
            "{query}: {p}"
        );
    }
    let (s, h, p) = api
        .send(
            Method::GET,
            "/allocations?product=TestOps&x=1",
            Some(&api.admin),
            None,
            &[],
        )
        .await;
    assert_eq!((s, is_problem(&h)), (StatusCode::BAD_REQUEST, true), "{p}");
    // Organization ids follow the one alphabet (as the CRD and manifests).
    for id in ["qa\tteam", " padded", ""] {
        let (s, h, p) = api
            .send(
                Method::POST,
                "/organizations",
                Some(&api.admin),
                Some(json!({"id": id})),
                &[],
            )
            .await;
        assert_eq!((s.as_u16(), is_problem(&h)), (422, true), "{id:?}: {p}");
        assert_eq!(p["reason"], "Invalid", "{p}");
    }
    // Releasing an unknown organization or product is a typed 404.
    for (path, reason) in [
        (
            "/organizations/ghost/allocations/TestOps/release",
            "UnknownOrganization",
        ),
        (
            "/organizations/qa-team/allocations/Nope/release",
            "UnknownProduct",
        ),
        ("/organizations/ghost/seats/TestOps", "UnknownOrganization"),
    ] {
        let body = if path.contains("seats") {
            json!({"release": 1})
        } else {
            json!({"managedBy": "m"})
        };
        let (s, h, p) = api
            .send(Method::POST, path, Some(&api.admin), Some(body), &[])
            .await;
        assert_eq!(
            (s, is_problem(&h)),
            (StatusCode::NOT_FOUND, true),
            "{path}: {p}"
        );
        assert_eq!(p["reason"], reason, "{path}");
    }
    assert_eq!(api.acct.rows(), before, "garbage changed the store");
    let (s, _) = api.admin(Method::GET, "/products", None).await;
    assert_eq!(s, StatusCode::OK, "the server keeps serving");
}

#[tokio::test]
async fn a_sigkill_mid_burst_loses_no_acknowledged_write() {
    let orgs: String = (0..400).map(|i| format!("  - id: org-{i}\n")).collect();
    let mut api = Api::start(&format!(
        "account: acme\nproducts: [{{name: TestOps, total: 100000}}]\norganizations:\n{orgs}"
    ));
    let shared = Arc::new((api.http.clone(), api.base.clone(), api.admin.clone()));
    let acknowledged = Arc::new(std::sync::Mutex::new(Vec::new()));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (shared, acknowledged) = (shared.clone(), acknowledged.clone());
            tokio::spawn(async move {
                let (http, base, token) = &*shared;
                for i in (w..400).step_by(4) {
                    let r = http
                        .put(format!("{base}/organizations/org-{i}/allocations/TestOps"))
                        .bearer_auth(token)
                        .json(&json!({"dedicated": 1 + i % 9, "managedBy": "burst"}))
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status() == StatusCode::OK => {
                            acknowledged.lock().unwrap().push(i)
                        }
                        _ => return,
                    }
                }
            })
        })
        .collect();
    // Killed once a tenth of the burst is acknowledged: mid-burst however
    // fast the machine writes.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while acknowledged.lock().unwrap().len() < 40 {
        assert!(
            std::time::Instant::now() < deadline,
            "the burst never got going"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    api.acct.server().unwrap().kill().unwrap();
    for w in writers {
        w.await.unwrap();
    }
    let acked = acknowledged.lock().unwrap().clone();
    assert!(
        !acked.is_empty() && acked.len() < 400,
        "the kill should land mid-burst: {}",
        acked.len()
    );

    api.acct.serve(&[]);
    let status = api.acct.status();
    let held: std::collections::HashMap<String, i64> = status["allocations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["organization"].as_str().unwrap().to_string(),
                a["dedicated"].as_i64().unwrap(),
            )
        })
        .collect();
    for i in &acked {
        assert_eq!(
            held.get(&format!("org-{i}")),
            Some(&(1 + *i as i64 % 9)),
            "acknowledged write {i} lost"
        );
    }
    let audit = api.acct.audit();
    let creates: Vec<&str> = audit
        .iter()
        .filter(|e| e["action"] == "create")
        .map(|e| e["organization"].as_str().unwrap())
        .collect();
    assert_eq!(creates.len(), held.len(), "audit and allocations agree");
    let total: i64 = held.values().sum();
    assert_eq!(
        api.acct.pool("TestOps").1,
        total,
        "the pool's sum matches its allocations"
    );
    eprintln!(
        "{} acknowledged, {} committed before the kill",
        acked.len(),
        held.len()
    );
}

/// A misbehaving platform on loopback: answers every request with `answer`
/// after `delay`, counting requests.
async fn fake_platform(
    delay: Duration,
    answer: impl Fn(usize) -> (u16, Option<u64>) + Send + Sync + 'static,
) -> (String, Arc<AtomicUsize>) {
    use axum::http::HeaderValue;
    use axum::response::IntoResponse;
    let count = Arc::new(AtomicUsize::new(0));
    let (seen, answer) = (count.clone(), Arc::new(answer));
    let app = axum::Router::new().fallback(move || {
        let (seen, answer) = (seen.clone(), answer.clone());
        async move {
            let n = seen.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(delay).await;
            let (status, retry_after) = answer(n);
            let body = if status == 200 {
                json!({"products": [], "organizations": [], "allocations": []}).to_string()
            } else {
                json!({"type": "about:blank", "title": "x", "status": status, "detail": "busy"})
                    .to_string()
            };
            let mut r = (axum::http::StatusCode::from_u16(status).unwrap(), body).into_response();
            r.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/json"));
            if let Some(s) = retry_after {
                r.headers_mut().insert("retry-after", HeaderValue::from(s));
            }
            r
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, count)
}

/// `licensor status` against `url`, with a short timeout.
async fn status_against(url: &str) -> (i32, String, Duration) {
    let url = url.to_string();
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_licensor"))
            .args([
                "--backend",
                &url,
                "--account",
                "acme",
                "--backend-timeout",
                "300ms",
                "status",
            ])
            .env("LICENSOR_TOKEN", "lsr_whatever")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            started.elapsed(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn the_client_retries_then_reports_the_backend_unavailable() {
    // Down: nothing listens.
    let port = common::free_port();
    let (code, err, _) = status_against(&format!("http://127.0.0.1:{port}")).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("backend unavailable") && err.contains("after 5 tries"),
        "{err}"
    );

    // 500 every time: five tries, then unavailable.
    let (url, count) = fake_platform(Duration::ZERO, |_| (500, None)).await;
    let (code, err, _) = status_against(&url).await;
    assert_eq!((code, count.load(Ordering::SeqCst)), (1, 5), "{err}");
    assert!(
        err.contains("backend unavailable") && err.contains("500"),
        "{err}"
    );

    // Slow past the timeout: each try times out, five tries.
    let (url, count) = fake_platform(Duration::from_secs(2), |_| (200, None)).await;
    let (code, err, took) = status_against(&url).await;
    assert_eq!((code, count.load(Ordering::SeqCst)), (1, 5), "{err}");
    assert!(
        took < Duration::from_secs(6),
        "timeouts were not applied: {took:?}"
    );

    // 429 twice with Retry-After: 1, then fine: the client waits and succeeds.
    let (url, count) = fake_platform(Duration::ZERO, |n| {
        if n < 2 { (429, Some(1)) } else { (200, None) }
    })
    .await;
    let (code, err, took) = status_against(&url).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        took >= Duration::from_secs(2),
        "Retry-After was not honoured: {took:?}"
    );
    assert_eq!(
        count.load(Ordering::SeqCst),
        2 + 1,
        "two refused, then the one read of status"
    );

    // Garbage with 200.
    let app = axum::Router::new()
        .fallback(|| async { ([("content-type", "application/json")], "{\"pools\": ") });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let (code, err, _) = status_against(&url).await;
    assert_eq!(code, 1);
    assert!(err.contains("garbage"), "{err}");
}

#[tokio::test]
async fn the_rate_limit_answers_429_with_retry_after() {
    let mut api = Api::start(DOCUMENTED);
    api.acct.serve(&["--rate-limit", "5"]);
    api.base = format!("{}/v1/accounts/acme", api.acct.backend);
    let mut limited = None;
    for _ in 0..50 {
        let (s, h, p) = api
            .send(Method::GET, "/products", Some(&api.admin), None, &[])
            .await;
        if s == StatusCode::TOO_MANY_REQUESTS {
            limited = Some((h, p));
            break;
        }
    }
    let (h, p) = limited.expect("no 429 in 50 requests at 5/s");
    assert!(h["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(p["type"], "https://licensor.dev/problems/rate-limited");
    // The CLI's client waits it out.
    let run = api.acct.run(&["status", "-o", "json"]);
    assert_eq!(run.code, 0, "{run:?}");
}

#[tokio::test]
async fn a_retried_write_after_a_lost_answer_is_applied_once() {
    use licensor::backend::Backend;
    use licensor::domain::{AllocationWrite, Basis, Target};
    let api = Api::start(DOCUMENTED);
    let client = || api.client();
    let version = client()
        .observe("qa-team", "TestOps")
        .await
        .unwrap()
        .allocations[0]
        .version;
    let mut write = AllocationWrite {
        organization: "qa-team".into(),
        product: "TestOps".into(),
        target: Target::Count(9),
        managed_by: Some("default/licenses/qa".into()),
        deletion_policy: Default::default(),
        expiry: None,
        allow_user_displacement: false,
        expected_version: Some(version),
        idempotency_key: None,
    };
    write.idempotency_key = Some(write.intent_key("", Basis::Allocation(version)));
    // The server commits; the client "crashes" before it reads the answer,
    // and a new process sends the same intended change again.
    let first = client().write(&write).await.unwrap();
    let again = client().write(&write).await.unwrap();
    assert!(!first.replayed && again.replayed);
    assert_eq!(first.effect, again.effect);
    let increases = api
        .acct
        .audit()
        .iter()
        .filter(|e| e["action"] == "increase")
        .count();
    assert_eq!(increases, 1, "applied once");
    assert_eq!(api.acct.allocation("qa-team", "TestOps"), Some((9, 4)));
}

#[tokio::test]
async fn health_metrics_openapi_and_a_clean_stop() {
    let mut api = Api::start(DOCUMENTED);
    let root = api.acct.backend.clone();
    let get = |path: &str| {
        let (http, url) = (api.http.clone(), format!("{root}{path}"));
        async move {
            let r = http.get(url).send().await.unwrap();
            (r.status(), r.text().await.unwrap())
        }
    };
    assert_eq!(get("/healthz").await.0, StatusCode::OK);
    assert_eq!(get("/readyz").await.0, StatusCode::OK);
    api.admin(Method::GET, "/products", None).await;
    let (s, metrics) = get("/metrics").await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        metrics.contains(r#"licensor_http_requests_total{method="GET",route="/v1/accounts/{account}/products",status="200"} 1"#),
        "{metrics}"
    );
    // No client can create series: invented methods and paths collapse
    // into fixed label values.
    let series = |m: &str| {
        m.lines()
            .filter(|l| l.starts_with("licensor_http_requests_total{"))
            .count()
    };
    let before = series(&get("/metrics").await.1);
    for i in 0..100 {
        let method = Method::from_bytes(format!("INVENT{i}").as_bytes()).unwrap();
        for path in [format!("{}{QA}", api.base), format!("{root}/nowhere/{i}")] {
            let r = api.http.request(method.clone(), path).send().await.unwrap();
            assert!(r.status().is_client_error());
        }
        api.http
            .get(format!("{root}/made/up/{i}"))
            .send()
            .await
            .unwrap();
    }
    let (_, metrics) = get("/metrics").await;
    assert!(
        series(&metrics) <= before + 4,
        "300 invented requests made {} new series:\n{metrics}",
        series(&metrics) - before
    );
    assert!(metrics.contains(r#"method="other""#), "{metrics}");
    assert!(metrics.contains(r#"route="(unmatched)""#), "{metrics}");

    let (s, doc) = get("/openapi.json").await;
    assert_eq!(s, StatusCode::OK);
    let doc: Value = serde_json::from_str(&doc).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    for path in [
        "/v1/accounts/{account}",
        "/v1/accounts/{account}/products",
        "/v1/accounts/{account}/organizations/{organization}/allocations/{product}",
        "/v1/accounts/{account}/organizations/{organization}/seats/{product}",
        "/v1/accounts/{account}/audit",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from /openapi.json"
        );
    }
    assert!(doc["components"]["schemas"]["Problem"].is_object());

    let server = api.acct.server().unwrap();
    let pid = nix::unistd::Pid::from_raw(server.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = server.wait().unwrap();
    assert_eq!(status.code(), Some(0), "SIGTERM stops cleanly");
}

#[tokio::test]
async fn a_slow_store_times_out_and_the_retry_applies_once() {
    let mut api = Api::start(DOCUMENTED);
    api.acct.serve(&["--timeout", "500ms"]);
    api.base = format!("{}/v1/accounts/acme", api.acct.backend);
    // Someone holds the store's write lock: the write waits behind it.
    let lock = rusqlite::Connection::open(api.acct.db()).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let key = [("idempotency-key", "raise-qa-to-7")];
    let body = json!({"dedicated": 7, "managedBy": "m"});
    let started = Instant::now();
    let (s, h, p) = api
        .send(Method::PUT, QA, Some(&api.admin), Some(body.clone()), &key)
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{p}");
    assert!(is_problem(&h) && h.contains_key("retry-after"));
    assert_eq!(p["type"], "https://licensor.dev/problems/timeout");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    lock.execute_batch("ROLLBACK").unwrap();
    // The write handed to the store still commits; the retry with the same
    // key gets its answer instead of applying it again.
    let (s, _, p) = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let answer = api
                .send(Method::PUT, QA, Some(&api.admin), Some(body.clone()), &key)
                .await;
            if answer.0 != StatusCode::SERVICE_UNAVAILABLE {
                return answer;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(s, StatusCode::OK, "{p}");
    let increases = api
        .acct
        .audit()
        .iter()
        .filter(|e| e["action"] == "increase")
        .count();
    assert_eq!(increases, 1);
    assert_eq!(api.acct.allocation("qa-team", "TestOps"), Some((7, 4)));
}

/// `licensor serve --tls-cert/--tls-key` serves HTTPS, and the HTTP backend
/// trusts a private CA given with `--backend-ca` (and nothing else).
#[test]
fn https_with_a_private_ca() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut acct = Account::seeded_on(Kind::Http, DOCUMENTED);
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let serving = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let cert_file = acct.write("tls.crt", &serving.pem());
    let key_file = acct.write("tls.key", &key.serialize_pem());
    let ca_file = acct.write("ca.pem", &ca.pem());
    let port = acct.serve(&[
        "--tls-cert",
        cert_file.to_str().unwrap(),
        "--tls-key",
        key_file.to_str().unwrap(),
    ]);
    acct.backend = format!("https://127.0.0.1:{port}");

    let run = acct.run(&[
        "--backend-ca",
        ca_file.to_str().unwrap(),
        "status",
        "-o",
        "json",
    ]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.json()["pools"][0]["free"], 195);

    // The page's cookies over TLS are Secure.
    let ca_cert = reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap();
    let page = set_cookies_over_tls(port, ca_cert);
    assert!(
        page.contains("Secure") && page.contains("HttpOnly"),
        "{page}"
    );

    // Without the CA the certificate is not trusted: a clear failure.
    let run = acct.run(&["status"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains("BackendUnavailable") || run.stderr.contains("unavailable"),
        "{}",
        run.stderr
    );
    // Plain HTTP to the TLS port is no answer either.
    acct.backend = format!("http://127.0.0.1:{port}");
    let run = acct.run(&["--backend-timeout", "2s", "status"]);
    assert_eq!(run.code, 1, "{run:?}");
    // A key that does not belong to the certificate is refused at start,
    // naming both files.
    let other = KeyPair::generate().unwrap();
    let wrong = acct.write("wrong.key", &other.serialize_pem());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_licensor"))
        .args([
            "--backend",
            acct.store(),
            "serve",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--tls-cert", cert_file.to_str().unwrap()])
        .args(["--tls-key", wrong.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("tls.crt and wrong.key do not belong together"),
        "{stderr}"
    );
}

/// The Set-Cookie headers of `GET /` over HTTPS on `port`, trusting `ca`,
/// after checking the answer says to come back over TLS only (HSTS).
fn set_cookies_over_tls(port: u16, ca: reqwest::Certificate) -> String {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = Client::builder().add_root_certificate(ca).build().unwrap();
        let answer = client
            .get(format!("https://127.0.0.1:{port}/"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            answer.headers()["strict-transport-security"],
            "max-age=31536000"
        );
        answer
            .headers()
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect::<Vec<_>>()
            .join("\n")
    })
}

/// `--backend-rate` is one token bucket for every call of the client:
/// 300 requests at 100 a second (a burst of 100) take at least 2 s, where
/// on loopback they take a fraction of that, and every one is made.
#[tokio::test]
async fn the_backend_rate_paces_every_call_of_the_client() {
    use licensor::backend::Backend;
    let api = Api::start(DOCUMENTED);
    let client = Arc::new(api.client().with_rate(std::num::NonZeroU32::new(100)));
    let requests = || async {
        let metrics = api
            .http
            .get(format!("{}/metrics", api.acct.backend))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        metrics
            .lines()
            .filter(|l| l.starts_with("licensor_http_requests_total{") && l.contains("/products"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let before = requests().await;
    let started = Instant::now();
    // Each observation is two requests: the pools and the allocation.
    let calls = (0..150).map(|_| {
        let client = client.clone();
        async move { client.observe("qa-team", "TestOps").await.unwrap() }
    });
    futures::future::join_all(calls).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1900),
        "300 requests at 100/s took {took:?}"
    );
    assert_eq!(
        requests().await - before,
        150.0,
        "every pools read was made"
    );
}

/// `licensor serve --account A` serves account A only: a token of another
/// account in the same store is 401 on the API and at the page's sign-in,
/// while without `--account` the same token works for its own account.
#[tokio::test]
async fn serve_with_an_account_serves_that_account_only() {
    let mut acct = Account::seeded(DOCUMENTED);
    let other = acct.write(
        "other.yaml",
        "account: other\nproducts:\n  - {name: TestOps, total: 10}\norganizations:\n  - id: ops\n",
    );
    let run = acct.run_local(&["backend", "seed", "-f", other.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{run:?}");
    let token = |account: &str, name: &str| {
        let run = acct.run_local(&[
            "--account",
            account,
            "token",
            "create",
            "--role",
            "Viewer",
            "--name",
            name,
        ]);
        assert_eq!(run.code, 0, "{run:?}");
        run.stdout.trim().to_string()
    };
    let (theirs, ours) = (token("other", "theirs"), token("acme", "ours"));
    let http = Client::new();
    let get = async |port: u16, account: &str, token: &str| {
        let r = http
            .get(format!("http://127.0.0.1:{port}/v1/accounts/{account}"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        (r.status(), r.text().await.unwrap())
    };

    let open = acct.serve(&[]);
    assert_eq!(get(open, "other", &theirs).await.0, StatusCode::OK);

    let bound = acct.serve(&["--account", "acme"]);
    let (status, body) = get(bound, "other", &theirs).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(
        body.contains("this server serves account acme only"),
        "{body}"
    );
    assert_eq!(
        get(bound, "acme", &theirs).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(get(bound, "acme", &ours).await.0, StatusCode::OK);

    // At sign-in: the page answers with the same words and opens no session.
    let browser = common::browser::no_redirects();
    let page = format!("http://127.0.0.1:{bound}");
    let answer = common::browser::sign_in_attempt(&browser, &page, &theirs, None).await;
    assert_eq!(answer.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        common::browser::set_cookie(&answer, "licensor_session="),
        None
    );
    let html = answer.text().await.unwrap();
    assert!(
        html.contains("this server serves account acme only"),
        "{html}"
    );
}

/// Every kind of answer says how it may be kept and read: `no-store` (but
/// the stylesheet, cached an hour), `nosniff`, a content security policy,
/// and over plain HTTP no HSTS (over TLS: `https_with_a_private_ca`).
#[tokio::test]
async fn every_kind_of_answer_carries_its_security_headers() {
    let api = Api::start(DOCUMENTED);
    let root = api.acct.backend.clone();
    let http = Client::new();
    let viewer = api.acct.token("Viewer", "reader");
    let cases: Vec<(&str, reqwest::RequestBuilder, u16)> = vec![
        (
            "an authenticated read",
            http.get(api.url("")).bearer_auth(&api.admin),
            200,
        ),
        ("a 401 problem", http.get(api.url("")), 401),
        (
            "a 403 problem",
            http.put(api.url("/organizations/qa-team/allocations/TestOps"))
                .bearer_auth(&viewer)
                .json(&json!({"dedicated": 6})),
            403,
        ),
        (
            "a 404 for an unknown page path",
            http.get(format!("{root}/nope")),
            404,
        ),
        ("a 405", http.patch(format!("{root}/sign-in")), 405),
        ("the page", http.get(format!("{root}/")), 200),
        ("health", http.get(format!("{root}/healthz")), 200),
        (
            "the OpenAPI document",
            http.get(format!("{root}/openapi.json")),
            200,
        ),
    ];
    for (what, request, status) in cases {
        let answer = request.send().await.unwrap();
        assert_eq!(answer.status().as_u16(), status, "{what}");
        let h = answer.headers();
        assert_eq!(h["cache-control"], "no-store", "{what}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{what}");
        assert!(h.contains_key("content-security-policy"), "{what}");
        assert!(
            !h.contains_key("strict-transport-security"),
            "{what}: plain HTTP"
        );
    }
    let css = http.get(format!("{root}/page.css")).send().await.unwrap();
    assert_eq!(css.headers()["cache-control"], "max-age=3600");
    assert_eq!(css.headers()["x-content-type-options"], "nosniff");
}
