//! `/fhir`: FHIR R4 REST (JSON). Handlers read headers and bodies, call [`crate::fhir`] and map
//! the answer: `Location`, `ETag`, `Last-Modified`, `Prefer: return=…`, and every error as an
//! OperationOutcome with its status.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;

use super::base_url;
use super::doc::Problem;
use super::error::{body_error, ApiError};
use crate::app::AppState;
use crate::auth::{Access, AuthError, Grant, Interaction};
use crate::fhir::{bundle, capability, compartment, rest, FhirError};
use crate::jobs::AsyncProgress;
use crate::store::fhir::Stored;
use utoipa::IntoParams;

const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

impl From<FhirError> for ApiError {
    fn from(e: FhirError) -> Self {
        match e {
            FhirError::Store(s) => ApiError::internal(s),
            other => ApiError::new(
                StatusCode::from_u16(other.status()).unwrap_or(StatusCode::BAD_REQUEST),
                other.code(),
                other.to_string(),
            ),
        }
    }
}

/// What `Prefer: return=` asks for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Return {
    Minimal,
    Representation,
    Outcome,
}

/// A resource type in the URL.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct TypePath {
    /// A FHIR R4 resource type, e.g. `Patient` (see `/fhir/metadata`).
    pub r#type: String,
}

/// A resource in the URL.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ResourcePath {
    /// A FHIR R4 resource type, e.g. `Patient`.
    pub r#type: String,
    /// The resource's logical id.
    pub id: String,
}

/// A version of a resource in the URL.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct VersionPath {
    /// A FHIR R4 resource type, e.g. `Patient`.
    pub r#type: String,
    /// The resource's logical id.
    pub id: String,
    /// The version id (`meta.versionId`, from 1).
    pub vid: String,
}

fn prefer(headers: &HeaderMap) -> (Return, bool) {
    let (ret, strict, _) = prefer_all(headers);
    (ret, strict)
}

/// `Prefer`: return=, handling=strict, respond-async.
fn prefer_all(headers: &HeaderMap) -> (Return, bool, bool) {
    let mut ret = Return::Representation;
    let mut strict = false;
    let mut respond_async = false;
    for v in headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
    {
        for part in v.split(',').map(str::trim) {
            match part.replace(' ', "").as_str() {
                "return=minimal" => ret = Return::Minimal,
                "return=representation" => ret = Return::Representation,
                "return=OperationOutcome" => ret = Return::Outcome,
                "handling=strict" => strict = true,
                "respond-async" => respond_async = true,
                _ => {}
            }
        }
    }
    (ret, strict, respond_async)
}

/// `Prefer: respond-async`: the resources are stored already; what they trigger runs in the
/// background. Answers 202 with `Content-Location` to the status endpoint.
async fn start_async(
    state: &AppState,
    base: &str,
    jobs: &[String],
    status: StatusCode,
    location: Option<String>,
    body: &Value,
) -> Result<Response, ApiError> {
    let id = uuid::Uuid::new_v4().to_string();
    // the jobs were enqueued with the resources: the status follows them, across restarts
    state.jobs.wake();
    state
        .store
        .async_start(
            &id,
            i64::from(status.as_u16()),
            location.as_deref(),
            body,
            jobs,
        )
        .await?;
    let mut r = fhir_json(
        StatusCode::ACCEPTED,
        &crate::fhir::outcome(
            "information",
            "informational",
            "accepted: the resources are stored; poll Content-Location for the result",
        ),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("{base}/_async/{id}")) {
        r.headers_mut().insert(header::CONTENT_LOCATION, v);
    }
    Ok(r)
}

/// `GET /fhir/_async/{id}`: 202 while running, then 200 with a batch-response Bundle: the
/// request's own answer, then each DiagnosticReport it produced.
#[utoipa::path(get, path = "/fhir/_async/{id}", tag = "FHIR R4",
    summary = "Status of a Prefer: respond-async request",
    description = "202 (X-Progress) while the analyses it triggered run; then 200 with a batch-response Bundle: the request's own answer, then each DiagnosticReport it produced. 500 incomplete when a restart cut the analyses short (the resources are stored).",
    params(("id" = String, Path)),
    responses((status = 200, description = "batch-response Bundle", content_type = "application/fhir+json"), (status = 202, description = "still running"), (status = 404, response = Problem))
)]
pub async fn async_status(
    State(state): State<AppState>,
    Extension(access): Extension<Access>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    // its batch-response may hold any patient's reports
    access.whole("DiagnosticReport", Interaction::Read)?;
    let row = state.store.async_job(&id).await?;
    let row = row.ok_or_else(|| FhirError::NotFound(format!("asynchronous request {id}")))?;
    let job = match state.jobs.async_progress(row).await? {
        AsyncProgress::Running { finished, total } => return Ok(still_running(finished, total)),
        AsyncProgress::Interrupted => return Err(interrupted()),
        AsyncProgress::Done(job) => job,
    };
    let mut reports = Vec::new();
    for (t, rid) in job.reports.iter().filter_map(|r| r.split_once('/')) {
        reports.extend(state.store.fhir_read(t, rid, None).await?);
    }
    let base = fhir_base(&state, &headers);
    let bundle = crate::report::request::async_batch_response(&job, &reports, &base);
    Ok(fhir_json(StatusCode::OK, &bundle))
}

/// 202 with `X-Progress: analysing: <finished> of <total> jobs finished`.
fn still_running(finished: usize, total: usize) -> Response {
    let mut r = StatusCode::ACCEPTED.into_response();
    let progress = format!("analysing: {finished} of {total} jobs finished");
    if let Ok(v) = HeaderValue::from_str(&progress) {
        r.headers_mut().insert("x-progress", v);
    }
    r
}

/// A request of a version before the job queue, whose analyses ran in memory and were lost.
fn interrupted() -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "incomplete",
        "the server restarted while this request's analyses ran; its resources are stored, post the ImagingStudy again to analyse it",
    )
}

fn fhir_base(state: &AppState, headers: &HeaderMap) -> String {
    format!("{}/fhir", base_url(state, headers))
}

/// A JSON response with the FHIR media type.
pub fn fhir_json(status: StatusCode, body: &Value) -> Response {
    let mut r = (status, body.to_string()).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    r
}

/// Reads a JSON body: size limit (413), media type (415), syntax (400).
fn json_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Value, ApiError> {
    let body = body.map_err(|e| body_error(e.status(), e.body_text(), state.fhir_max_body))?;
    // no Content-Type: refused, which also closes cross-site `no-cors` posts from a browser
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "not-supported",
                "Content-Type is required; send application/fhir+json",
            )
        })?;
    {
        let essence = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if !matches!(
            essence.as_str(),
            "application/fhir+json" | "application/json" | "application/json+fhir"
        ) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "not-supported",
                format!("Content-Type '{ct}' is not supported; send application/fhir+json"),
            ));
        }
    }
    if body.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "required",
            "the request body is empty",
        ));
    }
    crate::fhir::validate::precheck_json(&body)?;
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("the body is not valid JSON: {e}"),
        )
    })
}

/// The answer to a create or update.
fn written(s: &Stored, base: &str, ret: Return) -> Response {
    let status = if s.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut r = match ret {
        Return::Minimal => status.into_response(),
        Return::Representation => fhir_json(status, &s.body),
        Return::Outcome => fhir_json(
            status,
            &crate::fhir::outcome(
                "information",
                "informational",
                &format!(
                    "{} {}/{} version {}",
                    if s.created { "created" } else { "updated" },
                    s.resource_type,
                    s.id,
                    s.version
                ),
            ),
        ),
    };
    version_headers(&mut r, s);
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{base}/{}/{}/_history/{}",
        s.resource_type, s.id, s.version
    )) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

fn version_headers(r: &mut Response, s: &Stored) {
    if let Ok(v) = HeaderValue::from_str(&format!("W/\"{}\"", s.version)) {
        r.headers_mut().insert(header::ETAG, v);
    }
    if let Some(t) = chrono::DateTime::parse_from_rfc3339(&s.last_updated)
        .ok()
        .map(|t| t.to_utc().format("%a, %d %b %Y %H:%M:%S GMT").to_string())
        .and_then(|t| HeaderValue::from_str(&t).ok())
    {
        r.headers_mut().insert(header::LAST_MODIFIED, t);
    }
}

/// Links the DiagnosticReports an ImagingStudy produced (`Link: <…>; rel="related"`), and
/// says why there is none (`X-Carina-Analysis`).
fn trigger_headers(r: &mut Response, t: &crate::jobs::Triggered, base: &str) {
    for report in &t.reports {
        if let Ok(v) = HeaderValue::from_str(&format!("<{base}/{report}>; rel=\"related\"")) {
            r.headers_mut().append(header::LINK, v);
        }
    }
    for note in &t.notes {
        let clean: String = note
            .chars()
            .map(|c| {
                if c.is_ascii_graphic() || c == ' ' {
                    c
                } else {
                    '?'
                }
            })
            .take(300)
            .collect();
        if let Ok(v) = HeaderValue::from_str(&clean) {
            r.headers_mut().append("x-carina-analysis", v);
        }
    }
}

/// `GET /fhir/metadata`.
#[utoipa::path(get, path = "/fhir/metadata", tag = "FHIR R4",
    summary = "CapabilityStatement",
    description = "Exactly what this server implements: resource types, interactions, search parameters, operations.",
    responses((status = 200, description = "FHIR resource or Bundle", content_type = "application/fhir+json"), (status = 400, response = Problem), (status = 404, response = Problem))
)]
pub async fn metadata(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let security = match &state.auth {
        Some(a) => {
            let e = a.endpoints().await;
            Some(capability::Security {
                token: e.token_endpoint,
                authorize: e.authorization_endpoint,
            })
        }
        None => None,
    };
    fhir_json(
        StatusCode::OK,
        &capability::statement(
            &fhir_base(&state, &headers),
            env!("CARGO_PKG_VERSION"),
            security.as_ref(),
        ),
    )
}

/// `POST /fhir`: transaction, batch, or a Bundle to store.
#[utoipa::path(post, path = "/fhir", tag = "FHIR R4",
    summary = "Transaction, batch, or a Bundle to store",
    description = "transaction: atomic, urn:uuid references resolved, transaction-response; batch: each entry answered on its own (batch-response); any other Bundle type (collection, document, message, ...) is stored as a Bundle resource (201).",
    request_body(content_type = "application/fhir+json"),
    responses(
        (status = 200, description = "FHIR resource or Bundle", content_type = "application/fhir+json"),
        (status = 400, response = Problem),
        (status = 404, response = Problem),
        (status = 413, response = Problem),
        (status = 415, response = Problem),
        (status = 422, response = Problem)
    )
)]
pub async fn post_bundle(
    State(state): State<AppState>,
    Extension(access): Extension<Access>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let value = json_body(&state, &headers, body)?;
    check_entries(&access, &value)?;
    accepting(&state).await?;
    let (ret, _, respond_async) = prefer_all(&headers);
    let base = fhir_base(&state, &headers);
    let full = ret == Return::Representation;
    let result = bundle::post(&state.store, &state.jobs, value, &base, full).await?;
    let status = StatusCode::from_u16(result.status).unwrap_or(StatusCode::OK);
    if respond_async {
        let (jobs, location) = (&result.jobs, result.location);
        return start_async(&state, &base, jobs, status, location, &result.body).await;
    }
    let triggered = state.jobs.wait(&result.jobs, state.sync_wait).await;
    Ok(bundle_answer(result, status, ret, &triggered, &base))
}

/// The answer to a POSTed Bundle once its jobs finished or the sync wait passed.
fn bundle_answer(
    result: bundle::BundleResult,
    status: StatusCode,
    ret: Return,
    triggered: &crate::jobs::Triggered,
    base: &str,
) -> Response {
    let mut r = if status == StatusCode::CREATED && ret == Return::Minimal {
        status.into_response()
    } else {
        fhir_json(status, &result.body)
    };
    if let Some(l) = result.location.and_then(|l| HeaderValue::from_str(&l).ok()) {
        r.headers_mut().insert(header::LOCATION, l);
    }
    trigger_headers(&mut r, triggered, base);
    r
}

/// `POST /fhir/{type}`: create.
#[utoipa::path(post, path = "/fhir/{type}", tag = "FHIR R4",
    summary = "Create",
    description = "Server-assigned id; 201 with Location, ETag and Last-Modified. Prefer: return=minimal|representation|OperationOutcome. Stored Patients and lab Observations trigger an ICU-risk assessment when the risk features change.",
    params(TypePath),
    request_body(content_type = "application/fhir+json"),
    responses(
        (status = 201, description = "FHIR resource or Bundle", content_type = "application/fhir+json"),
        (status = 400, response = Problem),
        (status = 404, response = Problem),
        (status = 413, response = Problem),
        (status = 415, response = Problem),
        (status = 422, response = Problem)
    )
)]
pub async fn create(
    State(state): State<AppState>,
    Extension(access): Extension<Access>,
    Path(TypePath {
        r#type: resource_type,
    }): Path<TypePath>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let who = (&access, Interaction::Create);
    let (value, _) = write_request(&state, who, &resource_type, &headers, body).await?;
    let (ret, _) = prefer(&headers);
    let base = fhir_base(&state, &headers);
    // a Bundle POSTed to /fhir/Bundle is stored as it is, whatever its type
    let (stored, jobs) = rest::create(&state.store, &state.jobs, &resource_type, value).await?;
    if prefer_all(&headers).2 {
        let (t, id, v) = (&stored.resource_type, &stored.id, stored.version);
        let location = Some(format!("{base}/{t}/{id}/_history/{v}"));
        let created = StatusCode::CREATED;
        return start_async(&state, &base, &jobs, created, location, &stored.body).await;
    }
    Ok(answer_write(&state, &stored, &jobs, &base, ret).await)
}

/// The checks every create and update passes, in order: a known, writable type; a JSON body
/// within its limit; the token's grant for the interaction and the content; intake open. The
/// body and the grant.
async fn write_request(
    state: &AppState,
    (access, interaction): (&Access, Interaction),
    resource_type: &str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(Value, Grant), ApiError> {
    rest::known_type(resource_type)?;
    read_only(resource_type)?;
    let value = json_body(state, headers, body)?;
    let grant = access.fhir(resource_type, interaction)?;
    writable(&grant, resource_type, &value)?;
    accepting(state).await?;
    Ok((value, grant))
}

/// A stored write's answer, after waiting (up to the sync wait) for the jobs it started.
async fn answer_write(
    state: &AppState,
    stored: &Stored,
    jobs: &[String],
    base: &str,
    ret: Return,
) -> Response {
    let triggered = state.jobs.wait(jobs, state.sync_wait).await;
    let mut r = written(stored, base, ret);
    trigger_headers(&mut r, &triggered, base);
    r
}

/// `If-Match: W/"<version>"`, when given (400 for another form).
fn if_match(headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    let Some(v) = headers.get(header::IF_MATCH).and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    let version = rest::etag_version(v).ok_or_else(|| {
        let m = format!("If-Match '{v}' is not a version ETag like W/\"3\"");
        ApiError::new(StatusCode::BAD_REQUEST, "invalid", m)
    })?;
    Ok(Some(version))
}

/// `PUT /fhir/{type}/{id}`: update (or create with this id).
#[utoipa::path(put, path = "/fhir/{type}/{id}", tag = "FHIR R4",
    summary = "Update",
    description = "A new version (or the first one, with this id). If-Match: W/\"n\" is checked (412).",
    params(ResourcePath),
    request_body(content_type = "application/fhir+json"),
    responses(
        (status = 200, description = "FHIR resource or Bundle", content_type = "application/fhir+json"),
        (status = 400, response = Problem),
        (status = 404, response = Problem),
        (status = 413, response = Problem),
        (status = 415, response = Problem),
        (status = 422, response = Problem)
    )
)]
pub async fn update(
    State(state): State<AppState>,
    Extension(access): Extension<Access>,
    Path(ResourcePath {
        r#type: resource_type,
        id,
    }): Path<ResourcePath>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let who = (&access, Interaction::Update);
    let (value, grant) = write_request(&state, who, &resource_type, &headers, body).await?;
    if let Grant::Patient(p) = &grant {
        replaces_own(&state, &resource_type, &id, p).await?;
    }
    let (ret, _) = prefer(&headers);
    let (store, jobs, version) = (&state.store, &state.jobs, if_match(&headers)?);
    let (stored, jobs) = rest::update(store, jobs, &resource_type, &id, value, version).await?;
    let base = fhir_base(&state, &headers);
    Ok(answer_write(&state, &stored, &jobs, &base, ret).await)
}

/// A patient-level update: the version it replaces must be in the patient's compartment too.
async fn replaces_own(state: &AppState, t: &str, id: &str, patient: &str) -> Result<(), ApiError> {
    if let Some(old) = state.store.fhir_read(t, id, None).await? {
        if !compartment::contains(t, &old.body, patient) {
            return Err(outside().into());
        }
    }
    Ok(())
}

/// `GET /fhir/{type}/{id}`: read.
#[utoipa::path(get, path = "/fhir/{type}/{id}", tag = "FHIR R4",
    summary = "Read",
    description = "The current version, with ETag.",
    params(ResourcePath),
    responses((status = 200, description = "FHIR resource or Bundle", content_type = "application/fhir+json"), (status = 400, response = Problem), (status = 404, response = Problem))
)]
pub async fn read(
    State(state): State<AppState>,
    Extension(access): Extension<Access>,
    Path(ResourcePath {
        r#type: resource_type,
        id,
    }): Path<ResourcePath>,
) -> Result<Response, ApiError> {
    let grant = access.fhir(&resource_type, Interaction::Read)?;
    let s = rest::read(&state.store, &resource_type, &id, None).await?;
    readable(&grant, &s, &id)?;
    let mut r = fhir_json(StatusCode::OK, &s.body);
    version_headers(&mut r, &s);
    Ok(r)
}

/// `GET /fhir/{type}/{id}/_history/{vid}`: vread.
#[utoipa::path(get, path = "/fhir/{type}/{id}/_history/{vid}", tag = "FHIR R4",
    summary = "Vread",
    description = "One version.",
    params(VersionPath),
    responses((status = 200, description = "FHIR resource or Bundle", content_type = "application/fhir+json"), (status = 400, response = Problem), (status = 404, response = Problem))
)]
pub async fn vread(
    State(state): State<AppState>,
    Extension(access): Extension<Access>,
    Path(VersionPath {
        r#type: resource_type,
        id,
        vid,
    }): Path<VersionPath>,
) -> Result<Response, ApiError> {
    let grant = access.fhir(&resource_type, Interaction::Read)?;
    let s = rest::read(&state.store, &resource_type, &id, Some(&vid)).await?;
    readable(&grant, &s, &id)?;
    let mut r = fhir_json(StatusCode::OK, &s.body);
    version_headers(&mut r, &s);
    Ok(r)
}

/// `GET /fhir/{type}?…`: search.
#[utoipa::path(get, path = "/fhir/{type}", tag = "FHIR R4",
    summary = "Search",
    description = "Parameters per type (see /fhir/metadata): _id, _lastUpdated, patient, subject, code, date, status, identifier, ...; _count and next/previous links. Unknown parameters are reported in the searchset, or refused with Prefer: handling=strict.",
    params(TypePath),
    responses((status = 200, description = "FHIR resource or Bundle", content_type = "application/fhir+json"), (status = 400, response = Problem), (status = 404, response = Problem))
)]
pub async fn search(
    State(state): State<AppState>,
    Extension(access): Extension<Access>,
    Path(TypePath {
        r#type: resource_type,
    }): Path<TypePath>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let grant = access.fhir(&resource_type, Interaction::Search)?;
    let mut pairs: Vec<(String, String)> = raw
        .as_deref()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    if let Grant::Patient(p) = &grant {
        // limited in the query (so totals and paging are right) and filtered again
        pairs.push(patient_search_limit(&resource_type, p)?);
    }
    let (_, strict) = prefer(&headers);
    let base = fhir_base(&state, &headers);
    let mut bundle = rest::search(&state.store, &resource_type, &pairs, strict, &base).await?;
    if let Grant::Patient(p) = &grant {
        keep_compartment(&mut bundle, p);
    }
    Ok(fhir_json(StatusCode::OK, &bundle))
}

/// The search parameter that keeps a patient-level token's search inside its compartment.
fn patient_search_limit(resource_type: &str, patient: &str) -> Result<(String, String), AuthError> {
    compartment::search_limit(resource_type, patient).ok_or_else(|| {
        let m = format!("{resource_type} cannot be searched with a patient-level token");
        AuthError::Forbidden(m)
    })
}

/// Drops a searchset's entries outside the patient's compartment (outcomes stay).
fn keep_compartment(bundle: &mut Value, patient: &str) {
    if let Some(entries) = bundle["entry"].as_array_mut() {
        entries.retain(|e| {
            e["search"]["mode"] == "outcome"
                || e["resource"]["resourceType"]
                    .as_str()
                    .is_some_and(|t| compartment::contains(t, &e["resource"], patient))
        });
    }
}

/// `POST /fhir/{type}/{id}`: only `$operations` (`RiskAssessment/$predict`).
#[utoipa::path(post, path = "/fhir/{type}/{id}", tag = "FHIR R4",
    summary = "FHIR operation: `POST /fhir/RiskAssessment/$predict`, ICU-risk prediction",
    description = "Body: a Bundle with the Patient and lab Observations (LOINC, UCUM), or Parameters with `subject` (a stored Patient) or `resource` parts. Answers a collection Bundle with the RiskAssessment, its Provenance and the model's Device; stored when the subject is a stored Patient. 422 names missing required features.",
    params(("type" = String, Path, description = "`RiskAssessment`"), ("id" = String, Path, description = "The operation: `$predict` (any other answers 501 OperationOutcome `not-supported`)")),
    request_body(content_type = "application/fhir+json"),
    responses(
        (status = 200, description = "FHIR resource or Bundle", content_type = "application/fhir+json"),
        (status = 400, response = Problem),
        (status = 404, response = Problem),
        (status = 413, response = Problem),
        (status = 415, response = Problem),
        (status = 422, response = Problem)
    )
)]
pub async fn operation(
    State(state): State<AppState>,
    Extension(access): Extension<Access>,
    Path((resource_type, op)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    rest::known_type(&resource_type)?;
    if resource_type == "RiskAssessment" && op == "$predict" {
        let value = json_body(&state, &headers, body)?;
        if let Grant::Patient(p) = access.fhir("RiskAssessment", Interaction::Create)? {
            predict_in_compartment(&value, &p)?;
        }
        let base = fhir_base(&state, &headers);
        let out = crate::risk::predict_operation(state.risk.as_deref(), &state.store, value, &base)
            .await?;
        return Ok(fhir_json(StatusCode::OK, &out));
    }
    Err(FhirError::NotSupported(format!(
        "POST {resource_type}/{op}: not an operation this server implements (see /fhir/metadata)"
    ))
    .into())
}

/// Any other `/fhir` path: 404 OperationOutcome.
pub async fn not_found() -> ApiError {
    ApiError::not_found("no such FHIR endpoint; see /fhir/metadata")
}

/// FHIR writes obey the job backlog (all kinds) and the free-space watermark: 503 +
/// `Retry-After` instead of accepting work that cannot be done.
async fn accepting(state: &AppState) -> Result<(), ApiError> {
    match state.ingest.fhir_refusal().await? {
        None => Ok(()),
        Some(why) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "transient",
            why,
        )),
    }
}

/// The audit trail is written by Carina only: 405 for client writes of AuditEvents.
fn read_only(resource_type: &str) -> Result<(), ApiError> {
    if resource_type == "AuditEvent" {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "not-supported",
            "AuditEvents are written by Carina only (read and search need the operator scope)",
        ));
    }
    Ok(())
}

/// A patient-level token meets a resource of another patient.
fn outside() -> AuthError {
    AuthError::Forbidden("the resource is outside the patient compartment of this token".into())
}

/// A patient-level write must stay in the patient's compartment.
fn writable(grant: &Grant, resource_type: &str, value: &Value) -> Result<(), AuthError> {
    match grant {
        Grant::Patient(p) if !compartment::contains(resource_type, value, p) => Err(outside()),
        _ => Ok(()),
    }
}

/// A patient-level read outside the compartment answers 404, as if the resource did not exist.
fn readable(grant: &Grant, s: &Stored, id: &str) -> Result<(), ApiError> {
    match grant {
        Grant::Patient(p) if !compartment::contains(&s.resource_type, &s.body, p) => {
            Err(FhirError::NotFound(format!("{}/{id}", s.resource_type)).into())
        }
        _ => Ok(()),
    }
}

/// `POST /fhir`: every transaction or batch entry needs its own interaction's scope (and a
/// patient-level token may only write into its compartment and read nothing through a
/// Bundle); other Bundles are stored as Bundle resources (create).
fn check_entries(access: &Access, bundle: &Value) -> Result<(), AuthError> {
    let kind = bundle["type"].as_str().unwrap_or("");
    if !matches!(kind, "transaction" | "batch") {
        return match access.fhir("Bundle", Interaction::Create)? {
            Grant::All => Ok(()),
            Grant::Patient(_) => Err(AuthError::Forbidden(
                "a patient-level token cannot store Bundle resources".into(),
            )),
        };
    }
    for (i, e) in bundle["entry"].as_array().into_iter().flatten().enumerate() {
        let method = e["request"]["method"].as_str().unwrap_or("");
        if e["resource"]["resourceType"] == "AuditEvent" && method != "GET" {
            return Err(AuthError::Forbidden(format!(
                "Bundle.entry[{i}]: AuditEvents are written by Carina only"
            )));
        }
        let url = e["request"]["url"].as_str().unwrap_or("");
        let path = url.split(['?', '#']).next().unwrap_or("").trim_matches('/');
        let mut segments = path.split('/');
        let url_type = segments.next().unwrap_or("");
        let has_id = segments.next().is_some_and(|s| !s.is_empty());
        let resource_type = e["resource"]["resourceType"].as_str().unwrap_or(url_type);
        let interaction = match method {
            "POST" => Interaction::Create,
            "PUT" | "PATCH" => Interaction::Update,
            "DELETE" => Interaction::Delete,
            _ if has_id => Interaction::Read,
            _ => Interaction::Search,
        };
        let grant = access
            .fhir(resource_type, interaction)
            .map_err(|e| match e {
                AuthError::InsufficientScope(m) => AuthError::Forbidden(format!(
                    "Bundle.entry[{i}]: insufficient scope: needs {m}"
                )),
                other => other,
            })?;
        if let Grant::Patient(p) = grant {
            let inside = matches!(interaction, Interaction::Create | Interaction::Update)
                && compartment::contains(resource_type, &e["resource"], &p);
            if !inside {
                return Err(AuthError::Forbidden(format!(
                    "Bundle.entry[{i}]: a patient-level token may only create or update resources of its patient"
                )));
            }
        }
    }
    Ok(())
}

/// `$predict` with a patient-level token: the subject (or every resource of the Bundle) must
/// be the token's patient.
fn predict_in_compartment(value: &Value, patient: &str) -> Result<(), AuthError> {
    let ok = match value["resourceType"].as_str() {
        Some("Parameters") => {
            let mut subjects = value["parameter"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["name"] == "subject")
                .peekable();
            // no subject at all is not "in the compartment"
            subjects.peek().is_some()
                && subjects.all(|p| {
                    p["valueReference"]["reference"]
                        .as_str()
                        .map(crate::fhir::index::normalise_reference)
                        == Some(format!("Patient/{patient}"))
                })
        }
        Some("Bundle") => value["entry"].as_array().into_iter().flatten().all(|e| {
            e["resource"]["resourceType"]
                .as_str()
                .is_some_and(|t| compartment::contains(t, &e["resource"], patient))
        }),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(outside())
    }
}
