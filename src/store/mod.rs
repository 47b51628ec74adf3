//! Persistence: all SQL lives here (sqlx, migrations in `migrations/`), blobs live in
//! [`blob::BlobStore`]. A result is acknowledged only after its blobs are durable and its row is
//! committed, so a crash never leaves an answered analysis behind.

pub mod blob;
pub mod exports;
pub mod fhir;
pub mod instances;

use std::path::Path;
use std::str::FromStr;

use serde::Serialize;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::Row;
use uuid::Uuid;

pub use blob::BlobStore;
pub use exports::ExportRow;
pub use instances::{InstanceStatus, Query, Source, StudyHit};

use crate::pipeline::Analysis;

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
}

/// A stored analysis summary (`GET /v1/results/{id}`).
#[derive(Debug, Clone, Serialize)]
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
    /// `{key: p}`.
    pub probabilities: serde_json::Value,
    /// Heatmap method.
    pub cam_method: String,
}

/// Database + blobs.
#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
    blobs: BlobStore,
    dicom: BlobStore,
}

impl Store {
    /// Opens (creating if needed) the SQLite database and blob folder in `data_dir`, and runs
    /// migrations.
    ///
    /// # Errors
    /// When the folder or database cannot be created or migrated.
    pub async fn open(data_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir)?;
        let url = format!("sqlite://{}", data_dir.join("carina.db").display());
        let options = SqliteConnectOptions::from_str(&url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(std::time::Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Self {
            pool,
            blobs: BlobStore::new(data_dir.join("results"))?,
            dicom: BlobStore::new(data_dir.join("dicom"))?,
        })
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    /// Persists an analysis: blobs first (durable), then the row.
    ///
    /// # Errors
    /// [`StoreError`] when anything could not be made durable.
    pub async fn save_analysis(&self, a: &Analysis, source: &str) -> Result<(), StoreError> {
        let id = a.id.to_string();
        let bundle = serde_json::to_vec(&a.bundle)?;
        let mut files: Vec<(&str, Vec<u8>)> =
            vec![("bundle.json", bundle), ("input.png", a.input_png.clone())];
        if let Some(o) = &a.overlay_png {
            files.push(("overlay.png", o.clone()));
        }
        let blobs = self.blobs.clone();
        let dir = id.clone();
        tokio::task::spawn_blocking(move || {
            for (name, data) in files {
                blobs.put(&dir, name, &data)?;
            }
            Ok::<_, std::io::Error>(())
        })
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))??;
        sqlx::query(
            "INSERT INTO analyses (id, created, model, model_version, label, display, probabilities, cam_method, source) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&id)
        .bind(a.created.to_rfc3339())
        .bind(&a.model.manifest.name)
        .bind(&a.model.manifest.version)
        .bind(a.label_key())
        .bind(a.label_display())
        .bind(serde_json::to_string(&a.probabilities_json())?)
        .bind(a.cam_method().as_str())
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
        let row = sqlx::query("SELECT id, created, model, model_version, label, display, probabilities, cam_method FROM analyses WHERE id = ?")
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
