//! RFC 9457 problem details: one stable `type` per refusal reason and per
//! protocol error ([`ProblemType`]), with the numbers a client needs. The
//! server answers every error with one; the client maps it back
//! (`From<Problem> for BackendError`, in `backend::http`), so a reason
//! survives the round trip exactly. Framework-free: the server and the
//! client both use it.

use http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::domain::{Reason, Refusal};

/// Where the problem types live.
pub const TYPE_BASE: &str = "https://licensor.dev/problems/";
/// Media type of problem bodies.
pub const MEDIA_TYPE: &str = "application/problem+json";

/// What went wrong, as the slug of a problem's `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemType {
    /// The rules refused the change (or, for `BackendUnavailable`, the store
    /// could not serve it); the slug is the reason's.
    Refused(Reason),
    /// No valid bearer token for the account.
    Unauthorized,
    /// `If-Match` named another version.
    Stale,
    /// An `Idempotency-Key` came again with another request.
    KeyReused,
    /// Too many requests; see `Retry-After`.
    RateLimited,
    /// No such route or resource.
    NotFound,
    /// The route does not answer this method.
    MethodNotAllowed,
    /// The request cannot be read (body, query, headers).
    Malformed,
    /// The body is over the size limit.
    TooLarge,
    /// The body is not JSON.
    UnsupportedMediaType,
    /// The request took too long.
    Timeout,
}

impl ProblemType {
    const PROTOCOL: [(ProblemType, &'static str); 10] = [
        (ProblemType::Unauthorized, "unauthorized"),
        (ProblemType::Stale, "stale"),
        (ProblemType::KeyReused, "idempotency-key-reused"),
        (ProblemType::RateLimited, "rate-limited"),
        (ProblemType::NotFound, "not-found"),
        (ProblemType::MethodNotAllowed, "method-not-allowed"),
        (ProblemType::Malformed, "malformed-request"),
        (ProblemType::TooLarge, "body-too-large"),
        (ProblemType::UnsupportedMediaType, "unsupported-media-type"),
        (ProblemType::Timeout, "timeout"),
    ];

    /// `InsufficientPool` -> `insufficient-pool`; `Stale` -> `stale`.
    pub fn slug(self) -> String {
        match self {
            ProblemType::Refused(reason) => slug(reason),
            other => Self::PROTOCOL
                .iter()
                .find(|(t, _)| *t == other)
                .map_or_else(String::new, |(_, s)| (*s).to_string()),
        }
    }

    /// The problem type whose slug is `s`.
    pub fn parse(s: &str) -> Option<ProblemType> {
        Self::PROTOCOL
            .iter()
            .find(|(_, slug)| *slug == s)
            .map(|(t, _)| *t)
            .or_else(|| {
                Reason::all()
                    .find(|r| slug(*r) == s)
                    .map(ProblemType::Refused)
            })
    }

    /// Every problem type, for documentation and tests.
    pub fn all() -> impl Iterator<Item = ProblemType> {
        Reason::all()
            .map(ProblemType::Refused)
            .chain(Self::PROTOCOL.iter().map(|(t, _)| *t))
    }
}

/// A problem details body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Problem {
    /// `https://licensor.dev/problems/<slug>`, one per problem type.
    #[serde(rename = "type")]
    pub type_: String,
    pub title: String,
    /// The HTTP status code.
    #[schema(minimum = 400, maximum = 599)]
    pub status: u16,
    /// What happened and what to do, for people.
    pub detail: String,
    /// The refusal reason, for refusals. A reason this build does not know
    /// (from a newer server) reads as none: the problem's `type` still says
    /// what happened.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "known_reason"
    )]
    pub reason: Option<Reason>,
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
    /// Seconds to wait, for 429 and 503 (also sent as `Retry-After`).
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

/// The HTTP status a refusal reason is answered with.
pub fn status_of(reason: Reason) -> StatusCode {
    match reason {
        Reason::Forbidden => StatusCode::FORBIDDEN,
        Reason::UnknownProduct | Reason::UnknownOrganization | Reason::UnknownAccount => {
            StatusCode::NOT_FOUND
        }
        Reason::InsufficientPool
        | Reason::BelowInUse
        | Reason::WouldDisplaceUsers
        | Reason::Conflict
        | Reason::OverCommitted => StatusCode::CONFLICT,
        Reason::Invalid => StatusCode::UNPROCESSABLE_ENTITY,
        Reason::BackendUnavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// Reads a reason by its name; one this build does not know is none.
fn known_reason<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Reason>, D::Error> {
    let name: Option<String> = Deserialize::deserialize(d)?;
    Ok(name.as_deref().and_then(Reason::parse))
}

impl Problem {
    /// A problem of type `kind`.
    pub fn new(status: StatusCode, kind: ProblemType, detail: impl Into<String>) -> Problem {
        Problem {
            type_: format!("{TYPE_BASE}{}", kind.slug()),
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
            reason: Some(r.reason),
            requested: d.requested,
            free: d.free,
            in_use: d.in_use,
            displaced: d.displaced,
            owner: d.owner.clone(),
            ..Problem::new(
                status_of(r.reason),
                ProblemType::Refused(r.reason),
                r.message.clone(),
            )
        }
    }

    /// This problem's type, if it is one of ours.
    pub fn kind(&self) -> Option<ProblemType> {
        self.type_
            .strip_prefix(TYPE_BASE)
            .and_then(ProblemType::parse)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_is_spelled_as_before_and_an_unknown_one_reads_as_none() {
        let refusal = Refusal::new(Reason::BelowInUse, "below in use");
        let wire = serde_json::to_value(Problem::refusal(&refusal)).unwrap();
        assert_eq!(wire["reason"], "BelowInUse");
        let back: Problem = serde_json::from_value(wire.clone()).unwrap();
        assert_eq!(back.reason, Some(Reason::BelowInUse));
        let mut newer = wire;
        newer["reason"] = "SomethingNew".into();
        let read: Problem = serde_json::from_value(newer).unwrap();
        assert_eq!(read.reason, None);
        assert_eq!(read.type_, back.type_, "the type still says what happened");
    }

    #[test]
    fn every_problem_type_has_its_own_slug() {
        let slugs: Vec<String> = ProblemType::all().map(ProblemType::slug).collect();
        let mut unique = slugs.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), slugs.len(), "{slugs:?}");
        for t in ProblemType::all() {
            assert_eq!(ProblemType::parse(&t.slug()), Some(t));
        }
    }
}
