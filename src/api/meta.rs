//! Service routes: health, readiness, the model list, the web page, the API docs and spec.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::doc::Binary;
use super::error::ApiError;
use crate::app::AppState;
use crate::fhir::OperationOutcome;
use crate::inference::ModelInfo;

/// `GET /healthz`: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "ops", operation_id = "healthz",
    summary = "Liveness probe",
    description = "Liveness only: the process answers. Readiness is /readyz.",
    responses((status = 200, description = "Alive.", body = String, content_type = "text/plain"))
)]
pub async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: each check, the loaded models and this replica's name.
#[derive(Serialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `not ready`.
    #[schema(example = "ready")]
    pub status: &'static str,
    /// `database`, `blobs`, `models`: `ok` or `failing`.
    pub checks: BTreeMap<&'static str, &'static str>,
    /// Names of the loaded models.
    pub models: Vec<String>,
    /// This replica (the job lease owner).
    pub node: String,
}

/// `GET /readyz`: ready to take work when the database answers, both blob folders can be
/// written and at least one image model is loaded (HAProxy health checks use it).
#[utoipa::path(get, path = "/readyz", tag = "ops", operation_id = "readyz",
    summary = "Readiness probe",
    description = "Ready when the database answers, both blob folders can be written and at least one image model is loaded; `checks` says which failed, `node` names this replica (its job-lease owner). HAProxy's health check uses it.",
    responses(
        (status = 200, description = "Ready.", body = crate::api::meta::Readiness, content_type = "application/json"),
        (status = 503, description = "Not ready (database down, blob folder not writable, or no model).", body = crate::api::meta::Readiness, content_type = "application/json")
    )
)]
pub async fn readyz(State(state): State<AppState>) -> Response {
    let body = Readiness::check(&state).await;
    let status = if body.status == "ready" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

impl Readiness {
    /// Runs the checks now.
    async fn check(state: &AppState) -> Self {
        let checks = [
            ("database", state.store.ping().await),
            ("blobs", state.store.blobs_writable().await),
            ("models", !state.models.image.is_empty()),
        ];
        let ready = checks.iter().all(|(_, ok)| *ok);
        Readiness {
            status: if ready { "ready" } else { "not ready" },
            checks: checks
                .iter()
                .map(|(k, ok)| (*k, if *ok { "ok" } else { "failing" }))
                .collect(),
            models: state
                .models
                .describe()
                .into_iter()
                .map(|m| m.name)
                .collect(),
            node: state.jobs.settings().owner.clone(),
        }
    }
}

/// `GET /v1/models`.
#[utoipa::path(get, path = "/v1/models", tag = "models", operation_id = "listModels",
    summary = "List loaded models",
    description = "Name, version, task, inputs, class labels and CAM method of each loaded model.",
    responses(
        (status = 200, description = "Loaded models.", body = crate::api::meta::ModelList, content_type = "application/json"),
        (status = 500, description = "Internal error (OperationOutcome, code `exception`).", body = OperationOutcome, content_type = "application/fhir+json")
    )
)]
pub async fn models(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        models: state.models.describe(),
    })
}

/// The loaded models.
#[derive(Serialize, ToSchema)]
pub struct ModelList {
    /// Image and tabular models.
    pub models: Vec<ModelInfo>,
}

const INDEX: &str = include_str!("assets/index.html");

/// The page's Content-Security-Policy: its one inline script by hash, nothing from elsewhere,
/// never framed.
fn index_csp() -> &'static str {
    static CSP: OnceLock<String> = OnceLock::new();
    CSP.get_or_init(|| {
        use base64::Engine as _;
        let script = INDEX
            .split_once("<script>")
            .and_then(|(_, rest)| rest.split_once("</script>"))
            .map_or("", |(s, _)| s);
        let hash = ring::digest::digest(&ring::digest::SHA256, script.as_bytes());
        format!(
            "default-src 'none'; script-src 'sha256-{}'; style-src 'unsafe-inline'; img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            base64::engine::general_purpose::STANDARD.encode(hash.as_ref())
        )
    })
}

/// `GET /`: the upload page, with a strict CSP, `nosniff` and no framing.
#[utoipa::path(get, path = "/", tag = "ui", operation_id = "webUi",
    summary = "Web page",
    description = "Self-contained demo page for uploading an X-ray.",
    responses((status = 200, description = "HTML page.", body = String, content_type = "text/html"))
)]
pub async fn index() -> Response {
    (
        [
            (header::CONTENT_SECURITY_POLICY, index_csp()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        Html(INDEX),
    )
        .into_response()
}

/// `GET /docs`: to `/docs/`, so that the page's relative asset links resolve under it.
#[utoipa::path(get, path = "/docs", tag = "ui", operation_id = "apiDocs",
    summary = "Interactive API docs (redirects to `/docs/`)",
    description = "Renders this OpenAPI document with a \"Try it\" form per operation.",
    responses((status = 308, description = "To `/docs/`.", headers(("Location" = String))))
)]
pub async fn docs() -> Redirect {
    Redirect::permanent("/docs/")
}

/// The Swagger UI configuration: the spec at `/openapi.json`, no online validator (the page
/// talks to nothing but this server).
fn swagger_config() -> Arc<utoipa_swagger_ui::Config<'static>> {
    static CONFIG: OnceLock<Arc<utoipa_swagger_ui::Config<'static>>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            Arc::new(
                utoipa_swagger_ui::Config::from("/openapi.json")
                    .validator_url("none")
                    .try_it_out_enabled(true),
            )
        })
        .clone()
}

/// `GET /docs/`: the Swagger UI page (assets embedded in the binary, nothing from a CDN).
#[utoipa::path(get, path = "/docs/", tag = "ui", operation_id = "apiDocsPage",
    summary = "Interactive API docs: Swagger UI",
    description = "Renders this OpenAPI document with a \"Try it out\" form per operation. Served from assets compiled into the binary: nothing comes from a CDN.",
    responses((status = 200, description = "HTML page.", body = String, content_type = "text/html"))
)]
pub async fn docs_index() -> Result<Response, ApiError> {
    docs_asset("index.html")
}

/// `GET /docs/{file}`: a Swagger UI asset.
#[utoipa::path(get, path = "/docs/{file}", tag = "ui", operation_id = "apiDocsAsset",
    summary = "A Swagger UI asset",
    params(("file" = String, Path, description = "e.g. `swagger-ui-bundle.js`")),
    responses(
        (status = 200, description = "The asset.", body = Binary, content_type = "application/octet-stream"),
        (status = 404, description = "No such asset.", body = OperationOutcome, content_type = "application/fhir+json")
    )
)]
pub async fn docs_file(Path(file): Path<String>) -> Result<Response, ApiError> {
    docs_asset(&file)
}

fn docs_asset(file: &str) -> Result<Response, ApiError> {
    let asset = utoipa_swagger_ui::serve(file, swagger_config())
        .map_err(|e| ApiError::internal(e.to_string()))?
        .ok_or_else(|| ApiError::not_found(format!("no docs file '{file}'")))?;
    let mut r = (
        [
            (header::CONTENT_TYPE, asset.content_type),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".into()),
            (header::X_FRAME_OPTIONS, "DENY".into()),
            (header::CONTENT_SECURITY_POLICY, DOCS_CSP.into()),
        ],
        asset.bytes.into_owned(),
    )
        .into_response();
    if asset.gzpipped {
        r.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    Ok(r)
}

/// The docs page loads its scripts, styles and the spec from this server only.
const DOCS_CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// `GET /openapi.json`: the OpenAPI 3.1 document, derived from the handlers and types.
#[utoipa::path(get, path = "/openapi.json", tag = "ui", operation_id = "openapiSpec",
    summary = "OpenAPI document",
    description = "This document (OpenAPI 3.1).",
    responses((status = 200, description = "OpenAPI 3.1 JSON.", body = serde_json::Value, content_type = "application/json"))
)]
pub async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        super::doc::spec(),
    )
        .into_response()
}
