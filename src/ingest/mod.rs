//! The one way DICOM enters Carina, whatever the transport (STOW-RS, DIMSE C-STORE,
//! `/v1/analyze`): parse and check → refuse when storage is short → write the file durably →
//! commit its row with its analysis state → wake the analysis worker. Success is answered only
//! after the row is committed, so an acknowledged instance survives a crash; pending analyses
//! are picked up again at start-up.
//!
//! The analysis of an instance (routing → model → FHIR report → Secondary Capture result) uses
//! ids derived from the SOP Instance UID and the model, so running it twice (a re-send, a crash
//! between steps) makes the same report and the same Secondary Capture, never a second one.

pub mod dimse;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::dicom::export::Exporter;
use crate::dicom::parse::ParsedInstance;
use crate::dicom::routing::{self, Decision, Route};
use crate::dicom::sc::{self, ScInput};
use crate::dicom::{parse_instance, status, InstanceIndex, ParseError};
use crate::imaging::MediaType;
use crate::inference::Registry;
use crate::pipeline::{self, AnalyseError, Analysis};
use crate::store::{JobKind, NewJob, Source, Store, StoreError};

/// How ingest enqueues analysis jobs: the attempts they get, and (for an analysis the caller
/// runs at once) the lease it holds them under.
#[derive(Debug, Clone)]
pub struct QueueOptions {
    /// This process's lease owner name (the job workers' too).
    pub owner: String,
    /// Lease of a job enqueued already claimed.
    pub lease: Duration,
    /// Attempts before a job is dead.
    pub max_attempts: i64,
}

impl Default for QueueOptions {
    fn default() -> Self {
        Self {
            owner: format!("carina-{}", std::process::id()),
            lease: Duration::from_secs(60),
            max_attempts: 5,
        }
    }
}

/// Why an instance was not stored, with its DICOM status.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// Unparseable or invalid data.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// STOW-RS to `/studies/{study}` with an instance of another study.
    #[error("the instance belongs to study {got}, not to {expected} named in the request")]
    StudyMismatch {
        /// Study in the URL.
        expected: String,
        /// Study in the data set.
        got: String,
        /// The instance's attributes.
        index: Box<InstanceIndex>,
    },
    /// Not enough free disk space, or too many jobs waiting (backpressure).
    #[error("out of resources: {0}")]
    OutOfResources(String),
    /// The SOP Instance UID is stored already with other content (the stored one is kept).
    #[error("duplicate SOP Instance UID with different content; the stored instance is kept")]
    Duplicate(Box<InstanceIndex>),
    /// Database or file system failure.
    #[error("storage failed: {0}")]
    Store(#[from] StoreError),
}

impl IngestError {
    /// The DICOM status (C-STORE-RSP Status / STOW-RS FailureReason).
    pub fn status(&self) -> u16 {
        match self {
            Self::Parse(e) => e.status(),
            Self::StudyMismatch { .. } => status::DATASET_MISMATCH,
            Self::OutOfResources(_) => status::OUT_OF_RESOURCES,
            Self::Duplicate(_) => status::DUPLICATE_SOP_INSTANCE,
            Self::Store(StoreError::Io(_)) => status::OUT_OF_RESOURCES,
            Self::Store(e) if e.is_unavailable() || e.is_storage_full() => status::OUT_OF_RESOURCES,
            Self::Store(_) => status::PROCESSING_FAILURE,
        }
    }

    /// Class and instance UIDs when known.
    pub fn uids(&self) -> Option<(&str, &str)> {
        match self {
            Self::StudyMismatch { index, .. } | Self::Duplicate(index) => {
                Some((&index.sop_class_uid, &index.sop_instance_uid))
            }
            _ => None,
        }
    }
}

/// A stored (or already stored) instance.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// Its attributes.
    pub index: InstanceIndex,
    /// `false` when the SOP Instance UID was already stored (nothing was written).
    pub new: bool,
    /// The analysis job enqueued with it (claimed by this process for `receive_claimed`).
    pub job: Option<String>,
}

/// Why an analysis did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The instance is not stored.
    #[error("instance not found")]
    NotFound,
    /// The routing or the model refused it (stored as skipped).
    #[error("{0}")]
    Skipped(String),
    /// Analysis failed.
    #[error(transparent)]
    Analyse(#[from] AnalyseError),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The stored file no longer parses.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// The result instance could not be built.
    #[error(transparent)]
    Sc(#[from] sc::ScError),
}

impl ProcessError {
    /// Whether another attempt may succeed (storage trouble; not a failed analysis).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Store(_))
    }
}

/// The ingest and analysis service.
#[derive(Clone)]
pub struct Ingest {
    store: Store,
    models: Arc<Registry>,
    routes: Arc<Vec<Route>>,
    min_free_bytes: u64,
    public_url: Option<String>,
    wake: Arc<Notify>,
    exporter: Option<Exporter>,
    queue: Arc<QueueOptions>,
    max_backlog: i64,
}

impl Ingest {
    /// Builds the service; `routes` empty means the default chest X-ray route.
    pub fn new(
        store: Store,
        models: Arc<Registry>,
        routes: Vec<Route>,
        min_free_mb: u64,
        public_url: Option<String>,
    ) -> Self {
        let routes = if routes.is_empty() {
            models
                .image_model(None)
                .map(|m| routing::default_routes(&m.manifest.name))
                .unwrap_or_default()
        } else {
            routes
        };
        Self {
            store,
            models,
            routes: Arc::new(routes),
            min_free_bytes: min_free_mb.saturating_mul(1024 * 1024),
            public_url,
            wake: Arc::new(Notify::new()),
            exporter: None,
            queue: Arc::new(QueueOptions::default()),
            max_backlog: 10_000,
        }
    }

    /// Sets how jobs are leased and retried, and the backlog above which new work is refused
    /// (503 + Retry-After over HTTP, A700 over DIMSE).
    #[must_use]
    pub fn with_queue(mut self, queue: QueueOptions, max_backlog: i64) -> Self {
        self.queue = Arc::new(queue);
        self.max_backlog = max_backlog;
        self
    }

    /// How analysis jobs are enqueued.
    pub fn queue(&self) -> &QueueOptions {
        &self.queue
    }

    /// Wakes this process's idle workers (a job was enqueued).
    pub fn wake(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// The analysis job of an instance.
    fn analyse_job(&self, sop: &str, model: Option<&str>) -> NewJob {
        NewJob {
            kind: JobKind::Analyse,
            subject: sop.to_string(),
            payload: model.map_or(serde_json::json!({}), |m| serde_json::json!({ "model": m })),
            dedupe: Some(format!("analyse:{sop}")),
            max_attempts: self.queue.max_attempts,
        }
    }

    /// Sends each Secondary Capture result to the exporter's destinations.
    #[must_use]
    pub fn with_exporter(mut self, exporter: Exporter) -> Self {
        self.exporter = Some(exporter);
        self
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Whether free space is above the watermark (associations and uploads are refused below).
    pub fn has_space(&self) -> bool {
        self.store
            .free_bytes()
            .is_none_or(|free| free >= self.min_free_bytes)
    }

    /// Why new work cannot be accepted now (disk below the watermark, job backlog at its
    /// limit), or `None`.
    ///
    /// # Errors
    /// [`StoreError`] when the backlog cannot be read (the database is down).
    pub async fn refusal(&self) -> Result<Option<String>, StoreError> {
        self.refusal_by(false).await
    }

    /// [`Self::refusal`] for FHIR writes: every kind of job counts towards their backlog
    /// (DICOM intake counts only imaging jobs, so FHIR floods cannot lock it out).
    ///
    /// # Errors
    /// [`StoreError`] when the backlog cannot be read.
    pub async fn fhir_refusal(&self) -> Result<Option<String>, StoreError> {
        self.refusal_by(true).await
    }

    async fn refusal_by(&self, all_kinds: bool) -> Result<Option<String>, StoreError> {
        if !self.has_space() {
            return Ok(Some(
                "free space in the data folder is below the configured minimum".into(),
            ));
        }
        let backlog = if all_kinds {
            self.store.backlog().await?
        } else {
            self.store.imaging_backlog().await?
        };
        Ok((backlog >= self.max_backlog).then(|| {
            format!(
                "{backlog} jobs are waiting (limit {}); try again later",
                self.max_backlog
            )
        }))
    }

    /// Stores an instance and queues its analysis. `expected_study` is the study named in a
    /// STOW-RS URL.
    ///
    /// # Errors
    /// [`IngestError`] with the status to report; nothing is stored then.
    pub async fn receive(
        &self,
        bytes: Bytes,
        source: Source,
        expected_study: Option<&str>,
    ) -> Result<Accepted, IngestError> {
        let parsed = tokio::task::spawn_blocking(move || parse_instance(&bytes))
            .await
            .map_err(|e| IngestError::Parse(ParseError::Unreadable(e.to_string())))??;
        if let Some(study) = expected_study {
            if parsed.index.study_uid != study {
                return Err(IngestError::StudyMismatch {
                    expected: study.to_string(),
                    got: parsed.index.study_uid.clone(),
                    index: Box::new(parsed.index),
                });
            }
        }
        let (state, reason) = match routing::route(&self.routes, &parsed.index, parsed.has_pixels) {
            Decision::Analyse { model, .. } => ("pending", Some(format!("routed to {model}"))),
            Decision::Skip(why) => ("skipped", Some(why)),
        };
        let job =
            (state == "pending").then(|| self.analyse_job(&parsed.index.sop_instance_uid, None));
        let accepted = self
            .store_parsed(
                parsed,
                source,
                state,
                reason.as_deref(),
                None,
                job.as_ref().map(|j| (j, None)),
            )
            .await?;
        if accepted.new && state == "pending" {
            self.wake.notify_one();
        }
        Ok(accepted)
    }

    /// Stores an instance for an analysis the caller runs now ([`Self::process_claimed`]): its
    /// job is enqueued already leased to this process, so workers leave it alone (after a crash
    /// the lease expires and a worker runs it).
    ///
    /// # Errors
    /// As [`Self::receive`].
    pub async fn receive_claimed(
        &self,
        bytes: Bytes,
        source: Source,
    ) -> Result<Accepted, IngestError> {
        let parsed = tokio::task::spawn_blocking(move || parse_instance(&bytes))
            .await
            .map_err(|e| IngestError::Parse(ParseError::Unreadable(e.to_string())))??;
        let job = self.analyse_job(&parsed.index.sop_instance_uid, None);
        let lease = (self.queue.owner.as_str(), self.queue.lease);
        self.store_parsed(
            parsed,
            source,
            "running",
            Some("analysis requested"),
            None,
            Some((&job, Some(lease))),
        )
        .await
    }

    async fn store_parsed(
        &self,
        parsed: ParsedInstance,
        source: Source,
        state: &str,
        reason: Option<&str>,
        result_of: Option<&str>,
        job: Option<(&NewJob, Option<(&str, Duration)>)>,
    ) -> Result<Accepted, IngestError> {
        let ix = parsed.index;
        if let Some(stored) = self.store.instance(&ix.sop_instance_uid).await? {
            // a re-send is idempotent only with the same data set (Carina's own results are
            // re-made on re-runs and always match by their derived UIDs)
            if result_of.is_none() {
                let old = self.store.instance_file(&stored).await?;
                let same = old.as_deref().is_none_or(|old| {
                    crate::dicom::parse::data_set_of(old)
                        == crate::dicom::parse::data_set_of(&parsed.part10)
                });
                if !same {
                    return Err(IngestError::Duplicate(Box::new(ix)));
                }
            }
            return Ok(Accepted {
                index: ix,
                new: false,
                job: None,
            });
        }
        // Carina's own results are always kept: refusing them would lose finished work
        if result_of.is_none() {
            if let Some(why) = self.refusal().await? {
                return Err(IngestError::OutOfResources(why));
            }
        }
        let size = parsed.part10.len();
        self.store.put_instance_file(&ix, parsed.part10).await?;
        let (new, job_id) = self
            .store
            .insert_instance(&ix, size, source, state, reason, result_of, job)
            .await?;
        Ok(Accepted {
            index: ix,
            new,
            job: job_id,
        })
    }

    /// Analyses a stored instance now (routing decides the model unless `model` is given),
    /// stores the report and the Secondary Capture, and records the state. Idempotent.
    ///
    /// # Errors
    /// [`ProcessError`]; the instance's state records skips and failures.
    pub async fn process(&self, sop: &str, model: Option<&str>) -> Result<Analysis, ProcessError> {
        let result = self.process_inner(sop, model).await;
        let (state, reason, id) = match &result {
            Ok(a) => (
                "done",
                Some(format!("analysed by {}", a.model.manifest.name)),
                Some(a.id.to_string()),
            ),
            Err(ProcessError::NotFound) => return result,
            Err(ProcessError::Skipped(why)) => ("skipped", Some(why.clone()), None),
            Err(e) => ("failed", Some(e.to_string()), None),
        };
        self.store
            .set_analysis_state(sop, state, reason.as_deref(), id.as_deref())
            .await?;
        result
    }

    async fn process_inner(
        &self,
        sop: &str,
        model: Option<&str>,
    ) -> Result<Analysis, ProcessError> {
        let ix = self
            .store
            .instance(sop)
            .await?
            .ok_or(ProcessError::NotFound)?;
        let file = self
            .store
            .instance_file(&ix)
            .await?
            .ok_or(ProcessError::NotFound)?;
        let file = Bytes::from(file);
        let parsed = {
            let f = file.clone();
            tokio::task::spawn_blocking(move || parse_instance(&f))
                .await
                .map_err(|e| ParseError::Unreadable(e.to_string()))??
        };
        let (name, frame) = match (model, routing::route(&self.routes, &ix, parsed.has_pixels)) {
            (Some(m), _) => (m.to_string(), 0),
            (None, Decision::Analyse { model, frame }) => (model, frame),
            (None, Decision::Skip(why)) => return Err(ProcessError::Skipped(why)),
        };
        let model = self
            .models
            .image_model(Some(&name))
            .ok_or_else(|| ProcessError::Skipped(format!("model {name} is not loaded")))?
            .clone();
        let version = (model.manifest.name.clone(), model.manifest.version.clone());
        let id = Uuid::new_v5(
            &Uuid::NAMESPACE_OID,
            format!("carina/analysis/{sop}/{}/{}/{frame}", version.0, version.1).as_bytes(),
        );
        let base = self.public_url.clone();
        let analysis =
            pipeline::analyse_with(model, file, MediaType::Dicom, id, frame, move |id| {
                base.as_ref()
                    .map(|b| format!("{}/v1/results/{id}/overlay.png", b.trim_end_matches('/')))
            })
            .await?;
        self.store.save_analysis(&analysis, "dicom").await?;
        if let Some(png) = &analysis.overlay_png {
            let overlay = image::load_from_memory_with_format(png, image::ImageFormat::Png)
                .map_err(|e| sc::ScError::from_display(&e))?
                .to_rgb8();
            let p = analysis.prediction.probabilities[analysis.prediction.class];
            let summary = format!("{} {:.1}%", analysis.label_display(), p * 100.0);
            let bytes = sc::secondary_capture(&ScInput {
                source: &parsed.object,
                overlay: &overlay,
                model: (&version.0, &version.1),
                summary: &summary,
                created: analysis.created,
            })?;
            let result = tokio::task::spawn_blocking(move || parse_instance(&bytes))
                .await
                .map_err(|e| ParseError::Unreadable(e.to_string()))??;
            let stored = self
                .store_parsed(
                    result,
                    Source::Result,
                    "skipped",
                    Some("Carina result (Secondary Capture): not analysed"),
                    Some(sop),
                    None,
                )
                .await
                .map_err(|e| match e {
                    IngestError::Store(s) => ProcessError::Store(s),
                    other => ProcessError::Skipped(other.to_string()),
                })?;
            if let Some(x) = &self.exporter {
                // queued once per destination, whether this run or an earlier one stored it
                x.enqueue(&stored.index.sop_instance_uid).await?;
            }
        }
        Ok(analysis)
    }
}
