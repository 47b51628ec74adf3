//! SQL for the durable job queue (table `jobs`, see docs/adr/0001-job-queue-in-the-database.md).
//! A job is inserted in the same transaction as the data it works on ([`Store::insert_job`]
//! takes the open transaction). Workers claim due jobs with a lease: `FOR UPDATE SKIP LOCKED`
//! on PostgreSQL, a plain `UPDATE … RETURNING` on SQLite (whose writers are serialised). An
//! expired lease makes a job claimable again; a failed attempt is retried with exponential
//! backoff until `max_attempts`, then the job is `dead` with the reason.

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use sqlx::any::AnyRow;
use sqlx::AnyConnection;
use sqlx::{AssertSqlSafe, Row};

use super::{Store, StoreError};

/// Columns read into a [`Job`].
const COLUMNS: &str = "id, kind, subject, payload, state, attempts, max_attempts, run_at, \
    lease_owner, lease_until, last_error, result, created, updated";

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting (due at `run_at`).
    Queued,
    /// Leased by a worker.
    Running,
    /// Finished (its `result` says how).
    Done,
    /// Gave up after `max_attempts` (dead letter); `last_error` says why.
    Dead,
}

impl JobState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Done => "done",
            Self::Dead => "dead",
        }
    }

    /// From the stored name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "queued" => Some(Self::Queued),
            "running" => Some(Self::Running),
            "done" => Some(Self::Done),
            "dead" => Some(Self::Dead),
            _ => None,
        }
    }
}

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum JobKind {
    /// Analyse one stored DICOM instance (subject: its SOP Instance UID).
    Analyse,
    /// Find and analyse the pixels of a stored ImagingStudy (subject: `ImagingStudy/<id>`).
    ImagingStudy,
    /// Assess a patient's ICU risk from their stored Observations (subject: `Patient/<id>`).
    Risk,
}

impl JobKind {
    /// Every kind.
    pub const ALL: [Self; 3] = [Self::Analyse, Self::ImagingStudy, Self::Risk];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Analyse => "analyse",
            Self::ImagingStudy => "imaging-study",
            Self::Risk => "risk",
        }
    }

    /// From the stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Whether the kind works on images (the backlog DICOM intake obeys).
    pub fn is_imaging(self) -> bool {
        matches!(self, Self::Analyse | Self::ImagingStudy)
    }
}

impl std::fmt::Display for JobKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A job to enqueue.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// What to do.
    pub kind: JobKind,
    /// What it works on (a SOP Instance UID, `ImagingStudy/<id>`, `Patient/<id>`).
    pub subject: String,
    /// Parameters.
    pub payload: Value,
    /// At most one job per key: enqueueing an existing key does nothing.
    pub dedupe: Option<String>,
    /// Attempts before the job is dead.
    pub max_attempts: i64,
}

/// A stored job (`GET /v1/jobs/{id}`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Job {
    /// Id.
    pub id: String,
    /// What to do.
    pub kind: JobKind,
    /// What it works on.
    pub subject: String,
    /// Parameters.
    pub payload: Value,
    /// Where it is.
    pub state: JobState,
    /// Attempts started.
    pub attempts: i64,
    /// Attempts allowed.
    pub max_attempts: i64,
    /// Not claimed before (unix milliseconds).
    pub run_at: i64,
    /// The worker holding (or that last held) the job.
    pub lease_owner: Option<String>,
    /// Lease expiry (unix milliseconds).
    pub lease_until: Option<i64>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// Outcome of a finished job.
    pub result: Option<Value>,
    /// Enqueued (RFC 3339).
    pub created: String,
    /// Last change (RFC 3339).
    pub updated: String,
}

fn job_from(r: &AnyRow) -> Result<Job, StoreError> {
    let payload: String = r.try_get("payload")?;
    let result: Option<String> = r.try_get("result")?;
    let (kind, state): (String, String) = (r.try_get("kind")?, r.try_get("state")?);
    Ok(Job {
        id: r.try_get("id")?,
        kind: JobKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("job kind '{kind}'")))?,
        subject: r.try_get("subject")?,
        payload: serde_json::from_str(&payload)?,
        state: JobState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("job state '{state}'")))?,
        attempts: r.try_get("attempts")?,
        max_attempts: r.try_get("max_attempts")?,
        run_at: r.try_get("run_at")?,
        lease_owner: r.try_get("lease_owner")?,
        lease_until: r.try_get("lease_until")?,
        last_error: r.try_get("last_error")?,
        result: result.as_deref().map(serde_json::from_str).transpose()?,
        created: r.try_get("created")?,
        updated: r.try_get("updated")?,
    })
}

/// The job queue's clock: the system clock, moved forward by whatever a test advanced it (so
/// lease expiry and backoff are tested without sleeping). Clones share the offset.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    offset_ms: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

impl Clock {
    /// Moves this clock (and every clone) forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.offset_ms
            .fetch_add(ms(by), std::sync::atomic::Ordering::SeqCst);
    }

    /// Now.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::Utc::now()
            + chrono::Duration::milliseconds(
                self.offset_ms.load(std::sync::atomic::Ordering::SeqCst),
            )
    }

    /// Unix milliseconds now.
    pub fn now_ms(&self) -> i64 {
        self.now().timestamp_millis()
    }

    /// RFC 3339 now, UTC, microseconds, fixed width (so text comparison orders it).
    fn stamp(&self) -> String {
        self.now()
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, false)
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The delay before attempt `attempts + 1`: `base · 2^(attempts-1)`, at most 10 minutes.
pub fn backoff(base: Duration, attempts: i64) -> Duration {
    let exp = u32::try_from(attempts.clamp(1, 20) - 1).unwrap_or(0);
    base.saturating_mul(2_u32.saturating_pow(exp))
        .min(Duration::from_secs(600))
}

impl Store {
    /// Inserts `job` inside an open transaction (with the data it works on). A job `claimed_by`
    /// a worker starts `running` under its lease (the caller runs it now). Returns the job id,
    /// or `None` when a job with the same `dedupe` key exists. Keys that start with `pending:`
    /// hold only while the job is queued (they are cleared when it is claimed): one pending
    /// job per key, and a write during a run queues the next one.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub async fn insert_job(
        &self,
        conn: &mut AnyConnection,
        job: &NewJob,
        claimed_by: Option<(&str, Duration)>,
    ) -> Result<Option<String>, StoreError> {
        let id = uuid::Uuid::new_v4().to_string();
        let now = self.clock.stamp();
        let (state, attempts, owner, until) = match claimed_by {
            Some((owner, lease)) => (
                "running",
                1_i64,
                Some(owner.to_string()),
                Some(self.clock.now_ms() + ms(lease)),
            ),
            None => ("queued", 0, None, None),
        };
        let r = sqlx::query(
            "INSERT INTO jobs (id, kind, subject, payload, dedupe, state, attempts, max_attempts, \
             run_at, lease_owner, lease_until, created, updated) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12) \
             ON CONFLICT (dedupe) DO NOTHING",
        )
        .bind(&id)
        .bind(job.kind.as_str())
        .bind(&job.subject)
        .bind(serde_json::to_string(&job.payload)?)
        .bind(&job.dedupe)
        .bind(state)
        .bind(attempts)
        .bind(job.max_attempts)
        .bind(self.clock.now_ms())
        .bind(owner)
        .bind(until)
        .bind(&now)
        .execute(conn)
        .await?;
        Ok((r.rows_affected() == 1).then_some(id))
    }

    /// [`Self::insert_job`] (unclaimed); when its dedupe key is taken, the id of the job that
    /// holds it.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub async fn insert_or_find_job(
        &self,
        conn: &mut AnyConnection,
        job: &NewJob,
    ) -> Result<Option<String>, StoreError> {
        if let Some(id) = self.insert_job(&mut *conn, job, None).await? {
            return Ok(Some(id));
        }
        let Some(key) = &job.dedupe else {
            return Ok(None);
        };
        Ok(sqlx::query_scalar("SELECT id FROM jobs WHERE dedupe = $1")
            .bind(key)
            .fetch_optional(conn)
            .await?)
    }

    /// Enqueues `job` on its own (see [`Self::insert_job`]).
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub async fn enqueue(&self, job: &NewJob) -> Result<Option<String>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        self.insert_job(&mut conn, job, None).await
    }

    /// Claims up to `limit` due jobs for `owner` for `lease`. Jobs whose lease expired after
    /// their last allowed attempt (the worker died each time) become dead first.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub async fn claim_jobs(
        &self,
        owner: &str,
        limit: i64,
        lease: Duration,
    ) -> Result<Vec<Job>, StoreError> {
        let now = self.clock.now_ms();
        let stamp = self.clock.stamp();
        self.bury_expired(&stamp, now).await?;
        let _turn = self.write_turn().await;
        let rows = sqlx::query(AssertSqlSafe(format!(
            "UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_owner = $1, \
             lease_until = $2, updated = $3, \
             dedupe = CASE WHEN dedupe LIKE 'pending:%' THEN NULL ELSE dedupe END WHERE id IN (SELECT id FROM jobs WHERE \
             (state = 'queued' AND run_at <= $4) OR (state = 'running' AND lease_until < $4) \
             ORDER BY run_at LIMIT $5{}) RETURNING {COLUMNS}",
            self.dialect.skip_locked()
        )))
        .bind(owner)
        .bind(now + ms(lease))
        .bind(&stamp)
        .bind(now)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from).collect()
    }

    /// Dead-letters the jobs whose lease expired on their last allowed attempt and, in the same
    /// transaction, marks the instance of each such analysis `failed` with the reason (it would
    /// otherwise say `pending` with nothing left to run it).
    async fn bury_expired(&self, stamp: &str, now: i64) -> Result<(), StoreError> {
        const WHY: &str = "lease expired on the last allowed attempt (the worker stopped)";
        // A read first: claim polls run often, and nearly always nothing has expired, so they
        // should not take the write lock (SQLite) for nothing.
        let any = sqlx::query(
            "SELECT 1 FROM jobs WHERE state = 'running' AND lease_until < $1 \
             AND attempts >= max_attempts LIMIT 1",
        )
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        if any.is_none() {
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
        let dead = sqlx::query(
            "UPDATE jobs SET state = 'dead', updated = $1, last_error = \
             COALESCE(last_error || '; ', '') || $3 \
             WHERE state = 'running' AND lease_until < $2 AND attempts >= max_attempts \
             RETURNING kind, subject",
        )
        .bind(stamp)
        .bind(now)
        .bind(WHY)
        .fetch_all(&mut *tx)
        .await?;
        for row in &dead {
            let (kind, subject): (String, String) = (row.try_get("kind")?, row.try_get("subject")?);
            if kind == JobKind::Analyse.as_str() {
                sqlx::query(
                    "UPDATE dicom_instances SET analysis_state = 'failed', analysis_reason = $1 \
                     WHERE sop_instance_uid = $2 AND analysis_state <> 'done'",
                )
                .bind(format!("analysis job dead: {WHY}"))
                .bind(subject)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Extends `owner`'s lease on job `id`; `false` when the lease was lost.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub async fn extend_lease(
        &self,
        id: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let _turn = self.write_turn().await;
        let r = sqlx::query(
            "UPDATE jobs SET lease_until = $1 WHERE id = $2 AND lease_owner = $3 AND state = 'running'",
        )
        .bind(self.clock.now_ms() + ms(lease))
        .bind(id)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Marks job `id` done with `result`, if `owner` still holds it.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub async fn finish_job(
        &self,
        id: &str,
        owner: &str,
        result: &Value,
    ) -> Result<bool, StoreError> {
        let _turn = self.write_turn().await;
        let r = sqlx::query(
            "UPDATE jobs SET state = 'done', result = $1, lease_until = NULL, updated = $2 \
             WHERE id = $3 AND lease_owner = $4 AND state = 'running'",
        )
        .bind(serde_json::to_string(result)?)
        .bind(self.clock.stamp())
        .bind(id)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Records a failed attempt of job `id`: queued again after [`backoff`] while attempts
    /// remain (and `retry`), else dead with `error`. Returns the new state.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub async fn fail_job(
        &self,
        id: &str,
        owner: &str,
        error: &str,
        retry: bool,
        base: Duration,
    ) -> Result<Option<JobState>, StoreError> {
        let Some(job) = self.job(id).await? else {
            return Ok(None);
        };
        if job.lease_owner.as_deref() != Some(owner) || job.state != JobState::Running {
            return Ok(None);
        }
        let state = if retry && job.attempts < job.max_attempts {
            JobState::Queued
        } else {
            JobState::Dead
        };
        let _turn = self.write_turn().await;
        sqlx::query(
            "UPDATE jobs SET state = $1, last_error = $2, run_at = $3, lease_until = NULL, \
             updated = $4 WHERE id = $5 AND lease_owner = $6 AND state = 'running'",
        )
        .bind(state.as_str())
        .bind(error)
        .bind(self.clock.now_ms() + ms(backoff(base, job.attempts)))
        .bind(self.clock.stamp())
        .bind(id)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(Some(state))
    }

    /// Gives job `id` back (graceful shutdown before it finished): queued again at once, the
    /// interrupted attempt not counted.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub async fn release_job(&self, id: &str, owner: &str) -> Result<bool, StoreError> {
        let _turn = self.write_turn().await;
        let r = sqlx::query(
            "UPDATE jobs SET state = 'queued', attempts = attempts - 1, lease_until = NULL, \
             run_at = $1, updated = $2 WHERE id = $3 AND lease_owner = $4 AND state = 'running'",
        )
        .bind(self.clock.now_ms())
        .bind(self.clock.stamp())
        .bind(id)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// One job.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub async fn job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let r = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM jobs WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        r.as_ref().map(job_from).transpose()
    }

    /// Jobs, newest first, optionally of one state, kind and subject.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub async fn jobs(
        &self,
        state: Option<JobState>,
        kind: Option<JobKind>,
        subject: Option<&str>,
        limit: i64,
        offset: i64,
    ) -> Result<Vec<Job>, StoreError> {
        let mut q = super::sql::Sql::new(format!("SELECT {COLUMNS} FROM jobs WHERE 1=1"));
        if let Some(s) = state {
            q.push(" AND state = ").bind(s.as_str().to_string());
        }
        if let Some(k) = kind {
            q.push(" AND kind = ").bind(k.as_str().to_string());
        }
        if let Some(s) = subject {
            q.push(" AND subject = ").bind(s.to_string());
        }
        q.push(" ORDER BY created DESC, id LIMIT ")
            .bind(limit)
            .push(" OFFSET ")
            .bind(offset);
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter().map(job_from).collect()
    }

    /// Number of jobs by kind and state (for `/metrics`).
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub async fn job_counts(&self) -> Result<Vec<(String, String, i64)>, StoreError> {
        let rows = sqlx::query("SELECT kind, state, COUNT(*) AS n FROM jobs GROUP BY kind, state")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("kind")?, r.try_get("state")?, r.try_get("n")?)))
            .collect()
    }

    /// Deletes finished (`done`) jobs last changed longer than `keep` ago on the queue's clock;
    /// dead jobs are kept for people to look at. Returns how many were deleted.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub async fn prune_jobs(&self, keep: std::time::Duration) -> Result<u64, StoreError> {
        let keep = chrono::Duration::from_std(keep).unwrap_or(chrono::Duration::MAX);
        let before = self
            .clock
            .now()
            .checked_sub_signed(keep)
            .unwrap_or_default();
        let r = sqlx::query("DELETE FROM jobs WHERE state = 'done' AND updated < $1")
            .bind(before.to_rfc3339_opts(chrono::SecondsFormat::Micros, false))
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    /// Jobs not finished (queued or running): the backlog that backpressure limits.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub async fn backlog(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Unfinished imaging jobs (`analyse`, `imaging-study`): the backlog DICOM intake obeys, so
    /// a flood of FHIR writes (risk jobs) cannot lock DICOM intake out.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub async fn imaging_backlog(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running') \
             AND kind IN ('analyse', 'imaging-study')",
        )
        .fetch_one(&self.pool)
        .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let b = Duration::from_secs(2);
        assert_eq!(backoff(b, 1), Duration::from_secs(2));
        assert_eq!(backoff(b, 2), Duration::from_secs(4));
        assert_eq!(backoff(b, 4), Duration::from_secs(16));
        assert_eq!(backoff(b, 40), Duration::from_secs(600));
    }
}
