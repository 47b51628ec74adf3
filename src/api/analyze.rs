//! `POST /v1/analyze` and the stored results under `/v1/results/{id}`.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::base_url;
use super::error::{body_error, ApiError};
use crate::analysis::pipeline::Analysis;
use crate::app::AppState;
use crate::imaging::MediaType;

/// Query of `POST /v1/analyze`.
#[derive(Debug, Deserialize)]
pub struct AnalyzeQuery {
    /// Model name (default: the first image model).
    pub model: Option<String>,
}

/// `POST /v1/analyze`: raw DICOM/PNG/JPEG body → FHIR Bundle (stored, `Location` to the result).
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

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::not_found(format!("no result '{id}'")))
}

/// `GET /v1/results/{id}`: summary with links.
pub async fn result(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let uuid = parse_id(&id)?;
    let row = state
        .store
        .analysis(&uuid)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no result '{id}'")))?;
    let base = base_url(&state, &headers);
    let mut v = serde_json::to_value(&row).map_err(ApiError::internal)?;
    v["input_url"] = json!(format!("{base}/v1/results/{uuid}/input.png"));
    v["overlay_url"] = json!(format!("{base}/v1/results/{uuid}/overlay.png"));
    v["bundle_url"] = json!(format!("{base}/v1/results/{uuid}/bundle"));
    Ok(Json(v))
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
    Ok(([(header::CONTENT_TYPE, content_type)], data).into_response())
}

/// `GET /v1/results/{id}/bundle`.
pub async fn bundle(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    blob(&state, &id, "bundle.json", "application/fhir+json").await
}

/// `GET /v1/results/{id}/overlay.png`.
pub async fn overlay(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    blob(&state, &id, "overlay.png", "image/png").await
}

/// `GET /v1/results/{id}/input.png`.
pub async fn input(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    blob(&state, &id, "input.png", "image/png").await
}
