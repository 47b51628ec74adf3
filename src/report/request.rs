//! FHIR answers about requests (not about patients): the batch-response of an asynchronous
//! request, with the request's own answer first and then each DiagnosticReport it produced.

use serde_json::{json, Value};

use crate::store::fhir::{AsyncJob, Stored};

/// The batch-response Bundle of a finished asynchronous request `job`; `reports` are the stored
/// DiagnosticReports it produced, `base` the FHIR base URL.
pub fn async_batch_response(job: &AsyncJob, reports: &[Stored], base: &str) -> Value {
    let status = if job.status == 201 { "Created" } else { "OK" };
    let mut first = json!({
        "response": {"status": format!("{} {status}", job.status)},
        "resource": job.body,
    });
    if let Some(l) = &job.location {
        first["response"]["location"] = Value::String(l.clone());
    }
    if !job.notes.is_empty() {
        first["response"]["outcome"] =
            crate::fhir::outcome("warning", "incomplete", &job.notes.join("; "));
    }
    let mut entries = vec![first];
    for s in reports {
        let report = format!("{}/{}", s.resource_type, s.id);
        entries.push(json!({
            "fullUrl": format!("{base}/{report}"),
            "response": {"status": "200 OK", "location": format!("{report}/_history/{}", s.version)},
            "resource": s.body,
        }));
    }
    json!({
        "resourceType": "Bundle",
        "id": job.id,
        "type": "batch-response",
        "entry": entries,
    })
}
