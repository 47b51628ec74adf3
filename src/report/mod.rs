//! Results out as FHIR R4: the DiagnosticReport bundle for an image analysis, the
//! RiskAssessment of an ICU-risk prediction. Builders take domain values and return resources;
//! they do no I/O.

pub mod fhir;
pub mod request;
pub mod risk;

pub use fhir::{analysis_bundle, ReportInput};
