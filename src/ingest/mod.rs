//! The one way DICOM enters Carina, whatever the transport (STOW-RS, DIMSE C-STORE ([`dimse`]),
//! `/v1/analyze`, WADO-RS fetches): parse and check → refuse when storage or the queue is short
//! → write the file durably → commit its row with its analysis job → wake the workers. Nothing
//! else: the analysis is the [`crate::analysis`] stage, run by the jobs room. Success is
//! answered only after the row is committed, so an acknowledged instance survives a crash.

pub mod dimse;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::dicom::parse::ParsedInstance;
use crate::dicom::routing::{self, Decision, Route};
use crate::dicom::{parse_instance, status, InstanceIndex, ParseError};
use crate::store::{JobKind, NewJob, Source, Store, StoreError};

/// Instances being received in this process now (parsed, checked, written, committed).
static RECEIVING: AtomicUsize = AtomicUsize::new(0);

/// Whether this process is receiving instances now. The job workers beyond the first wait
/// while it is ("ingest first": a burst from a PACS is acknowledged at the rate storage
/// allows, and the queued analyses catch up when it ends; one worker always keeps going).
pub fn receiving() -> bool {
    RECEIVING.load(Ordering::Relaxed) > 0
}

/// Counts one instance in [`receiving`] while it lives.
struct Receiving;

impl Receiving {
    fn start() -> Self {
        RECEIVING.fetch_add(1, Ordering::Relaxed);
        Self
    }
}

impl Drop for Receiving {
    fn drop(&mut self) {
        RECEIVING.fetch_sub(1, Ordering::Relaxed);
    }
}

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

/// The way in for DICOM, whatever the transport. Cheap to clone.
#[derive(Clone)]
pub struct Ingest {
    store: Store,
    routes: Arc<Vec<Route>>,
    min_free_bytes: u64,
    wake: Arc<Notify>,
    queue: Arc<QueueOptions>,
    max_backlog: i64,
}

impl Ingest {
    /// Ingest into `store`; `routes` decide which instances get an analysis job (the
    /// analysis stage routes with the same ones); below `min_free_mb` of free space new
    /// instances are refused.
    pub fn new(store: Store, routes: Arc<Vec<Route>>, min_free_mb: u64) -> Self {
        Self {
            store,
            routes,
            min_free_bytes: min_free_mb.saturating_mul(1024 * 1024),
            wake: Arc::new(Notify::new()),
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
        let _receiving = Receiving::start();
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
                job.as_ref().map(|j| (j, None)),
            )
            .await?;
        if accepted.new && state == "pending" {
            self.wake.notify_one();
        }
        Ok(accepted)
    }

    /// Stores an instance for an analysis the caller runs now ([`crate::jobs::Jobs::analyse_claimed`]): its
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
        job: Option<(&NewJob, Option<(&str, Duration)>)>,
    ) -> Result<Accepted, IngestError> {
        let ix = parsed.index;
        if let Some(stored) = self.store.instance(&ix.sop_instance_uid).await? {
            // a re-send is idempotent only with the same data set
            let old = self.store.instance_file(&stored).await?;
            let same = old.as_deref().is_none_or(|old| {
                crate::dicom::parse::data_set_of(old)
                    == crate::dicom::parse::data_set_of(&parsed.part10)
            });
            if !same {
                return Err(IngestError::Duplicate(Box::new(ix)));
            }
            return Ok(Accepted {
                index: ix,
                new: false,
                job: None,
            });
        }
        if let Some(why) = self.refusal().await? {
            return Err(IngestError::OutOfResources(why));
        }
        let size = parsed.part10.len();
        self.store.put_instance_file(&ix, parsed.part10).await?;
        let (new, job_id) = self
            .store
            .insert_instance(&ix, size, source, state, reason, None, job)
            .await?;
        Ok(Accepted {
            index: ix,
            new,
            job: job_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receiving_counts_instances_in_flight() {
        // no other unit test of the library receives instances, so the count is this test's
        assert!(!receiving());
        let a = Receiving::start();
        let b = Receiving::start();
        assert!(receiving());
        assert_eq!(RECEIVING.load(Ordering::Relaxed), 2);
        drop(a);
        assert!(receiving(), "one still in flight");
        drop(b);
        assert!(!receiving());
    }
}
