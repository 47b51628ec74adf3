//! Service routes: health, readiness, the model list, the web page, the API docs and spec.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::app::AppState;

/// `GET /healthz`: the process answers.
pub async fn healthz() -> &'static str {
    "ok"
}

/// `GET /readyz`: ready to take work when the database answers, both blob folders can be
/// written and at least one image model is loaded (HAProxy health checks use it).
pub async fn readyz(State(state): State<AppState>) -> Response {
    let models: Vec<String> = state
        .models
        .describe()
        .into_iter()
        .map(|m| m.name)
        .collect();
    let checks = [
        ("database", state.store.ping().await),
        ("blobs", state.store.blobs_writable().await),
        ("models", !state.models.image.is_empty()),
    ];
    let ready = checks.iter().all(|(_, ok)| *ok);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let checks: serde_json::Map<String, serde_json::Value> = checks
        .iter()
        .map(|(k, ok)| ((*k).to_string(), json!(if *ok { "ok" } else { "failing" })))
        .collect();
    (
        status,
        Json(json!({
            "status": if ready { "ready" } else { "not ready" },
            "checks": checks,
            "models": models,
            "node": state.jobs.settings().owner,
        })),
    )
        .into_response()
}

/// `GET /v1/models`.
pub async fn models(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({"models": state.models.describe()}))
}

const INDEX: &str = include_str!("assets/index.html");

/// The page's Content-Security-Policy: its one inline script by hash, nothing from elsewhere,
/// never framed.
fn index_csp() -> &'static str {
    static CSP: std::sync::OnceLock<String> = std::sync::OnceLock::new();
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

/// `GET /docs`: interactive API docs (self-contained, no CDN).
pub async fn docs() -> Html<&'static str> {
    Html(include_str!("assets/docs.html"))
}

/// The OpenAPI document served at `/openapi.json`.
pub const OPENAPI: &str = include_str!("assets/openapi.json");

/// `GET /openapi.json`.
pub async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}
