//! FHIR resources: versioned rows in `fhir_resources` and their search index in `fhir_index`.
//! Writes of one request (a create, an update, a whole transaction Bundle) commit in one
//! database transaction.

use serde_json::Value;
use sqlx::Row;

use super::sql::Sql;

use super::{NewJob, Store, StoreError};
pub(crate) use crate::fhir_model::index::instant;
use crate::fhir_model::index::{self, Entry};

/// Date comparison prefixes (FHIR R4 3.1.1.4.5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix {
    /// equal (the resource's range lies within the value's)
    Eq,
    /// not equal
    Ne,
    /// greater than
    Gt,
    /// less than
    Lt,
    /// greater or equal
    Ge,
    /// less or equal
    Le,
    /// starts after
    Sa,
    /// ends before
    Eb,
}

/// One condition; a clause ORs several of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cond {
    /// `_id`
    Id(String),
    /// `_lastUpdated`: prefix, range start, range end.
    LastUpdated(Prefix, String, String),
    /// Token parameter. `system`: None = any system, Some(None) = no system.
    Token {
        /// Parameter.
        param: &'static str,
        /// System constraint.
        system: Option<Option<String>>,
        /// Code, when given.
        code: Option<String>,
    },
    /// Reference parameter, normalised (`Patient/123`).
    Reference {
        /// Parameter.
        param: &'static str,
        /// Value.
        value: String,
    },
    /// Date parameter: prefix, range start, range end.
    Date {
        /// Parameter.
        param: &'static str,
        /// Comparison.
        prefix: Prefix,
        /// Start of the value's range.
        lo: String,
        /// End of the value's range (exclusive).
        hi: String,
    },
}

/// A parsed search (built by [`crate::fhir::search::parse`]), run by [`Store::fhir_search`].
#[derive(Debug, Clone, Default)]
pub struct SearchQuery {
    /// Clauses (ANDed), each a list of conditions (ORed).
    pub clauses: Vec<Vec<Cond>>,
    /// Page size.
    pub count: u32,
    /// Offset of the page.
    pub offset: u32,
    /// Parameters that were used, for the `self` link.
    pub used: Vec<(String, String)>,
    /// Parameters that were ignored (unknown), with why.
    pub ignored: Vec<String>,
}

/// What to write.
#[derive(Debug, Clone)]
pub struct Write {
    /// Resource type.
    pub resource_type: String,
    /// Id (server-assigned for creates).
    pub id: String,
    /// The resource; `id` and `meta.versionId`/`meta.lastUpdated` are set by the store.
    pub body: Value,
    /// `If-Match` version, when the client gave one.
    pub if_match: Option<i64>,
}

/// A stored version.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Resource type.
    pub resource_type: String,
    /// Id.
    pub id: String,
    /// Version.
    pub version: i64,
    /// `meta.lastUpdated`.
    pub last_updated: String,
    /// Whether this write created the resource (version 1).
    pub created: bool,
    /// The resource with its id and meta.
    pub body: Value,
}

/// Names the jobs a FHIR write starts, from what it stored (the jobs room implements it; the
/// store only enqueues what it is given).
pub trait Planner: Send + Sync {
    /// The jobs to enqueue, in the write's transaction, for these new versions.
    fn plan(&self, written: &[Stored]) -> Vec<NewJob>;
}

/// Plans nothing: writes that start no jobs.
pub struct NoJobs;

impl Planner for NoJobs {
    fn plan(&self, _: &[Stored]) -> Vec<NewJob> {
        Vec::new()
    }
}

/// A [`Planner`] as FHIR writes take it.
pub type Plan<'a> = &'a dyn Planner;

/// What a FHIR write stored, and the jobs it started.
#[derive(Debug, Default)]
pub struct Written {
    /// The new versions, in the order written.
    pub stored: Vec<Stored>,
    /// Ids of the jobs the plan named (for a job deduplicated by its key: the existing one).
    pub jobs: Vec<String>,
}

impl Store {
    /// Writes every resource of `writes` in one transaction: a new version of each, with its
    /// search index. Nothing is written when one fails.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] when an `If-Match` version is not the current one;
    /// [`StoreError::Db`] otherwise.
    pub async fn fhir_write(&self, writes: Vec<Write>) -> Result<Vec<Stored>, StoreError> {
        Ok(self.fhir_write_then(writes, &NoJobs).await?.stored)
    }

    /// [`Self::fhir_write`], enqueueing the jobs `plan` names for what was stored in the same
    /// transaction (an accepted ImagingStudy or Observation is never without its job).
    ///
    /// # Errors
    /// As [`Self::fhir_write`].
    pub async fn fhir_write_then(
        &self,
        writes: Vec<Write>,
        plan: Plan<'_>,
    ) -> Result<Written, StoreError> {
        let now = instant(chrono::Utc::now());
        let mut tx = self.begin_write().await?;
        let mut out = Vec::with_capacity(writes.len());
        for w in writes {
            out.push(write_one(&mut tx, w, &now).await?);
        }
        // the AuditEvent of the change, in the change's transaction
        if let Some(actor) = crate::audit::current() {
            let created = out.iter().all(|s| s.created);
            let event = crate::audit::Event {
                kind: if actor.system {
                    crate::audit::Kind::Application
                } else {
                    crate::audit::Kind::Rest(if created { "create" } else { "update" })
                },
                action: if created {
                    crate::audit::Action::Create
                } else {
                    crate::audit::Action::Update
                },
                outcome: 0,
                outcome_text: None,
                entities: out
                    .iter()
                    .map(|s| crate::audit::Entity::Fhir(format!("{}/{}", s.resource_type, s.id)))
                    .collect(),
            };
            self.audit_in(&mut tx, &event, &actor, &now).await?;
        }
        let mut jobs = Vec::new();
        for job in plan.plan(&out) {
            jobs.extend(self.insert_or_find_job(&mut tx, &job).await?);
        }
        tx.commit().await?;
        Ok(Written { stored: out, jobs })
    }

    /// Writes the AuditEvent of `event` by `actor` inside `conn`'s transaction (and queues it
    /// for the syslog feed).
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub(crate) async fn audit_in(
        &self,
        conn: &mut sqlx::AnyConnection,
        event: &crate::audit::Event,
        actor: &crate::audit::Actor,
        now: &str,
    ) -> Result<(), StoreError> {
        let body = crate::audit::resource(event, actor);
        let stored = write_one(
            conn,
            Write {
                resource_type: "AuditEvent".into(),
                id: uuid::Uuid::new_v4().to_string(),
                body,
                if_match: None,
            },
            now,
        )
        .await?;
        crate::audit::forward(&stored.body);
        Ok(())
    }

    /// Records an event on its own (reads, searches, refusals: nothing else to commit with).
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub async fn audit(
        &self,
        event: &crate::audit::Event,
        actor: &crate::audit::Actor,
    ) -> Result<(), StoreError> {
        let now = instant(chrono::Utc::now());
        let mut conn = self.pool.acquire().await?;
        self.audit_in(&mut conn, event, actor, &now).await
    }

    /// The current version of a resource, or version `version`.
    ///
    /// # Errors
    /// [`StoreError::Db`] or a stored body that no longer parses.
    pub async fn fhir_read(
        &self,
        resource_type: &str,
        id: &str,
        version: Option<i64>,
    ) -> Result<Option<Stored>, StoreError> {
        let row = match version {
            None => sqlx::query(
                "SELECT version_id, last_updated, body FROM fhir_resources WHERE resource_type = $1 AND id = $2 AND is_current = 1",
            )
            .bind(resource_type)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?,
            Some(v) => sqlx::query(
                "SELECT version_id, last_updated, body FROM fhir_resources WHERE resource_type = $1 AND id = $2 AND version_id = $3",
            )
            .bind(resource_type)
            .bind(id)
            .bind(v)
            .fetch_optional(&self.pool)
            .await?,
        };
        let Some(r) = row else { return Ok(None) };
        let body: String = r.try_get("body")?;
        let version: i64 = r.try_get("version_id")?;
        Ok(Some(Stored {
            resource_type: resource_type.to_string(),
            id: id.to_string(),
            version,
            last_updated: r.try_get("last_updated")?,
            created: version == 1,
            body: serde_json::from_str(&body)?,
        }))
    }

    /// Runs a search: the total number of matches and one page of them, newest first.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub async fn fhir_search(
        &self,
        resource_type: &str,
        q: &SearchQuery,
    ) -> Result<(i64, Vec<Stored>), StoreError> {
        let mut count = Sql::new(
            "SELECT COUNT(*) FROM fhir_resources r WHERE r.is_current = 1 AND r.resource_type = ",
        );
        count.bind(resource_type.to_string());
        push_where(&mut count, q);
        let total: i64 = count.fetch_scalar(&self.pool).await?;
        let mut page = Sql::new(
            "SELECT r.id, r.version_id, r.last_updated, r.body FROM fhir_resources r \
             WHERE r.is_current = 1 AND r.resource_type = ",
        );
        page.bind(resource_type.to_string());
        push_where(&mut page, q);
        page.push(" ORDER BY r.last_updated DESC, r.id LIMIT ");
        page.bind(i64::from(q.count));
        page.push(" OFFSET ");
        page.bind(i64::from(q.offset));
        let rows = page.fetch_all(&self.pool).await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let body: String = r.try_get("body")?;
            let version: i64 = r.try_get("version_id")?;
            out.push(Stored {
                resource_type: resource_type.to_string(),
                id: r.try_get("id")?,
                version,
                last_updated: r.try_get("last_updated")?,
                created: version == 1,
                body: serde_json::from_str(&body)?,
            });
        }
        Ok((total, out))
    }

    /// The feature key of `patient`'s latest risk assessment.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub async fn risk_state(&self, patient: &str) -> Result<Option<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT features FROM risk_state WHERE patient = $1")
                .bind(patient)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// Records the feature key of `patient`'s latest risk assessment.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub async fn set_risk_state(&self, patient: &str, features: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO risk_state (patient, features, updated) VALUES ($1, $2, $3) \
             ON CONFLICT (patient) DO UPDATE SET features = excluded.features, updated = excluded.updated",
        )
        .bind(patient)
        .bind(features)
        .bind(instant(chrono::Utc::now()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

/// Appends ` AND (…)` for each clause of `q`.
fn push_where(b: &mut Sql, q: &SearchQuery) {
    for clause in &q.clauses {
        b.push(" AND (");
        for (i, cond) in clause.iter().enumerate() {
            if i > 0 {
                b.push(" OR ");
            }
            push_cond(b, cond);
        }
        b.push(")");
    }
}

fn push_cond(b: &mut Sql, cond: &Cond) {
    let exists = |b: &mut Sql, param: &str| {
        b.push(
            "EXISTS (SELECT 1 FROM fhir_index i WHERE i.resource_type = r.resource_type \
             AND i.id = r.id AND i.param = ",
        );
        b.bind(param.to_string());
    };
    match cond {
        Cond::Id(id) => {
            b.push("r.id = ");
            b.bind(id.clone());
        }
        Cond::LastUpdated(prefix, lo, hi) => {
            // a lastUpdated instant t is the range [t, t]: compare as start = end = t
            push_range(b, "r.last_updated", "r.last_updated", *prefix, lo, hi, true);
        }
        Cond::Token {
            param,
            system,
            code,
        } => {
            exists(b, param);
            match system {
                Some(Some(s)) => {
                    b.push(" AND i.system = ");
                    b.bind(s.clone());
                }
                Some(None) => {
                    b.push(" AND i.system IS NULL");
                }
                None => {}
            }
            if let Some(c) = code {
                b.push(" AND i.value = ");
                b.bind(c.clone());
            }
            b.push(")");
        }
        Cond::Reference { param, value } => {
            exists(b, param);
            b.push(" AND i.value = ");
            b.bind(value.clone());
            b.push(")");
        }
        Cond::Date {
            param,
            prefix,
            lo,
            hi,
        } => {
            exists(b, param);
            b.push(" AND ");
            push_range(b, "i.value", "i.value_hi", *prefix, lo, hi, false);
            b.push(")");
        }
    }
}

/// Compares a stored range `[rlo, rhi)` with the search range `[lo, hi)` (FHIR R4 3.1.1.4.5.2).
/// `point`: the stored value is an instant (rlo = rhi).
fn push_range(b: &mut Sql, rlo: &str, rhi: &str, prefix: Prefix, lo: &str, hi: &str, point: bool) {
    let (lo, hi) = (lo.to_string(), hi.to_string());
    // for a point, "ends after x" is rhi >= x rather than rhi > x
    let gt = if point { " >= " } else { " > " };
    match prefix {
        Prefix::Eq | Prefix::Ne => {
            if prefix == Prefix::Ne {
                b.push("NOT ");
            }
            b.push(format!("({rlo} >= "));
            b.bind(lo);
            b.push(format!(" AND {rhi}{}", if point { " < " } else { " <= " }));
            b.bind(hi);
            b.push(")");
        }
        Prefix::Gt => {
            b.push(format!("{rhi}{gt}"));
            b.bind(hi);
        }
        Prefix::Ge => {
            b.push(format!("{rhi}{gt}"));
            b.bind(lo);
        }
        Prefix::Lt => {
            b.push(format!("{rlo} < "));
            b.bind(lo);
        }
        Prefix::Le => {
            b.push(format!("{rlo} < "));
            b.bind(hi);
        }
        Prefix::Sa => {
            b.push(format!("{rlo} >= "));
            b.bind(hi);
        }
        Prefix::Eb => {
            b.push(format!("{rhi}{}", if point { " < " } else { " <= " }));
            b.bind(lo);
        }
    }
}

/// A `Prefer: respond-async` request.
#[derive(Debug, Clone)]
pub struct AsyncJob {
    /// Id (in the status URL).
    pub id: String,
    /// `running`, `done` or `interrupted`.
    pub state: String,
    /// HTTP status of the request's own answer.
    pub status: i64,
    /// Location of a created resource.
    pub location: Option<String>,
    /// The request's own answer.
    pub body: Value,
    /// `DiagnosticReport/<id>` produced.
    pub reports: Vec<String>,
    /// Why there is no report.
    pub notes: Vec<String>,
    /// Ids of the jobs the request's resources enqueued.
    pub jobs: Vec<String>,
}

impl Store {
    /// Records an accepted asynchronous request (its resources are already stored).
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub async fn async_start(
        &self,
        id: &str,
        status: i64,
        location: Option<&str>,
        body: &Value,
        jobs: &[String],
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO fhir_async (id, created, state, status, location, body, reports, notes, jobs) \
             VALUES ($1, $2, 'running', $3, $4, $5, '[]', '[]', $6)",
        )
        .bind(id)
        .bind(instant(chrono::Utc::now()))
        .bind(status)
        .bind(location)
        .bind(serde_json::to_string(body)?)
        .bind(serde_json::to_string(jobs)?)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Marks an asynchronous request finished with what it triggered.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub async fn async_finish(
        &self,
        id: &str,
        reports: &[String],
        notes: &[String],
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE fhir_async SET state = 'done', reports = $1, notes = $2 WHERE id = $3")
            .bind(serde_json::to_string(reports)?)
            .bind(serde_json::to_string(notes)?)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// One asynchronous request.
    ///
    /// # Errors
    /// [`StoreError::Db`] or a stored value that no longer parses.
    pub async fn async_job(&self, id: &str) -> Result<Option<AsyncJob>, StoreError> {
        let Some(r) = sqlx::query(
            "SELECT id, state, status, location, body, reports, notes, jobs FROM fhir_async WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        else {
            return Ok(None);
        };
        let text = |c: &str| -> Result<String, StoreError> { Ok(r.try_get::<String, _>(c)?) };
        Ok(Some(AsyncJob {
            id: text("id")?,
            state: text("state")?,
            status: r.try_get("status")?,
            location: r.try_get("location")?,
            body: serde_json::from_str(&text("body")?)?,
            reports: serde_json::from_str(&text("reports")?)?,
            notes: serde_json::from_str(&text("notes")?)?,
            jobs: serde_json::from_str(&text("jobs")?)?,
        }))
    }
}

/// One new version of a resource with its search index, inside `conn`'s transaction.
async fn write_one(
    conn: &mut sqlx::AnyConnection,
    mut w: Write,
    now: &str,
) -> Result<Stored, StoreError> {
    let current: Option<i64> = sqlx::query_scalar(
            "SELECT version_id FROM fhir_resources WHERE resource_type = $1 AND id = $2 AND is_current = 1",
        )
        .bind(&w.resource_type)
        .bind(&w.id)
        .fetch_optional(&mut *conn)
        .await?;
    if let Some(want) = w.if_match {
        if current != Some(want) {
            return Err(StoreError::Conflict(format!(
                "{}/{}: If-Match version {want} is not the current version ({})",
                w.resource_type,
                w.id,
                current.map_or("none".into(), |v| v.to_string())
            )));
        }
    }
    let version = current.unwrap_or(0) + 1;
    if let Some(obj) = w.body.as_object_mut() {
        obj.insert("id".into(), Value::String(w.id.clone()));
        let meta = obj
            .entry("meta")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Some(m) = meta.as_object_mut() {
            m.insert("versionId".into(), Value::String(version.to_string()));
            m.insert("lastUpdated".into(), Value::String(now.to_string()));
        }
    }
    sqlx::query(
            "UPDATE fhir_resources SET is_current = 0 WHERE resource_type = $1 AND id = $2 AND is_current = 1",
        )
        .bind(&w.resource_type)
        .bind(&w.id)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
            "INSERT INTO fhir_resources (resource_type, id, version_id, last_updated, is_current, body) \
             VALUES ($1, $2, $3, $4, 1, $5)",
        )
        .bind(&w.resource_type)
        .bind(&w.id)
        .bind(version)
        .bind(now)
        .bind(serde_json::to_string(&w.body)?)
        .execute(&mut *conn)
        .await
        .map_err(|e| match e.as_database_error() {
            Some(d) if d.is_unique_violation() => StoreError::Concurrent(format!(
                "{}/{} was updated by another request at the same time; send it again",
                w.resource_type, w.id
            )),
            _ => StoreError::Db(e),
        })?;
    sqlx::query("DELETE FROM fhir_index WHERE resource_type = $1 AND id = $2")
        .bind(&w.resource_type)
        .bind(&w.id)
        .execute(&mut *conn)
        .await?;
    for Entry {
        param,
        system,
        value,
        value_hi,
    } in index::extract(&w.resource_type, &w.body)
    {
        sqlx::query(
                "INSERT INTO fhir_index (resource_type, id, param, system, value, value_hi) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&w.resource_type)
            .bind(&w.id)
            .bind(param)
            .bind(system)
            .bind(value)
            .bind(value_hi)
            .execute(&mut *conn)
            .await?;
    }
    Ok(Stored {
        resource_type: w.resource_type,
        id: w.id,
        version,
        last_updated: now.to_string(),
        created: current.is_none(),
        body: w.body,
    })
}
