//! ICU risk from lab results: Observations → features ([`features`]) → a prediction from a
//! backend (the local ONNX tabular model) → RiskAssessment + Provenance (+ the model's Device),
//! stored as FHIR resources. Triggered by stored Observations/Patients whose features change,
//! and on request by `RiskAssessment/$predict`.

pub mod features;
pub mod iris;

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use serde_json::Value;

use crate::fhir::search::{Cond, SearchQuery};
use crate::fhir::FhirError;
use crate::inference::TabularModel;
use crate::report::risk as report;
use crate::store::fhir::{Stored, Write};
use crate::store::Store;
use features::{FeatureSpec, Input, Source};

/// Risk settings (`[risk]` in `carina.toml`).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RiskSettings {
    /// Look-back window for lab values, in hours.
    pub window_hours: i64,
    /// Name of the tabular model (default: the first one).
    pub model: Option<String>,
    /// IRIS IntegratedML backend (`[risk.iris]`); the local model answers when it is absent,
    /// down or failing.
    pub iris: Option<iris::IrisSettings>,
}

impl Default for RiskSettings {
    fn default() -> Self {
        Self {
            window_hours: 72,
            model: None,
            iris: None,
        }
    }
}

/// The risk model and what it needs.
pub struct RiskService {
    model: Arc<TabularModel>,
    specs: Vec<FeatureSpec>,
    moderate: f64,
    high: f64,
    outcome: (String, String, String),
    window: Duration,
    iris: Option<iris::Iris>,
}

/// A prediction and how it was made.
pub struct Prediction {
    /// Probability of the outcome.
    pub probability: f64,
    /// Which backend answered, and why that one.
    pub backend: String,
}

impl RiskService {
    /// Builds the service for the configured (or first) tabular model.
    ///
    /// # Errors
    /// A message when the manifest's features, thresholds or outcome are unusable.
    pub fn new(
        models: &[Arc<TabularModel>],
        settings: &RiskSettings,
    ) -> Result<Option<Self>, String> {
        let model = match &settings.model {
            Some(name) => models
                .iter()
                .find(|m| &m.manifest.name == name)
                .ok_or_else(|| format!("[risk] model '{name}' is not loaded"))?,
            None => match models.first() {
                Some(m) => m,
                None => return Ok(None),
            },
        };
        let m = &model.manifest;
        let specs =
            FeatureSpec::from_manifest(&m.features).map_err(|e| format!("{}: {e}", m.name))?;
        let num = |t: &Option<toml::Value>, k: &str| {
            t.as_ref()
                .and_then(|t| t.get(k))
                .and_then(|v| v.as_float().or_else(|| v.as_integer().map(|i| i as f64)))
        };
        let text = |k: &str| {
            m.outcome
                .as_ref()
                .and_then(|t| t.get(k))
                .and_then(|v| v.as_str())
                .map(str::to_string)
        };
        Ok(Some(Self {
            model: model.clone(),
            specs,
            moderate: num(&m.thresholds, "moderate").unwrap_or(0.2),
            high: num(&m.thresholds, "high").unwrap_or(0.5),
            outcome: (
                text("system").unwrap_or_default(),
                text("code").unwrap_or_default(),
                text("display").unwrap_or_else(|| "outcome".into()),
            ),
            window: Duration::hours(settings.window_hours.max(1)),
            iris: settings
                .iris
                .clone()
                .map(|s| iris::Iris::new(s, std::env::var("CARINA_IRIS_PASSWORD").ok())),
        }))
    }

    /// The LOINC codes of the model's features.
    pub fn loinc_codes(&self) -> Vec<&str> {
        self.specs.iter().map(|s| s.loinc.as_str()).collect()
    }

    /// Qualitative risk for a probability, from the manifest thresholds.
    pub fn qualitative(&self, p: f64) -> &'static str {
        if p >= self.high {
            "high"
        } else if p >= self.moderate {
            "moderate"
        } else {
            "low"
        }
    }

    /// Asks IRIS when it is configured, else (or when IRIS fails) the local model; the
    /// answer says which backend answered and why.
    ///
    /// # Errors
    /// [`PredictError`]: the local model failed.
    pub async fn predict(&self, values: &[f32]) -> Result<Prediction, PredictError> {
        let why = match &self.iris {
            None => "IRIS IntegratedML is not configured".to_string(),
            Some(iris) => match iris.predict(values).await {
                Ok(p) => {
                    return Ok(Prediction {
                        probability: p,
                        backend: iris.describe(),
                    })
                }
                Err(e) => {
                    tracing::warn!("risk: falling back to the local model: {e}");
                    format!("fallback: {e}")
                }
            },
        };
        let model = self.model.clone();
        let v = values.to_vec();
        let p = tokio::task::spawn_blocking(move || model.predict(&v)).await??;
        Ok(Prediction {
            probability: f64::from(p),
            backend: format!(
                "local ONNX model {} {} ({why})",
                self.model.manifest.name, self.model.manifest.version
            ),
        })
    }

    fn device_id(&self) -> String {
        let m = &self.model.manifest;
        uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_OID,
            format!("carina-model:{}:{}", m.name, m.version).as_bytes(),
        )
        .to_string()
    }

    /// The model as its reports name it.
    fn report_model<'a>(&'a self, device_id: &'a str) -> report::RiskModel<'a> {
        let m = &self.model.manifest;
        report::RiskModel {
            name: &m.name,
            version: &m.version,
            description: &m.description,
            device_id,
            outcome: (&self.outcome.0, &self.outcome.1, &self.outcome.2),
        }
    }

    /// The Device resource for the model.
    pub fn device(&self) -> Value {
        let id = self.device_id();
        report::device(&self.report_model(&id))
    }

    /// Builds the RiskAssessment and its Provenance (ids chosen here).
    pub fn resources(
        &self,
        subject: Option<&str>,
        f: &features::Features,
        p: &Prediction,
        at: DateTime<Utc>,
    ) -> (Value, Value) {
        let basis = f
            .sources
            .iter()
            .filter_map(|s| match s {
                Source::Observation(Some(r)) => Some(r.as_str()),
                _ => None,
            })
            .collect();
        let inputs = self
            .specs
            .iter()
            .zip(&f.values)
            .zip(&f.sources)
            .map(|((s, v), src)| {
                let how = match src {
                    Source::Observation(_) => "observed",
                    Source::BirthDate => "from birth date",
                    Source::Imputed => "imputed",
                };
                format!("{} = {v} {} ({how})", s.name, s.unit)
            })
            .collect();
        let a = report::Assessment {
            subject,
            inputs,
            notes: &f.notes,
            basis,
            probability: p.probability,
            qualitative: self.qualitative(p.probability),
            backend: &p.backend,
            at,
        };
        let id = self.device_id();
        report::assessment(&self.report_model(&id), &a)
    }

    /// The stored Patient and feature Observations of `patient` (`Patient/123`).
    async fn gather(
        &self,
        store: &Store,
        patient: &str,
    ) -> Result<(Option<Value>, Vec<Stored>), FhirError> {
        let id = patient.trim_start_matches("Patient/");
        let p = store.fhir_read("Patient", id, None).await?.map(|s| s.body);
        let q = SearchQuery {
            clauses: vec![
                vec![Cond::Reference {
                    param: "patient",
                    value: patient.to_string(),
                }],
                self.loinc_codes()
                    .into_iter()
                    .map(|c| Cond::Token {
                        param: "code",
                        system: Some(Some(features::LOINC.into())),
                        code: Some(c.into()),
                    })
                    .collect(),
            ],
            count: crate::fhir::search::MAX_COUNT,
            ..Default::default()
        };
        let obs = store.fhir_search("Observation", &q).await?.hits;
        Ok((p, obs))
    }

    /// Assesses `patient` from stored data. With `only_if_changed`, nothing is written when
    /// the feature vector equals the one of the previous assessment.
    ///
    /// # Errors
    /// [`FhirError::Unprocessable`] when a required feature is missing; storage failures.
    pub async fn assess_patient(
        &self,
        store: &Store,
        patient: &str,
        only_if_changed: bool,
    ) -> Result<Option<Vec<Stored>>, FhirError> {
        let (p, obs) = self.gather(store, patient).await?;
        let inputs: Vec<Input<'_>> = obs
            .iter()
            .map(|s| Input {
                reference: Some(format!("Observation/{}", s.id)),
                resource: &s.body,
            })
            .collect();
        let now = Utc::now();
        let f = features::map(&self.specs, &inputs, p.as_ref(), now, self.window)
            .map_err(|e| FhirError::Unprocessable(e.to_string()))?;
        let key = serde_json::to_string(&(&f.values, self.model.manifest.name.as_str()))
            .map_err(|e| FhirError::Invalid(e.to_string()))?;
        if only_if_changed && store.risk_state(patient).await?.as_deref() == Some(key.as_str()) {
            return Ok(None);
        }
        let pred = self
            .predict(&f.values)
            .await
            .map_err(|e| FhirError::Unavailable(e.to_string()))?;
        let written = self.write(store, Some(patient), &f, &pred, now).await?;
        store.set_risk_state(patient, &key).await?;
        Ok(Some(written))
    }

    /// Stores the Device (once), the RiskAssessment and its Provenance.
    async fn write(
        &self,
        store: &Store,
        subject: Option<&str>,
        f: &features::Features,
        pred: &Prediction,
        now: DateTime<Utc>,
    ) -> Result<Vec<Stored>, FhirError> {
        let (ra, prov) = self.resources(subject, f, pred, now);
        let mut writes = Vec::new();
        if store
            .fhir_read("Device", &self.device_id(), None)
            .await?
            .is_none()
        {
            writes.push(write(self.device()));
        }
        writes.push(write(ra));
        writes.push(write(prov));
        Ok(store.fhir_write(writes).await?)
    }
}

fn write(body: Value) -> Write {
    Write {
        resource_type: body["resourceType"].as_str().unwrap_or("").to_string(),
        id: body["id"].as_str().unwrap_or("").to_string(),
        body,
        if_match: None,
        fresh: false,
    }
}

/// Patients whose features may have changed with these writes: subjects of feature
/// Observations, and Patients themselves (age comes from the birth date).
pub fn affected_patients(service: &RiskService, written: &[Stored]) -> Vec<String> {
    let codes = service.loinc_codes();
    let mut out: Vec<String> = Vec::new();
    for s in written {
        let p = match s.resource_type.as_str() {
            "Patient" => Some(format!("Patient/{}", s.id)),
            "Observation" => {
                let relevant = s
                    .body
                    .pointer("/code/coding")
                    .and_then(Value::as_array)
                    .is_some_and(|cs| {
                        cs.iter().any(|c| {
                            c.get("code")
                                .and_then(Value::as_str)
                                .is_some_and(|code| codes.contains(&code))
                        })
                    });
                relevant
                    .then(|| s.body.pointer("/subject/reference").and_then(Value::as_str))
                    .flatten()
                    .map(crate::fhir::index::normalise_reference)
                    .filter(|r| r.starts_with("Patient/"))
            }
            _ => None,
        };
        if let Some(p) = p {
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out
}

/// `POST /fhir/RiskAssessment/$predict`: a Parameters with `subject` (a stored Patient) or
/// with `resource` parts, or a Bundle of the Patient and Observations. Returns a collection
/// Bundle with the RiskAssessment, its Provenance and the model's Device; stored when the
/// subject is a stored Patient.
///
/// # Errors
/// [`FhirError`]: 400 for a body of the wrong shape, 422 when required features are missing.
pub async fn predict_operation(
    risk: Option<&RiskService>,
    store: &Store,
    body: Value,
    base: &str,
) -> Result<Value, FhirError> {
    let Some(service) = risk else {
        return Err(FhirError::NotSupported(
            "no tabular risk model is loaded".into(),
        ));
    };
    crate::fhir::validate::check_resource(&body, "")?;
    let rt = body["resourceType"].as_str().unwrap_or("");
    let mut resources: Vec<(Option<String>, Value)> = Vec::new();
    let mut subject: Option<String> = None;
    match rt {
        "Parameters" => {
            for p in body["parameter"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or(&[])
            {
                match p["name"].as_str() {
                    Some("subject") | Some("patient") => {
                        subject = p
                            .pointer("/valueReference/reference")
                            .and_then(Value::as_str)
                            .map(crate::fhir::index::normalise_reference);
                    }
                    Some("resource") => {
                        if let Some(r) = p.get("resource") {
                            let id = r["id"].as_str().map(|id| {
                                format!("{}/{id}", r["resourceType"].as_str().unwrap_or(""))
                            });
                            resources.push((id, r.clone()));
                        }
                    }
                    _ => {}
                }
            }
        }
        "Bundle" => {
            for e in body["entry"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
                if let Some(r) = e.get("resource") {
                    let reference = e["fullUrl"].as_str().map(str::to_string).or_else(|| {
                        r["id"]
                            .as_str()
                            .map(|id| format!("{}/{id}", r["resourceType"].as_str().unwrap_or("")))
                    });
                    resources.push((reference, r.clone()));
                }
            }
        }
        other => {
            return Err(FhirError::Invalid(format!(
                "$predict takes a Parameters or a Bundle, not a {other}"
            )))
        }
    }
    let stored = if resources.is_empty() {
        let Some(patient) = subject.filter(|s| s.starts_with("Patient/")) else {
            return Err(FhirError::Invalid(
                "Parameters: give `subject` (valueReference to Patient/id) or `resource` parts"
                    .into(),
            ));
        };
        if store
            .fhir_read("Patient", patient.trim_start_matches("Patient/"), None)
            .await?
            .is_none()
        {
            return Err(FhirError::Unprocessable(format!(
                "Parameters.parameter[subject]: {patient} is not stored here"
            )));
        }
        service
            .assess_patient(store, &patient, false)
            .await?
            .unwrap_or_default()
            .into_iter()
            .map(|s| s.body)
            .collect::<Vec<_>>()
    } else {
        let patient_entry = resources
            .iter()
            .find(|(_, r)| r["resourceType"] == "Patient");
        let patient = patient_entry.map(|(_, r)| r.clone());
        // the subject: as named, else the Patient given, else the Observations' subject
        let subject = subject
            .or_else(|| patient_entry.and_then(|(reference, _)| reference.clone()))
            .or_else(|| {
                resources
                    .iter()
                    .filter(|(_, r)| r["resourceType"] == "Observation")
                    .find_map(|(_, r)| r.pointer("/subject/reference").and_then(Value::as_str))
                    .map(str::to_string)
            });
        let inputs: Vec<Input<'_>> = resources
            .iter()
            .filter(|(_, r)| r["resourceType"] == "Observation")
            .map(|(reference, r)| Input {
                reference: reference.clone(),
                resource: r,
            })
            .collect();
        let now = Utc::now();
        let f = features::map(
            &service.specs,
            &inputs,
            patient.as_ref(),
            now,
            service.window,
        )
        .map_err(|e| FhirError::Unprocessable(e.to_string()))?;
        let pred = service
            .predict(&f.values)
            .await
            .map_err(|e| FhirError::Unavailable(e.to_string()))?;
        let (ra, prov) = service.resources(subject.as_deref(), &f, &pred, now);
        vec![ra, prov, service.device()]
    };
    Ok(report::collection(stored, base))
}

/// Why no ICU-risk prediction came back (IRIS, when configured, has been tried and its
/// failure logged first).
#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    /// The local model failed.
    #[error("the local risk model failed: {0}")]
    Model(#[from] crate::inference::engine::EngineError),
    /// Its blocking task ended without an answer.
    #[error("the local risk model's task ended: {0}")]
    Task(#[from] tokio::task::JoinError),
}
