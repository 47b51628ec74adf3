//! Application state shared by handlers: handles to the model registry and the store, plus the
//! few HTTP settings handlers need. Built once in `main`, cloned per request.

use std::sync::Arc;

use crate::auth::Authorizer;
use crate::inference::Registry;
use crate::ingest::Ingest;
use crate::outbound::Outbound;
use crate::risk::{RiskService, RiskSettings};
use crate::store::fhir::Stored;
use crate::store::{Job, JobState, NewJob, Store};
use crate::worker::JobError;

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
    /// Body limit of FHIR JSON requests in bytes (below the DICOM one).
    pub fhir_max_body: usize,
    /// Where received DICOM goes (store + analysis queue).
    pub ingest: Ingest,
    /// ICU-risk assessment (None when no tabular model is loaded).
    pub risk: Option<Arc<RiskService>>,
    /// How long a FHIR request waits for the analysis it triggers before answering (the
    /// analysis goes on after that).
    pub sync_wait: std::time::Duration,
    /// Token verification; `None` when authorization is off.
    pub auth: Option<Arc<Authorizer>>,
    /// The one outbound HTTP client.
    pub outbound: Outbound,
    /// Host header values links may be built from when `public_url` is not set (besides
    /// loopback names).
    pub allowed_hosts: Arc<Vec<String>>,
}

/// The FHIR JSON body limit unless configured: 32 MiB (a large Synthea patient is a few MiB).
pub const DEFAULT_FHIR_MAX_BODY: usize = 32 << 20;

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
        let outbound = Outbound::with_configured(&[])?;
        let risk = RiskService::new(&models.tabular, risk)?.map(Arc::new);
        let (hook_risk, max_attempts) = (risk.clone(), ingest.job_settings().max_attempts);
        let store = store.with_fhir_triggers(Arc::new(move |written: &[Stored]| {
            trigger_jobs(hook_risk.as_deref(), written, max_attempts)
        }));
        Ok(Self {
            models,
            store,
            public_url,
            max_body,
            ingest,
            risk,
            fhir_max_body: max_body.min(DEFAULT_FHIR_MAX_BODY),
            sync_wait: std::time::Duration::from_secs(60),
            auth: None,
            outbound,
            allowed_hosts: Arc::new(Vec::new()),
        })
    }

    /// Sets the FHIR JSON body limit.
    #[must_use]
    pub fn with_fhir_limit(mut self, bytes: usize) -> Self {
        self.fhir_max_body = bytes;
        self
    }

    /// Turns authorization on with `auth` (see [`crate::api::auth`]).
    #[must_use]
    pub fn with_auth(mut self, auth: Option<Arc<Authorizer>>) -> Self {
        self.auth = auth;
        self
    }

    /// Sets the outbound client (allow-list, CA bundle, caps) and the Host values links may
    /// use.
    #[must_use]
    pub fn with_outbound(mut self, outbound: Outbound, allowed_hosts: Vec<String>) -> Self {
        self.outbound = outbound;
        self.allowed_hosts = Arc::new(allowed_hosts);
        self
    }

    /// Sets how long FHIR requests wait for the analyses they trigger.
    #[must_use]
    pub fn with_sync_wait(mut self, wait: std::time::Duration) -> Self {
        self.sync_wait = wait;
        self
    }

    /// Waits (up to the configured sync wait) for the jobs that stored FHIR resources
    /// started, and says what they produced. The jobs were enqueued with the resources and
    /// go on after the wait.
    pub async fn fhir_written(&self, written: &[Stored]) -> Triggered {
        self.fhir_written_within(written, self.sync_wait).await
    }

    /// [`Self::fhir_written`] with an explicit wait.
    pub async fn fhir_written_within(
        &self,
        written: &[Stored],
        wait: std::time::Duration,
    ) -> Triggered {
        let ids = match self.triggered_jobs(written).await {
            Ok(ids) => ids,
            Err(e) => {
                return Triggered {
                    notes: vec![format!("cannot read the job queue: {e}")],
                    ..Triggered::default()
                }
            }
        };
        let deadline = tokio::time::Instant::now() + wait;
        let mut jobs = Vec::new();
        let mut notes = Vec::new();
        for id in ids {
            loop {
                match self.store.job(&id).await {
                    Ok(Some(job))
                        if job_finished(&job) || tokio::time::Instant::now() >= deadline =>
                    {
                        jobs.push(job);
                        break;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        notes.push(format!("cannot read the job queue: {e}"));
                        break;
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
        let mut out = summarise(&jobs, wait);
        out.notes.extend(notes);
        out
    }

    /// Ids of the jobs that writing `written` enqueued (the newest of each kind and subject
    /// [`trigger_jobs`] names), and wakes the workers.
    ///
    /// # Errors
    /// [`crate::store::StoreError`] when the queue cannot be read.
    pub async fn triggered_jobs(
        &self,
        written: &[Stored],
    ) -> Result<Vec<String>, crate::store::StoreError> {
        let mut ids = Vec::new();
        // only the kinds and subjects matter here, not the attempts
        for job in trigger_jobs(self.risk.as_deref(), written, 0) {
            let found = self
                .store
                .jobs(None, Some(&job.kind), Some(&job.subject), 1, 0)
                .await?;
            ids.extend(found.into_iter().map(|j| j.id));
        }
        if !ids.is_empty() {
            self.ingest.wake().notify_one();
        }
        Ok(ids)
    }

    /// The job workers of this process, running every kind of job through [`Self::run_job`].
    pub fn worker(&self) -> crate::worker::Worker {
        let app = self.clone();
        let handler: crate::worker::Handler = Arc::new(move |job| {
            let app = app.clone();
            Box::pin(async move { app.run_job(&job).await })
        });
        crate::worker::Worker::new(
            self.store.clone(),
            self.ingest.job_settings().clone(),
            handler,
            self.ingest.wake(),
        )
    }

    /// Runs one job from the queue (the server's worker handler).
    ///
    /// # Errors
    /// [`JobError`]: retried or dead as it says.
    pub async fn run_job(&self, job: &Job) -> Result<serde_json::Value, JobError> {
        match job.kind.as_str() {
            "analyse" => self.ingest.run_job(job).await,
            "imaging-study" => self.run_imaging_study(job).await,
            "risk" => {
                let Some(risk) = &self.risk else {
                    return Ok(serde_json::json!({"note": "no risk model is loaded"}));
                };
                match risk.assess_patient(&self.store, &job.subject, true).await {
                    Ok(Some(w)) => Ok(serde_json::json!({
                        "written": w.iter().map(|s| format!("{}/{}", s.resource_type, s.id)).collect::<Vec<_>>()
                    })),
                    Ok(None) => Ok(serde_json::json!({"note": "features unchanged"})),
                    Err(e) => Ok(serde_json::json!({"note": format!("no risk assessment: {e}")})),
                }
            }
            other => Err(JobError::Fatal(format!("unknown job kind '{other}'"))),
        }
    }

    async fn run_imaging_study(&self, job: &Job) -> Result<serde_json::Value, JobError> {
        let retry = |e: crate::store::StoreError| JobError::Retry(e.to_string());
        let (ty, id) = job
            .subject
            .split_once('/')
            .ok_or_else(|| JobError::Fatal(format!("bad subject {}", job.subject)))?;
        let Some(study) = self.store.fhir_read(ty, id, None).await.map_err(retry)? else {
            return Err(JobError::Fatal(format!("{} is not stored", job.subject)));
        };
        // the other resources of the request (an Endpoint, a Binary or Media with the image)
        let mut bundle = std::collections::HashMap::new();
        for r in job.payload["with"].as_array().into_iter().flatten() {
            let Some((t, i)) = r.as_str().and_then(|r| r.split_once('/')) else {
                continue;
            };
            if let Some(s) = self.store.fhir_read(t, i, None).await.map_err(retry)? {
                bundle.insert(format!("{t}/{i}"), s.body);
            }
        }
        match crate::trigger::analyse_imaging_study(self, &study, &bundle).await {
            Ok(stored) => Ok(serde_json::json!({
                "reports": stored
                    .iter()
                    .filter(|s| s.resource_type == "DiagnosticReport")
                    .map(|s| format!("DiagnosticReport/{}", s.id))
                    .collect::<Vec<_>>()
            })),
            Err(why) => {
                tracing::info!("ImagingStudy without analysis: {why}");
                Ok(serde_json::json!({ "reports": [], "note": why }))
            }
        }
    }
}

/// Whether a job has finished (done, or dead after its last attempt).
pub fn job_finished(j: &Job) -> bool {
    j.state == "done" || j.state == "dead"
}

/// What finished (or still running) triggered jobs produced: the DiagnosticReports of imaging
/// analyses, and notes on what gave none.
pub fn summarise(jobs: &[Job], waited: std::time::Duration) -> Triggered {
    let mut out = Triggered::default();
    for job in jobs {
        let result = job.result.clone().unwrap_or_default();
        match (JobState::parse(&job.state), job.kind.as_str()) {
            (Some(JobState::Done), "imaging-study") => {
                if let Some(r) = result["reports"].as_array() {
                    out.reports
                        .extend(r.iter().filter_map(|v| v.as_str().map(str::to_string)));
                }
                if let Some(n) = result["note"].as_str() {
                    out.notes.push(n.to_string());
                }
            }
            (Some(JobState::Done), _) => {}
            (Some(JobState::Dead), kind) => out.notes.push(format!(
                "{kind} job {} failed: {}",
                job.id,
                job.last_error.clone().unwrap_or_default()
            )),
            (_, "imaging-study") => out.notes.push(format!(
                "analysis still running after {} s (job {}); its DiagnosticReport will reference the ImagingStudy",
                waited.as_secs(),
                job.id
            )),
            _ => {}
        }
    }
    out
}

/// The jobs stored FHIR resources start: an analysis per ImagingStudy version (with the
/// request's other resources, where its Endpoint or image may be), a risk assessment per
/// patient whose features may have changed. The store enqueues them in the write's transaction.
fn trigger_jobs(risk: Option<&RiskService>, written: &[Stored], max_attempts: i64) -> Vec<NewJob> {
    let mut jobs = Vec::new();
    let studies: Vec<&Stored> = written
        .iter()
        .filter(|s| s.resource_type == "ImagingStudy")
        .collect();
    if !studies.is_empty() {
        let with: Vec<String> = written
            .iter()
            .filter(|s| s.resource_type != "ImagingStudy")
            .map(|s| format!("{}/{}", s.resource_type, s.id))
            .collect();
        for s in studies {
            jobs.push(NewJob {
                kind: "imaging-study".into(),
                subject: format!("ImagingStudy/{}", s.id),
                payload: serde_json::json!({ "version": s.version, "with": with }),
                dedupe: Some(format!("imaging-study:{}:{}", s.id, s.version)),
                max_attempts,
            });
        }
    }
    if let Some(r) = risk {
        for p in crate::risk::affected_patients(r, written) {
            jobs.push(NewJob {
                kind: "risk".into(),
                dedupe: Some(format!("pending:risk:{p}")),
                subject: p,
                payload: serde_json::json!({}),
                max_attempts,
            });
        }
    }
    jobs
}
