//! Fuzzes the entry point every received DICOM byte stream takes: the structural checks and
//! parse of `dicom::parse_instance` (STOW-RS, C-STORE, /v1/analyze), then the pixel decode of
//! `imaging::decode` and the raw decode of `imaging::decode::raw_frame`. Any panic that escapes,
//! abort, stack overflow or out-of-memory is a finding; errors are the expected outcome.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = carina::dicom::parse_instance(data);
    let _ = carina::imaging::decode(data, carina::imaging::MediaType::Dicom);
    let _ = carina::imaging::decode::raw_frame(data, 0);
});
