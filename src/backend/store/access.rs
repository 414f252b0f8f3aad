//! Access to a store: API tokens (stored hashed, shown once), the page's
//! sessions (a cookie's hash, with its CSRF secret) and who is acting
//! ([`Principal`]). Roles are [`Role`]s from the rows up; a stored role
//! this licensor does not know is a damaged store, never some role.

use super::Store;
use super::audit::{AuditAction, AuditRecord};
use super::pipeline::hash;
use super::storage::{SessionRow, TokenRow, now, rfc3339};
use crate::backend::BackendError;
use crate::domain::Role;

/// Who is acting on the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Shown in the audit log; never the token.
    pub actor: String,
    pub role: Role,
}

impl Principal {
    /// The bearer of a token: the audit log names the token, never shows it.
    fn of_token(name: &str, role: Role) -> Principal {
        Principal {
            actor: format!("token:{name}"),
            role,
        }
    }

    /// Whoever can open the file can change it anyway, so local access
    /// without a token acts as the Account Admin.
    pub fn local() -> Principal {
        Principal {
            actor: "local".into(),
            role: Role::AccountAdmin,
        }
    }
}

/// 24 random bytes in hex: tokens, session ids, CSRF secrets.
pub fn random_hex() -> Result<String, BackendError> {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes)
        .map_err(|e| BackendError::Unavailable(format!("no randomness: {e}")))?;
    Ok(hex::encode(bytes))
}

/// A signed-in person on the License Management page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub account: String,
    pub who: Principal,
    /// The secret every form of the session must carry.
    pub csrf: String,
}

impl From<SessionRow> for Session {
    fn from(row: SessionRow) -> Session {
        Session {
            account: row.account,
            who: Principal {
                actor: row.actor,
                role: row.role,
            },
            csrf: row.csrf,
        }
    }
}

/// Why a token could not be created or revoked.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(
        "a token named {name:?} exists in account {account}; revoke it first or choose another name"
    )]
    NameTaken { name: String, account: String },
    #[error("no token named {name:?} in account {account}; `licensor token list` shows them")]
    NoSuchToken { name: String, account: String },
    #[error("a token's name is 1 to 100 printable characters, not {0:?}")]
    BadName(String),
    #[error("a token's expiry must be a time this licensor can hold, not {0} away")]
    BadExpiry(String),
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// A token as `token list` shows it: never the token or its hash.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenInfo {
    pub name: String,
    pub role: Role,
    pub created: String,
    pub expires: Option<String>,
    pub last_used: Option<String>,
}

impl From<TokenRow> for TokenInfo {
    fn from(t: TokenRow) -> TokenInfo {
        TokenInfo {
            name: t.name,
            role: t.role,
            created: t.created,
            expires: t.expires,
            last_used: t.last_used,
        }
    }
}

/// The actor of what licensor does on its own (a token's expiry).
const LICENSOR: &str = "licensor";

/// How long a token's last use stands before it is noted again.
const TOUCH_EVERY: chrono::Duration = chrono::Duration::minutes(1);

/// Tokens found good, as their rows were read, while the store has not
/// changed since: a request whose token is here needs no read of the
/// store. Anything committed to the store, by any process (a revoke, an
/// expiry, a write), empties it, so a revoked token is refused at once;
/// on a store that cannot say when it changed (PostgreSQL) it stays empty.
#[derive(Default)]
pub(super) struct Checked(std::sync::Mutex<CheckedTokens>);

#[derive(Default)]
struct CheckedTokens {
    /// The store's data version the rows were read at (or after).
    version: Option<i64>,
    rows: std::collections::HashMap<String, TokenRow>,
}

/// Tokens held at most; past that the next one empties it (tokens in use
/// at once are few; unknown tokens are never held).
const CHECKED_AT_MOST: usize = 1024;

impl Checked {
    /// `f` of the token hashed `hash`, if it was found good at the store's
    /// data version `version` (the store has not changed since).
    fn get<T>(&self, version: i64, hash: &str, f: impl FnOnce(&TokenRow) -> T) -> Option<T> {
        let mut checked = self.0.lock().ok()?;
        if checked.version != Some(version) {
            checked.rows.clear();
            checked.version = None;
            return None;
        }
        checked.rows.get(hash).map(f)
    }

    fn put(&self, version: i64, hash: String, row: TokenRow) {
        let Ok(mut checked) = self.0.lock() else {
            return;
        };
        if checked.version != Some(version) || checked.rows.len() >= CHECKED_AT_MOST {
            checked.rows.clear();
            checked.version = Some(version);
        }
        checked.rows.insert(hash, row);
    }
}

impl Store {
    /// Maps a bearer token to its principal: a token of `account` that has
    /// not expired (only hashes are stored). Its use is noted, at most once
    /// a minute.
    pub fn authenticate(&self, account: &str, token: &str) -> Result<Principal, BackendError> {
        let (who, due) = self.check_token(account, token)?;
        if due {
            self.note_token_use(token);
        }
        Ok(who)
    }

    /// Checks a bearer token as [`Store::authenticate`] does, and says
    /// whether its use is due to be noted ([`Store::note_token_use`]), which
    /// a server does without keeping the request waiting. Reads the store
    /// unless the token was found good since the store last changed.
    pub fn check_token(
        &self,
        account: &str,
        token: &str,
    ) -> Result<(Principal, bool), BackendError> {
        let (h, now) = (hash(token), chrono::Utc::now());
        // Taken before the read, so a commit after it is a change to it.
        let version = self.data_version();
        if let Some(checked) = version.and_then(|v| {
            self.checked
                .get(v, &h, |row| admit(Some(row), account, now))
        }) {
            return checked;
        }
        let row = self.read_one(|s| s.token(&h))?;
        let (who, due) = admit(row.as_ref(), account, now)?;
        if let (Some(version), Some(row), false) = (version, row, due) {
            self.checked.put(version, h, row);
        }
        Ok((who, due))
    }

    /// Notes that a token is in use now. Best effort: a busy store does not
    /// turn a request away.
    pub fn note_token_use(&self, token: &str) {
        let (h, now) = (hash(token), rfc3339(chrono::Utc::now()));
        if let Err(e) = self.transaction(true, |s| s.touch_token(&h, &now)) {
            tracing::debug!(error = %e, "noting a token's use");
        }
    }

    /// Creates a token named `name` (unique in the account), valid for
    /// `expires` if given, and audits it as done by `actor`. Returns the
    /// token: it is shown once and stored hashed.
    pub fn create_token(
        &self,
        account: &str,
        role: Role,
        name: &str,
        expires: Option<std::time::Duration>,
        actor: &str,
    ) -> Result<String, TokenError> {
        if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
            return Err(TokenError::BadName(name.to_string()));
        }
        let expires = match expires {
            Some(d) => Some(
                chrono::Duration::from_std(d)
                    .ok()
                    .and_then(|d| chrono::Utc::now().checked_add_signed(d))
                    .ok_or_else(|| {
                        TokenError::BadExpiry(humantime::format_duration(d).to_string())
                    })?,
            ),
            None => None,
        };
        let token = format!("lsr_{}", random_hex()?);
        let row = TokenRow {
            hash: hash(&token),
            account: account.to_string(),
            role,
            name: name.to_string(),
            created: now(),
            expires: expires.map(rfc3339),
            last_used: None,
        };
        let created = self.transaction_then(|s| {
            if s.tokens(account)?.iter().any(|t| t.name == name) {
                return Ok((false, false));
            }
            s.insert_token(&row)?;
            s.insert_audit(
                account,
                actor,
                &AuditRecord::token(AuditAction::TokenCreate, name, role),
            )?;
            Ok((true, true))
        })?;
        if !created {
            return Err(TokenError::NameTaken {
                name: name.to_string(),
                account: account.to_string(),
            });
        }
        Ok(token)
    }

    /// The tokens of an account, by name, once the expired ones are gone.
    pub fn list_tokens(&self, account: &str) -> Result<Vec<TokenInfo>, BackendError> {
        self.expire_tokens()?;
        Ok(self
            .read_one(|s| s.tokens(account))?
            .into_iter()
            .map(TokenInfo::from)
            .collect())
    }

    /// Revokes the token named `name`: it is refused from now on, and the
    /// page sessions opened with it end. Audited as done by `actor`.
    pub fn revoke_token(&self, account: &str, name: &str, actor: &str) -> Result<(), TokenError> {
        let revoked = self.transaction_then(|s| {
            let Some(t) = s.tokens(account)?.into_iter().find(|t| t.name == name) else {
                return Ok((false, false));
            };
            s.delete_token(&t.hash)?;
            s.insert_audit(
                account,
                actor,
                &AuditRecord::token(AuditAction::TokenRevoke, name, t.role),
            )?;
            Ok((true, true))
        })?;
        if !revoked {
            return Err(TokenError::NoSuchToken {
                name: name.to_string(),
                account: account.to_string(),
            });
        }
        Ok(())
    }

    /// Removes every token past its expiry, in every account, each with an
    /// audit record (the server does this every minute; `token` commands
    /// first). An expired token is refused before this, at once.
    pub fn expire_tokens(&self) -> Result<usize, BackendError> {
        let now = now();
        self.transaction(true, |s| {
            let expired = s.expired_tokens(&now)?;
            for t in &expired {
                s.delete_token(&t.hash)?;
                s.insert_audit(
                    &t.account,
                    LICENSOR,
                    &AuditRecord::token(AuditAction::TokenExpire, &t.name, t.role),
                )?;
            }
            Ok(expired.len())
        })
    }

    /// Signs in with an API token: a new page session for the token's
    /// account and role (which must be `only`, when given), lasting `ttl`,
    /// which ends with the token. The session `previous` (the browser's, if
    /// any) ends. Returns the cookie's value (random; only its hash is
    /// stored) and the session.
    pub fn open_session(
        &self,
        token: &str,
        ttl: chrono::Duration,
        previous: Option<&str>,
        only: Option<&str>,
    ) -> Result<(String, Session), BackendError> {
        let unknown =
            || BackendError::Unauthorized("the token is unknown, revoked or expired".into());
        let now = chrono::Utc::now();
        let t = self
            .read_one(|s| s.token(&hash(token)))?
            .filter(|t| !t.expired(&rfc3339(now)))
            .ok_or_else(unknown)?;
        serves(only, &t.account)?;
        let id = random_hex()?;
        let who = Principal::of_token(&t.name, t.role);
        let row = SessionRow {
            account: t.account,
            actor: who.actor,
            role: who.role,
            csrf: random_hex()?,
            expires_at: rfc3339(now + ttl),
            token: t.hash,
        };
        self.transaction(true, |s| {
            s.delete_sessions(&hash(previous.unwrap_or_default()), &rfc3339(now))?;
            s.insert_session(&hash(&id), &row)
        })?;
        Ok((id, Session::from(row)))
    }

    /// The live session a cookie names, if any: not expired, and its token
    /// neither revoked nor expired.
    pub fn session(&self, id: &str) -> Result<Option<Session>, BackendError> {
        let now = now();
        Ok(self
            .read_one(|s| s.session(&hash(id), &now))?
            .filter(|row| row.expires_at > now)
            .map(Session::from))
    }

    /// Ends a session (sign-out), and every expired one.
    pub fn close_session(&self, id: &str) -> Result<(), BackendError> {
        let now = now();
        self.transaction(true, |s| s.delete_sessions(&hash(id), &now))
    }
}

/// Refuses `account` on a server that serves `only` one account
/// (`serve --account`): the API and the sign-in say the same.
pub fn serves(only: Option<&str>, account: &str) -> Result<(), BackendError> {
    match only {
        Some(only) if only != account => Err(BackendError::Unauthorized(format!(
            "this server serves account {only} only"
        ))),
        _ => Ok(()),
    }
}

/// Whether the token `row` (if any) lets its bearer act on `account` at
/// `now`, as whom, and whether its use is due to be noted.
fn admit(
    row: Option<&TokenRow>,
    account: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(Principal, bool), BackendError> {
    let t = row.filter(|t| t.account == account).ok_or_else(|| {
        BackendError::Unauthorized("the token is unknown or not for this account".into())
    })?;
    if t.expired(&rfc3339(now)) {
        return Err(BackendError::Unauthorized(format!(
            "the token expired at {}",
            t.expires.as_deref().unwrap_or_default()
        )));
    }
    let stale = t.last_used.as_deref() < Some(rfc3339(now - TOUCH_EVERY).as_str());
    Ok((Principal::of_token(&t.name, t.role), stale))
}
