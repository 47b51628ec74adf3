//! Operations: the job queue (`GET /v1/jobs`, `GET /v1/jobs/{id}`), Prometheus `/metrics`, and
//! the middleware every request passes through (request id, one log line, metrics,
//! `Retry-After` on 503).

use std::collections::HashMap;

use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tracing::Instrument;

use super::error::ApiError;
use crate::app::AppState;
use crate::fhir::OperationOutcome;
use crate::metrics;
use crate::store::{JobKind, JobState};

/// Query parameter `name` parsed by `parse`, when given; 400 naming the `known` values else.
fn one_of<T>(
    q: &HashMap<String, String>,
    name: &str,
    parse: impl Fn(&str) -> Option<T>,
    known: &str,
) -> Result<Option<T>, ApiError> {
    q.get(name)
        .map(|v| {
            parse(v).ok_or_else(|| {
                let m = format!("unknown {name} '{v}' ({known})");
                ApiError::new(StatusCode::BAD_REQUEST, "invalid", m)
            })
        })
        .transpose()
}

/// `GET /v1/jobs?state=&kind=&subject=&_count=&offset=`: jobs, newest first.
///
/// # Errors
/// 400 for an unknown state or kind, or a bad number; 503 when the database is down.
#[utoipa::path(get, path = "/v1/jobs", tag = "ops", operation_id = "listJobs",
    summary = "Jobs of the durable queue, newest first",
    description = "Analyses, ImagingStudy analyses and risk assessments are jobs in the database, enqueued in the same transaction as the data they work on. Filter by state (dead = the dead-letter state, with last_error), kind and subject.",
    params(
        ("state" = Option<crate::store::JobState>, Query, description = "Only jobs in this state (`dead`: the dead-letter state, with last_error)."),
        ("kind" = Option<crate::store::JobKind>, Query, description = "Only jobs of this kind."),
        ("subject" = Option<String>, Query, description = "Only jobs on this subject: a SOP Instance UID, `ImagingStudy/<id>`, `Patient/<id>`."),
        ("_count" = Option<i64>, Query, description = "(default 100; at most 1000)"),
        ("offset" = Option<i64>, Query, description = "(default 0)")
    ),
    responses(
        (status = 200, description = "Jobs.", body = JobList, content_type = "application/json"),
        (status = 400, description = "Unknown state or bad number.", body = OperationOutcome, content_type = "application/fhir+json"),
        (status = 503, description = "Database unavailable (Retry-After).", body = OperationOutcome, content_type = "application/fhir+json")
    )
)]
pub async fn list(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<JobList>, ApiError> {
    let job_state = one_of(&q, "state", JobState::parse, "queued, running, done, dead")?;
    let kind = one_of(&q, "kind", JobKind::parse, "analyse, imaging-study, risk")?;
    let count = number(&q, "_count", 100, 1000)?;
    let offset = number(&q, "offset", 0, i64::MAX)?;
    let subject = q.get("subject").map(String::as_str);
    let jobs = state
        .store
        .jobs(job_state, kind, subject, count, offset)
        .await?;
    Ok(Json(JobList { jobs }))
}

/// Query parameter `name`: a number from 0 to `max`, `default` when absent; 400 else.
fn number(
    q: &HashMap<String, String>,
    name: &str,
    default: i64,
    max: i64,
) -> Result<i64, ApiError> {
    q.get(name).map_or(Ok(default), |v| {
        v.parse::<i64>()
            .ok()
            .filter(|n| (0..=max).contains(n))
            .ok_or_else(|| {
                let m = format!("{name} must be a number from 0 to {max}");
                ApiError::new(StatusCode::BAD_REQUEST, "invalid", m)
            })
    })
}

/// A page of jobs, newest first.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct JobList {
    /// The jobs.
    pub jobs: Vec<crate::store::Job>,
}

/// `GET /v1/jobs/{id}`.
///
/// # Errors
/// 404 for an unknown job; 503 when the database is down.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "ops", operation_id = "getJob",
    summary = "One job",
    params(("id" = String, Path)),
    responses(
        (status = 200, description = "The job.", body = crate::store::Job, content_type = "application/json"),
        (status = 404, description = "No such job.", body = OperationOutcome, content_type = "application/fhir+json")
    )
)]
pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<crate::store::Job>, ApiError> {
    state
        .store
        .job(&id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("job {id}")))
}

/// `GET /metrics`: Prometheus text format (queue depth read from the database now).
#[utoipa::path(get, path = "/metrics", tag = "ops", operation_id = "metrics",
    summary = "Prometheus metrics",
    description = "Text exposition 0.0.4: carina_http_requests_total and carina_http_request_duration_seconds by route template and status, carina_jobs (queue depth by kind and state), carina_job_outcomes_total, carina_job_duration_seconds, carina_inference_duration_seconds, carina_inference_batch_size, carina_gradcam_duration_seconds, carina_dimse_associations_total, carina_dimse_stores_total.",
    responses((status = 200, description = "Metrics.", body = String, content_type = "text/plain"))
)]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let queue = state.store.job_counts().await.unwrap_or_default();
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        metrics::global().render(&queue),
    )
        .into_response()
}

/// Request id (the client's `X-Request-Id` or a new one) in the log span and the answer, one
/// log line per request (method, route template, status, duration: no paths, no PHI), request
/// metrics, and `Retry-After` on every 503.
pub async fn observe(req: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let method = req.method().as_str().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_string);
    let span =
        tracing::info_span!("request", request_id = %request_id, method = %method, route = %route);
    let mut resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status();
    let secs = started.elapsed().as_secs_f64();
    metrics::global().observe_request(&method, &route, status.as_u16(), secs);
    // probes (HAProxy checks /readyz twice a second) log at debug, everything else at info
    let probe = matches!(route.as_str(), "/healthz" | "/readyz" | "/metrics");
    span.in_scope(|| {
        if let Some(super::error::InternalCause(cause)) = resp.extensions().get() {
            tracing::error!(cause = %cause, "internal error");
        }
        let ms = (secs * 1000.0).round();
        if probe && status.is_success() {
            tracing::debug!(status = status.as_u16(), ms, "request");
        } else {
            tracing::info!(status = status.as_u16(), ms, "request");
        }
    });
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        h.insert("x-request-id", v);
    }
    if status == StatusCode::SERVICE_UNAVAILABLE && !h.contains_key(header::RETRY_AFTER) {
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    }
    resp
}
