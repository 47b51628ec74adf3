//! HTTP errors, mapped once: `/v1` and FHIR-style paths answer a FHIR OperationOutcome
//! (`application/fhir+json`), the legacy `/covid19` API answers `{"detail": …}` like the 2020
//! demo. Internal errors are logged once with a request id and answered generically.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::analysis::pipeline::AnalyseError;
use crate::imaging::DecodeError;
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
}

impl ApiError {
    /// A 4xx/5xx with an issue code.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// 404.
    pub fn not_found(what: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", what)
    }

    /// 500 with the cause logged, not sent.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        let id = uuid::Uuid::new_v4();
        tracing::error!(error_id = %id, "internal error: {cause}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "exception",
            format!("internal error (id {id}); see the server log"),
        )
    }

    /// The OperationOutcome body.
    pub fn outcome(&self) -> serde_json::Value {
        let severity = if self.status.is_server_error() {
            "fatal"
        } else {
            "error"
        };
        json!({
            "resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": self.code, "diagnostics": self.message}]
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, self.outcome().to_string()).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/fhir+json"),
        );
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

impl IntoResponse for LegacyError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(json!({"detail": self.1}))).into_response()
    }
}

impl From<ApiError> for LegacyError {
    fn from(e: ApiError) -> Self {
        // The 2020 demo answered 400 for anything wrong with the image.
        let status = if e.status == StatusCode::UNPROCESSABLE_ENTITY {
            StatusCode::BAD_REQUEST
        } else {
            e.status
        };
        Self(status, e.message)
    }
}
