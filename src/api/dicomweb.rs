//! DICOMweb (PS3.18) under `/dicomweb`: STOW-RS, QIDO-RS, WADO-RS (instances, series, studies,
//! metadata, frames, rendered), plus `GET /v1/instances/{sop}` for an instance's analysis state.
//! Handlers parse HTTP, call [`crate::ingest`] / [`crate::store`], and format DICOM JSON.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::Value;

use super::base_url;
use super::doc::{Binary, Problem};
use super::error::{body_error, ApiError};
use crate::app::AppState;
use crate::dicom::json::{self, StowItem};
use crate::dicom::media_params;
use crate::dicom::InstanceIndex;
use crate::imaging::{self, MediaType};
use crate::store::{self, Source};
use utoipa::IntoParams;

const DICOM_JSON: &str = "application/dicom+json";

fn dicom_json(status: StatusCode, v: &Value) -> Response {
    (status, [(header::CONTENT_TYPE, DICOM_JSON)], v.to_string()).into_response()
}

/// `POST /dicomweb/studies`.
#[utoipa::path(post, path = "/dicomweb/studies", tag = "dicomweb", operation_id = "stowStudies",
    summary = "STOW-RS: store instances",
    description = "multipart/related; type=\"application/dicom\". Answers DICOM JSON with ReferencedSOPSequence (0008,1199) and FailedSOPSequence (0008,1198)/FailureReason (0008,1197). 200 all stored, 202 some failed, 409 none stored.",
    request_body(content = Binary, content_type = "multipart/related"),
    responses(
        (status = 200, description = "all stored", body = Vec<serde_json::Value>, content_type = "application/dicom+json"),
        (status = 202, description = "some stored, some failed (DICOM JSON)"),
        (status = 409, description = "none stored (DICOM JSON)"),
        (status = 400, response = Problem),
        (status = 413, response = Problem),
        (status = 415, response = Problem)
    )
)]
pub async fn stow(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    stow_impl(state, headers, None, body).await
}

/// `POST /dicomweb/studies/{study}`: instances of another study fail with A900.
#[utoipa::path(post, path = "/dicomweb/studies/{study}", tag = "dicomweb", operation_id = "stowStudy",
    summary = "STOW-RS: store instances",
    description = "multipart/related; type=\"application/dicom\". Answers DICOM JSON with ReferencedSOPSequence (0008,1199) and FailedSOPSequence (0008,1198)/FailureReason (0008,1197). 200 all stored, 202 some failed, 409 none stored.",
    params(StudyPath),
    request_body(content = Binary, content_type = "multipart/related"),
    responses(
        (status = 200, description = "all stored", body = Vec<serde_json::Value>, content_type = "application/dicom+json"),
        (status = 202, description = "some stored, some failed (DICOM JSON)"),
        (status = 409, description = "none stored (DICOM JSON)"),
        (status = 400, response = Problem),
        (status = 413, response = Problem),
        (status = 415, response = Problem)
    )
)]
pub async fn stow_study(
    State(state): State<AppState>,
    Path(study): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    stow_impl(state, headers, Some(study), body).await
}

async fn stow_impl(
    state: AppState,
    headers: HeaderMap,
    study: Option<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let boundary = stow_boundary(&headers)?;
    let body = body.map_err(|e| body_error(e.status(), e.body_text(), state.max_body))?;
    let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(body) });
    let multipart = multer::Multipart::new(stream, boundary);
    let base = format!("{}/dicomweb", base_url(&state, &headers));
    let parts = stow_parts(&state.ingest, multipart, study.as_deref(), &base).await?;
    stow_answer(&parts, study, &base)
}

/// The boundary of a STOW-RS body: `multipart/related` of `application/dicom` parts only.
fn stow_boundary(headers: &HeaderMap) -> Result<String, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let (essence, params) = media_params(ct);
    let unsupported =
        |why: String| ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "not-supported", why);
    if essence != "multipart/related" {
        return Err(unsupported(format!(
            "STOW-RS needs Content-Type multipart/related; type=\"application/dicom\", not '{essence}'"
        )));
    }
    if let Some(t) = params.get("type") {
        if !t.eq_ignore_ascii_case("application/dicom") {
            return Err(unsupported(format!(
                "only application/dicom parts are accepted (type=\"{t}\")"
            )));
        }
    }
    params.get("boundary").cloned().ok_or_else(|| {
        let m = "multipart/related without a boundary";
        ApiError::new(StatusCode::BAD_REQUEST, "invalid", m)
    })
}

/// What became of each part of a STOW-RS body.
#[derive(Default)]
struct StowParts {
    stored: Vec<StowItem>,
    failed: Vec<StowItem>,
}

/// Ingests every part (each on its own: a bad part fails alone).
async fn stow_parts(
    ingest: &crate::ingest::Ingest,
    mut multipart: multer::Multipart<'static>,
    study: Option<&str>,
    base: &str,
) -> Result<StowParts, ApiError> {
    let malformed = |e: multer::Error| {
        let m = format!("malformed multipart body: {e}");
        ApiError::new(StatusCode::BAD_REQUEST, "invalid", m)
    };
    let mut out = StowParts::default();
    let mut n = 0usize;
    while let Some(field) = multipart.next_field().await.map_err(malformed)? {
        n += 1;
        let part_type = field
            .content_type()
            .map(|m| m.essence_str().to_ascii_lowercase())
            .unwrap_or_else(|| "application/dicom".into());
        let data = field.bytes().await.map_err(malformed)?;
        if part_type != "application/dicom" {
            let why = format!("part {n}: media type {part_type} is not application/dicom");
            out.failed.push(StowItem::failed(
                "",
                "",
                crate::dicom::status::CANNOT_UNDERSTAND,
                why,
            ));
            continue;
        }
        match ingest.receive(data, Source::Stow, study).await {
            Ok(a) => out.stored.push(StowItem {
                sop_class_uid: a.index.sop_class_uid.clone(),
                sop_instance_uid: a.index.sop_instance_uid.clone(),
                retrieve_url: Some(json::instance_url(&a.index, base)),
                failure: None,
                comment: None,
            }),
            Err(e) => {
                tracing::info!(part = n, status = format!("{:04X}", e.status()), error = %e, "STOW instance refused");
                let (class, inst) = e.uids().unwrap_or(("", ""));
                out.failed.push(StowItem::failed(
                    class,
                    inst,
                    e.status(),
                    format!("part {n}: {e}"),
                ));
            }
        }
    }
    if n == 0 {
        let m = "the multipart body has no parts";
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "required", m));
    }
    Ok(out)
}

/// The STOW-RS answer (PS3.18 10.5.3): 200 all stored, 202 some, 409 none, and 503 +
/// Retry-After when every part was refused for lack of resources (disk, job backlog, database).
fn stow_answer(parts: &StowParts, study: Option<String>, base: &str) -> Result<Response, ApiError> {
    let StowParts { stored, failed } = parts;
    let study_url = study
        .or_else(|| (!stored.is_empty()).then(|| stored_study(stored)))
        .map(|s| format!("{base}/studies/{s}"));
    let refused = |f: &StowItem| f.failure == Some(crate::dicom::status::OUT_OF_RESOURCES);
    if stored.is_empty() && !failed.is_empty() && failed.iter().all(refused) {
        let why = failed
            .first()
            .and_then(|f| f.comment.clone())
            .unwrap_or_default();
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "transient",
            why,
        ));
    }
    let status = match (stored.is_empty(), failed.is_empty()) {
        (false, true) => StatusCode::OK,
        (false, false) => StatusCode::ACCEPTED,
        (true, _) => StatusCode::CONFLICT,
    };
    let body = json::stow_response(study_url.as_deref(), stored, failed);
    Ok(dicom_json(status, &body))
}

fn stored_study(stored: &[StowItem]) -> String {
    // RetrieveURL is .../studies/{study}/series/...: take the study from the first one
    stored
        .first()
        .and_then(|s| s.retrieve_url.as_deref())
        .and_then(|u| u.split("/studies/").nth(1))
        .and_then(|r| r.split('/').next())
        .unwrap_or_default()
        .to_string()
}

/// QIDO-RS query parameters (keywords or tags; `limit`, `offset`; `includefield` and
/// `fuzzymatching` are accepted and ignored).
fn qido_query(q: &HashMap<String, String>) -> Result<store::Query, ApiError> {
    let mut out = store::Query {
        limit: 100,
        ..store::Query::default()
    };
    for (k, v) in q {
        let v = v.trim().to_string();
        match k.as_str() {
            "StudyInstanceUID" | "0020000D" => out.study_uid = Some(v),
            "SeriesInstanceUID" | "0020000E" => out.series_uid = Some(v),
            "SOPInstanceUID" | "00080018" => out.sop_instance_uid = Some(v),
            "PatientID" | "00100020" => out.patient_id = Some(v),
            "AccessionNumber" | "00080050" => out.accession_number = Some(v),
            "Modality" | "00080060" | "ModalitiesInStudy" | "00080061" => out.modality = Some(v),
            "StudyDate" | "00080020" => {
                let ok = v.split('-').all(|d| d.is_empty() || (d.len() == 8 && d.bytes().all(|b| b.is_ascii_digit())));
                if !ok || v.matches('-').count() > 1 {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid",
                        format!("StudyDate '{v}' is not YYYYMMDD or a YYYYMMDD-YYYYMMDD range"),
                    ));
                }
                out.study_date = Some(v);
            }
            "limit" | "offset" => {
                let n: i64 = v.parse().ok().filter(|n| *n >= 0).ok_or_else(|| {
                    ApiError::new(StatusCode::BAD_REQUEST, "invalid", format!("{k} must be a non-negative integer"))
                })?;
                if k == "limit" {
                    out.limit = n.min(1000);
                } else {
                    out.offset = n;
                }
            }
            "includefield" | "fuzzymatching" => {}
            other => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "not-supported",
                    format!("search by '{other}' is not supported; use StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, PatientID, AccessionNumber, Modality, StudyDate, limit, offset"),
                ))
            }
        }
    }
    Ok(out)
}

/// `GET /dicomweb/studies`.
#[utoipa::path(get, path = "/dicomweb/studies", tag = "dicomweb", operation_id = "qidoStudies",
    summary = "QIDO-RS: search studies",
    params(QidoQuery),
    responses((status = 200, description = "DICOM JSON array", body = Vec<serde_json::Value>, content_type = "application/dicom+json"), (status = 400, response = Problem))
)]
pub async fn search_studies(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let f = qido_query(&q)?;
    let base = format!("{}/dicomweb", base_url(&state, &headers));
    let hits = state.store.search_studies(&f).await?;
    let v: Vec<Value> = hits
        .iter()
        .map(|h| json::study_attributes(&h.index, h.series, h.instances, &h.modalities, &base))
        .collect();
    Ok(dicom_json(StatusCode::OK, &Value::Array(v)))
}

/// `GET /dicomweb/series`.
#[utoipa::path(get, path = "/dicomweb/series", tag = "dicomweb", operation_id = "qidoSeries",
    summary = "QIDO-RS: search series",
    params(QidoQuery),
    responses((status = 200, description = "DICOM JSON array", body = Vec<serde_json::Value>, content_type = "application/dicom+json"), (status = 400, response = Problem))
)]
pub async fn search_series(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    series_impl(state, headers, q, None).await
}

/// `GET /dicomweb/studies/{study}/series`.
#[utoipa::path(get, path = "/dicomweb/studies/{study}/series", tag = "dicomweb", operation_id = "qidoStudySeries",
    summary = "QIDO-RS: series of a study",
    params(StudyPath, QidoQuery),
    responses((status = 200, description = "DICOM JSON array", body = Vec<serde_json::Value>, content_type = "application/dicom+json"))
)]
pub async fn search_study_series(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(StudyPath { study }): Path<StudyPath>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    series_impl(state, headers, q, Some(study)).await
}

async fn series_impl(
    state: AppState,
    headers: HeaderMap,
    q: HashMap<String, String>,
    study: Option<String>,
) -> Result<Response, ApiError> {
    let mut f = qido_query(&q)?;
    if study.is_some() {
        f.study_uid = study;
    }
    let base = format!("{}/dicomweb", base_url(&state, &headers));
    let hits = state.store.search_series(&f).await?;
    let v: Vec<Value> = hits
        .iter()
        .map(|(ix, n)| json::series_attributes(ix, *n, &base))
        .collect();
    Ok(dicom_json(StatusCode::OK, &Value::Array(v)))
}

/// `GET /dicomweb/instances`.
#[utoipa::path(get, path = "/dicomweb/instances", tag = "dicomweb", operation_id = "qidoInstances",
    summary = "QIDO-RS: search instances",
    params(QidoQuery),
    responses((status = 200, description = "DICOM JSON array", body = Vec<serde_json::Value>, content_type = "application/dicom+json"), (status = 400, response = Problem))
)]
pub async fn search_instances(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    instances_impl(state, headers, q, None).await
}

/// `GET /dicomweb/studies/{study}/instances`.
#[utoipa::path(get, path = "/dicomweb/studies/{study}/instances", tag = "dicomweb", operation_id = "qidoStudyInstances",
    summary = "QIDO-RS: instances of a study",
    params(StudyPath, QidoQuery),
    responses((status = 200, description = "DICOM JSON array", body = Vec<serde_json::Value>, content_type = "application/dicom+json"))
)]
pub async fn search_study_instances(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(p): Path<StudyPath>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    instances_impl(state, headers, q, Some(p.into())).await
}

/// `GET /dicomweb/studies/{study}/series/{series}/instances`.
#[utoipa::path(get, path = "/dicomweb/studies/{study}/series/{series}/instances", tag = "dicomweb", operation_id = "qidoSeriesInstances",
    summary = "QIDO-RS: instances of a series",
    params(SeriesPath, QidoQuery),
    responses((status = 200, description = "DICOM JSON array", body = Vec<serde_json::Value>, content_type = "application/dicom+json"))
)]
pub async fn search_series_instances(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(p): Path<SeriesPath>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    instances_impl(state, headers, q, Some(p.into())).await
}

/// QIDO-RS instances, of a study or a series when `scope` names one.
async fn instances_impl(
    state: AppState,
    headers: HeaderMap,
    q: HashMap<String, String>,
    scope: Option<Scope>,
) -> Result<Response, ApiError> {
    let mut f = qido_query(&q)?;
    if let Some(scope) = scope {
        f.study_uid = Some(scope.study);
        if scope.series.is_some() {
            f.series_uid = scope.series;
        }
    }
    let base = format!("{}/dicomweb", base_url(&state, &headers));
    let hits = state.store.search_instances(&f).await?;
    let v: Vec<Value> = hits
        .iter()
        .map(|ix| json::instance_attributes(ix, &base))
        .collect();
    Ok(dicom_json(StatusCode::OK, &Value::Array(v)))
}

/// The instances a WADO-RS path names (404 when none).
async fn resolve(state: &AppState, scope: &Scope) -> Result<Vec<InstanceIndex>, ApiError> {
    let found = state.store.search_instances(&scope.query(100_000)).await?;
    if found.is_empty() {
        return Err(ApiError::not_found(format!(
            "no stored instance matches {scope}"
        )));
    }
    Ok(found)
}

/// Checks the Accept header of a retrieve allows multipart/related; type="application/dicom".
fn accepts_dicom(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return Ok(());
    };
    let ok = accept.split(',').any(|a| {
        let (essence, params) = media_params(a);
        essence == "*/*"
            || essence == "application/dicom"
            || (essence == "multipart/related"
                && params
                    .get("type")
                    .is_none_or(|t| t.eq_ignore_ascii_case("application/dicom")))
    });
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::NOT_ACCEPTABLE,
            "not-supported",
            format!("cannot answer '{accept}': instances are sent as multipart/related; type=\"application/dicom\" in their stored transfer syntax"),
        ))
    }
}

/// `GET /dicomweb/studies/{study}`.
#[utoipa::path(get, path = "/dicomweb/studies/{study}", tag = "dicomweb", operation_id = "wadoStudy",
    summary = "WADO-RS: retrieve a study",
    params(StudyPath),
    responses(
        (status = 200, description = "multipart/related; type=\"application/dicom\" (stored transfer syntax)", body = Binary, content_type = "multipart/related"),
        (status = 404, response = Problem),
        (status = 406, response = Problem)
    )
)]
pub async fn retrieve_study(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(p): Path<StudyPath>,
) -> Result<Response, ApiError> {
    retrieve(state, headers, p.into()).await
}

/// `GET /dicomweb/studies/{study}/series/{series}`.
#[utoipa::path(get, path = "/dicomweb/studies/{study}/series/{series}", tag = "dicomweb", operation_id = "wadoSeries",
    summary = "WADO-RS: retrieve a series",
    params(SeriesPath),
    responses(
        (status = 200, description = "multipart/related; type=\"application/dicom\" (stored transfer syntax)", body = Binary, content_type = "multipart/related"),
        (status = 404, response = Problem)
    )
)]
pub async fn retrieve_series(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(p): Path<SeriesPath>,
) -> Result<Response, ApiError> {
    retrieve(state, headers, p.into()).await
}

/// `GET /dicomweb/studies/{study}/series/{series}/instances/{instance}`.
#[utoipa::path(get, path = "/dicomweb/studies/{study}/series/{series}/instances/{instance}", tag = "dicomweb", operation_id = "wadoInstance",
    summary = "WADO-RS: retrieve an instance",
    params(InstancePath),
    responses(
        (status = 200, description = "multipart/related; type=\"application/dicom\" (stored transfer syntax)", body = Binary, content_type = "multipart/related"),
        (status = 404, response = Problem),
        (status = 406, response = Problem)
    )
)]
pub async fn retrieve_instance(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(p): Path<InstancePath>,
) -> Result<Response, ApiError> {
    retrieve(state, headers, p.into()).await
}

/// WADO-RS retrieve of a study, series or instance: `multipart/related; type="application/dicom"`.
async fn retrieve(state: AppState, headers: HeaderMap, scope: Scope) -> Result<Response, ApiError> {
    accepts_dicom(&headers)?;
    let found = resolve(&state, &scope).await?;
    let boundary = format!("carina-{}", uuid::Uuid::new_v4().simple());
    let mut body = Vec::new();
    for ix in &found {
        let Some(file) = state.store.instance_file(ix).await? else {
            return Err(ApiError::internal(format!(
                "file of instance {} is missing",
                ix.sop_instance_uid
            )));
        };
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Type: application/dicom; transfer-syntax={}\r\nContent-Length: {}\r\n\r\n",
                ix.transfer_syntax,
                file.len()
            )
            .as_bytes(),
        );
        body.extend_from_slice(&file);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    let ct = format!("multipart/related; type=\"application/dicom\"; boundary={boundary}");
    let mut r = (StatusCode::OK, body).into_response();
    if let Ok(v) = HeaderValue::from_str(&ct) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    Ok(r)
}

/// `GET /dicomweb/studies/{study}/metadata`.
#[utoipa::path(get, path = "/dicomweb/studies/{study}/metadata", tag = "dicomweb", operation_id = "wadoStudyMetadata",
    summary = "WADO-RS: study metadata",
    params(StudyPath),
    responses((status = 200, description = "DICOM JSON array", body = Vec<serde_json::Value>, content_type = "application/dicom+json"), (status = 404, response = Problem))
)]
pub async fn study_metadata(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(p): Path<StudyPath>,
) -> Result<Response, ApiError> {
    metadata(state, headers, p.into()).await
}

/// `GET /dicomweb/studies/{study}/series/{series}/metadata`.
#[utoipa::path(get, path = "/dicomweb/studies/{study}/series/{series}/metadata", tag = "dicomweb", operation_id = "wadoSeriesMetadata",
    summary = "WADO-RS: series metadata",
    params(SeriesPath),
    responses((status = 200, description = "DICOM JSON array", body = Vec<serde_json::Value>, content_type = "application/dicom+json"), (status = 404, response = Problem))
)]
pub async fn series_metadata(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(p): Path<SeriesPath>,
) -> Result<Response, ApiError> {
    metadata(state, headers, p.into()).await
}

/// `GET /dicomweb/studies/{study}/series/{series}/instances/{instance}/metadata`.
#[utoipa::path(get, path = "/dicomweb/studies/{study}/series/{series}/instances/{instance}/metadata", tag = "dicomweb", operation_id = "wadoInstanceMetadata",
    summary = "WADO-RS: instance metadata (Pixel Data as BulkDataURI)",
    params(InstancePath),
    responses((status = 200, description = "DICOM JSON array", body = Vec<serde_json::Value>, content_type = "application/dicom+json"), (status = 404, response = Problem))
)]
pub async fn instance_metadata(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(p): Path<InstancePath>,
) -> Result<Response, ApiError> {
    metadata(state, headers, p.into()).await
}

/// WADO-RS metadata of a study, series or instance (DICOM JSON array).
async fn metadata(state: AppState, headers: HeaderMap, scope: Scope) -> Result<Response, ApiError> {
    let found = resolve(&state, &scope).await?;
    let base = format!("{}/dicomweb", base_url(&state, &headers));
    let mut out = Vec::with_capacity(found.len());
    for ix in &found {
        let Some(file) = state.store.instance_file(ix).await? else {
            return Err(ApiError::internal(format!(
                "file of instance {} is missing",
                ix.sop_instance_uid
            )));
        };
        let url = json::instance_url(ix, &base);
        let v = tokio::task::spawn_blocking(move || {
            let parsed = crate::dicom::parse_instance(&file).map_err(ApiError::internal)?;
            json::metadata(&parsed.object, &url).map_err(ApiError::internal)
        })
        .await
        .map_err(ApiError::internal)??;
        out.push(v);
    }
    Ok(dicom_json(StatusCode::OK, &Value::Array(out)))
}

/// Loads the instance a path names (404 unless it is in that study and series).
async fn one_instance(
    state: &AppState,
    p: &InstancePath,
) -> Result<(InstanceIndex, Vec<u8>), ApiError> {
    let ix = state
        .store
        .instance(&p.instance)
        .await?
        .filter(|ix| ix.study_uid == p.study && ix.series_uid == p.series)
        .ok_or_else(|| ApiError::not_found("no such instance in this study and series"))?;
    let file = state
        .store
        .instance_file(&ix)
        .await?
        .ok_or_else(|| ApiError::internal("instance file missing"))?;
    Ok((ix, file))
}

/// QIDO-RS query parameters (DICOM attribute keywords, or their tags as `gggg eeee` hex, e.g.
/// `0020000D`; matching per PS3.18 §8.3.4). Parsed by `qido_query`; a unit test checks every
/// one documented here is accepted there.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(non_snake_case, dead_code)]
pub struct QidoQuery {
    /// Exact (tag `0020000D`).
    StudyInstanceUID: Option<String>,
    /// Exact (tag `0020000E`).
    SeriesInstanceUID: Option<String>,
    /// Exact (tag `00080018`).
    SOPInstanceUID: Option<String>,
    /// Exact, `*` and `?` wildcards (tag `00100020`).
    PatientID: Option<String>,
    /// Exact, wildcards (tag `00080050`).
    AccessionNumber: Option<String>,
    /// Exact; `ModalitiesInStudy` (`00080061`) is the same at study level (tag `00080060`).
    Modality: Option<String>,
    /// `YYYYMMDD`, `A-B`, `A-`, `-B` (tag `00080020`).
    StudyDate: Option<String>,
    /// Page size, default 100, at most 1000.
    limit: Option<u32>,
    /// Rows skipped.
    offset: Option<u32>,
    /// Accepted and ignored: every answer carries the same attributes.
    includefield: Option<String>,
    /// Accepted and ignored: matching is as described above.
    fuzzymatching: Option<bool>,
}

/// A study in the URL.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct StudyPath {
    /// Study Instance UID.
    pub study: String,
}

/// A series in the URL.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct SeriesPath {
    /// Study Instance UID.
    pub study: String,
    /// Series Instance UID.
    pub series: String,
}

/// An instance in the URL.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct InstancePath {
    /// Study Instance UID.
    pub study: String,
    /// Series Instance UID.
    pub series: String,
    /// SOP Instance UID.
    pub instance: String,
}

/// A frame in the URL.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct FramePath {
    /// Study Instance UID.
    pub study: String,
    /// Series Instance UID.
    pub series: String,
    /// SOP Instance UID.
    pub instance: String,
    /// Frame number, from 1 (anything else is a 400 OperationOutcome, not a bare rejection).
    #[param(value_type = u32, minimum = 1)]
    pub frame: String,
}

impl FramePath {
    /// The instance and the frame number (400 unless it is a number from 1).
    fn split(self) -> Result<(InstancePath, u32), ApiError> {
        let frame = self.frame.parse().ok().filter(|n| *n >= 1).ok_or_else(|| {
            let m = format!("frame numbers start at 1, not '{}'", self.frame);
            ApiError::new(StatusCode::BAD_REQUEST, "invalid", m)
        })?;
        let FramePath {
            study,
            series,
            instance,
            ..
        } = self;
        let p = InstancePath {
            study,
            series,
            instance,
        };
        Ok((p, frame))
    }
}

/// What a WADO-RS path names: a study, a series of it, or an instance of that series.
#[derive(Default)]
struct Scope {
    study: String,
    series: Option<String>,
    instance: Option<String>,
}

impl From<StudyPath> for Scope {
    fn from(p: StudyPath) -> Self {
        Scope {
            study: p.study,
            ..Scope::default()
        }
    }
}

impl From<SeriesPath> for Scope {
    fn from(p: SeriesPath) -> Self {
        Scope {
            study: p.study,
            series: Some(p.series),
            instance: None,
        }
    }
}

impl From<InstancePath> for Scope {
    fn from(p: InstancePath) -> Self {
        Scope {
            study: p.study,
            series: Some(p.series),
            instance: Some(p.instance),
        }
    }
}

impl Scope {
    /// The store query for the instances in this scope.
    fn query(&self, limit: i64) -> store::Query {
        store::Query {
            study_uid: Some(self.study.clone()),
            series_uid: self.series.clone(),
            sop_instance_uid: self.instance.clone(),
            limit,
            ..store::Query::default()
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.study)?;
        for part in [&self.series, &self.instance].into_iter().flatten() {
            write!(f, "/{part}")?;
        }
        Ok(())
    }
}

/// Rendered query: `quality` (JPEG, 1..=100).
#[derive(Debug, serde::Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RenderedQuery {
    /// JPEG quality, 1 to 100 (default 90).
    pub quality: Option<u8>,
}

/// `GET /dicomweb/studies/{study}/series/{series}/instances/{instance}/rendered`.
#[utoipa::path(get, path = "/dicomweb/studies/{study}/series/{series}/instances/{instance}/rendered", tag = "dicomweb", operation_id = "wadoRendered",
    summary = "WADO-RS rendered: first frame as PNG (default) or JPEG",
    description = "Modality LUT, VOI LUT/window, MONOCHROME1 inversion and palette/YBR conversion applied.",
    params(InstancePath, RenderedQuery),
    responses((status = 200, description = "image", content(("image/png"), ("image/jpeg"))), (status = 404, response = Problem), (status = 406, response = Problem), (status = 422, response = Problem))
)]
pub async fn rendered_instance(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(p): Path<InstancePath>,
    Query(q): Query<RenderedQuery>,
) -> Result<Response, ApiError> {
    rendered(state, headers, p, 1, q).await
}

/// `GET /dicomweb/studies/{study}/series/{series}/instances/{instance}/frames/{frame}/rendered`.
#[utoipa::path(get, path = "/dicomweb/studies/{study}/series/{series}/instances/{instance}/frames/{frame}/rendered", tag = "dicomweb", operation_id = "wadoFrameRendered",
    summary = "WADO-RS rendered frame (1-based)",
    params(FramePath, RenderedQuery),
    responses((status = 200, description = "image", content(("image/png"), ("image/jpeg"))), (status = 400, response = Problem), (status = 404, response = Problem), (status = 422, response = Problem))
)]
pub async fn rendered_frame(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(p): Path<FramePath>,
    Query(q): Query<RenderedQuery>,
) -> Result<Response, ApiError> {
    let (p, frame) = p.split()?;
    rendered(state, headers, p, frame, q).await
}

/// WADO-RS rendered instance (first frame) or frame (`/frames/{n}/rendered`): the 8-bit
/// picture after Modality LUT, VOI LUT/window, MONOCHROME1 inversion and palette/YBR → RGB,
/// as image/png (default) or image/jpeg.
async fn rendered(
    state: AppState,
    headers: HeaderMap,
    p: InstancePath,
    frame: u32,
    q: RenderedQuery,
) -> Result<Response, ApiError> {
    let jpeg = rendered_as_jpeg(&headers)?;
    let (_, file) = one_instance(&state, &p).await?;
    let quality = q.quality.unwrap_or(90).clamp(1, 100);
    let (ct, data) = tokio::task::spawn_blocking(move || render(&file, frame - 1, jpeg, quality))
        .await
        .map_err(ApiError::internal)??;
    Ok(([(header::CONTENT_TYPE, ct)], data).into_response())
}

/// Whether `Accept` asks for JPEG (PNG otherwise; 406 for anything else).
fn rendered_as_jpeg(headers: &HeaderMap) -> Result<bool, ApiError> {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("image/png");
    let jpeg = accept.contains("image/jpeg") && !accept.contains("image/png");
    let png = ["image/png", "*/*", "image/*"]
        .iter()
        .any(|t| accept.contains(t));
    if jpeg || png {
        return Ok(jpeg);
    }
    let m = format!("rendered images are image/png or image/jpeg, not '{accept}'");
    Err(ApiError::new(
        StatusCode::NOT_ACCEPTABLE,
        "not-supported",
        m,
    ))
}

/// Frame `frame` (0-based) of a Part 10 file as PNG, or JPEG of `quality`.
fn render(
    file: &[u8],
    frame: u32,
    jpeg: bool,
    quality: u8,
) -> Result<(&'static str, Vec<u8>), imaging::DecodeError> {
    let img = imaging::decode_frame(file, MediaType::Dicom, frame)?.image;
    let mut out = std::io::Cursor::new(Vec::new());
    let failed = |e: image::ImageError| imaging::DecodeError::Pixels(e.to_string());
    if jpeg {
        let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality);
        img.write_with_encoder(enc).map_err(failed)?;
        Ok(("image/jpeg", out.into_inner()))
    } else {
        img.write_to(&mut out, image::ImageFormat::Png)
            .map_err(failed)?;
        Ok(("image/png", out.into_inner()))
    }
}

/// `GET /v1/instances/{sop}`: where an instance is in the analysis flow.
#[utoipa::path(get, path = "/v1/instances/{sop}", tag = "dicom-status", operation_id = "instanceStatus",
    summary = "Analysis and export state of an instance",
    params(("sop" = String, Path)),
    responses(
        (status = 200, description = "state: pending, running, done, skipped or failed, with the reason, result_url and exports", body = serde_json::Value, content_type = "application/json"),
        (status = 404, response = Problem)
    )
)]
pub async fn instance_status(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(sop): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let st = state
        .store
        .instance_status(&sop)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no instance '{sop}'")))?;
    let base = base_url(&state, &headers);
    let mut v = serde_json::to_value(&st).map_err(ApiError::internal)?;
    if let Some(id) = &st.analysis_id {
        v["result_url"] = Value::from(format!("{base}/v1/results/{id}"));
    }
    let exports = state.store.exports(Some(&sop), None, 100).await?;
    v["exports"] = serde_json::to_value(exports).map_err(ApiError::internal)?;
    v["retrieve_url"] = Value::from(format!(
        "{base}/dicomweb/studies/{}/series/{}/instances/{}",
        st.study_uid, st.series_uid, st.sop_instance_uid
    ));
    Ok(Json(v))
}

/// `GET /v1/studies/{study}/instances`: the analysis state of every instance of a study,
/// Carina's results included.
#[utoipa::path(get, path = "/v1/studies/{study}/instances", tag = "dicom-status", operation_id = "studyStatus",
    summary = "State of every instance of a study, Carina's results included",
    params(StudyPath),
    responses((status = 200, description = "array", body = Vec<serde_json::Value>, content_type = "application/json"), (status = 404, response = Problem))
)]
pub async fn study_status(
    State(state): State<AppState>,
    Path(StudyPath { study }): Path<StudyPath>,
) -> Result<Json<Value>, ApiError> {
    let all = state.store.study_status(&study).await?;
    if all.is_empty() {
        return Err(ApiError::not_found(format!("no study '{study}'")));
    }
    Ok(Json(serde_json::to_value(all).map_err(ApiError::internal)?))
}

/// `GET /v1/exports` query.
#[derive(Debug, serde::Deserialize)]
pub struct ExportsQuery {
    /// pending | sent | failed.
    pub state: Option<String>,
    /// Only this instance's exports.
    pub sop: Option<String>,
    /// Page size (default 100, at most 1000).
    pub limit: Option<i64>,
}

/// `GET /v1/exports`: result exports to PACS destinations and their state.
#[utoipa::path(get, path = "/v1/exports", tag = "dicom-status", operation_id = "exports",
    summary = "Result exports to PACS destinations",
    params(("state" = Option<String>, Query, description = "(one of `pending`, `sent`, `failed`)"), ("sop" = Option<String>, Query), ("limit" = Option<i64>, Query)),
    responses((status = 200, description = "array", body = Vec<serde_json::Value>, content_type = "application/json"), (status = 400, response = Problem))
)]
pub async fn exports(
    State(state): State<AppState>,
    Query(q): Query<ExportsQuery>,
) -> Result<Json<Value>, ApiError> {
    if let Some(s) = &q.state {
        if !matches!(s.as_str(), "pending" | "sent" | "failed") {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid",
                "state is pending, sent or failed",
            ));
        }
    }
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let rows = state
        .store
        .exports(q.sop.as_deref(), q.state.as_deref(), limit)
        .await?;
    Ok(Json(
        serde_json::to_value(rows).map_err(ApiError::internal)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(key: &str, value: &str) -> Result<store::Query, ApiError> {
        qido_query(&HashMap::from([(key.to_string(), value.to_string())]))
    }

    /// The documented QIDO parameters (`QidoQuery`) are the ones `qido_query` accepts, by
    /// keyword and by the tag each one's description names.
    #[test]
    fn every_documented_qido_parameter_is_accepted() {
        let params = QidoQuery::into_params(|| None);
        assert_eq!(params.len(), 11);
        for p in &params {
            let value = match p.name.as_str() {
                "limit" | "offset" => "5",
                "StudyDate" => "20200101-20201231",
                "fuzzymatching" => "true",
                _ => "1.2.3",
            };
            assert!(one(&p.name, value).is_ok(), "{} refused", p.name);
            let doc = p.description.clone().unwrap_or_default();
            for tag in doc
                .split('`')
                .filter(|t| t.len() == 8 && t.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                assert!(one(tag, value).is_ok(), "tag {tag} of {} refused", p.name);
            }
        }
        assert_eq!(
            one("PatientID", "P1")
                .map(|q| q.patient_id)
                .ok()
                .flatten()
                .as_deref(),
            Some("P1")
        );
        assert_eq!(
            one("00080061", "CR")
                .map(|q| q.modality)
                .ok()
                .flatten()
                .as_deref(),
            Some("CR")
        );
        assert!(
            one("PatientName", "X").is_err(),
            "an undocumented key must be refused"
        );
        assert!(one("limit", "-1").is_err());
        assert!(one("StudyDate", "2020").is_err());
    }

    #[test]
    fn frame_paths_need_a_number_from_one() {
        let path = |f: &str| FramePath {
            study: "1".into(),
            series: "2".into(),
            instance: "3".into(),
            frame: f.into(),
        };
        assert_eq!(
            path("2").split().map(|(p, n)| (p.instance, n)).ok(),
            Some(("3".into(), 2))
        );
        for bad in ["0", "x", "-1", ""] {
            let e = path(bad).split().err().map(|e| e.status);
            assert_eq!(e, Some(StatusCode::BAD_REQUEST), "frame '{bad}'");
        }
    }
}
