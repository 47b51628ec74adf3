//! The HTTP API (axum): routes, thin handlers, error mapping. Handlers extract, call one use
//! case ([`crate::analysis::pipeline`], [`crate::store`]) and map the answer; nothing here does maths or SQL.

pub mod analyze;
pub mod auth;
pub mod dicomweb;
pub mod error;
pub mod fhir;
pub mod legacy;
pub mod meta;
pub mod ops;
pub mod serve;

use axum::extract::DefaultBodyLimit;
use axum::handler::Handler;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::Router;

use crate::app::AppState;

/// The whole router.
pub fn router(state: AppState) -> Router {
    let limit = state.max_body;
    let fhir_limit = DefaultBodyLimit::max(state.fhir_max_body);
    Router::new()
        .route("/", get(meta::index))
        .route("/docs", get(meta::docs))
        .route("/openapi.json", get(meta::openapi))
        .route("/healthz", get(meta::healthz))
        .route(
            "/.well-known/smart-configuration",
            get(auth::smart_configuration),
        )
        .route(
            "/fhir/.well-known/smart-configuration",
            get(auth::smart_configuration),
        )
        .route("/readyz", get(meta::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/v1/jobs", get(ops::list))
        .route("/v1/jobs/{id}", get(ops::get))
        .route("/v1/models", get(meta::models))
        .route("/v1/analyze", post(analyze::analyze))
        .route("/v1/results/{id}", get(analyze::result))
        .route("/v1/results/{id}/bundle", get(analyze::bundle))
        .route("/v1/results/{id}/overlay.png", get(analyze::overlay))
        .route("/v1/results/{id}/input.png", get(analyze::input))
        .route("/v1/instances/{sop}", get(dicomweb::instance_status))
        .route("/v1/studies/{study}/instances", get(dicomweb::study_status))
        .route("/v1/exports", get(dicomweb::exports))
        .route(
            "/dicomweb/studies",
            get(dicomweb::search_studies).post(dicomweb::stow),
        )
        .route(
            "/dicomweb/studies/{study}",
            get(dicomweb::retrieve).post(dicomweb::stow_study),
        )
        .route("/dicomweb/studies/{study}/metadata", get(dicomweb::metadata))
        .route(
            "/dicomweb/studies/{study}/series",
            get(dicomweb::search_study_series),
        )
        .route(
            "/dicomweb/studies/{study}/instances",
            get(dicomweb::search_scoped_instances),
        )
        .route(
            "/dicomweb/studies/{study}/series/{series}",
            get(dicomweb::retrieve),
        )
        .route(
            "/dicomweb/studies/{study}/series/{series}/metadata",
            get(dicomweb::metadata),
        )
        .route(
            "/dicomweb/studies/{study}/series/{series}/instances",
            get(dicomweb::search_scoped_instances),
        )
        .route(
            "/dicomweb/studies/{study}/series/{series}/instances/{instance}",
            get(dicomweb::retrieve),
        )
        .route(
            "/dicomweb/studies/{study}/series/{series}/instances/{instance}/metadata",
            get(dicomweb::metadata),
        )
        .route(
            "/dicomweb/studies/{study}/series/{series}/instances/{instance}/rendered",
            get(dicomweb::rendered),
        )
        .route(
            "/dicomweb/studies/{study}/series/{series}/instances/{instance}/frames/{frame}/rendered",
            get(dicomweb::rendered),
        )
        .route("/dicomweb/series", get(dicomweb::search_series))
        .route("/dicomweb/instances", get(dicomweb::search_instances))
        .route(
            "/fhir",
            post(fhir::post_bundle).layer(fhir_limit),
        )
        .route("/fhir/metadata", get(fhir::metadata))
        .route("/fhir/_async/{id}", get(fhir::async_status))
        .route(
            "/fhir/{type}",
            get(fhir::search).post(fhir::create.layer(fhir_limit)),
        )
        .route(
            "/fhir/{type}/{id}",
            get(fhir::read)
                .put(fhir::update.layer(fhir_limit))
                .post(fhir::operation.layer(fhir_limit)),
        )
        .route("/fhir/{type}/{id}/_history/{vid}", get(fhir::vread))
        .route("/covid19/api/v1/healthcheck", get(legacy::healthcheck))
        .route("/covid19/api/v1/predict/", post(legacy::predict))
        .route(
            "/covid19/api/v1/predict/heatmap",
            post(legacy::predict_heatmap),
        )
        .route("/static/source/{file}", get(legacy::source_image))
        .route("/static/result/{file}", get(legacy::result_image))
        .layer(DefaultBodyLimit::max(limit))
        // every route: the authorization layer (inside the request log and metrics)
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authorize,
        ))
        .route_layer(axum::middleware::from_fn(ops::observe))
        .with_state(state)
}

/// The base URL for links: the configured public URL, or `http://<Host>` of the request when
/// that Host is a loopback name or on the `allowed_hosts` list (never an arbitrary Host, which
/// would let a client plant links), else `http://localhost`.
pub fn base_url(state: &AppState, headers: &HeaderMap) -> String {
    if let Some(u) = &state.public_url {
        return u.trim_end_matches('/').to_string();
    }
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| host_allowed(h, &state.allowed_hosts))
        .unwrap_or("localhost");
    format!("http://{host}")
}

/// Whether a Host header value (`name[:port]`) may appear in links.
fn host_allowed(host: &str, allowed: &[String]) -> bool {
    if !host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '-' | '[' | ']'))
    {
        return false;
    }
    let name = match host.rsplit_once(':') {
        Some((n, p))
            if p.chars().all(|c| c.is_ascii_digit()) && (n.ends_with(']') || !n.contains(':')) =>
        {
            n
        }
        _ => host,
    };
    let name = name.to_ascii_lowercase();
    matches!(name.as_str(), "localhost" | "127.0.0.1" | "[::1]")
        || allowed
            .iter()
            .any(|a| a.eq_ignore_ascii_case(host) || a.eq_ignore_ascii_case(&name))
}

#[cfg(test)]
mod tests {
    #[test]
    fn links_use_loopback_or_allowed_hosts_only() {
        let allowed = vec!["carina.hospital.org".to_string()];
        for ok in [
            "localhost",
            "localhost:8080",
            "127.0.0.1:9",
            "[::1]:80",
            "carina.hospital.org",
            "CARINA.hospital.org:443",
        ] {
            assert!(super::host_allowed(ok, &allowed), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "a/b",
            "x@y",
        ] {
            assert!(!super::host_allowed(bad, &allowed), "{bad}");
        }
    }
}
