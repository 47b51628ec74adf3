//! The DICOM node: parsing received instances ([`parse`]), routing them to models
//! ([`routing`]), DICOM JSON ([`json`]), Secondary Capture results ([`sc`]) and the DIMSE
//! C-ECHO/C-STORE service class provider ([`dimse`]) and result export to PACS
//! destinations ([`export`]). Everything received, whatever the
//! transport, goes through [`crate::ingest`].

pub mod dimse;
pub mod export;
pub mod json;
pub mod parse;
pub mod routing;
pub mod sc;
pub mod status;

pub use parse::{parse_instance, InstanceIndex, ParseError, ParsedInstance};
