//! Pixels in: decoding PNG, JPEG and DICOM Part 10 bytes into 8-bit images, with the DICOM
//! attributes that later stages need (UIDs for FHIR references). Knows nothing of models.

pub mod decode;
pub mod jpeg;

pub use decode::{decode, decode_frame, DecodeError, DecodedImage, DicomMeta, MediaType};
