//! The License Management page (DESIGN §8), served by `licensor serve` at
//! `/`: server-rendered HTML ([`view`]) from the same store calls and
//! problem messages as the API, no script, no external assets.
//!
//! Sign-in exchanges an API token for a session kept in the store: the
//! cookie (`HttpOnly`, `SameSite=Strict`, `Secure` behind TLS) carries a
//! random id whose hash names the session row, never the token, so any
//! replica serves it and sign-out ends it everywhere. Every form carries the
//! session's CSRF secret (the sign-in form a double-submit cookie's), checked
//! before anything else a POST does. Edit, Give and Revoke write with no
//! manager, so the rules refuse them on a managed allocation (`Conflict`):
//! nothing on the page can take an allocation away from its manager. Every
//! form answers with a redirect to the account (post/redirect/get), which
//! shows what the form did once, from a cookie of its own.

mod chart;
mod view;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form};
use axum::{Router, middleware};
use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};
use serde::Deserialize;

use super::Shared;
use super::routes::store;
use crate::api::{Problem, ProblemType};
use crate::backend::store::Session;
use crate::domain::{AllocationWrite, Role, Target, check_count, require_admin};

/// The session cookie.
const SESSION: &str = "licensor_session";
/// What the last form did, carried across its redirect to the account.
const FLASH: &str = "licensor_flash";
/// The sign-in form's double-submit CSRF cookie.
const SIGN_IN: &str = "licensor_sign_in";
/// How long a session lasts.
const SESSION_TTL: chrono::TimeDelta = chrono::TimeDelta::hours(8);
/// Audit entries per page.
pub const AUDIT_PAGE: usize = 50;

/// The page's route templates.
pub mod path {
    pub const HOME: &str = "/";
    pub const STYLESHEET: &str = "/page.css";
    pub const SIGN_IN: &str = "/sign-in";
    pub const SIGN_OUT: &str = "/sign-out";
    pub const CONFIRM_REVOKE: &str = "/revoke";
    pub const EDIT: &str = "/allocations/edit";
    pub const REVOKE: &str = "/allocations/revoke";
    pub const GIVE: &str = "/allocations/give";
    pub const FAVICON: &str = "/favicon.svg";
    pub const AUDIT_CSV: &str = "/audit.csv";
}

/// The page's routes.
pub fn routes(shared: Shared) -> Router<Shared> {
    Router::new()
        .route(path::HOME, get(home))
        .route(path::STYLESHEET, get(stylesheet))
        .route(path::FAVICON, get(favicon))
        .route(path::AUDIT_CSV, get(audit_csv))
        // A form's address loaded by itself (a reload, a bookmark) shows
        // the account: every form answers with a redirect (PRG).
        .route(path::SIGN_IN, post(sign_in).get(to_home))
        .route(path::SIGN_OUT, post(sign_out).get(to_home))
        .route(path::CONFIRM_REVOKE, get(confirm_revoke))
        .route(path::EDIT, post(counted::<false>).get(to_home))
        .route(path::REVOKE, post(revoke).get(to_home))
        .route(path::GIVE, post(counted::<true>).get(to_home))
        .layer(middleware::map_response(errors_as_pages))
        .layer(middleware::map_response(secure_headers))
        .with_state(shared)
}

/// No framing, no outside resources, no caching of pages with account data.
async fn secure_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // Same-origin: nothing leaves for other sites, and the page's own
    // posts carry their true Origin (under no-referrer a browser sends
    // `Origin: null`, which the origin check refuses).
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        include_str!("page.css"),
    )
        .into_response()
}

/// The session the request's cookie names, if it is live.
async fn session(s: &Shared, jar: &CookieJar) -> Result<Option<Session>, Problem> {
    let Some(id) = jar.get(SESSION).map(|c| c.value().to_string()) else {
        return Ok(None);
    };
    store(s, move |st| st.session(&id)).await
}

/// Whether the request reached us over TLS: served with `--tls-cert`, or
/// through a proxy that says so. The cookies are then `Secure`.
fn over_tls(s: &Shared, headers: &HeaderMap) -> bool {
    s.tls
        || headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

fn cookie(s: &Shared, name: &'static str, value: String, headers: &HeaderMap) -> Cookie<'static> {
    Cookie::build((name, value))
        .path("/")
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(over_tls(s, headers))
        .build()
}

/// Compares two secrets in time that does not depend on where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    !a.is_empty()
        && a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// A problem shown as a page (with the API's status, reason and words).
pub(super) fn problem_page(problem: Problem, session: Option<&Session>) -> Response {
    let status = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::BAD_REQUEST);
    (status, view::problem(&problem, session)).into_response()
}

fn forbidden_form() -> Problem {
    Problem::new(
        StatusCode::FORBIDDEN,
        ProblemType::Refused(crate::domain::Reason::Forbidden),
        "the form is missing its CSRF token or it does not match this session; reload the page and try again",
    )
}

fn signed_out() -> Problem {
    Problem::new(
        StatusCode::UNAUTHORIZED,
        ProblemType::Unauthorized,
        "sign in first: the session is missing or has ended",
    )
}

/// What `/` shows: filters and the page of the audit log.
#[derive(Debug, Default, Deserialize)]
pub struct AuditQuery {
    #[serde(default)]
    pub organization: String,
    #[serde(default)]
    pub product: String,
    /// A page number; anything else reads as the first page.
    #[serde(default, deserialize_with = "lenient_page")]
    pub page: Option<usize>,
    /// The history's range (`30d`, `90d`, `1y`, `all`); anything else
    /// reads as 30 days.
    #[serde(default)]
    pub range: String,
}

fn lenient_page<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    Ok(String::deserialize(d)?.trim().parse().ok())
}

/// The account page, or the sign-in form.
async fn home(
    State(s): State<Shared>,
    Query(query): Query<AuditQuery>,
    headers: HeaderMap,
    jar: CookieJar,
) -> Response {
    match session(&s, &jar).await {
        Ok(Some(session)) => {
            // What the form before the redirect did, shown once.
            let outcome = jar
                .get(FLASH)
                .and_then(|c| view::Outcome::from_cookie(c.value()));
            let jar = jar.remove(Cookie::build(FLASH).path("/"));
            (jar, account_page(&s, &session, &query, outcome).await).into_response()
        }
        Ok(None) => sign_in_page(&s, jar, &headers, None),
        Err(p) => problem_page(p, None),
    }
}

/// The signed-in account's audit log as a CSV download.
async fn audit_csv(State(s): State<Shared>, jar: CookieJar) -> Response {
    match session(&s, &jar).await {
        Ok(Some(session)) => {
            let account = session.account.clone();
            super::routes::audit_download(s, account, 0, i64::MAX)
                .await
                .unwrap_or_else(|p| problem_page(p, Some(&session)))
        }
        Ok(None) => problem_page(signed_out(), None),
        Err(p) => problem_page(p, None),
    }
}

/// The sign-in form, with a fresh double-submit secret.
fn sign_in_page(
    s: &Shared,
    jar: CookieJar,
    headers: &HeaderMap,
    error: Option<Problem>,
) -> Response {
    let secret = match crate::backend::store::random_hex() {
        Ok(s) => s,
        Err(e) => return problem_page(e.into(), None),
    };
    let status = error
        .as_ref()
        .and_then(|p| StatusCode::from_u16(p.status).ok())
        .unwrap_or(StatusCode::OK);
    let jar = jar.add(cookie(s, SIGN_IN, secret.clone(), headers));
    (status, jar, view::sign_in(&secret, error.as_ref())).into_response()
}

/// The account page, with what a form just did (or why not).
async fn account_page(
    s: &Shared,
    session: &Session,
    query: &AuditQuery,
    outcome: Option<view::Outcome>,
) -> Response {
    let account = session.account.clone();
    let read = store(s, move |st| {
        Ok((st.snapshot(&account)?, st.audit(&account)?))
    })
    .await;
    let (snapshot, audit) = match read {
        Ok(r) => r,
        Err(p) => return problem_page(p, Some(session)),
    };
    let now = chrono::Utc::now();
    let organization = Some(query.organization.as_str()).filter(|o| !o.is_empty());
    let range = crate::history::Range::parse(&query.range);
    let history = crate::history::history(&snapshot, &audit, range, now, organization);
    view::account(
        session,
        &snapshot,
        &audit,
        query,
        outcome.as_ref(),
        now,
        &history,
    )
    .into_response()
}

#[derive(Deserialize)]
struct SignIn {
    #[serde(default)]
    token: String,
    #[serde(default)]
    csrf: String,
}

async fn sign_in(
    State(s): State<Shared>,
    client: Option<Extension<ConnectInfo<std::net::SocketAddr>>>,
    headers: HeaderMap,
    jar: CookieJar,
    Form(form): Form<SignIn>,
) -> Response {
    let expected = jar.get(SIGN_IN).map(|c| c.value().to_string());
    if !expected.is_some_and(|e| same_secret(&e, &form.csrf)) {
        return sign_in_page(&s, jar, &headers, Some(forbidden_form()));
    }
    // Too many failed sign-ins from this address: 429 until the oldest is
    // a minute old, before the token is looked at.
    let client = client.map(|Extension(ConnectInfo(a))| a.ip());
    let now = std::time::Instant::now();
    if let Some(ip) = client
        && let Some(wait) = s.sign_ins.wait(ip, now)
    {
        s.metrics.sign_ins_throttled.inc();
        tracing::warn!(client = %ip, "sign-in refused: too many failures from this address");
        let seconds = wait.as_secs().max(1);
        let problem = Problem {
            retry_after: Some(seconds),
            ..Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                ProblemType::RateLimited,
                format!("too many failed sign-ins from this address; try again in {seconds} s"),
            )
        };
        let mut page = sign_in_page(&s, jar, &headers, Some(problem));
        page.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        return page;
    }
    let token = form.token.trim().to_string();
    // Signing in ends the browser's previous session.
    let previous = jar.get(SESSION).map(|c| c.value().to_string());
    let only = s.account.clone();
    match store(&s, move |st| {
        st.open_session(&token, SESSION_TTL, previous.as_deref(), only.as_deref())
    })
    .await
    {
        Ok((id, _)) => {
            let jar = jar
                .remove(Cookie::build(SIGN_IN).path("/"))
                .add(cookie(&s, SESSION, id, &headers));
            (jar, Redirect::to("/")).into_response()
        }
        Err(p) => {
            if p.status == StatusCode::UNAUTHORIZED.as_u16() {
                s.metrics.sign_in_failures.inc();
                if let Some(ip) = client {
                    s.sign_ins.failed(ip, now);
                }
                let client = client.map_or("unknown".into(), |ip| ip.to_string());
                tracing::warn!(%client, "sign-in failed: the token is unknown, revoked or expired");
            }
            sign_in_page(&s, jar, &headers, Some(p))
        }
    }
}

#[derive(Deserialize)]
struct Csrf {
    #[serde(default)]
    csrf: String,
}

async fn sign_out(State(s): State<Shared>, jar: CookieJar, Form(form): Form<Csrf>) -> Response {
    let session = match session(&s, &jar).await {
        Ok(Some(session)) => session,
        Ok(None) => {
            return (
                jar.remove(Cookie::build(SESSION).path("/")),
                Redirect::to("/"),
            )
                .into_response();
        }
        Err(p) => return problem_page(p, None),
    };
    if !same_secret(&session.csrf, &form.csrf) {
        return problem_page(forbidden_form(), Some(&session));
    }
    let id = jar
        .get(SESSION)
        .map(|c| c.value().to_string())
        .unwrap_or_default();
    if let Err(p) = store(&s, move |st| st.close_session(&id)).await {
        return problem_page(p, Some(&session));
    }
    (
        jar.remove(Cookie::build(SESSION).path("/")),
        Redirect::to("/"),
    )
        .into_response()
}

/// The session of a form, checked: signed in, the form's CSRF secret, and
/// the Account Admin role (the API's 403 and words for a Viewer).
async fn admin_form(s: &Shared, jar: &CookieJar, csrf: &str) -> Result<Session, Response> {
    let session = match session(s, jar).await {
        Ok(Some(session)) => session,
        Ok(None) => return Err(problem_page(signed_out(), None)),
        Err(p) => return Err(problem_page(p, None)),
    };
    if !same_secret(&session.csrf, csrf) {
        return Err(problem_page(forbidden_form(), Some(&session)));
    }
    if let Err(refusal) = require_admin(session.who.role, "change the account") {
        return Err(problem_page(Problem::refusal(&refusal), Some(&session)));
    }
    Ok(session)
}

#[derive(Deserialize)]
struct CountForm {
    /// Missing reads as empty, and is refused as a mismatch (403).
    #[serde(default)]
    csrf: String,
    organization: String,
    product: String,
    /// As typed: read here, so a wrong one is told in the page's words.
    dedicated: String,
    /// Edit's: the allocation's version the form was shown with.
    #[serde(default)]
    version: Option<i64>,
}

/// A count as typed in a form: a whole number from 0 to the limit.
fn typed_count(typed: &str) -> Result<i64, crate::domain::Refusal> {
    let count = typed.trim().parse::<i64>().map_err(|_| {
        crate::domain::Refusal::new(
            crate::domain::Reason::Invalid,
            format!(
                "the count is a whole number from 0 to {}; “{}” is not",
                view::thousands(crate::domain::MAX_COUNT),
                typed.trim()
            ),
        )
    })?;
    check_count(count)?;
    Ok(count)
}

/// Edit (`GIVE` false) changes the count of an allocation the organization
/// holds (0 goes through the Revoke confirmation); it never creates one.
/// Give (`GIVE` true) gives an organization licenses of a product it holds
/// none of: a new, unmanaged allocation; it never changes one. Either is
/// Account Admin only: the count checked, then written as the session's
/// caller with no manager.
async fn counted<const GIVE: bool>(
    State(s): State<Shared>,
    headers: HeaderMap,
    jar: CookieJar,
    Form(form): Form<CountForm>,
) -> Response {
    let (s, headers) = (&s, &headers);
    let session = match admin_form(s, &jar, &form.csrf).await {
        Ok(session) => session,
        Err(page) => return page,
    };
    let typed = view::Typed {
        organization: form.organization.clone(),
        product: form.product.clone(),
        count: form.dedicated.clone(),
    };
    let count = match typed_count(&form.dedicated) {
        Ok(count) => count,
        Err(refusal) => {
            let p = Problem::refusal(&refusal);
            return back(s, headers, jar, view::Outcome::Refused(p, Some(typed)));
        }
    };
    // Give creates only; Edit needs the version of one that exists.
    let expected = match (GIVE, form.version) {
        (true, _) => 0,
        (false, Some(version)) if version > 0 => version,
        (false, _) => {
            let p = Problem::new(
                StatusCode::NOT_FOUND,
                ProblemType::NotFound,
                format!(
                    "{} holds no {} licenses to edit; give them with “Give licenses”",
                    form.organization, form.product
                ),
            );
            return back(s, headers, jar, view::Outcome::Refused(p, None));
        }
    };
    if count == 0 && GIVE {
        let refusal = crate::domain::Refusal::new(
            crate::domain::Reason::Invalid,
            "give at least 1 license; 0 gives nothing".to_string(),
        );
        return back(
            s,
            headers,
            jar,
            view::Outcome::Refused(Problem::refusal(&refusal), Some(typed)),
        );
    }
    if count == 0 {
        let q = view::query(&[
            ("organization", &form.organization),
            ("product", &form.product),
        ]);
        return Redirect::to(&format!("{}?{q}", path::CONFIRM_REVOKE)).into_response();
    }
    let write = AllocationWrite {
        expected_version: Some(expected),
        ..AllocationWrite::new(form.organization, form.product, Target::Count(count))
    };
    written(s, headers, jar, &session, write, Some(typed)).await
}

#[derive(Deserialize)]
struct RevokeQuery {
    organization: String,
    product: String,
}

/// The confirmation box of a revoke: how many in-use seats move to the
/// account pool and how many users would be displaced, from a dry run.
async fn confirm_revoke(
    State(s): State<Shared>,
    jar: CookieJar,
    Query(q): Query<RevokeQuery>,
) -> Response {
    let session = match session(&s, &jar).await {
        Ok(Some(session)) => session,
        Ok(None) => return problem_page(signed_out(), None),
        Err(p) => return problem_page(p, None),
    };
    if let Err(refusal) = require_admin(session.who.role, "change the account") {
        return problem_page(Problem::refusal(&refusal), Some(&session));
    }
    let (account, who) = (session.account.clone(), session.who.clone());
    let (organization, product) = (q.organization.clone(), q.product.clone());
    let dry = store(&s, move |st| {
        let snapshot = st.snapshot(&account)?;
        let version = snapshot
            .allocations
            .iter()
            .find(|a| a.organization == organization && a.product == product)
            .map(|a| a.version);
        let write = AllocationWrite {
            allow_user_displacement: true,
            expected_version: version,
            ..AllocationWrite::new(organization, product, Target::Remove)
        };
        Ok((st.write(&account, &who, &write, true)?, version))
    })
    .await;
    match dry {
        Ok((written, Some(version))) => {
            view::confirm_revoke(&session, &q.organization, &q.product, &written, version)
                .into_response()
        }
        Ok((_, None)) => problem_page(
            Problem::new(
                StatusCode::NOT_FOUND,
                ProblemType::NotFound,
                format!("{} holds no {} allocation", q.organization, q.product),
            ),
            Some(&session),
        ),
        Err(p) => problem_page(p, Some(&session)),
    }
}

#[derive(Deserialize)]
struct RevokeForm {
    #[serde(default)]
    csrf: String,
    organization: String,
    product: String,
    version: i64,
    /// The explicit choice to displace users (a checkbox: present or not).
    #[serde(default)]
    displace: Option<String>,
}

async fn revoke(
    State(s): State<Shared>,
    headers: HeaderMap,
    jar: CookieJar,
    Form(form): Form<RevokeForm>,
) -> Response {
    let session = match admin_form(&s, &jar, &form.csrf).await {
        Ok(session) => session,
        Err(page) => return page,
    };
    let write = AllocationWrite {
        allow_user_displacement: form.displace.is_some(),
        expected_version: Some(form.version),
        ..AllocationWrite::new(form.organization, form.product, Target::Remove)
    };
    written(&s, &headers, jar, &session, write, None).await
}

/// Writes as the session's caller, then back to the account with the
/// outcome (post/redirect/get): a reload shows the account, never posts
/// again. A refusal keeps what was typed.
async fn written(
    s: &Shared,
    headers: &HeaderMap,
    jar: CookieJar,
    session: &Session,
    write: AllocationWrite,
    typed: Option<view::Typed>,
) -> Response {
    let (account, who) = (session.account.clone(), session.who.clone());
    let what = (write.organization.clone(), write.product.clone());
    let creating = write.expected_version == Some(0);
    let outcome = match store(s, move |st| st.write(&account, &who, &write, false)).await {
        Ok(w) => view::Outcome::Written(what.0, what.1, w),
        Err(p) => view::Outcome::Refused(view::in_page_words(p, &what, creating), typed),
    };
    back(s, headers, jar, outcome)
}

/// To the account, with `outcome` to show there once.
fn back(s: &Shared, headers: &HeaderMap, jar: CookieJar, outcome: view::Outcome) -> Response {
    let flash = cookie(s, FLASH, outcome.to_cookie(), headers);
    (jar.add(flash), Redirect::to("/#outcome")).into_response()
}

/// A form's address loaded by itself: the account.
async fn to_home() -> Redirect {
    Redirect::to(path::HOME)
}

/// The page's icon: a key, drawn here, loaded from this server.
async fn favicon() -> Response {
    (
        [
            (header::CONTENT_TYPE, "image/svg+xml"),
            (header::CACHE_CONTROL, "max-age=86400"),
        ],
        include_str!("favicon.svg"),
    )
        .into_response()
}

/// An error the page's own handlers did not write (a form that cannot be
/// read, a body too large, a method a path does not have) as a page in
/// the page's words, not the API's JSON.
async fn errors_as_pages(response: Response) -> Response {
    let status = response.status();
    let html = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/html"));
    if html || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let detail = match status {
        StatusCode::PAYLOAD_TOO_LARGE => {
            "what was sent is far too long (a licensor token is 52 characters); go back and try again"
        }
        StatusCode::METHOD_NOT_ALLOWED => {
            "this address does not answer that; go back to the account"
        }
        s if s.is_client_error() => {
            "the form could not be read; go back to the account and try again"
        }
        _ => "the server failed; try again shortly",
    };
    let title = status.canonical_reason().unwrap_or("Error");
    let problem = Problem {
        title: title.to_string(),
        ..Problem::new(status, ProblemType::Malformed, detail)
    };
    problem_page(problem, None)
}

/// The role's name as the page shows it.
fn role_name(role: Role) -> &'static str {
    match role {
        Role::AccountAdmin => "Account Admin",
        Role::Viewer => "Viewer",
    }
}
