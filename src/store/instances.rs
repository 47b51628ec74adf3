//! SQL for stored DICOM instances and their analysis state (table `dicom_instances`).

use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Row};

use super::jobs::NewJob;
use super::sql::Sql;

use super::{Store, StoreError};
use crate::dicom::InstanceIndex;

/// Where an instance came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// DICOMweb STOW-RS.
    Stow,
    /// DIMSE C-STORE.
    Dimse,
    /// `POST /v1/analyze`.
    Api,
    /// A result Carina made (Secondary Capture).
    Result,
    /// Fetched by WADO-RS for an ImagingStudy.
    Wado,
}

impl Source {
    /// Stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stow => "stow",
            Self::Dimse => "dimse",
            Self::Api => "api",
            Self::Result => "result",
            Self::Wado => "wado",
        }
    }
}

/// The analysis state of a stored instance (the job status shown by the API).
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct InstanceStatus {
    /// SOP Instance UID.
    pub sop_instance_uid: String,
    /// Study Instance UID.
    pub study_uid: String,
    /// Series Instance UID.
    pub series_uid: String,
    /// How it arrived.
    pub source: String,
    /// When it was stored (RFC 3339).
    pub received: String,
    /// pending | done | skipped | failed.
    pub analysis_state: String,
    /// Why skipped or failed, or which model ran.
    pub analysis_reason: Option<String>,
    /// The analysis (`/v1/results/{id}`) when done.
    pub analysis_id: Option<String>,
    /// For Carina's results: the analysed instance.
    pub result_of: Option<String>,
}

/// QIDO-RS match keys (values as sent; `*`/`?` wildcards in text keys).
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// StudyInstanceUID.
    pub study_uid: Option<String>,
    /// SeriesInstanceUID.
    pub series_uid: Option<String>,
    /// SOPInstanceUID.
    pub sop_instance_uid: Option<String>,
    /// PatientID.
    pub patient_id: Option<String>,
    /// AccessionNumber.
    pub accession_number: Option<String>,
    /// Modality (ModalitiesInStudy at study level).
    pub modality: Option<String>,
    /// StudyDate: `YYYYMMDD`, `A-B`, `A-`, `-B`.
    pub study_date: Option<String>,
    /// Page size.
    pub limit: i64,
    /// Rows skipped.
    pub offset: i64,
}

/// A study found by QIDO.
#[derive(Debug, Clone)]
pub struct StudyHit {
    /// Attributes of one of its instances.
    pub index: InstanceIndex,
    /// Number of series.
    pub series: i64,
    /// Number of instances.
    pub instances: i64,
    /// Modalities in the study.
    pub modalities: Vec<String>,
}

const COLUMNS: &str = "sop_instance_uid, sop_class_uid, study_uid, series_uid, transfer_syntax, \
    patient_id, patient_name, patient_birth_date, patient_sex, study_date, study_time, \
    accession_number, study_id, study_description, referring_physician, modality, series_number, \
    series_description, body_part, view_position, instance_number, rows_, columns_, frames";

fn index_from(r: &AnyRow) -> Result<InstanceIndex, sqlx::Error> {
    Ok(InstanceIndex {
        sop_instance_uid: r.try_get("sop_instance_uid")?,
        sop_class_uid: r.try_get("sop_class_uid")?,
        study_uid: r.try_get("study_uid")?,
        series_uid: r.try_get("series_uid")?,
        transfer_syntax: r.try_get("transfer_syntax")?,
        patient_id: r.try_get("patient_id")?,
        patient_name: r.try_get("patient_name")?,
        patient_birth_date: r.try_get("patient_birth_date")?,
        patient_sex: r.try_get("patient_sex")?,
        study_date: r.try_get("study_date")?,
        study_time: r.try_get("study_time")?,
        accession_number: r.try_get("accession_number")?,
        study_id: r.try_get("study_id")?,
        study_description: r.try_get("study_description")?,
        referring_physician: r.try_get("referring_physician")?,
        modality: r.try_get("modality")?,
        series_number: r.try_get("series_number")?,
        series_description: r.try_get("series_description")?,
        body_part: r.try_get("body_part")?,
        view_position: r.try_get("view_position")?,
        instance_number: r.try_get("instance_number")?,
        rows: r.try_get("rows_")?,
        columns: r.try_get("columns_")?,
        frames: r.try_get("frames")?,
    })
}

fn status_from(r: &AnyRow) -> Result<InstanceStatus, sqlx::Error> {
    Ok(InstanceStatus {
        sop_instance_uid: r.try_get("sop_instance_uid")?,
        study_uid: r.try_get("study_uid")?,
        series_uid: r.try_get("series_uid")?,
        source: r.try_get("source")?,
        received: r.try_get("received")?,
        analysis_state: r.try_get("analysis_state")?,
        analysis_reason: r.try_get("analysis_reason")?,
        analysis_id: r.try_get("analysis_id")?,
        result_of: r.try_get("result_of")?,
    })
}

/// `*`/`?` wildcards → a LIKE pattern (with `\` escapes), or `None` for an exact match.
fn like_pattern(v: &str) -> Option<String> {
    if !v.contains(['*', '?']) {
        return None;
    }
    let mut out = String::new();
    for c in v.chars() {
        match c {
            '*' => out.push('%'),
            '?' => out.push('_'),
            '%' | '_' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    Some(out)
}

fn text_match(q: &mut Sql, column: &str, value: &str) {
    match like_pattern(value) {
        Some(p) => {
            q.push(format!(" AND {column} LIKE "));
            q.bind(p);
            q.push(" ESCAPE '\\'");
        }
        None => {
            q.push(format!(" AND {column} = "));
            q.bind(value.to_string());
        }
    }
}

/// Appends the WHERE clauses of `f` (after a `WHERE 1=1`).
fn filters(q: &mut Sql, f: &Query) {
    for (col, v) in [
        ("study_uid", &f.study_uid),
        ("series_uid", &f.series_uid),
        ("sop_instance_uid", &f.sop_instance_uid),
    ] {
        if let Some(v) = v {
            q.push(format!(" AND {col} = "));
            q.bind(v.clone());
        }
    }
    if let Some(v) = &f.patient_id {
        text_match(q, "patient_id", v);
    }
    if let Some(v) = &f.accession_number {
        text_match(q, "accession_number", v);
    }
    if let Some(v) = &f.modality {
        q.push(" AND modality = ");
        q.bind(v.clone());
    }
    if let Some(d) = &f.study_date {
        match d.split_once('-') {
            Some((from, to)) => {
                if !from.is_empty() {
                    q.push(" AND study_date >= ");
                    q.bind(from.to_string());
                }
                if !to.is_empty() {
                    q.push(" AND study_date <= ");
                    q.bind(to.to_string());
                }
            }
            None => {
                q.push(" AND study_date = ");
                q.bind(d.clone());
            }
        }
    }
}

impl Store {
    /// Records an instance whose file is already durable and, in the same transaction, its
    /// analysis job (`claimed_by`: the caller runs it now under that lease). Returns `false`
    /// when the SOP Instance UID was already stored (nothing changes then), with the job id.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    #[allow(clippy::too_many_arguments)]
    pub async fn insert_instance(
        &self,
        ix: &InstanceIndex,
        size: usize,
        source: Source,
        state: &str,
        reason: Option<&str>,
        result_of: Option<&str>,
        job: Option<(&NewJob, Option<(&str, std::time::Duration)>)>,
    ) -> Result<(bool, Option<String>), StoreError> {
        let mut tx = self.begin_write().await?;
        let r = sqlx::query(
            "INSERT INTO dicom_instances (sop_instance_uid, sop_class_uid, study_uid, series_uid, \
             transfer_syntax, patient_id, patient_name, patient_birth_date, patient_sex, study_date, \
             study_time, accession_number, study_id, study_description, referring_physician, \
             modality, series_number, series_description, body_part, view_position, \
             instance_number, rows_, columns_, frames, size, received, source, analysis_state, \
             analysis_reason, analysis_id, result_of) VALUES \
             ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29, $30, $31) \
             ON CONFLICT (sop_instance_uid) DO NOTHING",
        )
        .bind(&ix.sop_instance_uid)
        .bind(&ix.sop_class_uid)
        .bind(&ix.study_uid)
        .bind(&ix.series_uid)
        .bind(&ix.transfer_syntax)
        .bind(&ix.patient_id)
        .bind(&ix.patient_name)
        .bind(&ix.patient_birth_date)
        .bind(&ix.patient_sex)
        .bind(&ix.study_date)
        .bind(&ix.study_time)
        .bind(&ix.accession_number)
        .bind(&ix.study_id)
        .bind(&ix.study_description)
        .bind(&ix.referring_physician)
        .bind(&ix.modality)
        .bind(ix.series_number)
        .bind(&ix.series_description)
        .bind(&ix.body_part)
        .bind(&ix.view_position)
        .bind(ix.instance_number)
        .bind(ix.rows)
        .bind(ix.columns)
        .bind(ix.frames)
        .bind(i64::try_from(size).unwrap_or(i64::MAX))
        .bind(chrono::Utc::now().to_rfc3339())
        .bind(source.as_str())
        .bind(state)
        .bind(reason)
        .bind(None::<String>)
        .bind(result_of)
        .execute(&mut *tx)
        .await?;
        let new = r.rows_affected() == 1;
        let mut id = None;
        if let (true, Some((job, claimed))) = (new, job) {
            id = self.insert_job(&mut tx, job, claimed).await?;
        }
        // the AuditEvent of the transfer, in the same transaction
        if let (true, Some(actor)) = (new, crate::audit::current()) {
            let event = crate::audit::Event {
                kind: crate::audit::Kind::InstancesTransferred,
                action: crate::audit::Action::Create,
                outcome: 0,
                outcome_text: Some(format!("stored ({})", source.as_str())),
                entities: vec![
                    crate::audit::Entity::Study(ix.study_uid.clone()),
                    crate::audit::Entity::Instance(ix.sop_instance_uid.clone()),
                ],
            };
            let now = super::fhir::instant(chrono::Utc::now());
            self.audit_in(&mut tx, &event, &actor, &now).await?;
        }
        tx.commit().await?;
        Ok((new, id))
    }

    /// The index of a stored instance.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub async fn instance(&self, sop: &str) -> Result<Option<InstanceIndex>, StoreError> {
        let r = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM dicom_instances WHERE sop_instance_uid = $1"
        )))
        .bind(sop)
        .fetch_optional(&self.pool)
        .await?;
        Ok(r.as_ref().map(index_from).transpose()?)
    }

    /// The analysis status of a stored instance.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub async fn instance_status(&self, sop: &str) -> Result<Option<InstanceStatus>, StoreError> {
        let r = sqlx::query("SELECT * FROM dicom_instances WHERE sop_instance_uid = $1")
            .bind(sop)
            .fetch_optional(&self.pool)
            .await?;
        Ok(r.as_ref().map(status_from).transpose()?)
    }

    /// Statuses of the instances of a study, Carina's results included.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub async fn study_status(&self, study: &str) -> Result<Vec<InstanceStatus>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM dicom_instances WHERE study_uid = $1 ORDER BY received, sop_instance_uid",
        )
        .bind(study)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(status_from).collect::<Result<_, _>>()?)
    }

    /// Sets the analysis state of an instance. `done` is final: only another `done` replaces it.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub async fn set_analysis_state(
        &self,
        sop: &str,
        state: &str,
        reason: Option<&str>,
        analysis_id: Option<&str>,
    ) -> Result<(), StoreError> {
        let _turn = self.write_turn().await;
        // `done` is final: a late failure of an attempt whose lease another attempt took over
        // (the database was down past the lease) must not overwrite the finished analysis
        sqlx::query(
            "UPDATE dicom_instances SET analysis_state = $1, analysis_reason = $2, analysis_id = $3 \
             WHERE sop_instance_uid = $4 AND (analysis_state <> 'done' OR $1 = 'done')",
        )
        .bind(state)
        .bind(reason)
        .bind(analysis_id)
        .bind(sop)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Instances matching `f` (QIDO-RS instance level), ordered by series and instance number.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub async fn search_instances(&self, f: &Query) -> Result<Vec<InstanceIndex>, StoreError> {
        let mut q = Sql::new(format!("SELECT {COLUMNS} FROM dicom_instances WHERE 1=1"));
        filters(&mut q, f);
        q.push(" ORDER BY study_uid, series_uid, instance_number, sop_instance_uid LIMIT ");
        q.bind(f.limit);
        q.push(" OFFSET ");
        q.bind(f.offset);
        let rows = q.fetch_all(&self.pool).await?;
        Ok(rows.iter().map(index_from).collect::<Result<_, _>>()?)
    }

    /// Series matching `f`, each with one instance's attributes and its instance count.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub async fn search_series(&self, f: &Query) -> Result<Vec<(InstanceIndex, i64)>, StoreError> {
        let mut q = Sql::new(format!(
            "SELECT {COLUMNS}, n FROM (SELECT *, COUNT(*) OVER (PARTITION BY series_uid) AS n, \
             ROW_NUMBER() OVER (PARTITION BY series_uid ORDER BY instance_number, sop_instance_uid) AS k \
             FROM dicom_instances WHERE 1=1"
        ));
        filters(&mut q, f);
        q.push(") AS s WHERE k = 1 ORDER BY study_uid, series_number, series_uid LIMIT ");
        q.bind(f.limit);
        q.push(" OFFSET ");
        q.bind(f.offset);
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| Ok((index_from(r)?, r.try_get("n")?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Studies matching `f` (Modality matches ModalitiesInStudy).
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub async fn search_studies(&self, f: &Query) -> Result<Vec<StudyHit>, StoreError> {
        let mut inner = f.clone();
        let modality = inner.modality.take();
        let mut q = Sql::new(format!(
            "SELECT {COLUMNS}, n_series, n_inst, mods FROM (SELECT *, \
             ROW_NUMBER() OVER (PARTITION BY study_uid ORDER BY received, sop_instance_uid) AS k, \
             COUNT(*) OVER (PARTITION BY study_uid) AS n_inst \
             FROM dicom_instances WHERE 1=1"
        ));
        filters(&mut q, &inner);
        q.push(format!(
            ") AS i JOIN (SELECT study_uid AS s, COUNT(DISTINCT series_uid) AS n_series, \
             {} AS mods FROM dicom_instances GROUP BY study_uid) AS g \
             ON g.s = i.study_uid WHERE k = 1",
            self.dialect.concat_distinct("modality")
        ));
        if let Some(m) = modality {
            q.push(" AND (',' || mods || ',') LIKE ");
            q.bind(format!("%,{m},%"));
        }
        q.push(" ORDER BY study_date, study_uid LIMIT ");
        q.bind(f.limit);
        q.push(" OFFSET ");
        q.bind(f.offset);
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                let mods: Option<String> = r.try_get("mods")?;
                let mut modalities: Vec<String> = mods
                    .unwrap_or_default()
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect();
                modalities.sort();
                Ok(StudyHit {
                    index: index_from(r)?,
                    series: r.try_get("n_series")?,
                    instances: r.try_get("n_inst")?,
                    modalities,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Writes an instance file durably (before its row is inserted).
    ///
    /// # Errors
    /// [`StoreError::Io`].
    pub async fn put_instance_file(
        &self,
        ix: &InstanceIndex,
        data: bytes::Bytes,
    ) -> Result<(), StoreError> {
        let blobs = self.dicom.clone();
        let (key, name) = (ix.study_uid.clone(), format!("{}.dcm", ix.sop_instance_uid));
        tokio::task::spawn_blocking(move || blobs.put(&key, &name, &data))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??;
        Ok(())
    }

    /// Reads a stored instance file.
    ///
    /// # Errors
    /// [`StoreError::Io`] on read failure other than absence.
    pub async fn instance_file(&self, ix: &InstanceIndex) -> Result<Option<Vec<u8>>, StoreError> {
        let blobs = self.dicom.clone();
        let (key, name) = (ix.study_uid.clone(), format!("{}.dcm", ix.sop_instance_uid));
        Ok(tokio::task::spawn_blocking(move || blobs.get(&key, &name))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??)
    }

    /// Free bytes on the file system holding the blobs, when known.
    pub fn free_bytes(&self) -> Option<u64> {
        self.dicom.free_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_become_escaped_like_patterns() {
        assert_eq!(like_pattern("ABC"), None);
        assert_eq!(like_pattern("AB*").as_deref(), Some("AB%"));
        assert_eq!(like_pattern("A_?").as_deref(), Some("A\\__"));
    }
}
