//! How the server answers with problem details: the status and headers of
//! a [`Problem`], what a [`BackendError`] becomes on the wire (storage
//! details stay in the log), and a last guard that turns any error answer
//! not written by a route (a 405 from the router, say) into one.

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::api::problem::{MEDIA_TYPE, Problem, ProblemType};
use crate::backend::BackendError;
use crate::domain::Reason;

impl From<BackendError> for Problem {
    fn from(e: BackendError) -> Problem {
        match e {
            BackendError::Refused(r) => Problem::refusal(&r),
            BackendError::Stale { expected, actual } => Problem {
                expected_version: Some(expected),
                actual_version: Some(actual),
                ..Problem::new(
                    StatusCode::PRECONDITION_FAILED,
                    ProblemType::Stale,
                    e.to_string(),
                )
            },
            BackendError::KeyReused(_) => Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                ProblemType::KeyReused,
                e.to_string(),
            ),
            BackendError::Unauthorized(m) => {
                Problem::new(StatusCode::UNAUTHORIZED, ProblemType::Unauthorized, m)
            }
            BackendError::Unavailable(m) => {
                // Storage details stay in the server's log, not in answers.
                tracing::error!("storage: {m}");
                Problem {
                    reason: Some(Reason::BackendUnavailable),
                    retry_after: Some(1),
                    ..Problem::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        ProblemType::Refused(Reason::BackendUnavailable),
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

/// Every error answer is problem details: one the routes did not write
/// (the router's 405, a rejection of a framework extractor) is rewritten,
/// keeping its status and headers (`Allow` on a 405).
pub async fn errors_as_problems(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(MEDIA_TYPE.as_bytes()));
    // The page's own error pages say the same in HTML.
    let is_page = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/html"));
    if !(status.is_client_error() || status.is_server_error()) || is_problem || is_page {
        return response;
    }
    let (kind, detail) = match status {
        StatusCode::METHOD_NOT_ALLOWED => (
            ProblemType::MethodNotAllowed,
            "this route does not answer that method; see the Allow header and /openapi.json",
        ),
        StatusCode::NOT_FOUND => (ProblemType::NotFound, "no such route; see /openapi.json"),
        StatusCode::PAYLOAD_TOO_LARGE => (ProblemType::TooLarge, "the body is too large"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (
            ProblemType::UnsupportedMediaType,
            "send the body as application/json",
        ),
        s if s.is_client_error() => (ProblemType::Malformed, "the request cannot be read"),
        _ => (
            ProblemType::Refused(Reason::BackendUnavailable),
            "the server failed; retry shortly",
        ),
    };
    let (mut parts, _) = response.into_parts();
    let problem = Problem::new(status, kind, detail).into_response();
    let (problem_parts, body) = problem.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    for (name, value) in &problem_parts.headers {
        parts.headers.insert(name.clone(), value.clone());
    }
    Response::from_parts(parts, body)
}
