//! Carina puts AI models into hospital workflows. Data flows down this list; a module imports
//! only modules below it. `scripts/structure.py` checks this order.
//!
//! - [`cli`]: the `carina serve | predict | models` commands (`main` is settings → telemetry
//!   → models → [`app::App::build`] → run).
//! - [`api`]: HTTP routes and thin handlers, the authorization middleware, error mapping, the
//!   HTTP server loop.
//! - [`app`]: [`app::App::build`], the one way Carina is wired (main and the tests' `TestApp`),
//!   and the handles handlers reach.
//! - [`config`]: settings from defaults, `carina.toml`, `CARINA_*` and flags; each room gets its
//!   own options from them.
//! - [`auth`]: the trust boundary: bearer JWTs from the configured issuer → SMART scopes.
//! - [`jobs`]: the jobs room: what writes start, the worker loop, the one dispatch from a job's
//!   kind to its stage, waiting for jobs; the ImagingStudy job.
//! - [`ingest`]: the one receive → check → store durably → enqueue path for DICOM, whatever the
//!   transport (the DIMSE listener is [`ingest::dimse`]).
//! - [`risk`]: lab Observations → features → ICU-risk prediction → RiskAssessment.
//! - [`analysis`]: routing → the image pipeline (decode, infer, Grad-CAM) → report → Secondary
//!   Capture → export.
//! - [`report`]: FHIR R4 resources of an image analysis (fhirbolt).
//! - [`render`]: overlay PNGs and `.npy` dumps.
//! - [`imaging`]: PNG/JPEG/DICOM bytes → 8-bit images.
//! - [`inference`]: model manifests, ONNX Runtime sessions and batching, preprocessing, Grad-CAM.
//! - [`outbound`]: the one outbound HTTP client (allow-list, address guard, size caps,
//!   deadlines), and the clients on it: PACS export (DIMSE and STOW-RS), WADO-RS retrieve.
//! - [`fhir`]: the FHIR R4 server's rules: validation, REST interactions, Bundles, search,
//!   compartments, capability.
//! - [`store`]: all SQL (sqlx, SQLite or PostgreSQL) and blob files: instances, FHIR resources,
//!   analyses, the job queue and its clock; never calls up.
//! - [`fhir_model`]: FHIR R4 as data: resource types, search parameters and the index rows of
//!   a resource, reference and date normalisation (the store indexes with it).
//! - [`audit`]: the audit trail: AuditEvents (DICOM/IHE ATNA codes), the acting task's actor,
//!   syslog (the store writes them with each change).
//! - [`dicom`]: DICOM as data: parsing, routing rules, DICOM JSON, Secondary Capture, the DIMSE
//!   codec, status codes.
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
pub mod fhir_model;
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
