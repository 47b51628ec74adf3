//! The type- and instance-level interactions: create, update, read, vread and search.

use serde_json::{json, Value};

use super::search::{self, SearchQuery};
use super::types::is_resource_type;
use super::validate::{check_resource, valid_id};
use super::FhirError;
use crate::store::fhir::{Plan, Stored, Write, Written};
use crate::store::Store;

/// The version in a weak or strong ETag (`W/"3"`, `"3"`, `3`).
pub fn etag_version(v: &str) -> Option<i64> {
    v.trim_start_matches("W/").trim_matches('"').parse().ok()
}

/// Checks the resource type named in a URL.
///
/// # Errors
/// [`FhirError::UnknownType`] (404).
pub fn known_type(resource_type: &str) -> Result<(), FhirError> {
    if is_resource_type(resource_type) {
        Ok(())
    } else {
        Err(FhirError::UnknownType(resource_type.to_string()))
    }
}

/// Checks that `body` is a valid resource of `resource_type`.
///
/// # Errors
/// [`FhirError::Invalid`] when it is not valid R4 or is of another type.
pub fn check_type(resource_type: &str, body: &Value) -> Result<(), FhirError> {
    check_resource(body, "")?;
    let got = body
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or("");
    if got != resource_type {
        return Err(FhirError::Invalid(format!(
            "resourceType: the body is a {got}, the URL names {resource_type}"
        )));
    }
    Ok(())
}

/// Every `reference` string in `v`, with its element path.
pub fn references(v: &Value, path: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                let p = format!("{path}.{k}");
                if k == "reference" {
                    if let Some(s) = x.as_str() {
                        out.push((p, s.to_string()));
                        continue;
                    }
                }
                references(x, &p, out);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                references(x, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// Refuses `urn:uuid:`/`urn:oid:` references outside a Bundle: nothing can resolve them.
fn check_no_placeholders(resource_type: &str, body: &Value) -> Result<(), FhirError> {
    let mut refs = Vec::new();
    references(body, resource_type, &mut refs);
    if let Some((path, r)) = refs
        .iter()
        .find(|(_, r)| r.starts_with("urn:uuid:") || r.starts_with("urn:oid:"))
    {
        return Err(FhirError::Unprocessable(format!(
            "{path}: reference '{r}' cannot be resolved (placeholders resolve only inside a transaction Bundle)"
        )));
    }
    Ok(())
}

/// `POST /fhir/{type}`: stores `body` under a new server-assigned id.
///
/// # Errors
/// [`FhirError`] for invalid content or storage failure.
pub async fn create(
    store: &Store,
    plan: Plan<'_>,
    resource_type: &str,
    mut body: Value,
) -> Result<(Stored, Vec<String>), FhirError> {
    known_type(resource_type)?;
    check_type(resource_type, &body)?;
    if resource_type != "Bundle" {
        // inside a stored Bundle (a document, say) placeholders resolve to its own entries
        check_no_placeholders(resource_type, &body)?;
    }
    let id = uuid::Uuid::new_v4().to_string();
    if let Some(o) = body.as_object_mut() {
        o.remove("id");
    }
    let write = Write {
        resource_type: resource_type.to_string(),
        id,
        body,
        if_match: None,
        fresh: true,
    };
    one(store.fhir_write_then(vec![write], plan).await?)
}

/// `PUT /fhir/{type}/{id}`: a new version (or the first, with a client-chosen id).
///
/// # Errors
/// [`FhirError`] for invalid content, an id mismatch, an `If-Match` conflict or storage failure.
pub async fn update(
    store: &Store,
    plan: Plan<'_>,
    resource_type: &str,
    id: &str,
    body: Value,
    if_match: Option<i64>,
) -> Result<(Stored, Vec<String>), FhirError> {
    known_type(resource_type)?;
    if !valid_id(id) {
        return Err(FhirError::Invalid(format!("'{id}' is not a valid FHIR id")));
    }
    check_type(resource_type, &body)?;
    match body.get("id").and_then(Value::as_str) {
        Some(b) if b == id => {}
        Some(b) => {
            return Err(FhirError::Invalid(format!(
                "{resource_type}.id: the body's id '{b}' does not match the URL's '{id}'"
            )))
        }
        None => {
            return Err(FhirError::Invalid(format!(
                "{resource_type}.id: an update must carry the id of the URL"
            )))
        }
    }
    check_no_placeholders(resource_type, &body)?;
    let write = Write {
        resource_type: resource_type.to_string(),
        id: id.to_string(),
        body,
        if_match,
        fresh: false,
    };
    one(store.fhir_write_then(vec![write], plan).await?)
}

/// The one resource of a single write, with its jobs.
pub(crate) fn one(mut w: Written) -> Result<(Stored, Vec<String>), FhirError> {
    let s = w
        .stored
        .pop()
        .ok_or_else(|| FhirError::Invalid("nothing was written".into()))?;
    Ok((s, w.jobs))
}

/// `GET /fhir/{type}/{id}[/_history/{vid}]`.
///
/// # Errors
/// [`FhirError::NotFound`] or storage failure.
pub async fn read(
    store: &Store,
    resource_type: &str,
    id: &str,
    version: Option<&str>,
) -> Result<Stored, FhirError> {
    known_type(resource_type)?;
    let v = match version {
        None => None,
        Some(v) => Some(
            v.parse::<i64>()
                .map_err(|_| FhirError::NotFound(format!("{resource_type}/{id}/_history/{v}")))?,
        ),
    };
    store.fhir_read(resource_type, id, v).await?.ok_or_else(|| {
        FhirError::NotFound(match version {
            Some(v) => format!("{resource_type}/{id}/_history/{v}"),
            None => format!("{resource_type}/{id}"),
        })
    })
}

/// `GET /fhir/{type}?…`: a searchset Bundle with paging links.
///
/// # Errors
/// [`FhirError::Invalid`] for malformed parameters, or storage failure.
pub async fn search(
    store: &Store,
    resource_type: &str,
    pairs: &[(String, String)],
    strict: bool,
    base: &str,
) -> Result<Value, FhirError> {
    known_type(resource_type)?;
    let q = search::parse(resource_type, pairs, strict)?;
    let page = store.fhir_search(resource_type, &q).await?;
    let link = |offset: u32| page_url(base, resource_type, &q, offset);
    let mut links = vec![json!({"relation": "self", "url": link(q.offset)})];
    if page.more {
        links.push(json!({"relation": "next", "url": link(q.offset + q.count)}));
    }
    if q.offset > 0 {
        links.push(json!({"relation": "previous", "url": link(q.offset.saturating_sub(q.count))}));
    }
    let mut entries: Vec<Value> = page
        .hits
        .into_iter()
        .map(|s| {
            json!({
                "fullUrl": format!("{base}/{}/{}", s.resource_type, s.id),
                "resource": s.body,
                "search": {"mode": "match"}
            })
        })
        .collect();
    if !q.ignored.is_empty() {
        entries.push(json!({
            "resource": super::outcome("warning", "not-supported", &format!("ignored: {}", q.ignored.join("; "))),
            "search": {"mode": "outcome"}
        }));
    }
    let mut bundle = json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "meta": {"lastUpdated": crate::fhir::index::instant(chrono::Utc::now())},
        "type": "searchset",
        "link": links,
        "entry": entries,
    });
    if let Some(total) = page.total {
        bundle["total"] = json!(total);
    }
    Ok(bundle)
}

fn page_url(base: &str, resource_type: &str, q: &SearchQuery, offset: u32) -> String {
    let mut parts: Vec<String> = q
        .used
        .iter()
        .filter(|(k, _)| k != "_count")
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect();
    parts.push(format!("_count={}", q.count));
    if offset > 0 {
        parts.push(format!("_offset={offset}"));
    }
    format!("{base}/{resource_type}?{}", parts.join("&"))
}

fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:,".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
