//! HTTP errors, mapped once: `/v1` and FHIR-style paths answer a FHIR OperationOutcome
//! (`application/fhir+json`), the legacy `/covid19` API answers `{"detail": …}` like the 2020
//! demo. Internal errors are answered generically; their cause travels in the response's
//! extensions to the request-logging middleware ([`crate::api::ops::observe`]), which logs it
//! once inside the request's span, with the request id the client gets as `X-Request-Id`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::analysis::pipeline::AnalyseError;
use crate::imaging::DecodeError;
use crate::inference::engine::EngineError;
use crate::store::StoreError;

/// An error answered as an OperationOutcome.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// OperationOutcome issue code (`invalid`, `not-supported`, `too-costly`, `not-found`, `exception`...).
    pub code: &'static str,
    /// Human text.
    pub message: String,
    /// What went wrong inside (logged, never sent).
    cause: Option<String>,
}

/// The cause of an internal error, handed from the answer to the request-logging middleware.
#[derive(Debug, Clone)]
pub struct InternalCause(pub String);

impl ApiError {
    /// A 4xx/5xx with an issue code.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            cause: None,
        }
    }

    /// 404.
    pub fn not_found(what: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", what)
    }

    /// 500 with the cause logged (once, by the request-logging middleware), not sent.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        let mut e = Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "exception",
            "internal error; the server log has it under this answer's X-Request-Id",
        );
        e.cause = Some(cause.to_string());
        e
    }

    /// The OperationOutcome body.
    pub fn outcome(&self) -> serde_json::Value {
        let severity = if self.status.is_server_error() {
            "fatal"
        } else {
            "error"
        };
        crate::fhir::outcome(severity, self.code, &self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, self.outcome().to_string()).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/fhir+json"),
        );
        if let Some(cause) = self.cause {
            r.extensions_mut().insert(InternalCause(cause));
        }
        r
    }
}

impl From<DecodeError> for ApiError {
    fn from(e: DecodeError) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", e.to_string())
    }
}

impl From<AnalyseError> for ApiError {
    fn from(e: AnalyseError) -> Self {
        match e {
            AnalyseError::Decode(d) => d.into(),
            AnalyseError::Engine(EngineError::Unavailable(why)) => {
                // the pool's address stays in the log, not in the answer
                let mut e = Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "transient",
                    "the inference pool for this model is unavailable; try again later",
                );
                e.cause = Some(why);
                e
            }
            other => Self::internal(other),
        }
    }
}

impl From<crate::ingest::IngestError> for ApiError {
    fn from(e: crate::ingest::IngestError) -> Self {
        use crate::ingest::IngestError as E;
        match e {
            E::Parse(_) | E::StudyMismatch { .. } => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", e.to_string())
            }
            E::OutOfResources(_) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "transient", e.to_string())
            }
            E::Duplicate(_) => Self::new(StatusCode::CONFLICT, "duplicate", e.to_string()),
            E::Store(s) => s.into(),
        }
    }
}

impl From<crate::analysis::ProcessError> for ApiError {
    fn from(e: crate::analysis::ProcessError) -> Self {
        use crate::analysis::ProcessError as E;
        match e {
            E::Analyse(a) => a.into(),
            E::Parse(_) | E::Skipped(_) => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", e.to_string())
            }
            E::NotFound => Self::not_found("instance"),
            E::Store(s) => s.into(),
            other => Self::internal(other),
        }
    }
}

impl From<crate::jobs::UploadError> for ApiError {
    fn from(e: crate::jobs::UploadError) -> Self {
        use crate::jobs::UploadError as E;
        match e {
            E::Ingest(e) => e.into(),
            E::Process(e) => e.into(),
            E::Analyse(e) => e.into(),
            E::Store(e) => e.into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if e.is_storage_full() {
            tracing::warn!(error = %e, "storage full");
            return Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "transient",
                "out of storage space; nothing was kept, try again later",
            );
        }
        if e.is_unavailable() {
            tracing::warn!(error = %e, "database unavailable");
            return Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "transient",
                "the database is unavailable; try again later",
            );
        }
        Self::internal(e)
    }
}

/// Maps a body-reading failure: 413 when over the limit, else 400.
pub fn body_error(status: StatusCode, text: String, limit: usize) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            status,
            "too-costly",
            format!("request body larger than the limit of {limit} bytes"),
        )
    } else if text.contains("designated timeout") {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            "the request body stopped arriving; send it again",
        )
    } else {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid", text)
    }
}

/// An error of the legacy API: `{"detail": "..."}`.
#[derive(Debug)]
pub struct LegacyError(pub StatusCode, pub String);

/// The body of a legacy error.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct LegacyDetail {
    /// What went wrong.
    pub detail: String,
}

impl IntoResponse for LegacyError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(LegacyDetail { detail: self.1 })).into_response()
    }
}

impl From<ApiError> for LegacyError {
    fn from(e: ApiError) -> Self {
        // the legacy body has no place for it: logged here, inside the request's span (with
        // its request id)
        if let Some(cause) = &e.cause {
            tracing::error!(cause = %cause, "internal error");
        }
        // The 2020 demo answered 400 for anything wrong with the image.
        let status = if e.status == StatusCode::UNPROCESSABLE_ENTITY {
            StatusCode::BAD_REQUEST
        } else {
            e.status
        };
        Self(status, e.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_internal_cause_goes_to_the_log_middleware_not_to_the_client() {
        let r = ApiError::internal("database: password authentication failed for user x")
            .into_response();
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let cause = r.extensions().get::<InternalCause>().map(|c| c.0.clone());
        assert_eq!(
            cause.as_deref(),
            Some("database: password authentication failed for user x")
        );
        let e = ApiError::internal("driver text");
        let body = e.outcome().to_string();
        assert!(!body.contains("driver text"), "{body}");
        assert!(body.contains("X-Request-Id"), "{body}");
        let client = ApiError::not_found("no result 'x'").into_response();
        assert!(client.extensions().get::<InternalCause>().is_none());
    }
}
