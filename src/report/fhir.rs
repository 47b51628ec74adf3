//! FHIR R4 resources for one image analysis: DiagnosticReport (conclusion coded with the winning
//! label), one Observation per label probability, a Media with the heatmap overlay PNG, a Device
//! for the model and a Provenance, in a `collection` Bundle. Resources are assembled as JSON,
//! then parsed into fhirbolt's strict R4 model and serialised from it, so anything the R4 model
//! rejects (unknown element, wrong type, missing required field) fails here, not at the client.
//! Profiles: `fhir-profiles/`.

use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use fhirbolt::model::r4::Resource;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::imaging::DicomMeta;
use crate::inference::manifest::Label;

/// `meta.security` marking AI-asserted content.
pub const AIAST: (&str, &str, &str) = (
    "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "AIAST",
    "Artificial Intelligence asserted",
);
/// LOINC code of the report: XR Chest Views.
pub const REPORT_CODE: (&str, &str, &str) = ("http://loinc.org", "30745-4", "XR Chest Views");
/// Canonical base of Carina's profiles.
pub const PROFILE_BASE: &str = "https://carina.example.org/fhir/StructureDefinition/";

/// Everything the report says.
pub struct ReportInput<'a> {
    /// Analysis id (also the DiagnosticReport id).
    pub id: Uuid,
    /// When the analysis finished.
    pub issued: DateTime<Utc>,
    /// Model name and version.
    pub model: (&'a str, &'a str),
    /// Labels in output order.
    pub labels: &'a [Label],
    /// Probabilities in label order.
    pub probabilities: &'a [f32],
    /// Winning label index.
    pub class: usize,
    /// Heatmap method name.
    pub cam_method: &'a str,
    /// Overlay PNG bytes (inlined) and the absolute URL it is served at, if any.
    pub overlay_png: Option<(&'a [u8], Option<String>)>,
    /// DICOM identifiers, when the input was DICOM.
    pub dicom: Option<&'a DicomMeta>,
}

/// Errors from the fhirbolt round trip: a bug in a builder, never a client mistake.
#[derive(Debug, thiserror::Error)]
#[error("generated FHIR is not valid R4 ({0})")]
pub struct ReportError(pub String);

fn meta(profile: &str) -> Value {
    json!({
        "profile": [format!("{PROFILE_BASE}{profile}")],
        "security": [{"system": AIAST.0, "code": AIAST.1, "display": AIAST.2}]
    })
}

fn coding(l: &Label) -> Value {
    json!({"system": l.system, "code": l.code, "display": l.display})
}

/// Builds the collection Bundle.
///
/// # Errors
/// [`ReportError`] when the generated resources do not pass fhirbolt's R4 model.
pub fn analysis_bundle(r: &ReportInput) -> Result<Value, ReportError> {
    let when = r.issued.to_rfc3339_opts(SecondsFormat::Millis, true);
    let urn = |id: &Uuid| format!("urn:uuid:{id}");
    let (device_id, media_id, prov_id) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let obs_ids: Vec<Uuid> = r.labels.iter().map(|_| Uuid::new_v4()).collect();
    let subject = r
        .dicom
        .and_then(|d| d.patient_id.as_ref())
        .map(|pid| json!({"type": "Patient", "identifier": {"value": pid}}));
    let study = r.dicom.and_then(|d| d.study_uid.as_ref()).map(|uid| {
        json!({"type": "ImagingStudy", "identifier": {"system": "urn:dicom:uid", "value": format!("urn:oid:{uid}")}})
    });
    let device_ref =
        json!({"reference": urn(&device_id), "display": format!("{} {}", r.model.0, r.model.1)});
    let win = &r.labels[r.class];
    let p_win = r.probabilities[r.class];

    let mut report = json!({
        "resourceType": "DiagnosticReport",
        "id": r.id.to_string(),
        "meta": meta("CarinaAIDiagnosticReport"),
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD", "display": "Radiology"}]}],
        "code": {"coding": [{"system": REPORT_CODE.0, "code": REPORT_CODE.1, "display": REPORT_CODE.2}], "text": "Chest X-ray AI analysis"},
        "effectiveDateTime": when,
        "issued": when,
        "result": obs_ids.iter().map(|id| json!({"reference": urn(id)})).collect::<Vec<_>>(),
        "conclusion": format!(
            "AI suggestion: {} (probability {:.3}) by {} {}, heatmap by {}. Demo model, not for clinical use.",
            win.display, p_win, r.model.0, r.model.1, r.cam_method
        ),
        "conclusionCode": [{"coding": [coding(win)], "text": win.display}],
    });
    if r.overlay_png.is_some() {
        report["media"] = json!([{"comment": format!("{} heatmap overlay", r.cam_method), "link": {"reference": urn(&media_id)}}]);
    }
    if let Some(s) = &subject {
        report["subject"] = s.clone();
    }
    if let Some(s) = &study {
        report["imagingStudy"] = json!([s]);
    }

    let mut entries = vec![entry(&urn(&r.id), report)];
    for ((l, p), id) in r.labels.iter().zip(r.probabilities).zip(&obs_ids) {
        let mut obs = json!({
            "resourceType": "Observation",
            "id": id.to_string(),
            "meta": meta("CarinaAIProbabilityObservation"),
            "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "imaging", "display": "Imaging"}]}],
            "code": {"coding": [coding(l)], "text": format!("Probability of {}", l.display)},
            "effectiveDateTime": when,
            "issued": when,
            "valueQuantity": {"value": round6(*p), "unit": "probability", "system": "http://unitsofmeasure.org", "code": "1"},
            "device": device_ref.clone(),
        });
        if let Some(s) = &subject {
            obs["subject"] = s.clone();
        }
        entries.push(entry(&urn(id), obs));
    }
    if let Some((png, url)) = &r.overlay_png {
        let mut media = json!({
            "resourceType": "Media",
            "id": media_id.to_string(),
            "meta": meta("CarinaHeatmapMedia"),
            "status": "completed",
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/media-type", "code": "image", "display": "Image"}]},
            "createdDateTime": when,
            "issued": when,
            "device": device_ref.clone(),
            "content": {
                "contentType": "image/png",
                // the real data goes in after the R4 check (see below)
                "data": PLACEHOLDER,
                "size": png.len(),
                "title": format!("{} heatmap overlay for {}", r.cam_method, win.display)
            },
        });
        if let Some(u) = url {
            media["content"]["url"] = json!(u);
        }
        if let Some(s) = &subject {
            media["subject"] = s.clone();
        }
        entries.push(entry(&urn(&media_id), media));
    }
    entries.push(entry(
        &urn(&device_id),
        json!({
            "resourceType": "Device",
            "id": device_id.to_string(),
            "meta": {"profile": [format!("{PROFILE_BASE}CarinaModelDevice")]},
            "status": "active",
            "deviceName": [{"name": r.model.0, "type": "model-name"}],
            "type": {"text": "AI model (image classification)"},
            "version": [{"value": r.model.1}],
            "note": [{"text": "Demo model, not for clinical use."}]
        }),
    ));
    let mut targets = vec![json!({"reference": urn(&r.id)})];
    targets.extend(obs_ids.iter().map(|id| json!({"reference": urn(id)})));
    if r.overlay_png.is_some() {
        targets.push(json!({"reference": urn(&media_id)}));
    }
    let mut prov = json!({
        "resourceType": "Provenance",
        "id": prov_id.to_string(),
        "meta": {"profile": [format!("{PROFILE_BASE}CarinaAIProvenance")]},
        "target": targets,
        "recorded": when,
        "activity": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation", "code": "CREATE", "display": "create"}]},
        "agent": [{
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type", "code": "author", "display": "Author"}]},
            "who": device_ref
        }],
    });
    if let Some(s) = &study {
        prov["entity"] = json!([{"role": "source", "what": s}]);
    }
    entries.push(entry(&urn(&prov_id), prov));

    let bundle = json!({
        "resourceType": "Bundle",
        "id": Uuid::new_v4().to_string(),
        "type": "collection",
        "timestamp": when,
        "entry": entries,
    });
    let mut checked = through_fhirbolt(bundle)?;
    // The overlay's base64 (hundreds of KB) is ours and valid by construction; it skips the
    // R4 round trip (which copied it three times) and takes the placeholder's place.
    if let Some((png, _)) = &r.overlay_png {
        let data = checked["entry"]
            .as_array_mut()
            .and_then(|e| {
                e.iter_mut()
                    .find(|e| e["resource"]["resourceType"] == "Media")
            })
            .and_then(|e| e["resource"]["content"].get_mut("data"))
            .ok_or_else(|| ReportError("the Media lost its data in the R4 check".into()))?;
        *data = Value::String(base64::engine::general_purpose::STANDARD.encode(png));
    }
    Ok(checked)
}

/// Valid base64 standing in for the overlay during the R4 check.
const PLACEHOLDER: &str = "AA==";

fn entry(full_url: &str, resource: Value) -> Value {
    json!({"fullUrl": full_url, "resource": resource})
}

fn round6(p: f32) -> f64 {
    (f64::from(p) * 1e6).round() / 1e6
}

/// Parses `value` into fhirbolt's strict R4 model and serialises it back.
///
/// # Errors
/// [`ReportError`] with fhirbolt's message.
pub fn through_fhirbolt(value: Value) -> Result<Value, ReportError> {
    let typed: Resource =
        fhirbolt::json::from_json_value(value, None).map_err(|e| ReportError(e.to_string()))?;
    fhirbolt::json::to_json_value(typed, None).map_err(|e| ReportError(e.to_string()))
}
