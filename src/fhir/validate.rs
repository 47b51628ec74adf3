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
    precheck_json(body)?;
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
    let where_ = if path.is_empty() {
        rt.to_string()
    } else {
        path.to_string()
    };
    // fhirbolt 0.4 panics on some malformed input (cargo fuzz found an unwrap in its element
    // deserializer): a refusal, never a dead request
    std::panic::catch_unwind(|| {
        fhirbolt::json::from_json_value::<fhirbolt::model::r4::Resource>(value.clone(), None)
    })
    .map_err(|_| {
        FhirError::Invalid(format!(
            "{where_}: not valid FHIR R4: the R4 model cannot read it (check empty arrays and element names)"
        ))
    })?
    .map_err(|e| FhirError::Invalid(format!("{where_}: not valid FHIR R4: {e}")))?;
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

/// Deepest JSON nesting accepted in a FHIR body (R4 resources nest far less; a Bundle of
/// resources with contained resources and extensions stays well below).
pub const MAX_JSON_DEPTH: usize = 64;
/// Most elements in one JSON array.
pub const MAX_JSON_ARRAY: usize = 100_000;
/// Most JSON values (objects, arrays, strings, numbers, literals) in one body.
pub const MAX_JSON_VALUES: usize = 5_000_000;

/// A cheap pass over the raw bytes before any tree is built: nesting depth, array lengths and
/// the number of values, so a body of a million `[` or of ten million tiny values is refused
/// without allocating for it. Syntax is left to the parser.
///
/// # Errors
/// [`FhirError::Invalid`] naming the limit.
pub fn precheck_json(body: &[u8]) -> Result<(), FhirError> {
    // per open container: (is array, elements seen so far)
    let mut stack: Vec<(bool, usize)> = Vec::new();
    let mut values: usize = 0;
    let mut in_string = false;
    let mut escaped = false;
    let mut in_scalar = false;
    for &b in body {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        let scalar = b.is_ascii_alphanumeric() || matches!(b, b'-' | b'+' | b'.');
        if scalar && !in_scalar {
            values += 1;
        }
        in_scalar = scalar;
        match b {
            b'"' => {
                in_string = true;
                values += 1;
            }
            b'[' | b'{' => {
                values += 1;
                stack.push((b == b'[', 0));
                if stack.len() > MAX_JSON_DEPTH {
                    return Err(FhirError::Invalid(format!(
                        "the JSON nests deeper than {MAX_JSON_DEPTH} levels"
                    )));
                }
            }
            b']' | b'}' => {
                stack.pop();
            }
            b',' => {
                if let Some((true, n)) = stack.last_mut() {
                    *n += 1;
                    if *n >= MAX_JSON_ARRAY {
                        return Err(FhirError::Invalid(format!(
                            "a JSON array has more than {MAX_JSON_ARRAY} elements"
                        )));
                    }
                }
            }
            _ => {}
        }
        if values > MAX_JSON_VALUES {
            return Err(FhirError::Invalid(format!(
                "the JSON has more than {MAX_JSON_VALUES} values"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod precheck_tests {
    use super::*;

    #[test]
    fn the_fuzz_finding_is_a_400_not_a_panic() {
        // tests/fixtures/fuzz/fhir-coding-panic.json: cargo fuzz (fhir_json) made fhirbolt panic
        let body = include_bytes!("../../tests/fixtures/fuzz/fhir-coding-panic.json");
        assert!(matches!(parse_resource(body), Err(FhirError::Invalid(_))));
    }

    #[test]
    fn depth_arrays_and_values_are_bounded_before_parsing() {
        assert!(precheck_json(br#"{"a":[1,2,{"b":"[[[[{{"}],"c":"x\"]"}"#).is_ok());
        let deep = "[".repeat(MAX_JSON_DEPTH + 1);
        assert!(precheck_json(deep.as_bytes()).is_err());
        let ok = "[".repeat(MAX_JSON_DEPTH);
        assert!(
            precheck_json(ok.as_bytes()).is_ok(),
            "syntax is the parser's"
        );
        let wide = format!("[{}0]", "0,".repeat(MAX_JSON_ARRAY));
        assert!(precheck_json(wide.as_bytes()).is_err());
        let fine = format!("[{}0]", "0,".repeat(1000));
        assert!(precheck_json(fine.as_bytes()).is_ok());
    }
}
