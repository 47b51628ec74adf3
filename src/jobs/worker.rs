//! The worker loop: claim due jobs from the database queue under a lease, run them, record the
//! outcome. Each worker loop holds one job at a time and renews its lease while the job runs, so
//! a job runs on one replica at a time; a crashed replica's jobs become claimable again when
//! their leases expire. On shutdown a worker stops claiming, lets its job finish within the grace
//! period, and otherwise releases the lease so another replica (or the next start) runs it.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::Value;
use tokio::sync::{watch, Notify};
use tracing::Instrument;

use super::{Failure, JobError};
use crate::store::{Job, JobState, Store};

/// How often a worker that yields to ingest looks again.
const INGEST_FIRST_POLL: Duration = Duration::from_millis(10);

/// How workers claim and retry jobs.
#[derive(Debug, Clone)]
pub struct JobSettings {
    /// Lease owner name: unique per process (`<host>-<pid>-<random>`).
    pub owner: String,
    /// Worker loops in this process (0: this replica accepts work but runs no jobs).
    pub concurrency: usize,
    /// Lease length; renewed every third of it while the job runs.
    pub lease: Duration,
    /// How often an idle worker looks for jobs enqueued by other replicas.
    pub poll: Duration,
    /// First retry delay (doubles per attempt).
    pub backoff: Duration,
    /// Attempts before a job is dead.
    pub max_attempts: i64,
    /// How long a job may go on after a shutdown signal before its lease is released.
    pub grace: Duration,
    /// How long finished jobs are kept before they are pruned (`None`: forever).
    pub keep_done: Option<Duration>,
    /// How long one attempt may run; then it fails and is retried with backoff (a hung fetch
    /// or a stuck peer cannot hold a worker forever).
    pub deadline: Duration,
}

impl Default for JobSettings {
    fn default() -> Self {
        Self {
            owner: default_owner(),
            concurrency: 2,
            lease: Duration::from_secs(60),
            poll: Duration::from_millis(500),
            backoff: Duration::from_secs(2),
            max_attempts: 5,
            grace: Duration::from_secs(20),
            keep_done: Some(Duration::from_secs(7 * 24 * 3600)),
            deadline: Duration::from_secs(600),
        }
    }
}

impl JobSettings {
    /// What ingest needs to enqueue analysis jobs like these workers run them.
    pub fn queue_options(&self) -> crate::ingest::QueueOptions {
        crate::ingest::QueueOptions {
            owner: self.owner.clone(),
            lease: self.lease,
            max_attempts: self.max_attempts,
        }
    }
}

/// `<host>-<pid>-<8 random hex>`.
pub fn default_owner() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "carina".into());
    let rand = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &rand[..8])
}

/// Runs one job, returning its result.
pub type Handler = Arc<dyn Fn(Job) -> BoxFuture<'static, Result<Value, JobError>> + Send + Sync>;

/// The worker pool of one process.
#[derive(Clone)]
pub struct Worker {
    store: Store,
    settings: Arc<JobSettings>,
    handler: Handler,
    wake: Arc<Notify>,
}

impl Worker {
    /// Workers for `store`'s queue; `wake` is notified when this process enqueues a job.
    pub fn new(store: Store, settings: JobSettings, handler: Handler, wake: Arc<Notify>) -> Self {
        Self {
            store,
            settings: Arc::new(settings),
            handler,
            wake,
        }
    }

    /// Runs the worker loops until `stop` resolves (see [`Self::run`]).
    pub async fn run_until(self, stop: impl std::future::Future<Output = ()> + Send + 'static) {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            stop.await;
            let _ = tx.send(true);
        });
        self.run(rx).await;
    }

    /// Runs the worker loops until `stop` turns true (or its sender is dropped) and every loop
    /// has finished or released its job.
    pub async fn run(self, stop: watch::Receiver<bool>) {
        if let (Some(keep), true) = (self.settings.keep_done, self.settings.concurrency > 0) {
            tokio::spawn(prune(self.store.clone(), keep, stop.clone()));
        }
        let loops: Vec<_> = (0..self.settings.concurrency)
            .map(|i| tokio::spawn(self.clone().run_loop(i, stop.clone())))
            .collect();
        for l in loops {
            let _ = l.await;
        }
    }

    /// Claims and runs due jobs one at a time until none is due, and returns how many ran (a
    /// job retried after a failure waits for its backoff, so it is not run again here). Tests
    /// drain the queue with it instead of polling; the server runs [`Self::run`].
    pub async fn run_until_idle(&self) -> usize {
        let (_keep, never) = watch::channel(false);
        let mut ran = 0;
        loop {
            let s = &self.settings;
            match self.store.claim_jobs(&s.owner, 1, s.lease).await {
                Ok(jobs) if !jobs.is_empty() => {
                    for job in jobs {
                        self.run_one(job, never.clone()).await;
                        ran += 1;
                    }
                }
                Ok(_) => return ran,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot claim jobs");
                    return ran;
                }
            }
        }
    }

    /// Worker loop `index`: every loop but the first waits while ingest is receiving
    /// instances ([`crate::ingest::receiving`]), so acknowledgements keep the disk and cores.
    async fn run_loop(self, index: usize, mut stop: watch::Receiver<bool>) {
        let s = self.settings.clone();
        while !*stop.borrow() {
            if index > 0 && crate::ingest::receiving() {
                tokio::select! {
                    r = stop.changed() => if r.is_err() { return },
                    () = tokio::time::sleep(INGEST_FIRST_POLL) => {}
                }
                continue;
            }
            match self.store.claim_jobs(&s.owner, 1, s.lease).await {
                Ok(jobs) if !jobs.is_empty() => {
                    for job in jobs {
                        self.run_one(job, stop.clone()).await;
                    }
                }
                Ok(_) => {
                    tokio::select! {
                        r = stop.changed() => if r.is_err() { return },
                        () = self.wake.notified() => {}
                        () = tokio::time::sleep(s.poll) => {}
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot claim jobs (database unavailable?)");
                    tokio::select! {
                        r = stop.changed() => if r.is_err() { return },
                        () = tokio::time::sleep(s.poll * 2) => {}
                    }
                }
            }
        }
    }

    async fn run_one(&self, job: Job, mut stop: watch::Receiver<bool>) {
        let s = self.settings.clone();
        let span =
            tracing::info_span!("job", job_id = %job.id, kind = %job.kind, attempt = job.attempts);
        let (id, kind) = (job.id.clone(), job.kind);
        async move {
            let started = std::time::Instant::now();
            let heartbeat = {
                let (store, id, owner, lease) =
                    (self.store.clone(), id.clone(), s.owner.clone(), s.lease);
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(lease / 3).await;
                        match store.extend_lease(&id, &owner, lease).await {
                            Ok(false) => {
                                tracing::warn!("job lease lost");
                                return;
                            }
                            Ok(true) => {}
                            Err(e) => tracing::warn!(error = %e, "cannot renew the job lease"),
                        }
                    }
                })
            };
            // Carina itself acts: what the job stores is audited as its application activity
            // ... and in the background lane: ingest and waiting users keep the cores first
            let work = crate::audit::ACTOR.scope(
                crate::audit::Actor::carina(),
                crate::analysis::cpu::background((self.handler)(job)),
            );
            tokio::pin!(work);
            let grace = async {
                let _ = stop.wait_for(|v| *v).await;
                tokio::time::sleep(s.grace).await;
            };
            let outcome = tokio::select! {
                r = &mut work => Some(r),
                () = grace => None,
                () = tokio::time::sleep(s.deadline) => {
                    tracing::warn!(secs = s.deadline.as_secs(), "job attempt ran past its deadline");
                    Some(Err(JobError::Deadline(s.deadline)))
                }
            };
            heartbeat.abort();
            let m = crate::metrics::global();
            m.observe_job(kind.as_str(), started.elapsed().as_secs_f64());
            let recorded = match outcome {
                None => {
                    m.job_outcome(kind.as_str(), "released");
                    tracing::info!("job released at shutdown");
                    self.store.release_job(&id, &s.owner).await.map(|_| ())
                }
                Some(outcome) => {
                    let outcome = outcome.as_ref().map(Value::clone).map_err(JobError::failure);
                    record(&self.store, &id, &s.owner, outcome, s.backoff)
                        .await
                        .map(|name| m.job_outcome(kind.as_str(), name))
                }
            };
            if let Err(e) = recorded {
                // the lease expires and the job runs again; its effects are idempotent
                tracing::warn!(error = %e, "cannot record the job outcome");
            }
        }
        .instrument(span)
        .await;
    }
}

/// Records the outcome of an attempt by `owner` (who must still hold the lease): done with its
/// result, or failed, queued again after a backoff or dead. Returns the outcome's name (`done`,
/// `retry`, `dead`, or `lost` when the lease had gone to another worker).
///
/// # Errors
/// [`crate::store::StoreError`] when it cannot be written (the lease then expires and the job
/// runs again; its effects are idempotent).
pub async fn record(
    store: &Store,
    id: &str,
    owner: &str,
    outcome: Result<Value, Failure<'_>>,
    backoff: Duration,
) -> Result<&'static str, crate::store::StoreError> {
    match outcome {
        Ok(result) => {
            let held = store.finish_job(id, owner, &result).await?;
            tracing::info!("job done");
            Ok(if held { "done" } else { "lost" })
        }
        Err(Failure { why, retry }) => {
            let msg = why.to_string();
            let name = match store.fail_job(id, owner, &msg, retry, backoff).await? {
                Some(JobState::Dead) => "dead",
                Some(_) => "retry",
                None => "lost",
            };
            tracing::warn!(error = %msg, outcome = name, "job attempt failed");
            Ok(name)
        }
    }
}

/// Deletes jobs finished longer than `keep` ago, hourly, until `stop`.
async fn prune(store: Store, keep: Duration, mut stop: watch::Receiver<bool>) {
    loop {
        match store.prune_jobs(keep).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(pruned = n, "finished jobs pruned"),
            Err(e) => tracing::warn!(error = %e, "cannot prune finished jobs"),
        }
        tokio::select! {
            r = stop.changed() => if r.is_err() || *stop.borrow() { return },
            () = tokio::time::sleep(Duration::from_secs(3600)) => {}
        }
    }
}
