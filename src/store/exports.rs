//! SQL for result exports to PACS destinations (table `dicom_exports`): one row per instance
//! and destination, with attempts, the next attempt time and the last error.

use chrono::{DateTime, Utc};
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{Store, StoreError};

/// One export of one instance to one destination.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct ExportRow {
    /// The instance sent.
    pub sop_instance_uid: String,
    /// Destination name (from the configuration).
    pub destination: String,
    /// pending | sent | failed.
    pub state: String,
    /// Attempts made.
    pub attempts: i64,
    /// When the next attempt is due (RFC 3339).
    pub next_attempt: String,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// Last change (RFC 3339).
    pub updated: String,
}

fn row(r: &AnyRow) -> Result<ExportRow, sqlx::Error> {
    Ok(ExportRow {
        sop_instance_uid: r.try_get("sop_instance_uid")?,
        destination: r.try_get("destination")?,
        state: r.try_get("state")?,
        attempts: r.try_get("attempts")?,
        next_attempt: r.try_get("next_attempt")?,
        last_error: r.try_get("last_error")?,
        updated: r.try_get("updated")?,
    })
}

impl Store {
    /// Queues `sop` for each destination (once: a queued or sent export is left alone).
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub async fn enqueue_exports(
        &self,
        sop: &str,
        destinations: &[String],
    ) -> Result<(), StoreError> {
        let now = Utc::now().to_rfc3339();
        for d in destinations {
            sqlx::query(
                "INSERT INTO dicom_exports (sop_instance_uid, destination, state, attempts, \
                 next_attempt, updated) VALUES ($1, $2, 'pending', 0, $3, $4) \
                 ON CONFLICT (sop_instance_uid, destination) DO NOTHING",
            )
            .bind(sop)
            .bind(d)
            .bind(&now)
            .bind(&now)
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }

    /// Claims pending exports due at `now`, oldest first: their next attempt moves `lease`
    /// ahead, so another replica leaves them alone while this one sends them (a crash makes
    /// them due again when the lease ends).
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub async fn due_exports(
        &self,
        now: DateTime<Utc>,
        limit: i64,
        lease: chrono::Duration,
    ) -> Result<Vec<ExportRow>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE dicom_exports SET next_attempt = $1 WHERE (sop_instance_uid, destination) IN \
             (SELECT sop_instance_uid, destination FROM dicom_exports WHERE state = 'pending' \
             AND next_attempt <= $2 ORDER BY next_attempt LIMIT $3{}) RETURNING *",
            self.dialect.skip_locked()
        )))
        .bind((now + lease).to_rfc3339())
        .bind(now.to_rfc3339())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(row).collect::<Result<_, _>>()?)
    }

    /// The earliest next attempt among pending exports.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub async fn next_export_due(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        let r: Option<String> = sqlx::query_scalar(
            "SELECT MIN(next_attempt) FROM dicom_exports WHERE state = 'pending'",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(r.and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
            .map(|t| t.with_timezone(&Utc)))
    }

    /// Records the outcome of an attempt.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub async fn record_export(
        &self,
        sop: &str,
        destination: &str,
        state: &str,
        attempts: i64,
        next_attempt: DateTime<Utc>,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE dicom_exports SET state = $1, attempts = $2, next_attempt = $3, last_error = $4, \
             updated = $5 WHERE sop_instance_uid = $6 AND destination = $7",
        )
        .bind(state)
        .bind(attempts)
        .bind(next_attempt.to_rfc3339())
        .bind(error)
        .bind(Utc::now().to_rfc3339())
        .bind(sop)
        .bind(destination)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Exports, optionally only those of one instance or in one state, newest first.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub async fn exports(
        &self,
        sop: Option<&str>,
        state: Option<&str>,
        limit: i64,
    ) -> Result<Vec<ExportRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM dicom_exports WHERE ($1 IS NULL OR sop_instance_uid = $2) \
             AND ($3 IS NULL OR state = $4) ORDER BY updated DESC LIMIT $5",
        )
        .bind(sop)
        .bind(sop)
        .bind(state)
        .bind(state)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(row).collect::<Result<_, _>>()?)
    }
}
