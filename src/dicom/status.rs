//! DICOM status codes used by C-STORE responses and STOW-RS FailureReason (PS3.4 Annex B,
//! PS3.7 Annex C, PS3.18 Table 10.5.3-1).

/// Success.
pub const SUCCESS: u16 = 0x0000;
/// Refused: out of resources (disk full, store unavailable).
pub const OUT_OF_RESOURCES: u16 = 0xA700;
/// Error: data set does not match SOP Class (missing Type 1 attributes, wrong study).
pub const DATASET_MISMATCH: u16 = 0xA900;
/// Error: cannot understand (unparseable data).
pub const CANNOT_UNDERSTAND: u16 = 0xC000;
/// Failure: processing failure (an internal error).
pub const PROCESSING_FAILURE: u16 = 0x0110;
/// Failure: duplicate SOP instance (the same SOP Instance UID with other content).
pub const DUPLICATE_SOP_INSTANCE: u16 = 0x0111;
/// Refused: SOP Class not supported.
pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
/// Unrecognised operation (a DIMSE command Carina does not provide).
pub const UNRECOGNIZED_OPERATION: u16 = 0x0211;
