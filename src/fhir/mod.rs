//! The FHIR R4 server side: validating incoming resources, the REST interactions (create,
//! update, read, vread, search), Bundles (transaction, batch, and stored bundles), and the
//! CapabilityStatement that describes exactly these. HTTP lives in [`crate::api::fhir`]; SQL in
//! [`crate::store::fhir`].

pub mod bundle;
pub mod capability;
pub mod compartment;
pub mod rest;
pub mod search;
pub mod validate;

pub use crate::fhir_model::{index, types};

use crate::store::StoreError;

/// Why a FHIR interaction failed; each maps to one HTTP status and OperationOutcome code.
#[derive(Debug, thiserror::Error)]
pub enum FhirError {
    /// Malformed request or resource (400, `invalid`).
    #[error("{0}")]
    Invalid(String),
    /// Unknown resource type in the URL (404, `not-supported`).
    #[error("'{0}' is not a FHIR R4 resource type this server knows")]
    UnknownType(String),
    /// No such resource or version (404, `not-found`).
    #[error("{0} not found")]
    NotFound(String),
    /// Valid FHIR that breaks a server rule, such as a reference that cannot resolve (422,
    /// `processing`).
    #[error("{0}")]
    Unprocessable(String),
    /// `If-Match` or conditional create conflicts (412, `conflict`).
    #[error("{0}")]
    Conflict(String),
    /// A concurrent update of the same resource won (409, `conflict`): send it again.
    #[error("{0}")]
    Concurrent(String),
    /// An interaction this server does not implement (405 or 400, `not-supported`).
    #[error("{0}")]
    NotSupported(String),
    /// A backend (model, IRIS) could not answer (503, `transient`).
    #[error("{0}")]
    Unavailable(String),
    /// Server-side storage failure (500).
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for FhirError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(m) => FhirError::Conflict(m),
            StoreError::Concurrent(m) => FhirError::Concurrent(m),
            e if e.is_unavailable() => {
                FhirError::Unavailable(format!("the database is unavailable: {e}"))
            }
            e if e.is_storage_full() => {
                FhirError::Unavailable("out of storage space; nothing was kept".into())
            }
            other => FhirError::Store(other),
        }
    }
}

impl FhirError {
    /// HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            FhirError::Invalid(_) => 400,
            FhirError::UnknownType(_) | FhirError::NotFound(_) => 404,
            FhirError::Unprocessable(_) => 422,
            FhirError::Conflict(_) => 412,
            FhirError::Concurrent(_) => 409,
            FhirError::NotSupported(_) => 405,
            FhirError::Unavailable(_) => 503,
            FhirError::Store(_) => 500,
        }
    }

    /// OperationOutcome issue code.
    pub fn code(&self) -> &'static str {
        match self {
            FhirError::Invalid(_) => "invalid",
            FhirError::UnknownType(_) | FhirError::NotSupported(_) => "not-supported",
            FhirError::NotFound(_) => "not-found",
            FhirError::Unprocessable(_) => "processing",
            FhirError::Conflict(_) | FhirError::Concurrent(_) => "conflict",
            FhirError::Unavailable(_) => "transient",
            FhirError::Store(_) => "exception",
        }
    }
}

/// An OperationOutcome with one issue.
pub fn outcome(severity: &str, code: &str, diagnostics: &str) -> serde_json::Value {
    let one = OperationOutcome {
        resource_type: "OperationOutcome",
        issue: vec![Issue {
            severity: severity.to_string(),
            code: code.to_string(),
            diagnostics: Some(diagnostics.to_string()),
        }],
    };
    serde_json::to_value(one).unwrap_or(serde_json::Value::Null)
}

/// FHIR R4 OperationOutcome as Carina writes it: every error on the FHIR and `/v1` paths, and
/// warnings inside Bundles. Its schema in the OpenAPI document is derived from this type.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[schema(example = json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-supported", "diagnostics": "unsupported media type: text/plain"}]}))]
#[serde(rename_all = "camelCase")]
pub struct OperationOutcome {
    /// Always `OperationOutcome`.
    #[schema(value_type = String)]
    pub resource_type: &'static str,
    /// At least one issue.
    pub issue: Vec<Issue>,
}

/// One issue of an [`OperationOutcome`].
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Issue {
    /// `fatal`, `error`, `warning` or `information`.
    pub severity: String,
    /// FHIR issue-type code, e.g. `too-long`, `not-supported`, `invalid`, `not-found`, `exception`.
    pub code: String,
    /// Human-readable explanation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diagnostics: Option<String>,
}
