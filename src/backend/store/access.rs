//! Access to a store: API tokens (stored hashed, shown once), the page's
//! sessions (a cookie's hash, with its CSRF secret) and who is acting
//! ([`Principal`]). Roles are [`Role`]s from the rows up; a stored role
//! this licensor does not know is a damaged store, never some role.

use super::Store;
use super::pipeline::hash;
use super::storage::{SessionRow, TokenRow, now};
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

impl Store {
    /// Maps a bearer token to its principal; only the hash is stored.
    pub fn authenticate(&self, account: &str, token: &str) -> Result<Principal, BackendError> {
        match self.read_one(|s| s.token(&hash(token)))? {
            Some(t) if t.account == account => Ok(Principal {
                actor: format!("token:{}", t.name),
                role: t.role,
            }),
            _ => Err(BackendError::Unauthorized(
                "the token is unknown or not for this account".into(),
            )),
        }
    }

    /// Creates a token and returns it; it is shown once and stored hashed.
    pub fn create_token(
        &self,
        account: &str,
        role: Role,
        name: &str,
    ) -> Result<String, BackendError> {
        let token = format!("lsr_{}", random_hex()?);
        let row = TokenRow {
            hash: hash(&token),
            account: account.to_string(),
            role,
            name: name.to_string(),
            created: now(),
        };
        self.transaction(true, |s| s.insert_token(&row))?;
        Ok(token)
    }

    /// Signs in with an API token: a new page session for the token's
    /// account and role, lasting `ttl`. Returns the cookie's value (random;
    /// only its hash is stored) and the session.
    pub fn open_session(
        &self,
        token: &str,
        ttl: chrono::Duration,
    ) -> Result<(String, Session), BackendError> {
        let unknown = || BackendError::Unauthorized("the token is unknown".into());
        let t = self
            .read_one(|s| s.token(&hash(token)))?
            .ok_or_else(unknown)?;
        let id = random_hex()?;
        let now = chrono::Utc::now();
        let row = SessionRow {
            account: t.account,
            actor: format!("token:{}", t.name),
            role: t.role,
            csrf: random_hex()?,
            expires_at: (now + ttl).to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        };
        let expired = now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        self.transaction(true, |s| {
            s.delete_sessions(&hash(&id), &expired)?;
            s.insert_session(&hash(&id), &row)
        })?;
        Ok((id, Session::from(row)))
    }

    /// The live session a cookie names, if any.
    pub fn session(&self, id: &str) -> Result<Option<Session>, BackendError> {
        let now = now();
        Ok(self
            .read_one(|s| s.session(&hash(id)))?
            .filter(|row| row.expires_at > now)
            .map(Session::from))
    }

    /// Ends a session (sign-out), and every expired one.
    pub fn close_session(&self, id: &str) -> Result<(), BackendError> {
        let now = now();
        self.transaction(true, |s| s.delete_sessions(&hash(id), &now))
    }
}
