//! Application state shared by handlers: handles to the model registry and the store, plus the
//! few HTTP settings handlers need. Built once in `main`, cloned per request.

use std::sync::Arc;

use crate::inference::Registry;
use crate::ingest::Ingest;
use crate::risk::{RiskService, RiskSettings};
use crate::store::fhir::Stored;
use crate::store::Store;

/// What handlers can reach.
#[derive(Clone)]
pub struct AppState {
    /// Loaded models.
    pub models: Arc<Registry>,
    /// Database and blobs.
    pub store: Store,
    /// Public base URL for links, when configured.
    pub public_url: Option<String>,
    /// Body limit in bytes.
    pub max_body: usize,
    /// Where received DICOM goes (store + analysis queue).
    pub ingest: Ingest,
    /// ICU-risk assessment (None when no tabular model is loaded).
    pub risk: Option<Arc<RiskService>>,
    /// How long a FHIR request waits for the analysis it triggers before answering (the
    /// analysis goes on after that).
    pub sync_wait: std::time::Duration,
}

/// What stored resources triggered, for the answer.
#[derive(Debug, Default)]
pub struct Triggered {
    /// `DiagnosticReport/<id>` of finished imaging analyses.
    pub reports: Vec<String>,
    /// Why an ImagingStudy gave no report (yet).
    pub notes: Vec<String>,
}

impl AppState {
    /// State with the default risk settings.
    ///
    /// # Errors
    /// When the risk model's manifest is unusable.
    pub fn new(
        models: Arc<Registry>,
        store: Store,
        public_url: Option<String>,
        max_body: usize,
        ingest: Ingest,
    ) -> Result<Self, String> {
        Self::with_risk(
            models,
            store,
            public_url,
            max_body,
            ingest,
            &RiskSettings::default(),
        )
    }

    /// State with explicit risk settings.
    ///
    /// # Errors
    /// When the risk model's manifest is unusable or the named model is not loaded.
    pub fn with_risk(
        models: Arc<Registry>,
        store: Store,
        public_url: Option<String>,
        max_body: usize,
        ingest: Ingest,
        risk: &RiskSettings,
    ) -> Result<Self, String> {
        let risk = RiskService::new(&models.tabular, risk)?.map(Arc::new);
        Ok(Self {
            models,
            store,
            public_url,
            max_body,
            ingest,
            risk,
            sync_wait: std::time::Duration::from_secs(60),
        })
    }

    /// Sets how long FHIR requests wait for the analyses they trigger.
    #[must_use]
    pub fn with_sync_wait(mut self, wait: std::time::Duration) -> Self {
        self.sync_wait = wait;
        self
    }

    /// Runs what stored FHIR resources trigger: a new risk assessment for each patient whose
    /// features changed. Failures are logged (without patient identifiers), never answered:
    /// the resources themselves are already stored.
    pub async fn fhir_written(&self, written: &[Stored]) -> Triggered {
        self.fhir_written_within(written, self.sync_wait).await
    }

    /// [`Self::fhir_written`] with an explicit wait for imaging analyses.
    pub async fn fhir_written_within(
        &self,
        written: &[Stored],
        wait: std::time::Duration,
    ) -> Triggered {
        let mut out = Triggered::default();
        let studies: Vec<&Stored> = written
            .iter()
            .filter(|s| s.resource_type == "ImagingStudy")
            .collect();
        // the other resources of the request, where an Endpoint or an image may be (built
        // only when there is an ImagingStudy to analyse)
        let bundle: Arc<std::collections::HashMap<String, serde_json::Value>> =
            Arc::new(if studies.is_empty() {
                Default::default()
            } else {
                written
                    .iter()
                    .map(|s| (format!("{}/{}", s.resource_type, s.id), s.body.clone()))
                    .collect()
            });
        for study in studies {
            let (state, study, bundle) = (self.clone(), study.clone(), bundle.clone());
            let mut job = tokio::spawn(async move {
                crate::trigger::analyse_imaging_study(&state, &study, &bundle).await
            });
            match tokio::time::timeout(wait, &mut job).await {
                Ok(Ok(Ok(stored))) => out.reports.extend(
                    stored
                        .iter()
                        .filter(|s| s.resource_type == "DiagnosticReport")
                        .map(|s| format!("DiagnosticReport/{}", s.id)),
                ),
                Ok(Ok(Err(why))) => {
                    tracing::info!("ImagingStudy without analysis: {why}");
                    out.notes.push(why);
                }
                Ok(Err(e)) => out.notes.push(format!("analysis task failed: {e}")),
                Err(_) => out.notes.push(format!(
                    "analysis still running after {} s; its DiagnosticReport will reference the ImagingStudy",
                    wait.as_secs()
                )),
            }
        }
        let Some(risk) = &self.risk else { return out };
        for patient in crate::risk::affected_patients(risk, written) {
            match risk.assess_patient(&self.store, &patient, true).await {
                Ok(Some(w)) => {
                    if let Some(ra) = w.iter().find(|s| s.resource_type == "RiskAssessment") {
                        tracing::info!(risk_assessment = %ra.id, "risk assessed");
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::info!("no risk assessment: {e}"),
            }
        }
        out
    }
}
