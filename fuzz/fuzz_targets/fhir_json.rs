//! Fuzzes the FHIR JSON entry point every FHIR request body takes: the pre-check (depth, array
//! lengths, value count), the JSON parse and fhirbolt's strict R4 model, for a resource and for
//! each entry of a Bundle. Any panic, abort, stack overflow, hang or out-of-memory is a finding;
//! errors are the expected outcome.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Carina catches fhirbolt's known panics (catch_unwind in check_resource); libfuzzer-sys's
    // panic hook would abort on those too. A quiet hook keeps them caught, while a panic that
    // escapes the target still aborts (libfuzzer-sys catches it and aborts): a finding.
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    if let Ok(v) = carina::fhir::validate::parse_resource(data) {
        for (i, e) in v["entry"].as_array().into_iter().flatten().enumerate() {
            let _ = carina::fhir::validate::check_resource(
                &e["resource"],
                &format!("Bundle.entry[{i}].resource"),
            );
        }
    }
});
