//! Access to the API: the bearer token of a request is checked for the
//! account in its path (401), and any method but GET and HEAD needs the
//! Account Admin role (403), before anything else the route does. The
//! token is checked in the store on every request (or, on SQLite, found
//! checked since the store last changed), so a revoked or expired one is
//! refused by every server on the store at once; tokens are never logged,
//! echoed or stored in clear.

use std::collections::HashMap;

use axum::RequestExt;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::Shared;
use crate::api::Problem;
use crate::backend::BackendError;
use crate::backend::store::{Principal, serves};
use crate::domain::require_admin;

/// The bearer token of a request; the scheme name is case-insensitive
/// (RFC 9110 §11.1).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The caller of a request for `account`, from its bearer token.
pub async fn authorize(
    s: &Shared,
    headers: &HeaderMap,
    account: &str,
) -> Result<Principal, Problem> {
    let unauthorized = |m: &str| Problem::from(BackendError::Unauthorized(m.to_string()));
    let token = bearer(headers)
        .ok_or_else(|| unauthorized("send a bearer token: Authorization: Bearer <token>"))?;
    serves(s.account.as_deref(), account)?;
    let (token, acc) = (token.to_string(), account.to_string());
    let (who, due) = super::routes::point_read(s, {
        let token = token.clone();
        move |st| st.check_token(&acc, &token)
    })
    .await?;
    if due {
        // Noted on a thread of the store's while the request goes on.
        let store = s.store.clone();
        tokio::task::spawn_blocking(move || store.note_token_use(&token));
    }
    Ok(who)
}

/// Checks the caller before anything else a route does: a valid token for
/// the account in the path (401), and the Account Admin role for any
/// method but GET and HEAD (403). The caller is handed to the route.
pub async fn authenticate(State(s): State<Shared>, mut request: Request, next: Next) -> Response {
    // A path that does not decode names no account a token is for: 401.
    let account = request
        .extract_parts::<Path<HashMap<String, String>>>()
        .await
        .ok()
        .and_then(|Path(mut p)| p.remove("account"))
        .unwrap_or_default();
    let who = match authorize(&s, request.headers(), &account).await {
        Ok(who) => who,
        Err(problem) => return problem.into_response(),
    };
    if !matches!(*request.method(), Method::GET | Method::HEAD)
        && let Err(refusal) = require_admin(who.role, "change the account")
    {
        return Problem::refusal(&refusal).into_response();
    }
    request.extensions_mut().insert(who);
    next.run(request).await
}

/// Why a state-changing request comes from another origin, if it does. A
/// browser says where a request comes from: `Sec-Fetch-Site` (the page's
/// own forms are `same-origin`), or in an older browser only `Origin`. A request that says neither is
/// no browser's, so no cookie rode along on its own. The own origin is the
/// scheme (https over TLS or behind a proxy saying `X-Forwarded-Proto:
/// https`) and the host the request names (`X-Forwarded-Host` behind a
/// proxy, else `Host`).
pub fn cross_origin(headers: &HeaderMap, tls: bool) -> Option<String> {
    let text = |name: &str| headers.get(name).map(|v| v.to_str().unwrap_or("?"));
    // Sec-Fetch-Site, where the browser sends it, is the browser's own
    // word, which no page can set.
    if let Some(site) = text("sec-fetch-site") {
        return (site != "same-origin" && site != "none")
            .then(|| format!("Sec-Fetch-Site: {site}"));
    }
    let origin = text("origin")?;
    let https = tls || text("x-forwarded-proto") == Some("https");
    let host = text("x-forwarded-host").or(text("host")).unwrap_or("");
    let own = format!("{}://{host}", if https { "https" } else { "http" });
    (origin != own).then(|| format!("Origin: {origin}, this server is {own}"))
}

/// Refuses (403) a request that would change something when a browser
/// sent it from another origin: a page on another site, or on another port
/// of this host, cannot post the page's forms or call the API's writes,
/// with or without a cookie or token it planted. Logged, never the body.
pub async fn same_origin(State(s): State<Shared>, request: Request, next: Next) -> Response {
    if matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    ) {
        return next.run(request).await;
    }
    let Some(why) = cross_origin(request.headers(), s.tls) else {
        return next.run(request).await;
    };
    let path = request.uri().path().to_string();
    tracing::warn!(%path, %why, "refused a request from another origin");
    let problem = Problem::refusal(&crate::domain::Refusal::new(
        crate::domain::Reason::Forbidden,
        format!(
            "refused: this request came from another origin ({why}); use the page itself, or call the API without a browser"
        ),
    ));
    if path.starts_with("/v1/") {
        problem.into_response()
    } else {
        super::page::problem_page(problem, None)
    }
}
