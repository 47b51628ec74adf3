//! `POST /v1/analyze` and the stored results under `/v1/results/{id}`.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use utoipa::IntoParams;
use uuid::Uuid;

use super::base_url;
use super::doc::{Binary, Problem};
use super::error::{body_error, ApiError};
use crate::analysis::pipeline::Analysis;
use crate::app::AppState;
use crate::fhir::OperationOutcome;
use crate::imaging::MediaType;

/// Query of `POST /v1/analyze`.
#[derive(Debug, Deserialize)]
pub struct AnalyzeQuery {
    /// Model name (default: the first image model).
    pub model: Option<String>,
}

/// `POST /v1/analyze`: raw DICOM/PNG/JPEG body → FHIR Bundle (stored, `Location` to the result).
#[utoipa::path(post, path = "/v1/analyze", tag = "analysis", operation_id = "analyze",
    summary = "Classify a chest X-ray and compute a Grad-CAM heatmap",
    description = "Send the raw bytes of a DICOM, PNG or JPEG image. Returns a FHIR R4 Bundle (type `collection`) with a DiagnosticReport, one Observation per class probability, a Media resource with the heatmap overlay PNG, the Device and a Provenance. The `Location` header points to the JSON summary of the result. Errors are FHIR OperationOutcome resources. Demo — not for clinical use.",
    params(("model" = Option<String>, Query, description = "Name of the model to use (see `GET /v1/models`); default model if omitted.")),
    request_body(content((Binary = "application/dicom"), (Binary = "image/png"), (Binary = "image/jpeg")), description = "The image file's raw bytes."),
    responses(
        (status = 200, description = "Analysis result as a FHIR Bundle.", body = crate::api::doc::Bundle, content_type = "application/fhir+json", headers(("Location" = String, description = "`/v1/results/{id}` — JSON summary of this result."))),
        (status = 400, description = "Bad request, e.g. unknown `model` (OperationOutcome).", body = OperationOutcome, content_type = "application/fhir+json"),
        (status = 413, description = "Request body too large (OperationOutcome, code `too-long`).", body = OperationOutcome, content_type = "application/fhir+json"),
        (status = 415, description = "Unsupported media type (OperationOutcome, code `not-supported`).", body = OperationOutcome, content_type = "application/fhir+json"),
        (status = 422, description = "Image cannot be decoded (OperationOutcome, code `invalid`).", body = OperationOutcome, content_type = "application/fhir+json"),
        (status = 500, description = "Internal error (OperationOutcome, code `exception`).", body = OperationOutcome, content_type = "application/fhir+json"),
        (status = 503, description = "Models not loaded, or the model runs on a serving engine that is unavailable now (OperationOutcome, code `transient`).", body = OperationOutcome, content_type = "application/fhir+json")
    )
)]
pub async fn analyze(
    State(state): State<AppState>,
    query: Result<Query<AnalyzeQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| body_error(e.status(), e.body_text(), state.max_body))?;
    let Query(query) =
        query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid", e.body_text()))?;
    let media = upload_media(&headers)?;
    if body.is_empty() {
        let m = "the request body is empty";
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "required", m));
    }
    let name = query.model.as_deref();
    let model = state.models.image_model(name).ok_or_else(|| {
        let m = format!("no image model named '{}'", name.unwrap_or_default());
        ApiError::new(StatusCode::BAD_REQUEST, "not-found", m)
    })?;
    let base = base_url(&state, &headers);
    let analysis = state.jobs.analyse_upload(body, media, model.clone(), &base);
    Ok(analysis_response(&analysis.await?))
}

/// The media type of an upload from its Content-Type (415 for anything but DICOM, PNG, JPEG).
fn upload_media(headers: &HeaderMap) -> Result<MediaType, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    MediaType::from_content_type(content_type).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "not-supported",
            format!("Content-Type '{content_type}' is not supported; send application/dicom, image/png or image/jpeg"),
        )
    })
}

/// 200 with the analysis Bundle, `Location` of the stored result and `Server-Timing`.
fn analysis_response(analysis: &Analysis) -> Response {
    let mut r = (StatusCode::OK, analysis.bundle.to_string()).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/fhir+json"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/results/{}", analysis.id)) {
        h.insert(header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&analysis.server_timing()) {
        h.insert("server-timing", v);
    }
    r
}

/// A result in the URL.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ResultId {
    /// Result id, from the `Location` header of `POST /v1/analyze`.
    pub id: String,
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::not_found(format!("no result '{id}'")))
}

/// `GET /v1/results/{id}`: summary with links.
#[utoipa::path(get, path = "/v1/results/{id}", tag = "analysis", operation_id = "getResult",
    summary = "Result summary",
    description = "JSON summary of an analysis: predicted class, probabilities, model and links to the input image, overlay and FHIR Bundle.",
    params(ResultId),
    responses((status = 200, description = "Result summary.", body = crate::api::analyze::ResultSummary, content_type = "application/json"), (status = 404, response = Problem))
)]
pub async fn result(
    State(state): State<AppState>,
    Path(ResultId { id }): Path<ResultId>,
    headers: HeaderMap,
) -> Result<Json<ResultSummary>, ApiError> {
    let uuid = parse_id(&id)?;
    let row = state
        .store
        .analysis(&uuid)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no result '{id}'")))?;
    let base = format!("{}/v1/results/{uuid}", base_url(&state, &headers));
    Ok(Json(ResultSummary {
        row,
        input_url: format!("{base}/input.png"),
        overlay_url: format!("{base}/overlay.png"),
        bundle_url: format!("{base}/bundle"),
    }))
}

/// A stored result with links to its parts.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ResultSummary {
    /// The stored summary.
    #[serde(flatten)]
    pub row: crate::store::ResultRow,
    /// The input image as the model saw it (PNG).
    pub input_url: String,
    /// The Grad-CAM overlay (PNG).
    pub overlay_url: String,
    /// The FHIR Bundle of the report.
    pub bundle_url: String,
}

async fn blob(
    state: &AppState,
    id: &str,
    name: &'static str,
    content_type: &'static str,
) -> Result<Response, ApiError> {
    let uuid = parse_id(id)?;
    let data = state
        .store
        .analysis_blob(&uuid, name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no {name} for result '{id}'")))?;
    // the input is kept as uploaded (PNG or JPEG): its bytes say which
    let content_type = MediaType::sniff(&data).map_or(content_type, MediaType::as_str);
    Ok(([(header::CONTENT_TYPE, content_type)], data).into_response())
}

/// `GET /v1/results/{id}/bundle`.
#[utoipa::path(get, path = "/v1/results/{id}/bundle", tag = "analysis", operation_id = "getResultBundle",
    summary = "Result as FHIR Bundle",
    description = "The same FHIR R4 Bundle that `POST /v1/analyze` returned.",
    params(ResultId),
    responses((status = 200, description = "FHIR Bundle.", body = crate::api::doc::Bundle, content_type = "application/fhir+json"), (status = 404, response = Problem))
)]
pub async fn bundle(s: State<AppState>, Path(p): Path<ResultId>) -> Result<Response, ApiError> {
    blob(&s, &p.id, "bundle.json", "application/fhir+json").await
}

/// `GET /v1/results/{id}/overlay.png`.
#[utoipa::path(get, path = "/v1/results/{id}/overlay.png", tag = "analysis", operation_id = "getResultOverlay",
    summary = "Grad-CAM overlay image",
    description = "Heatmap blended over the input image, as PNG.",
    params(ResultId),
    responses((status = 200, description = "PNG image.", body = Binary, content_type = "image/png"), (status = 404, response = Problem))
)]
pub async fn overlay(
    State(state): State<AppState>,
    Path(ResultId { id }): Path<ResultId>,
) -> Result<Response, ApiError> {
    blob(&state, &id, "overlay.png", "image/png").await
}

/// `GET /v1/results/{id}/input.png`.
#[utoipa::path(get, path = "/v1/results/{id}/input.png", tag = "analysis", operation_id = "getResultInput",
    summary = "Input image",
    description = "The analysed image: an uploaded PNG or JPEG as it was sent (Content-Type says which), or an 8-bit PNG of the analysed DICOM frame.",
    params(ResultId),
    responses((status = 200, description = "The image as uploaded, or PNG.", content((Binary = "image/png"), (Binary = "image/jpeg"))), (status = 404, response = Problem))
)]
pub async fn input(s: State<AppState>, Path(p): Path<ResultId>) -> Result<Response, ApiError> {
    blob(&s, &p.id, "input.png", "image/png").await
}
