//! The jobs room: what work a write starts ([`Jobs::plan`]), the worker loop that claims it
//! ([`worker`]), the one dispatch from a job's kind to the stage that does it ([`Jobs::run`]),
//! and waiting for jobs on behalf of a request ([`Jobs::wait`]). Nothing else dispatches work.
//! The SQL of the queue is in [`crate::store`]; kinds and states are [`JobKind`] and [`JobState`].

pub mod study;
pub mod worker;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::Notify;

use crate::analysis::pipeline::Analysis;
use crate::analysis::{Analyser, ProcessError};
use crate::ingest::{Accepted, Ingest};
use crate::outbound::Outbound;
use crate::risk::RiskService;
use crate::store::fhir::Stored;
pub use crate::store::{Job, JobKind, JobState, NewJob};
use crate::store::{Source, Store, StoreError};
pub use worker::{default_owner, record, Handler, JobSettings, Worker};

/// Why a job attempt failed. [`JobError::retry`] says whether another attempt may succeed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The database or the blob folders failed: retried.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The attempt ran past its deadline (a hung fetch, a stuck peer): retried.
    #[error("the attempt ran past its deadline of {} s", .0.as_secs())]
    Deadline(Duration),
    /// The analysis failed; the instance's state says why. Retried only for storage trouble.
    #[error(transparent)]
    Analysis(#[from] ProcessError),
    /// The subject is not `Type/id`: dead at once.
    #[error("bad subject '{0}'")]
    BadSubject(String),
    /// The subject is no longer stored: dead at once.
    #[error("{0} is not stored")]
    Missing(String),
}

impl JobError {
    /// Whether another attempt may succeed.
    pub fn retry(&self) -> bool {
        match self {
            Self::Store(_) | Self::Deadline(_) => true,
            Self::Analysis(e) => e.is_retryable(),
            Self::BadSubject(_) | Self::Missing(_) => false,
        }
    }

    /// This error as the queue records it.
    pub fn failure(&self) -> Failure<'_> {
        Failure {
            why: self,
            retry: self.retry(),
        }
    }
}

/// A failed attempt as the queue records it: why, and whether another attempt may succeed.
#[derive(Debug, Clone, Copy)]
pub struct Failure<'a> {
    /// The error (its text is stored as the job's `last_error`).
    pub why: &'a (dyn std::error::Error + Send + Sync),
    /// Queued again after a backoff (while attempts remain) rather than dead.
    pub retry: bool,
}

/// Why an uploaded image was not analysed.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// A DICOM upload was refused by ingest.
    #[error(transparent)]
    Ingest(#[from] crate::ingest::IngestError),
    /// A DICOM upload's analysis failed.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// A PNG or JPEG upload's analysis failed.
    #[error(transparent)]
    Analyse(#[from] crate::analysis::pipeline::AnalyseError),
    /// Its result could not be stored.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the jobs a request started produced, for its answer.
#[derive(Debug, Default)]
pub struct Triggered {
    /// `DiagnosticReport/<id>` of finished imaging analyses.
    pub reports: Vec<String>,
    /// Why an ImagingStudy gave no report (yet).
    pub notes: Vec<String>,
}

/// Where an asynchronous FHIR request (`Prefer: respond-async`) stands.
#[derive(Debug)]
pub enum AsyncProgress {
    /// Its jobs are still running.
    Running {
        /// Jobs finished.
        finished: usize,
        /// Jobs started.
        total: usize,
    },
    /// The server restarted while analyses of a version before the job queue ran in memory.
    Interrupted,
    /// Finished: the request's row with its reports and notes.
    Done(Box<crate::store::fhir::AsyncJob>),
}

/// The jobs room's handle: plans, runs and waits for jobs. Cheap to clone.
#[derive(Clone)]
pub struct Jobs {
    store: Store,
    ingest: Ingest,
    analyser: Analyser,
    risk: Option<Arc<RiskService>>,
    outbound: Outbound,
    settings: Arc<JobSettings>,
    wake: Arc<Notify>,
}

impl Jobs {
    /// The jobs of `store`'s queue, run with `ingest` (DICOM), `risk` (when a tabular model is
    /// loaded) and `outbound` (WADO-RS fetches). `ingest` shares the wake-up and settings.
    pub fn new(
        store: Store,
        ingest: Ingest,
        analyser: Analyser,
        risk: Option<Arc<RiskService>>,
        outbound: Outbound,
        settings: JobSettings,
    ) -> Self {
        Self {
            analyser,
            settings: Arc::new(settings),
            wake: ingest.wake(),
            store,
            ingest,
            risk,
            outbound,
        }
    }

    /// The analysis stage the jobs run.
    pub fn analyser(&self) -> &Analyser {
        &self.analyser
    }

    /// How jobs are leased and retried.
    pub fn settings(&self) -> &JobSettings {
        &self.settings
    }

    /// The jobs stored FHIR resources start: an analysis per ImagingStudy version (with the
    /// request's other resources, where its Endpoint or image may be), a risk assessment per
    /// patient whose features may have changed. The store enqueues them in the write's
    /// transaction.
    pub fn plan(&self, written: &[Stored]) -> Vec<NewJob> {
        let max_attempts = self.settings.max_attempts;
        let mut jobs = Vec::new();
        let studies = written.iter().filter(|s| s.resource_type == "ImagingStudy");
        let with: Vec<String> = written
            .iter()
            .filter(|s| s.resource_type != "ImagingStudy")
            .map(|s| format!("{}/{}", s.resource_type, s.id))
            .collect();
        for s in studies {
            jobs.push(NewJob {
                kind: JobKind::ImagingStudy,
                subject: format!("ImagingStudy/{}", s.id),
                payload: json!({ "version": s.version, "with": with }),
                dedupe: Some(format!("imaging-study:{}:{}", s.id, s.version)),
                max_attempts,
            });
        }
        if let Some(r) = &self.risk {
            for p in crate::risk::affected_patients(r, written) {
                jobs.push(NewJob {
                    kind: JobKind::Risk,
                    dedupe: Some(format!("pending:risk:{p}")),
                    subject: p,
                    payload: json!({}),
                    max_attempts,
                });
            }
        }
        jobs
    }

    /// Wakes this process's idle workers (jobs were enqueued).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Waits up to `wait` for jobs `ids` to finish and says what they produced. The jobs go on
    /// after the wait.
    pub async fn wait(&self, ids: &[String], wait: Duration) -> Triggered {
        if !ids.is_empty() {
            self.wake();
        }
        let deadline = tokio::time::Instant::now() + wait;
        let mut jobs = Vec::new();
        let mut notes = Vec::new();
        for id in ids {
            loop {
                match self.store.job(id).await {
                    Ok(Some(job)) if finished(&job) || tokio::time::Instant::now() >= deadline => {
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
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let mut out = summarise(&jobs, wait);
        out.notes.extend(notes);
        out
    }

    /// Where asynchronous request `row` stands; when its jobs have all finished, their reports
    /// and notes are recorded with it (once).
    ///
    /// # Errors
    /// [`StoreError`] when the queue cannot be read or the result written.
    pub async fn async_progress(
        &self,
        mut row: crate::store::fhir::AsyncJob,
    ) -> Result<AsyncProgress, StoreError> {
        match row.state.as_str() {
            "interrupted" => return Ok(AsyncProgress::Interrupted),
            "running" => {}
            _ => return Ok(AsyncProgress::Done(Box::new(row))),
        }
        let mut jobs = Vec::new();
        for j in &row.jobs {
            jobs.extend(self.store.job(j).await?);
        }
        let done = jobs.iter().filter(|j| finished(j)).count();
        if done < jobs.len() {
            let total = jobs.len();
            return Ok(AsyncProgress::Running {
                finished: done,
                total,
            });
        }
        let t = summarise(&jobs, Duration::ZERO);
        self.store
            .async_finish(&row.id, &t.reports, &t.notes)
            .await?;
        (row.reports, row.notes) = (t.reports, t.notes);
        Ok(AsyncProgress::Done(Box::new(row)))
    }

    /// The worker loops of this process, running every kind of job through [`Self::run`].
    pub fn worker(&self) -> Worker {
        let jobs = self.clone();
        let handler: Handler = Arc::new(move |job| {
            let jobs = jobs.clone();
            Box::pin(async move { jobs.run(&job).await })
        });
        Worker::new(
            self.store.clone(),
            (*self.settings).clone(),
            handler,
            self.wake.clone(),
        )
    }

    /// Runs one job: the one dispatch from a kind to the stage that does it.
    ///
    /// # Errors
    /// [`JobError`]: retried or dead as [`JobError::retry`] says.
    pub async fn run(&self, job: &Job) -> Result<Value, JobError> {
        match job.kind {
            JobKind::Analyse => {
                let model = job.payload.get("model").and_then(Value::as_str);
                analysis_result(self.analyser.process(&job.subject, model).await)
            }
            JobKind::ImagingStudy => self.run_imaging_study(job).await,
            JobKind::Risk => Ok(self.run_risk(&job.subject).await),
        }
    }

    /// Analyses an instance stored by [`Ingest::receive_claimed`] now (its job is leased to
    /// this process) and records the job's outcome like a worker would.
    ///
    /// # Errors
    /// As [`Analyser::process`].
    pub async fn analyse_claimed(
        &self,
        accepted: &Accepted,
        model: Option<&str>,
    ) -> Result<Analysis, ProcessError> {
        let result = self
            .analyser
            .process(&accepted.index.sop_instance_uid, model)
            .await;
        if let Some(job) = &accepted.job {
            let outcome = match &result {
                Ok(a) => Ok(analysis_summary(a)),
                Err(ProcessError::Skipped(why)) => Ok(json!({ "skipped": why })),
                Err(e) => Err(Failure {
                    why: e,
                    retry: e.is_retryable(),
                }),
            };
            let s = &self.settings;
            if let Err(e) = record(&self.store, job, &s.owner, outcome, s.backoff).await {
                tracing::warn!(error = %e, "cannot record the analysis job outcome");
            }
        }
        result
    }

    /// Analyses an uploaded image now with `model`. DICOM takes the one ingest path (stored,
    /// idempotent by SOP Instance UID, analysed under its claimed job, Secondary Capture
    /// stored with it); PNG and JPEG go straight through the pipeline and their result is
    /// stored. `base` makes the overlay link absolute.
    ///
    /// # Errors
    /// [`UploadError`].
    pub async fn analyse_upload(
        &self,
        body: bytes::Bytes,
        media: crate::imaging::MediaType,
        model: Arc<crate::inference::ImageModel>,
        base: &str,
    ) -> Result<Analysis, UploadError> {
        if media == crate::imaging::MediaType::Dicom {
            let accepted = self.ingest.receive_claimed(body, Source::Api).await?;
            let name = &model.manifest.name;
            return Ok(self.analyse_claimed(&accepted, Some(name)).await?);
        }
        let overlay = format!("{base}/v1/results");
        let a = crate::analysis::pipeline::analyse(model, body, media, move |id| {
            Some(format!("{overlay}/{id}/overlay.png"))
        })
        .await?;
        self.store.save_analysis(&a.record(), "api").await?;
        Ok(a)
    }

    async fn run_risk(&self, subject: &str) -> Value {
        let Some(risk) = &self.risk else {
            return json!({"note": "no risk model is loaded"});
        };
        match risk.assess_patient(&self.store, subject, true).await {
            Ok(Some(w)) => json!({
                "written": w.iter().map(|s| format!("{}/{}", s.resource_type, s.id)).collect::<Vec<_>>()
            }),
            Ok(None) => json!({"note": "features unchanged"}),
            Err(e) => json!({"note": format!("no risk assessment: {e}")}),
        }
    }

    async fn run_imaging_study(&self, job: &Job) -> Result<Value, JobError> {
        let (ty, id) = job
            .subject
            .split_once('/')
            .ok_or_else(|| JobError::BadSubject(job.subject.clone()))?;
        let study = self
            .store
            .fhir_read(ty, id, None)
            .await?
            .ok_or_else(|| JobError::Missing(job.subject.clone()))?;
        // the other resources of the request (an Endpoint, a Binary or Media with the image)
        let mut bundle = HashMap::new();
        for r in job.payload["with"].as_array().into_iter().flatten() {
            let Some((t, i)) = r.as_str().and_then(|r| r.split_once('/')) else {
                continue;
            };
            if let Some(s) = self.store.fhir_read(t, i, None).await? {
                bundle.insert(format!("{t}/{i}"), s.body);
            }
        }
        match study::analyse_imaging_study(self, &study, &bundle).await {
            Ok(stored) => Ok(json!({
                "reports": stored
                    .iter()
                    .filter(|s| s.resource_type == "DiagnosticReport")
                    .map(|s| format!("DiagnosticReport/{}", s.id))
                    .collect::<Vec<_>>()
            })),
            Err(why) => {
                tracing::info!("ImagingStudy without analysis: {why}");
                Ok(json!({ "reports": [], "note": why.to_string() }))
            }
        }
    }
}

/// An analysis as a job outcome: done (analysed, or skipped with the reason), or failed (retried
/// after storage trouble, dead when the analysis itself failed; the instance's state says why).
fn analysis_result(result: Result<Analysis, ProcessError>) -> Result<Value, JobError> {
    match result {
        Ok(a) => Ok(analysis_summary(&a)),
        Err(ProcessError::Skipped(why)) => Ok(json!({ "skipped": why })),
        Err(e) => Err(JobError::Analysis(e)),
    }
}

fn analysis_summary(a: &Analysis) -> Value {
    json!({
        "analysis": a.id.to_string(),
        "model": a.model.manifest.name,
        "label": a.label_key(),
    })
}

/// Whether a job has finished (done, or dead after its last attempt).
pub fn finished(j: &Job) -> bool {
    matches!(j.state, JobState::Done | JobState::Dead)
}

/// What finished (or still running) triggered jobs produced: the DiagnosticReports of imaging
/// analyses, and notes on what gave none.
pub fn summarise(jobs: &[Job], waited: Duration) -> Triggered {
    let mut out = Triggered::default();
    for job in jobs {
        let result = job.result.clone().unwrap_or_default();
        match (job.state, job.kind) {
            (JobState::Done, JobKind::ImagingStudy) => {
                if let Some(r) = result["reports"].as_array() {
                    out.reports
                        .extend(r.iter().filter_map(|v| v.as_str().map(str::to_string)));
                }
                if let Some(n) = result["note"].as_str() {
                    out.notes.push(n.to_string());
                }
            }
            (JobState::Done, _) => {}
            (JobState::Dead, kind) => out.notes.push(format!(
                "{kind} job {} failed: {}",
                job.id,
                job.last_error.clone().unwrap_or_default()
            )),
            (_, JobKind::ImagingStudy) => out.notes.push(format!(
                "analysis still running after {} s (job {}); its DiagnosticReport will reference the ImagingStudy",
                waited.as_secs(),
                job.id
            )),
            _ => {}
        }
    }
    out
}

impl crate::store::fhir::Planner for Jobs {
    fn plan(&self, written: &[Stored]) -> Vec<NewJob> {
        Jobs::plan(self, written)
    }
}
