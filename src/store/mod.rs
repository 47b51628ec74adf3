//! Persistence: all SQL lives here (sqlx, migrations in `migrations/`), blobs live in
//! [`blob::BlobStore`]. A result is acknowledged only after its blobs are durable and its row is
//! committed, so a crash never leaves an answered analysis behind.

pub mod blob;
pub mod exports;
pub mod fhir;
pub mod instances;
pub mod jobs;
pub mod sql;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Row};
use uuid::Uuid;

pub use blob::BlobStore;
pub use exports::ExportRow;
pub use instances::{InstanceStatus, Query, Source, StudyHit};
pub use jobs::{Clock, Job, JobKind, JobState, NewJob};
pub use sql::Dialect;

/// Store failures (server-side).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Database error.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// Migration error.
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// File I/O.
    #[error("blob storage: {0}")]
    Io(#[from] std::io::Error),
    /// Serialisation.
    #[error("serialisation: {0}")]
    Json(#[from] serde_json::Error),
    /// A write conflicted with the current state (a stale `If-Match` version).
    #[error("conflict: {0}")]
    Conflict(String),
    /// A concurrent write to the same resource won (PostgreSQL); retrying succeeds.
    #[error("concurrent write: {0}")]
    Concurrent(String),
    /// The database URL names no supported database.
    #[error("unsupported database URL (use sqlite://FILE or postgres://…)")]
    Url,
    /// A stored value this version does not know (a row written by a newer release?).
    #[error("unreadable stored value: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Whether the blob file system is full (ENOSPC, EDQUOT): answered 503 / A700, not 500.
    pub fn is_storage_full(&self) -> bool {
        match self {
            Self::Io(e) => {
                e.kind() == std::io::ErrorKind::StorageFull
                    || e.kind() == std::io::ErrorKind::QuotaExceeded
                    || matches!(e.raw_os_error(), Some(28 | 122))
            }
            // SQLITE_FULL
            Self::Db(e) => e
                .as_database_error()
                .and_then(|d| d.code())
                .is_some_and(|c| c == "13"),
            _ => false,
        }
    }

    /// Whether the failure is the database being unreachable (answered 503, not 500).
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Db(e) => {
                matches!(
                    e,
                    sqlx::Error::Io(_)
                        | sqlx::Error::PoolTimedOut
                        | sqlx::Error::PoolClosed
                        | sqlx::Error::Tls(_)
                        | sqlx::Error::WorkerCrashed
                ) || e
                    .as_database_error()
                    .and_then(|d| d.code())
                    .is_some_and(|c| c.starts_with("57P") || c.starts_with("08"))
            }
            _ => false,
        }
    }
}

/// A stored analysis summary (`GET /v1/results/{id}`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ResultRow {
    /// Id.
    pub id: String,
    /// RFC 3339 creation time.
    pub created: String,
    /// Model name.
    pub model: String,
    /// Model version.
    pub model_version: String,
    /// Winning label key.
    pub label: String,
    /// Winning label display.
    pub display: String,
    /// Probability per class key: `{key: p}`.
    #[schema(value_type = std::collections::BTreeMap<String, f64>)]
    pub probabilities: serde_json::Value,
    /// Heatmap method.
    pub cam_method: String,
}

/// An analysis to keep: its summary row and its blobs (report Bundle, input and overlay PNGs).
#[derive(Debug)]
pub struct NewAnalysis<'a> {
    /// Id (also the DiagnosticReport id).
    pub id: Uuid,
    /// Finish time.
    pub created: chrono::DateTime<chrono::Utc>,
    /// Model name and version.
    pub model: (&'a str, &'a str),
    /// Winning label key and display.
    pub label: (&'a str, &'a str),
    /// `{label key: probability}`.
    pub probabilities: serde_json::Value,
    /// Heatmap method.
    pub cam_method: &'a str,
    /// The FHIR Bundle.
    pub bundle: &'a serde_json::Value,
    /// The input image file: the uploaded PNG or JPEG as it came, or a PNG of a DICOM frame
    /// (kept as the blob `input.png` whatever its format; served with its own media type).
    pub input_image: bytes::Bytes,
    /// The overlay PNG.
    pub overlay_png: Option<bytes::Bytes>,
}

/// Database + blobs.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    dialect: Dialect,
    blobs: BlobStore,
    dicom: BlobStore,
    clock: jobs::Clock,
    planner_stats: Arc<PlannerStats>,
    /// SQLite's one writer at a time, taken in this process before `BEGIN IMMEDIATE`: a writer
    /// waiting here is woken the moment the previous one commits, where SQLite's busy handler
    /// would sleep 1, 2, 5, 10 … ms between retries and leave the disk and cores idle.
    write_turn: Arc<tokio::sync::Mutex<()>>,
}

/// A write transaction ([`Store::begin_write`]); on SQLite it holds this process's write turn
/// until it commits or is dropped (rolled back).
pub(crate) struct WriteTx {
    tx: sqlx::Transaction<'static, sqlx::Any>,
    _turn: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl WriteTx {
    /// Commits, then gives the turn to the next writer.
    ///
    /// # Errors
    /// The database's.
    pub(crate) async fn commit(self) -> Result<(), sqlx::Error> {
        self.tx.commit().await
    }
}

impl std::ops::Deref for WriteTx {
    type Target = sqlx::AnyConnection;
    fn deref(&self) -> &Self::Target {
        &self.tx
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.tx
    }
}

/// When to refresh PostgreSQL's planner statistics for the FHIR tables. A fresh or bulk-loaded
/// database has none until autovacuum's next pass (a minute or more), and without them the
/// planner picks nested loops that made a search of 3 670 resources take a second. `ANALYZE`
/// runs after 1 000 resources written by this process, then 2 000 more, 4 000 more, … (a
/// sample of at most 30 000 rows each time, in the background).
#[derive(Default)]
struct PlannerStats {
    written: AtomicU64,
    next: AtomicU64,
    running: AtomicBool,
}

impl PlannerStats {
    const FIRST: u64 = 1000;

    /// Counts `n` written resources; true when statistics are due (the caller runs them).
    fn due(&self, n: u64) -> bool {
        let written = self.written.fetch_add(n, Ordering::Relaxed) + n;
        let next = match self.next.load(Ordering::Relaxed) {
            0 => Self::FIRST,
            v => v,
        };
        if written < next || self.running.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.next
            .store(written + written.max(Self::FIRST), Ordering::Relaxed);
        true
    }
}

impl Store {
    /// Opens (creating if needed) the embedded SQLite database and the blob folders in
    /// `data_dir`, and runs migrations.
    ///
    /// # Errors
    /// When the folder or database cannot be created or migrated.
    pub async fn open(data_dir: &Path) -> Result<Self, StoreError> {
        Self::connect(None, data_dir).await
    }

    /// Opens the database named by `url` (`sqlite://FILE` or `postgres://…`; `None`: SQLite
    /// `carina.db` in `data_dir`) with the blob folders in `data_dir`, and runs migrations.
    /// Several replicas may share one PostgreSQL database and one data folder.
    ///
    /// # Errors
    /// When the folder or database cannot be created, reached or migrated.
    pub async fn connect(url: Option<&str>, data_dir: &Path) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        std::fs::create_dir_all(data_dir)?;
        let url = url.map_or_else(
            || format!("sqlite://{}?mode=rwc", data_dir.join("carina.db").display()),
            str::to_string,
        );
        let dialect = Dialect::of_url(&url).ok_or(StoreError::Url)?;
        // an SQLite file named by the user is created when missing, like the default one
        let url = if dialect == Dialect::Sqlite && !url.contains("mode=") {
            format!("{url}{}mode=rwc", if url.contains('?') { '&' } else { '?' })
        } else {
            url
        };
        let options = AnyPoolOptions::new()
            .acquire_timeout(Duration::from_secs(5))
            .idle_timeout(Duration::from_secs(300));
        let pool = match dialect {
            Dialect::Sqlite => {
                options
                    .max_connections(4)
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            sqlx::raw_sql(
                                "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                                 PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON; \
                                 PRAGMA mmap_size = 268435456; PRAGMA journal_size_limit = 67108864;",
                            )
                            .execute(conn)
                            .await
                            .map(|_| ())
                        })
                    })
                    .connect(&url)
                    .await?
            }
            Dialect::Postgres => options.max_connections(16).connect(&url).await?,
        };
        match dialect {
            Dialect::Sqlite => sqlx::migrate!("./migrations/sqlite").run(&pool).await?,
            Dialect::Postgres => sqlx::migrate!("./migrations/postgres").run(&pool).await?,
        }
        Ok(Self {
            pool,
            dialect,
            blobs: BlobStore::new(data_dir.join("results"))?,
            dicom: BlobStore::new(data_dir.join("dicom"))?,
            clock: jobs::Clock::default(),
            planner_stats: Arc::default(),
            write_turn: Arc::default(),
        })
    }

    /// This store with the job queue reading time from `clock` (tests advance it instead of
    /// sleeping through leases and backoffs).
    #[must_use]
    pub fn with_clock(mut self, clock: jobs::Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Begins a write transaction: `BEGIN IMMEDIATE` on SQLite, so a transaction that reads
    /// before it writes waits for the write lock up front instead of failing when it upgrades,
    /// after this process's write turn (writers queue in order, see `write_turn`).
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub(crate) async fn begin_write(&self) -> Result<WriteTx, StoreError> {
        Ok(match self.dialect {
            Dialect::Sqlite => {
                let turn = self.write_turn.clone().lock_owned().await;
                WriteTx {
                    tx: self.pool.begin_with("BEGIN IMMEDIATE").await?,
                    _turn: Some(turn),
                }
            }
            Dialect::Postgres => WriteTx {
                tx: self.pool.begin().await?,
                _turn: None,
            },
        })
    }

    /// This process's SQLite write turn for a single-statement write (autocommit) on a hot
    /// path, so it queues behind [`Self::begin_write`]'s transactions instead of sleeping in
    /// SQLite's busy handler; `None` on PostgreSQL (row locks, no single writer).
    pub(crate) async fn write_turn(&self) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        match self.dialect {
            Dialect::Sqlite => Some(self.write_turn.clone().lock_owned().await),
            Dialect::Postgres => None,
        }
    }

    /// Counts `n` FHIR resources written and, on PostgreSQL, refreshes the FHIR tables'
    /// planner statistics in the background when [`PlannerStats`] says they are due.
    pub(crate) fn wrote_fhir(&self, n: usize) {
        if self.dialect != Dialect::Postgres || !self.planner_stats.due(n as u64) {
            return;
        }
        let (pool, stats) = (self.pool.clone(), self.planner_stats.clone());
        tokio::spawn(async move {
            let t = std::time::Instant::now();
            match sqlx::query("ANALYZE fhir_resources, fhir_index")
                .execute(&pool)
                .await
            {
                Ok(_) => tracing::info!(
                    written = stats.written.load(Ordering::Relaxed),
                    ms = t.elapsed().as_millis() as u64,
                    "planner statistics of the FHIR tables refreshed"
                ),
                Err(e) => tracing::warn!(error = %e, "ANALYZE of the FHIR tables failed"),
            }
            stats.running.store(false, Ordering::Release);
        });
    }

    /// Which database this store uses.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Closes the database connections (graceful shutdown).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    /// Whether both blob folders can be written (a probe file is written and removed).
    pub async fn blobs_writable(&self) -> bool {
        let (a, b) = (self.blobs.clone(), self.dicom.clone());
        tokio::task::spawn_blocking(move || a.probe().is_ok() && b.probe().is_ok())
            .await
            .unwrap_or(false)
    }

    /// Persists an analysis: blobs first (durable), then the row.
    ///
    /// # Errors
    /// [`StoreError`] when anything could not be made durable.
    pub async fn save_analysis(&self, a: &NewAnalysis<'_>, source: &str) -> Result<(), StoreError> {
        let id = a.id.to_string();
        let bundle = serde_json::to_vec(a.bundle)?;
        // Shared handles on the buffers, not copies.
        let mut files: Vec<(&str, bytes::Bytes)> = vec![
            ("bundle.json", bundle.into()),
            ("input.png", a.input_image.clone()),
        ];
        if let Some(o) = &a.overlay_png {
            files.push(("overlay.png", o.clone()));
        }
        let blobs = self.blobs.clone();
        let dir = id.clone();
        tokio::task::spawn_blocking(move || blobs.put_all(&dir, &files))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??;
        let _turn = self.write_turn().await;
        sqlx::query(
            "INSERT INTO analyses (id, created, model, model_version, label, display, probabilities, cam_method, source) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&id)
        .bind(a.created.to_rfc3339())
        .bind(a.model.0)
        .bind(a.model.1)
        .bind(a.label.0)
        .bind(a.label.1)
        .bind(serde_json::to_string(&a.probabilities)?)
        .bind(a.cam_method)
        .bind(source)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The summary of analysis `id`, if stored.
    ///
    /// # Errors
    /// [`StoreError::Db`] on database failure.
    pub async fn analysis(&self, id: &Uuid) -> Result<Option<ResultRow>, StoreError> {
        let row = sqlx::query("SELECT id, created, model, model_version, label, display, probabilities, cam_method FROM analyses WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        let Some(r) = row else { return Ok(None) };
        let probs: String = r.try_get("probabilities")?;
        Ok(Some(ResultRow {
            id: r.try_get("id")?,
            created: r.try_get("created")?,
            model: r.try_get("model")?,
            model_version: r.try_get("model_version")?,
            label: r.try_get("label")?,
            display: r.try_get("display")?,
            probabilities: serde_json::from_str(&probs)?,
            cam_method: r.try_get("cam_method")?,
        }))
    }

    /// A blob of a stored analysis (`bundle.json`, `input.png`, `overlay.png`).
    ///
    /// # Errors
    /// [`StoreError::Io`] on read failure other than absence.
    pub async fn analysis_blob(
        &self,
        id: &Uuid,
        name: &'static str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let blobs = self.blobs.clone();
        let dir = id.to_string();
        let data = tokio::task::spawn_blocking(move || blobs.get(&dir, name))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??;
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planner_statistics_are_due_at_growing_intervals_one_at_a_time() {
        let s = PlannerStats::default();
        assert!(!s.due(999), "not before 1 000 resources");
        assert!(s.due(1), "due at 1 000");
        s.running.store(false, Ordering::Release);
        assert!(!s.due(999), "next after as many again (2 000)");
        assert!(s.due(1));
        assert!(
            !s.due(2_000),
            "a refresh is still running: not twice at once"
        );
        s.running.store(false, Ordering::Release);
        assert!(s.due(2_000), "6 000 written: due, and next at 12 000");
        s.running.store(false, Ordering::Release);
        assert!(!s.due(5_999));
        assert!(s.due(1));
    }
}
