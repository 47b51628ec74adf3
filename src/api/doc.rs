//! The OpenAPI document, derived from the code: every operation comes from the
//! `#[utoipa::path]` attribute on its handler (the router registers routes from those same
//! attributes, see [`super::routes`]), every JSON body Carina builds from a Rust type has its
//! schema derived from that type. This module adds what belongs to the whole document: info,
//! tags, the bearer scheme, and the schemas of FHIR resources, which Carina builds as JSON
//! rather than as Rust types (their shape is HL7's, summarised here).

use std::sync::OnceLock;

use serde::Serialize;
use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, Schema, SchemaFormat, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::RefOr;
use utoipa::{Modify, OpenApi, ToResponse, ToSchema};

use super::error::LegacyDetail;
use crate::fhir::OperationOutcome;

/// Document-wide parts of the OpenAPI document; the paths are added by [`super::routes`].
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Carina — chest X-ray AI",
        description = "**Demo — not for clinical use.** Carina classifies chest X-rays (COVID-19 / normal / pneumonia) with an ONNX model and draws Grad-CAM heatmaps, takes DICOM (DICOMweb, DIMSE) and FHIR R4, and assesses ICU risk from lab Observations.\n\nThe FHIR paths (`/fhir/...`, `/v1/...`) answer FHIR R4 resources (`application/fhir+json`); their errors are FHIR `OperationOutcome` resources. The legacy 2020 demo API under `/covid19/api/v1/` keeps its original response shapes; its errors are `{\"detail\": \"...\"}`.",
    ),
    tags(
        (name = "analysis", description = "Analyse an image; results as FHIR and JSON."),
        (name = "models", description = "Loaded models."),
        (name = "ops", description = "Health and readiness probes, the job queue, metrics."),
        (name = "ui", description = "Web page, docs and this document."),
        (name = "legacy covid19 demo", description = "Compatibility with the 2020 COVID-19 detector demo API."),
        (name = "dicomweb", description = "DICOMweb (PS3.18): STOW-RS, QIDO-RS, WADO-RS and rendered images. Bodies are DICOM Part 10 / DICOM JSON."),
        (name = "dicom-status", description = "Where received DICOM instances and Carina's results are in the flow: analysis and export state."),
        (name = "FHIR R4", description = "FHIR R4 REST: read, vread, search, create, update, transaction/batch Bundles, `$predict`, async requests."),
        (name = "security", description = "SMART on FHIR discovery."),
    ),
    components(
        schemas(OperationOutcome, Bundle, Binary, LegacyDetail),
        responses(Problem, LegacyProblem)
    ),
    modifiers(&Bearer),
    security(("bearer" = []), ()),
)]
pub struct ApiDoc;

/// Adds the `bearer` security scheme the document-wide `security` names.
struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let scheme = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .bearer_format("JWT")
            .description(Some(
                "An access token from the configured OAuth2 / SMART issuer (see README, Security). Not needed when authorization is off.",
            ))
            .build();
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

/// The document as served at `/openapi.json`: [`ApiDoc`] plus every routed operation, built
/// once.
pub fn spec() -> &'static str {
    static SPEC: OnceLock<String> = OnceLock::new();
    SPEC.get_or_init(|| {
        super::routes()
            .into_openapi()
            .to_pretty_json()
            .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    })
}

/// Raw bytes: an image, a DICOM file, a multipart body (`type: string, format: binary`).
pub struct Binary;

impl utoipa::PartialSchema for Binary {
    fn schema() -> RefOr<Schema> {
        let format = SchemaFormat::KnownFormat(KnownFormat::Binary);
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(format))
            .description(Some("Raw bytes."))
            .into()
    }
}

impl ToSchema for Binary {}

/// An error: a FHIR OperationOutcome saying what is wrong (FHIR issue-type code and diagnostics).
#[derive(ToResponse)]
#[response(content_type = "application/fhir+json")]
pub struct Problem(pub OperationOutcome);

/// FHIR R4 Bundle. From `POST /v1/analyze`: type `collection` with a DiagnosticReport, one
/// Observation per class probability, a Media resource with the Grad-CAM overlay PNG, the
/// Device (model) and a Provenance.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Bundle {
    /// Always `Bundle`.
    resource_type: String,
    /// Id.
    id: Option<String>,
    /// `collection`, `searchset`, `transaction-response`, `batch-response`, ...
    r#type: String,
    /// When the Bundle was assembled.
    timestamp: Option<String>,
    /// The resources.
    entry: Vec<Entry>,
}

/// One entry of a [`Bundle`].
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    /// Absolute URL of the resource.
    full_url: Option<String>,
    /// A FHIR resource (`resourceType` and its elements).
    resource: Option<serde_json::Value>,
}

/// The legacy API's error, `{"detail": ...}`: 400 for invalid base64 or not an image, 404 for
/// no such file, 413 for a body too large.
#[derive(ToResponse)]
#[response(content_type = "application/json")]
pub struct LegacyProblem(pub LegacyDetail);
