//! `POST /fhir` with a Bundle. A transaction is all-or-nothing: every entry is validated, ids
//! are assigned, `urn:uuid:` (and other fullUrl) references are rewritten to `Type/id`, then all
//! resources are written in one database transaction. A batch answers each entry on its own.
//! Other Bundle types (collection, document, message, …) are stored as Bundle resources.

use std::collections::HashMap;

use serde_json::{json, Value};

use super::rest::{self, references};
use super::search;
use super::validate::{check_resource, valid_id};
use super::FhirError;
use crate::store::fhir::{Plan as JobPlan, Stored, Write};
use crate::store::Store;

/// The result of a Bundle POST.
pub struct BundleResult {
    /// HTTP status of the whole request.
    pub status: u16,
    /// Response body (transaction-response, batch-response, or the stored Bundle).
    pub body: Value,
    /// `Location` for a stored Bundle.
    pub location: Option<String>,
    /// Every resource written.
    pub written: Vec<Stored>,
    /// The jobs the writes started (imaging, risk).
    pub jobs: Vec<String>,
}

/// One planned write or read of a transaction/batch entry.
enum Plan {
    Write(Write),
    /// Conditional create that matched an existing resource.
    Existing(Stored),
    Read(String, String),
}

/// Handles `POST /fhir` with `body` (already JSON).
///
/// # Errors
/// [`FhirError`]: for a transaction, the first failing entry fails the whole request.
pub async fn post(
    store: &Store,
    jobs: JobPlan<'_>,
    body: Value,
    base: &str,
    full: bool,
) -> Result<BundleResult, FhirError> {
    if body.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(FhirError::Invalid(
            "resourceType: POST to the base URL takes a Bundle".into(),
        ));
    }
    // transaction and batch entries are validated one by one (with their path); other
    // Bundles as a whole when they are stored
    match body.get("type").and_then(Value::as_str).unwrap_or("") {
        "transaction" => transaction(store, jobs, &body, base, full).await,
        "batch" => batch(store, jobs, &body, base, full).await,
        _ => {
            let (stored, jobs) = rest::create(store, jobs, "Bundle", body).await?;
            Ok(BundleResult {
                status: 201,
                location: Some(format!(
                    "{base}/Bundle/{}/_history/{}",
                    stored.id, stored.version
                )),
                body: stored.body.clone(),
                written: vec![stored],
                jobs,
            })
        }
    }
}

fn entries(body: &Value) -> &[Value] {
    body.get("entry")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// Plans entry `i`: method and URL checked, id chosen, conditional create resolved.
async fn plan(
    store: &Store,
    i: usize,
    entry: &Value,
    map: &mut HashMap<String, String>,
) -> Result<Plan, FhirError> {
    let at = format!("Bundle.entry[{i}]");
    let request = entry
        .get("request")
        .ok_or_else(|| FhirError::Invalid(format!("{at}.request is missing")))?;
    let method = request.get("method").and_then(Value::as_str).unwrap_or("");
    let url = request.get("url").and_then(Value::as_str).unwrap_or("");
    let url = url.split('?').next().unwrap_or("").trim_matches('/');
    let query = request
        .get("url")
        .and_then(Value::as_str)
        .and_then(|u| u.split_once('?').map(|(_, q)| q.to_string()));
    let resource = entry.get("resource");
    let full_url = entry.get("fullUrl").and_then(Value::as_str);
    match method {
        "POST" | "PUT" => {
            let resource =
                resource.ok_or_else(|| FhirError::Invalid(format!("{at}.resource is missing")))?;
            check_resource(resource, &format!("{at}.resource"))?;
            let rt = resource
                .get("resourceType")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let (url_type, url_id) = match url.split_once('/') {
                Some((t, id)) => (t, Some(id)),
                None => (url, None),
            };
            if url_type != rt {
                return Err(FhirError::Invalid(format!(
                    "{at}.request.url names {url_type}, the resource is a {rt}"
                )));
            }
            if query.is_some() && method == "PUT" {
                return Err(FhirError::NotSupported(format!(
                    "{at}: conditional update is not supported"
                )));
            }
            let id = if method == "POST" {
                if let Some(cond) = entry
                    .pointer("/request/ifNoneExist")
                    .and_then(Value::as_str)
                {
                    let pairs: Vec<(String, String)> = cond
                        .split('&')
                        .filter_map(|kv| kv.split_once('='))
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect();
                    let mut q = search::parse(&rt, &pairs, true)?;
                    q.no_total = false;
                    let found = store.fhir_search(&rt, &q).await?;
                    let (n, mut hits) = (found.total.unwrap_or(0), found.hits);
                    if n > 1 {
                        return Err(FhirError::Conflict(format!(
                            "{at}.request.ifNoneExist matches {n} resources"
                        )));
                    }
                    if let Some(existing) = hits.pop() {
                        if let Some(f) = full_url {
                            map.insert(f.to_string(), format!("{rt}/{}", existing.id));
                        }
                        return Ok(Plan::Existing(existing));
                    }
                }
                uuid::Uuid::new_v4().to_string()
            } else {
                let id = url_id.unwrap_or("");
                if !valid_id(id) {
                    return Err(FhirError::Invalid(format!(
                        "{at}.request.url: PUT needs Type/id"
                    )));
                }
                if resource.get("id").and_then(Value::as_str) != Some(id) {
                    return Err(FhirError::Invalid(format!(
                        "{at}.resource.id does not match {at}.request.url"
                    )));
                }
                id.to_string()
            };
            if let Some(f) = full_url {
                map.insert(f.to_string(), format!("{rt}/{id}"));
            }
            let if_match = entry
                .pointer("/request/ifMatch")
                .and_then(Value::as_str)
                .map(|v| {
                    rest::etag_version(v)
                        .ok_or_else(|| FhirError::Invalid(format!("{at}.request.ifMatch: '{v}'")))
                })
                .transpose()?;
            let mut body = resource.clone();
            if method == "POST" {
                if let Some(o) = body.as_object_mut() {
                    o.remove("id");
                }
            }
            Ok(Plan::Write(Write {
                resource_type: rt,
                id,
                body,
                if_match,
                fresh: method == "POST",
            }))
        }
        "GET" => match url.split_once('/') {
            Some((t, id)) if query.is_none() => {
                rest::known_type(t)?;
                Ok(Plan::Read(t.to_string(), id.to_string()))
            }
            _ => Err(FhirError::NotSupported(format!(
                "{at}: only reads (GET Type/id) are supported inside a Bundle"
            ))),
        },
        "" => Err(FhirError::Invalid(format!(
            "{at}.request.method is missing"
        ))),
        m => Err(FhirError::NotSupported(format!(
            "{at}.request.method {m} is not supported"
        ))),
    }
}

/// Rewrites references to entries of this Bundle; refuses placeholders that resolve to nothing.
fn rewrite(body: &mut Value, map: &HashMap<String, String>, path: &str) -> Result<(), FhirError> {
    let mut refs = Vec::new();
    references(body, path, &mut refs);
    if let Some((p, r)) = refs.iter().find(|(_, r)| {
        (r.starts_with("urn:uuid:") || r.starts_with("urn:oid:")) && !map.contains_key(r.as_str())
    }) {
        return Err(FhirError::Invalid(format!(
            "{p}: reference '{r}' does not resolve to any entry of the Bundle"
        )));
    }
    replace_refs(body, map);
    Ok(())
}

/// Replaces every `reference` found in `map` by its target.
pub fn replace_refs(v: &mut Value, map: &HashMap<String, String>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o.iter_mut() {
                if k == "reference" {
                    if let Some(to) = x.as_str().and_then(|s| map.get(s)) {
                        *x = Value::String(to.clone());
                        continue;
                    }
                }
                replace_refs(x, map);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| replace_refs(x, map)),
        _ => {}
    }
}

fn response_entry(s: &Stored, status: &str, base: &str, full: bool) -> Value {
    let mut e = json!({
        "response": {
            "status": status,
            "location": format!("{}/{}/_history/{}", s.resource_type, s.id, s.version),
            "etag": format!("W/\"{}\"", s.version),
            "lastModified": s.last_updated,
        }
    });
    e["fullUrl"] = json!(format!("{base}/{}/{}", s.resource_type, s.id));
    if full {
        e["resource"] = s.body.clone();
    }
    e
}

async fn transaction(
    store: &Store,
    jobs: JobPlan<'_>,
    body: &Value,
    base: &str,
    full: bool,
) -> Result<BundleResult, FhirError> {
    let mut map = HashMap::new();
    let mut plans = Vec::new();
    for (i, entry) in entries(body).iter().enumerate() {
        plans.push(plan(store, i, entry, &mut map).await?);
    }
    let mut writes = Vec::new();
    for (i, p) in plans.iter_mut().enumerate() {
        if let Plan::Write(w) = p {
            rewrite(&mut w.body, &map, &format!("Bundle.entry[{i}].resource"))?;
            writes.push(w.clone());
        }
    }
    let done = store.fhir_write_then(writes, jobs).await?;
    let mut written = done.stored.into_iter();
    let mut out = Vec::new();
    let mut all = Vec::new();
    for p in plans {
        match p {
            Plan::Write(_) => {
                let s = written
                    .next()
                    .ok_or_else(|| FhirError::Invalid("write count mismatch".into()))?;
                out.push(response_entry(
                    &s,
                    if s.created { "201 Created" } else { "200 OK" },
                    base,
                    full,
                ));
                all.push(s);
            }
            Plan::Existing(s) => out.push(response_entry(&s, "200 OK", base, full)),
            Plan::Read(t, id) => {
                let s = rest::read(store, &t, &id, None).await?;
                out.push(response_entry(&s, "200 OK", base, true));
            }
        }
    }
    Ok(BundleResult {
        status: 200,
        body: json!({
            "resourceType": "Bundle",
            "id": uuid::Uuid::new_v4().to_string(),
            "type": "transaction-response",
            "entry": out,
        }),
        location: None,
        written: all,
        jobs: done.jobs,
    })
}

/// A batch entry's result: (stored, status, the jobs when this entry wrote, whether a read).
type EntryOutcome = (Stored, &'static str, Option<Vec<String>>, bool);

async fn batch(
    store: &Store,
    jobs: JobPlan<'_>,
    body: &Value,
    base: &str,
    full: bool,
) -> Result<BundleResult, FhirError> {
    let mut out = Vec::new();
    let mut all = Vec::new();
    let mut started = Vec::new();
    for (i, entry) in entries(body).iter().enumerate() {
        let mut map = HashMap::new();
        let result: Result<EntryOutcome, FhirError> = async {
            match plan(store, i, entry, &mut map).await? {
                Plan::Write(mut w) => {
                    rewrite(&mut w.body, &map, &format!("Bundle.entry[{i}].resource"))?;
                    let (s, j) = rest::one(store.fhir_write_then(vec![w], jobs).await?)?;
                    let status = if s.created { "201 Created" } else { "200 OK" };
                    Ok((s, status, Some(j), false))
                }
                Plan::Existing(s) => Ok((s, "200 OK", None, false)),
                Plan::Read(t, id) => Ok((
                    rest::read(store, &t, &id, None).await?,
                    "200 OK",
                    None,
                    true,
                )),
            }
        }
        .await;
        match result {
            Ok((s, status, wrote, read)) => {
                out.push(response_entry(&s, status, base, full || read));
                if let Some(j) = wrote {
                    all.push(s);
                    started.extend(j);
                }
            }
            Err(FhirError::Store(e)) => return Err(FhirError::Store(e)),
            Err(e) => out.push(json!({
                "response": {
                    "status": format!("{} {}", e.status(), reason(e.status())),
                    "outcome": super::outcome("error", e.code(), &e.to_string()),
                }
            })),
        }
    }
    Ok(BundleResult {
        status: 200,
        body: json!({
            "resourceType": "Bundle",
            "id": uuid::Uuid::new_v4().to_string(),
            "type": "batch-response",
            "entry": out,
        }),
        location: None,
        written: all,
        jobs: started,
    })
}

fn reason(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        412 => "Precondition Failed",
        422 => "Unprocessable Entity",
        _ => "Error",
    }
}
