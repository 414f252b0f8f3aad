//! RFC 9457 problem details: one stable `type` per refusal reason and per
//! protocol error, with the numbers a client needs. The HTTP client maps them
//! back with [`Problem::into_error`], so a reason survives the round trip
//! exactly.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::backend::BackendError;
use crate::domain::{Reason, Refusal, RefusalDetail};

/// Where the problem types live.
pub const TYPE_BASE: &str = "https://licensor.dev/problems/";
/// Media type of problem bodies.
pub const MEDIA_TYPE: &str = "application/problem+json";

/// Problem types that are not refusal reasons.
pub const UNAUTHORIZED: &str = "unauthorized";
pub const STALE: &str = "stale";
pub const KEY_REUSED: &str = "idempotency-key-reused";
pub const RATE_LIMITED: &str = "rate-limited";
pub const NOT_FOUND: &str = "not-found";
pub const MALFORMED: &str = "malformed-request";
pub const TOO_LARGE: &str = "body-too-large";
pub const MEDIA: &str = "unsupported-media-type";
pub const TIMEOUT: &str = "timeout";

/// A problem details body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Problem {
    #[serde(rename = "type")]
    pub type_: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// The refusal reason, for refusals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_use: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub displaced: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// For a stale write: the version the request expected, and the current one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_version: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_version: Option<i64>,
    /// Seconds to wait, for 429 and 503.
    #[serde(skip)]
    pub retry_after: Option<u64>,
}

/// `InsufficientPool` -> `insufficient-pool`.
pub fn slug(reason: Reason) -> String {
    let mut out = String::new();
    for (i, c) in reason.as_str().chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('-');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

fn status_of(reason: Reason) -> StatusCode {
    match reason {
        Reason::Forbidden => StatusCode::FORBIDDEN,
        Reason::UnknownProduct | Reason::UnknownOrganization => StatusCode::NOT_FOUND,
        Reason::InsufficientPool
        | Reason::BelowInUse
        | Reason::WouldDisplaceUsers
        | Reason::Conflict
        | Reason::OverCommitted => StatusCode::CONFLICT,
        Reason::Invalid => StatusCode::UNPROCESSABLE_ENTITY,
        Reason::BackendUnavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

impl Problem {
    /// A problem of type `kind` (a slug under [`TYPE_BASE`]).
    pub fn new(status: StatusCode, kind: &str, detail: impl Into<String>) -> Problem {
        Problem {
            type_: format!("{TYPE_BASE}{kind}"),
            title: status.canonical_reason().unwrap_or("Error").to_string(),
            status: status.as_u16(),
            detail: detail.into(),
            reason: None,
            requested: None,
            free: None,
            in_use: None,
            displaced: None,
            owner: None,
            expected_version: None,
            actual_version: None,
            retry_after: None,
        }
    }

    pub fn refusal(r: &Refusal) -> Problem {
        let d = &r.detail;
        Problem {
            title: r.reason.as_str().to_string(),
            reason: Some(r.reason.as_str().to_string()),
            requested: d.requested,
            free: d.free,
            in_use: d.in_use,
            displaced: d.displaced,
            owner: d.owner.clone(),
            ..Problem::new(status_of(r.reason), &slug(r.reason), r.message.clone())
        }
    }

    /// The slug of this problem's type, if it is one of ours.
    pub fn kind(&self) -> Option<&str> {
        self.type_.strip_prefix(TYPE_BASE)
    }

    /// The backend error this problem stands for (the client's side).
    pub fn into_error(self) -> BackendError {
        let reason = self.reason.as_deref().and_then(Reason::parse);
        match (self.kind(), reason) {
            (_, Some(Reason::BackendUnavailable)) => BackendError::Unavailable(self.detail),
            (_, Some(reason)) => BackendError::Refused(Refusal {
                reason,
                message: self.detail,
                detail: RefusalDetail {
                    requested: self.requested,
                    free: self.free,
                    in_use: self.in_use,
                    displaced: self.displaced,
                    owner: self.owner,
                },
            }),
            (Some(UNAUTHORIZED), None) => BackendError::Unauthorized(self.detail),
            (Some(STALE), None) => BackendError::Stale {
                expected: self.expected_version.unwrap_or(-1),
                actual: self.actual_version.unwrap_or(-1),
            },
            (Some(KEY_REUSED), None) => BackendError::KeyReused(self.detail),
            _ => BackendError::Unavailable(format!(
                "the server answered {} {}: {}",
                self.status, self.title, self.detail
            )),
        }
    }
}

impl From<BackendError> for Problem {
    fn from(e: BackendError) -> Problem {
        match e {
            BackendError::Refused(r) => Problem::refusal(&r),
            BackendError::Stale { expected, actual } => Problem {
                expected_version: Some(expected),
                actual_version: Some(actual),
                ..Problem::new(StatusCode::PRECONDITION_FAILED, STALE, e.to_string())
            },
            BackendError::KeyReused(_) => {
                Problem::new(StatusCode::UNPROCESSABLE_ENTITY, KEY_REUSED, e.to_string())
            }
            BackendError::Unauthorized(m) => {
                Problem::new(StatusCode::UNAUTHORIZED, UNAUTHORIZED, m)
            }
            BackendError::Unavailable(m) => {
                // Storage details stay in the server's log, not in answers.
                tracing::error!("storage: {m}");
                Problem {
                    reason: Some(Reason::BackendUnavailable.as_str().into()),
                    retry_after: Some(1),
                    ..Problem::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &slug(Reason::BackendUnavailable),
                        "the license store is unavailable; retry shortly",
                    )
                }
            }
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let retry_after = self.retry_after;
        let mut response = (status, axum::Json(self)).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(MEDIA_TYPE));
        if let Some(s) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_survives_the_round_trip() {
        for reason in Reason::ALL {
            let refusal = Refusal {
                reason,
                message: "m".into(),
                detail: RefusalDetail {
                    requested: Some(5),
                    free: Some(2),
                    ..Default::default()
                },
            };
            let wire = serde_json::to_string(&Problem::refusal(&refusal)).unwrap();
            let back: Problem = serde_json::from_str(&wire).unwrap();
            let expected = if reason == Reason::BackendUnavailable {
                BackendError::Unavailable("m".into())
            } else {
                BackendError::Refused(refusal)
            };
            assert_eq!(back.into_error(), expected, "{wire}");
        }
        assert_eq!(slug(Reason::WouldDisplaceUsers), "would-displace-users");
    }
}
