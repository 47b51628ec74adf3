//! DICOM as data: parsing and checking instances ([`parse`], [`frame_header`]), routing them
//! to models ([`routing`]), DICOM JSON ([`json`]), Secondary Capture results ([`sc`]), status
//! codes ([`status`]) and the DIMSE message codec ([`dimse`]) that the SCP
//! ([`crate::ingest::dimse`]) and the export SCU ([`crate::outbound::export`]) share. Nothing
//! here stores, listens or calls out.

pub mod dimse;
pub mod frame_header;
pub mod json;
pub mod parse;
pub mod routing;
pub mod sc;
pub mod status;

pub use parse::{parse_instance, InstanceIndex, ParseError, ParsedInstance};

/// Splits a media type (`multipart/related; type="application/dicom"; boundary=x`) into its
/// lower-case essence and its parameters (names lower-cased, quotes removed).
pub fn media_params(v: &str) -> (String, std::collections::HashMap<String, String>) {
    let mut parts = v.split(';');
    let essence = parts.next().unwrap_or("").trim().to_ascii_lowercase();
    let params = parts
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| {
            (
                k.trim().to_ascii_lowercase(),
                v.trim().trim_matches('"').to_string(),
            )
        })
        .collect();
    (essence, params)
}
