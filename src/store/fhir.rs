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
    /// `_total=none`: no count of all matches (a search matching most of a large store then
    /// costs one page, not a pass over every match).
    pub no_total: bool,
}

/// One page of a search.
#[derive(Debug)]
pub struct SearchPage {
    /// Number of all matches (`None` with `_total=none`).
    pub total: Option<i64>,
    /// The page, newest first.
    pub hits: Vec<Stored>,
    /// Whether matches follow this page.
    pub more: bool,
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
    /// The id was generated for this write (a create): no version of it can exist yet, so the
    /// store does not look for one (three statements fewer per resource).
    pub fresh: bool,
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
        let mut index = Vec::new();
        for w in writes {
            out.push(write_one(&mut tx, w, &now, &mut index).await?);
        }
        insert_index(&mut tx, &index).await?;
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
        self.wrote_fhir(out.len());
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
        let mut index = Vec::new();
        let stored = write_one(
            conn,
            Write {
                resource_type: "AuditEvent".into(),
                id: uuid::Uuid::new_v4().to_string(),
                body,
                if_match: None,
                fresh: true,
            },
            now,
            &mut index,
        )
        .await?;
        insert_index(conn, &index).await?;
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

    /// Runs a search: one page of matches, newest first, with the number of all matches unless
    /// `q.no_total`.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub async fn fhir_search(
        &self,
        resource_type: &str,
        q: &SearchQuery,
    ) -> Result<SearchPage, StoreError> {
        let total = if q.no_total {
            None
        } else {
            let mut count = Sql::new("SELECT COUNT(*) FROM ");
            push_matches(&mut count, resource_type, q);
            Some(count.fetch_scalar::<i64>(&self.pool).await?)
        };
        // without a total, one row past the page says whether another page follows
        let limit = i64::from(q.count) + i64::from(total.is_none());
        // the page's keys first (ordered and cut from the index rows), then only their bodies
        let mut page = Sql::new("SELECT f.id, f.version_id, f.last_updated, f.body FROM (SELECT r.id, r.version_id FROM ");
        push_matches(&mut page, resource_type, q);
        page.push(" ORDER BY r.last_updated DESC, r.id LIMIT ");
        page.bind(limit);
        page.push(" OFFSET ");
        page.bind(i64::from(q.offset));
        page.push(") p CROSS JOIN fhir_resources f WHERE f.resource_type = ");
        page.bind(resource_type.to_string());
        page.push(
            " AND f.id = p.id AND f.version_id = p.version_id ORDER BY f.last_updated DESC, f.id",
        );
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
        let more = match total {
            Some(n) => i64::from(q.offset) + i64::from(q.count) < n && q.count > 0,
            None => out.len() > q.count as usize,
        };
        out.truncate(q.count as usize);
        Ok(SearchPage {
            total,
            hits: out,
            more,
        })
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

/// Appends `fhir_resources r WHERE <conditions>`: the current resources of `resource_type`
/// that match `q`. When `q` has clauses on indexed parameters, the ids of one of them come from
/// the index (`r.id IN (<lookups of its OR'd values>)`), each candidate is checked against the
/// others through its own index rows, and `+r.is_current` keeps SQLite from walking every
/// current resource of the type (its index on `is_current`) and testing each against the set
/// instead of looking the set's ids up: a search costs what it matches (before: 80 ms for no
/// match among 57 000 Observations on SQLite; a correlated `EXISTS` per row, 2.4 s for 3 670 on
/// PostgreSQL).
fn push_matches(b: &mut Sql, resource_type: &str, q: &SearchQuery) {
    let (indexed, other): (Vec<&Vec<Cond>>, Vec<&Vec<Cond>>) = q
        .clauses
        .iter()
        .partition(|c| !c.is_empty() && c.iter().all(|c| index_param(c).is_some()));
    b.push("fhir_resources r WHERE r.resource_type = ");
    b.bind(resource_type.to_string());
    // the clause whose ids are looked up: a reference or token (a patient, a code) rather than
    // a date range, which can match most of the store
    let driver = indexed
        .iter()
        .position(|c| !matches!(c[0], Cond::Date { .. }))
        .unwrap_or(0);
    match indexed.get(driver) {
        None => {
            b.push(" AND r.is_current = 1");
        }
        Some(clause) => {
            b.push(" AND +r.is_current = 1 AND r.id IN (");
            for (i, cond) in clause.iter().enumerate() {
                if i > 0 {
                    b.push(" UNION ALL ");
                }
                push_index_select(b, resource_type, cond);
            }
            b.push(")");
        }
    }
    // the other indexed clauses are checked on each candidate through its own index rows
    // (`param || ''` keeps SQLite on the (resource_type, id) index there)
    for (_, clause) in indexed.iter().enumerate().filter(|(k, _)| *k != driver) {
        b.push(
            " AND EXISTS (SELECT 1 FROM fhir_index i WHERE i.resource_type = r.resource_type \
             AND i.id = r.id AND (",
        );
        for (i, cond) in clause.iter().enumerate() {
            if i > 0 {
                b.push(" OR ");
            }
            b.push("(");
            push_index_predicate(b, cond, "(i.param || '')");
            b.push(")");
        }
        b.push("))");
    }
    for clause in other {
        b.push(" AND (");
        for (i, cond) in clause.iter().enumerate() {
            if i > 0 {
                b.push(" OR ");
            }
            push_cond(b, resource_type, cond);
        }
        b.push(")");
    }
}

/// The `fhir_index` parameter a condition looks up (`None` for `_id` and `_lastUpdated`, which
/// are columns of the resource row).
fn index_param(cond: &Cond) -> Option<&'static str> {
    match cond {
        Cond::Token { param, .. } | Cond::Reference { param, .. } | Cond::Date { param, .. } => {
            Some(param)
        }
        Cond::Id(_) | Cond::LastUpdated(..) => None,
    }
}

fn push_cond(b: &mut Sql, resource_type: &str, cond: &Cond) {
    match cond {
        Cond::Id(id) => {
            b.push("r.id = ");
            b.bind(id.clone());
        }
        Cond::LastUpdated(prefix, lo, hi) => {
            // a lastUpdated instant t is the range [t, t]: compare as start = end = t
            push_range(b, "r.last_updated", "r.last_updated", *prefix, lo, hi, true);
        }
        Cond::Token { .. } | Cond::Reference { .. } | Cond::Date { .. } => {
            b.push("r.id IN (");
            push_index_select(b, resource_type, cond);
            b.push(")");
        }
    }
}

/// `SELECT i.id FROM fhir_index i WHERE …`: the ids of the current resources of
/// `resource_type` with an index row matching `cond` (an index condition).
fn push_index_select(b: &mut Sql, resource_type: &str, cond: &Cond) {
    b.push("SELECT i.id FROM fhir_index i WHERE i.resource_type = ");
    b.bind(resource_type.to_string());
    b.push(" AND ");
    push_index_predicate(b, cond, "i.param");
}

/// `<param column> = … AND <value conditions>` of an index condition over `fhir_index i`.
fn push_index_predicate(b: &mut Sql, cond: &Cond, param_column: &str) {
    let Some(param) = index_param(cond) else {
        return;
    };
    b.push(format!("{param_column} = "));
    b.bind(param.to_string());
    match cond {
        Cond::Token { system, code, .. } => {
            if let Some(c) = code {
                b.push(" AND i.value = ");
                b.bind(c.clone());
            }
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
        }
        Cond::Reference { value, .. } => {
            b.push(" AND i.value = ");
            b.bind(value.clone());
        }
        Cond::Date { prefix, lo, hi, .. } => {
            b.push(" AND ");
            push_range(b, "i.value", "i.value_hi", *prefix, lo, hi, false);
        }
        Cond::Id(_) | Cond::LastUpdated(..) => {}
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

/// One index row waiting to be written: resource type, id, row.
type IndexRow = (String, String, Entry);

/// One new version of a resource inside `conn`'s transaction; its search index rows are added
/// to `index` (written by [`insert_index`] once the transaction's resources are in).
async fn write_one(
    conn: &mut sqlx::AnyConnection,
    mut w: Write,
    now: &str,
    index: &mut Vec<IndexRow>,
) -> Result<Stored, StoreError> {
    let current: Option<i64> = if w.fresh {
        None
    } else {
        sqlx::query_scalar(
            "SELECT version_id FROM fhir_resources WHERE resource_type = $1 AND id = $2 AND is_current = 1",
        )
        .bind(&w.resource_type)
        .bind(&w.id)
        .fetch_optional(&mut *conn)
        .await?
    };
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
    if !w.fresh {
        sqlx::query(
            "UPDATE fhir_resources SET is_current = 0 WHERE resource_type = $1 AND id = $2 AND is_current = 1",
        )
        .bind(&w.resource_type)
        .bind(&w.id)
        .execute(&mut *conn)
        .await?;
    }
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
    // after the new version's insert, as before: a concurrent writer of the same resource
    // fails on that insert (409) before it touches the index rows (deleting them first let two
    // updates of one resource deadlock on PostgreSQL)
    if !w.fresh {
        sqlx::query("DELETE FROM fhir_index WHERE resource_type = $1 AND id = $2")
            .bind(&w.resource_type)
            .bind(&w.id)
            .execute(&mut *conn)
            .await?;
        // an earlier version written in this same transaction is no longer current either
        index.retain(|(t, id, _)| !(t == &w.resource_type && id == &w.id));
    }
    index.extend(
        index::extract(&w.resource_type, &w.body)
            .into_iter()
            .map(|e| (w.resource_type.clone(), w.id.clone(), e)),
    );
    Ok(Stored {
        resource_type: w.resource_type,
        id: w.id,
        version,
        last_updated: now.to_string(),
        created: current.is_none(),
        body: w.body,
    })
}

/// Index rows per `INSERT` (6 values each: well under SQLite's and PostgreSQL's bind limits).
const INDEX_ROWS_PER_INSERT: usize = 256;

/// Writes search index rows, many per statement (one round trip per 256 rows on PostgreSQL
/// instead of one per row).
async fn insert_index(conn: &mut sqlx::AnyConnection, rows: &[IndexRow]) -> Result<(), StoreError> {
    for chunk in rows.chunks(INDEX_ROWS_PER_INSERT) {
        let mut q = Sql::new(
            "INSERT INTO fhir_index (resource_type, id, param, system, value, value_hi) VALUES ",
        );
        for (k, (rt, id, e)) in chunk.iter().enumerate() {
            q.push(if k == 0 { "(" } else { ", (" });
            q.bind(rt.clone());
            q.push(", ");
            q.bind(id.clone());
            q.push(", ");
            q.bind(e.param.to_string());
            q.push(", ");
            q.bind(e.system.clone());
            q.push(", ");
            q.bind(e.value.clone());
            q.push(", ");
            q.bind(e.value_hi.clone());
            q.push(")");
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}
