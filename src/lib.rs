//! Carina puts AI models into hospital workflows. Data flows down this list:
//!
//! - [`config`]: settings from defaults, `carina.toml`, `CARINA_*` and flags.
//! - [`cli`]: the `carina serve | predict | models` commands.
//! - [`app`]: state shared by HTTP handlers.
//! - [`auth`]: the trust boundary: bearer JWTs from the configured issuer → SMART scopes.
//! - [`api`]: HTTP routes (the `/v1` API, the 2020 demo's `/covid19` API, web page, docs).
//! - [`pipeline`]: the image analysis use case (decode → infer → Grad-CAM → overlay → FHIR).
//! - [`dicom`]: DICOM parsing, routing, DICOM JSON, Secondary Capture results, DIMSE SCP.
//! - [`ingest`]: the one path every received instance takes: store, then queue its analysis.
//! - [`imaging`]: PNG/JPEG/DICOM bytes → 8-bit images.
//! - [`inference`]: model manifests, ONNX Runtime sessions and batching, preprocessing, Grad-CAM.
//! - [`render`]: overlay PNGs and `.npy` dumps.
//! - [`report`]: FHIR R4 resources of an image analysis (fhirbolt).
//! - [`fhir`]: the FHIR R4 server: validation, REST interactions, Bundles, search, capability.
//! - [`risk`]: lab Observations → features → ICU-risk prediction → RiskAssessment.
//! - [`trigger`]: what a stored ImagingStudy starts: finding its pixels, analysing them.
//! - [`worker`]: job workers: leased jobs from the database queue, retries, dead letters.
//! - [`audit`]: the audit trail: AuditEvents (DICOM/IHE ATNA codes), the acting task's actor, syslog
//!   (below the request handlers and the worker, beside the store that writes them with each change).
//! - [`store`]: SQL (sqlx, SQLite or PostgreSQL) and blob files.
//! - [`outbound`]: the one outbound HTTP client: allow-list, address guard, size caps, deadlines.
//! - [`metrics`]: Prometheus metrics.

pub mod analysis;
pub mod api;
pub mod app;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod config;
pub mod dicom;
pub mod fhir;
pub mod imaging;
pub mod inference;
pub mod ingest;
pub mod jobs;
pub mod metrics;
pub mod outbound;
pub mod render;
pub mod report;
pub mod risk;
pub mod store;
