//! FHIR R4 resources of an ICU-risk assessment: the model's Device, the RiskAssessment with its
//! Provenance, and the collection Bundle `$predict` answers. Built from plain values; the risk
//! room computes them.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use super::fhir::{AIAST, PROFILE_BASE};
use crate::fhir_model::index::instant;

/// The model behind an assessment.
#[derive(Debug, Clone, Copy)]
pub struct RiskModel<'a> {
    /// Name.
    pub name: &'a str,
    /// Version.
    pub version: &'a str,
    /// What it predicts, from its manifest.
    pub description: &'a str,
    /// Id of its Device resource.
    pub device_id: &'a str,
    /// The predicted outcome's coding: system, code, display.
    pub outcome: (&'a str, &'a str, &'a str),
}

/// One assessment: whom it is about, what went in and what came out.
#[derive(Debug)]
pub struct Assessment<'a> {
    /// `Patient/<id>`, when the request named a patient.
    pub subject: Option<&'a str>,
    /// The inputs, as text (`name = value unit (how)`).
    pub inputs: Vec<String>,
    /// Notes on the inputs (missing values imputed, ...).
    pub notes: &'a [String],
    /// References of the Observations used.
    pub basis: Vec<&'a str>,
    /// Probability of the outcome.
    pub probability: f64,
    /// `high`, `moderate` or `low`.
    pub qualitative: &'a str,
    /// Which backend answered, and why.
    pub backend: &'a str,
    /// When.
    pub at: DateTime<Utc>,
}

/// The Device resource for the model.
pub fn device(m: &RiskModel) -> Value {
    json!({
        "resourceType": "Device",
        "id": m.device_id,
        "meta": {"profile": [format!("{PROFILE_BASE}CarinaModelDevice")]},
        "status": "active",
        "deviceName": [{"name": m.name, "type": "model-name"}],
        "type": {"text": "AI model"},
        "version": [{"value": m.version}],
        "note": [{"text": format!("Tabular risk model: {} A demo, not for clinical use.", m.description)}]
    })
}

/// The RiskAssessment and its Provenance (new ids).
pub fn assessment(m: &RiskModel, a: &Assessment) -> (Value, Value) {
    let (ra_id, prov_id) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let when = instant(a.at);
    let device = json!({"reference": format!("Device/{}", m.device_id), "display": format!("{} {}", m.name, m.version)});
    let basis: Vec<Value> = a.basis.iter().map(|r| json!({"reference": r})).collect();
    let q = a.qualitative;
    let (system, code, display) = m.outcome;
    let notes = if a.notes.is_empty() {
        String::new()
    } else {
        format!("Notes: {}. ", a.notes.join("; "))
    };
    let mut ra = json!({
        "resourceType": "RiskAssessment",
        "id": ra_id.to_string(),
        "meta": {
            "profile": [format!("{PROFILE_BASE}CarinaRiskAssessment")],
            "security": [{"system": AIAST.0, "code": AIAST.1, "display": AIAST.2}]
        },
        "status": "final",
        "method": {"coding": [{"system": "https://carina.example.org/fhir/CodeSystem/models", "code": m.name, "display": format!("{} {}", m.name, m.version)}], "text": format!("{} {}", m.name, m.version)},
        "code": {"text": format!("Risk of {display}")},
        "occurrenceDateTime": when,
        "performer": device,
        "prediction": [{
            "outcome": {"coding": [{"system": system, "code": code, "display": display}], "text": display},
            "probabilityDecimal": (a.probability * 1e6).round() / 1e6,
            "qualitativeRisk": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/risk-probability", "code": q, "display": match q { "high" => "High likelihood", "moderate" => "Moderate likelihood", _ => "Low likelihood" }}]}
        }],
        "note": [{"text": format!(
            "Inputs: {}. {notes}Backend: {}. Demo model, not for clinical use.",
            a.inputs.join("; "),
            a.backend
        )}]
    });
    // subject is 1..1 in R4: a display-only reference when the caller named no patient
    ra["subject"] = match a.subject {
        Some(s) => json!({"reference": s}),
        None => json!({"display": "patient not identified in the request"}),
    };
    if !basis.is_empty() {
        ra["basis"] = json!(basis);
    }
    let mut prov = json!({
        "resourceType": "Provenance",
        "id": prov_id.to_string(),
        "meta": {"profile": [format!("{PROFILE_BASE}CarinaAIProvenance")]},
        "target": [{"reference": format!("RiskAssessment/{ra_id}")}],
        "recorded": when,
        "activity": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation", "code": "CREATE", "display": "create"}]},
        "reason": [{"text": format!("backend: {}", a.backend)}],
        "agent": [{
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type", "code": "author", "display": "Author"}]},
            "who": device
        }],
    });
    if !basis.is_empty() {
        prov["entity"] = json!(basis
            .iter()
            .map(|b| json!({"role": "source", "what": b}))
            .collect::<Vec<_>>());
    }
    (ra, prov)
}

/// The collection Bundle `$predict` answers: `resources` with full URLs under `base`.
pub fn collection(resources: Vec<Value>, base: &str) -> Value {
    let entries: Vec<Value> = resources
        .into_iter()
        .map(|r| {
            let (t, id) = (
                r["resourceType"].as_str().unwrap_or(""),
                r["id"].as_str().unwrap_or(""),
            );
            json!({"fullUrl": format!("{base}/{t}/{id}"), "resource": r})
        })
        .collect();
    json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "type": "collection",
        "timestamp": instant(Utc::now()),
        "entry": entries,
    })
}
