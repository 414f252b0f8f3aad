//! Access to the API: the bearer token of a request is checked for the
//! account in its path (401), and any method but GET and HEAD needs the
//! Account Admin role (403), before anything else the route does. A
//! checked token is remembered for [`TOKEN_CACHE`], by its hash; tokens are
//! never logged, echoed or stored in clear.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::RequestExt;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::Shared;
use crate::api::{Problem, ProblemType};
use crate::backend::BackendError;
use crate::backend::store::{Principal, off_thread};
use crate::domain::require_admin;

/// How long an authenticated token is remembered before it is checked again.
const TOKEN_CACHE: Duration = Duration::from_secs(10);

/// Tokens checked lately: sha256(token) -> (account, caller, when checked).
#[derive(Default)]
pub struct Tokens(Mutex<HashMap<String, (String, Principal, Instant)>>);

impl Tokens {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, Principal, Instant)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

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
    let unauthorized =
        |m: &str| Problem::new(StatusCode::UNAUTHORIZED, ProblemType::Unauthorized, m);
    let token = bearer(headers)
        .ok_or_else(|| unauthorized("send a bearer token: Authorization: Bearer <token>"))?;
    let key = hex::encode(Sha256::digest(token.as_bytes()));
    if let Some((a, who, at)) = s.tokens.lock().get(&key)
        && a == account
        && at.elapsed() < TOKEN_CACHE
    {
        return Ok(who.clone());
    }
    let (store, token, acc) = (s.store.clone(), token.to_string(), account.to_string());
    let who = off_thread(move || store.authenticate(&acc, &token))
        .await
        .map_err(|e| match e {
            BackendError::Unauthorized(_) => {
                unauthorized("the token is unknown or not for this account")
            }
            other => Problem::from(other),
        })?;
    s.tokens
        .lock()
        .insert(key, (account.to_string(), who.clone(), Instant::now()));
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
