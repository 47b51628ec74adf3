//! The HTTP API (axum): routes, thin handlers, error mapping. Handlers extract, call one use
//! case ([`crate::analysis::pipeline`], [`crate::store`]) and map the answer; nothing here does maths or SQL.

pub mod analyze;
pub mod auth;
pub mod dicomweb;
pub mod doc;
pub mod error;
pub mod fhir;
pub mod legacy;
pub mod meta;
pub mod ops;
pub mod serve;

use axum::extract::DefaultBodyLimit;
use axum::http::HeaderMap;
use axum::Router;
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::AppState;

/// The whole router: [`routes`] with the body limits, the authorization layer on every route
/// (inside the request log and metrics), and the state.
pub fn router(state: AppState) -> Router {
    let fhir_limit = DefaultBodyLimit::max(state.fhir_max_body);
    let (router, _) = service_routes()
        .merge(fhir_routes().layer(fhir_limit))
        .layer(DefaultBodyLimit::max(state.max_body))
        .split_for_parts();
    router
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authorize,
        ))
        .route_layer(axum::middleware::from_fn(ops::observe))
        .with_state(state)
}

/// Every operation, each routed from its handler's `#[utoipa::path]` attribute: the OpenAPI
/// document ([`doc::spec`]) and the routing table are one list, so they cannot drift.
pub fn routes() -> OpenApiRouter<AppState> {
    service_routes().merge(fhir_routes())
}

/// Everything but the FHIR REST API (which has its own body limit).
fn service_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(doc::ApiDoc::openapi())
        // the page, its API docs and the spec
        .routes(routes!(meta::index))
        .routes(routes!(meta::docs))
        .routes(routes!(meta::docs_index))
        .routes(routes!(meta::docs_file))
        .routes(routes!(meta::openapi))
        // probes
        .routes(routes!(meta::healthz))
        .routes(routes!(meta::readyz))
        // SMART discovery
        .routes(routes!(auth::smart_configuration))
        .routes(routes!(auth::fhir_smart_configuration))
        // the job queue, metrics
        .routes(routes!(ops::list))
        .routes(routes!(ops::get))
        .routes(routes!(ops::metrics))
        // image analysis
        .routes(routes!(meta::models))
        .routes(routes!(analyze::analyze))
        // its results
        .routes(routes!(analyze::result))
        .routes(routes!(analyze::bundle))
        .routes(routes!(analyze::overlay))
        .routes(routes!(analyze::input))
        .merge(dicom_routes())
        // the 2020 demo's API
        .routes(routes!(legacy::healthcheck))
        .routes(routes!(legacy::predict))
        .routes(routes!(legacy::predict_heatmap))
        .routes(routes!(legacy::source_image))
        .routes(routes!(legacy::result_image))
}

/// DICOMweb (STOW-RS, QIDO-RS, WADO-RS) and where received instances are in the flow.
fn dicom_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        // where received instances are in the flow
        .routes(routes!(dicomweb::instance_status))
        .routes(routes!(dicomweb::study_status))
        .routes(routes!(dicomweb::exports))
        // studies: search and store, retrieve and store into one, its metadata, series, instances
        .routes(routes!(dicomweb::search_studies, dicomweb::stow))
        .routes(routes!(dicomweb::retrieve_study, dicomweb::stow_study))
        .routes(routes!(dicomweb::study_metadata))
        .routes(routes!(dicomweb::search_study_series))
        .routes(routes!(dicomweb::search_study_instances))
        // series
        .routes(routes!(dicomweb::search_series))
        .routes(routes!(dicomweb::retrieve_series))
        .routes(routes!(dicomweb::series_metadata))
        .routes(routes!(dicomweb::search_series_instances))
        // instances and frames
        .routes(routes!(dicomweb::search_instances))
        .routes(routes!(dicomweb::retrieve_instance))
        .routes(routes!(dicomweb::instance_metadata))
        .routes(routes!(dicomweb::rendered_instance))
        .routes(routes!(dicomweb::rendered_frame))
}

/// The FHIR R4 REST API.
fn fhir_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(fhir::post_bundle))
        .routes(routes!(fhir::metadata))
        .routes(routes!(fhir::async_status))
        // type and instance interactions
        .routes(routes!(fhir::search, fhir::create))
        .routes(routes!(fhir::read, fhir::update, fhir::operation))
        .routes(routes!(fhir::vread))
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
