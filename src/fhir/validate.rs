//! Incoming resources: JSON syntax, resource type, then fhirbolt's strict R4 model (unknown
//! elements, wrong types, missing required elements). The original JSON is what gets stored, so
//! a resource reads back exactly as it was sent, apart from the server-assigned `id` and `meta`.

use serde_json::Value;

use super::types::is_resource_type;
use super::FhirError;

/// Parses a request body as one resource of any R4 type.
///
/// # Errors
/// [`FhirError::Invalid`] (400) for bad JSON, a missing or unknown `resourceType`, or content the
/// R4 model rejects; the message names the element path when fhirbolt gives one.
pub fn parse_resource(body: &[u8]) -> Result<Value, FhirError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| FhirError::Invalid(format!("the body is not valid JSON: {e}")))?;
    check_resource(&value, "")?;
    Ok(value)
}

/// Checks one resource (already parsed JSON); `path` prefixes element paths in messages
/// (`Bundle.entry[3].resource`).
///
/// # Errors
/// [`FhirError::Invalid`] as for [`parse_resource`].
pub fn check_resource(value: &Value, path: &str) -> Result<(), FhirError> {
    let at = |p: &str| {
        if path.is_empty() {
            p.to_string()
        } else {
            format!("{path}.{p}")
        }
    };
    let Some(obj) = value.as_object() else {
        return Err(FhirError::Invalid(format!(
            "{}: a resource must be a JSON object",
            if path.is_empty() { "body" } else { path }
        )));
    };
    let rt = match obj.get("resourceType") {
        Some(Value::String(s)) => s.as_str(),
        _ => {
            return Err(FhirError::Invalid(format!(
                "{}: resourceType is missing",
                at("resourceType")
            )))
        }
    };
    if !is_resource_type(rt) {
        return Err(FhirError::Invalid(format!(
            "{}: '{rt}' is not a FHIR R4 resource type",
            at("resourceType")
        )));
    }
    if let Some(id) = obj.get("id") {
        if !id.as_str().is_some_and(valid_id) {
            return Err(FhirError::Invalid(format!(
                "{}: an id is 1 to 64 characters of A-Z, a-z, 0-9, '-' and '.'",
                at(&format!("{rt}.id"))
            )));
        }
    }
    fhirbolt::json::from_json_value::<fhirbolt::model::r4::Resource>(value.clone(), None).map_err(
        |e| {
            let where_ = if path.is_empty() {
                rt.to_string()
            } else {
                path.to_string()
            };
            FhirError::Invalid(format!("{where_}: not valid FHIR R4: {e}"))
        },
    )?;
    Ok(())
}

/// FHIR `id` syntax: `[A-Za-z0-9\-\.]{1,64}`.
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_what_is_wrong() {
        let e = parse_resource(b"{").unwrap_err().to_string();
        assert!(e.contains("not valid JSON"), "{e}");
        let e = parse_resource(br#"{"resourceType":"Foo"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("'Foo' is not a FHIR R4 resource type"), "{e}");
        let e = parse_resource(br#"{"resourceType":"Observation","code":{}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("Observation") && e.contains("status"), "{e}");
        let e = parse_resource(
            br#"{"resourceType":"Observation","status":"final","bogus":1,"code":{}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = parse_resource(br#"{"resourceType":"Patient","id":"a b"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("Patient.id"), "{e}");
        assert!(
            parse_resource(br#"{"resourceType":"Patient","id":"p-1","gender":"female"}"#).is_ok()
        );
    }
}
