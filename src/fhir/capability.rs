//! `GET /fhir/metadata`: the CapabilityStatement, generated from the same tables the server
//! uses ([`super::types`], [`super::index::params`]), so it lists exactly what is implemented.

use serde_json::{json, Value};

use super::index::params;
use super::types::RESOURCE_TYPES;

/// Type-level operations Carina implements: (resource type, name, canonical, doc).
pub const OPERATIONS: &[(&str, &str, &str, &str)] = &[(
    "RiskAssessment",
    "predict",
    "https://carina.example.org/fhir/OperationDefinition/RiskAssessment-predict",
    "Computes an ICU-risk RiskAssessment from a Bundle of Observations (and the Patient), or from a Parameters resource naming a stored Patient (`subject`); the result is stored and returned.",
)];

/// Builds the CapabilityStatement.
pub fn statement(base: &str, software_version: &str) -> Value {
    let resources: Vec<Value> = RESOURCE_TYPES
        .iter()
        .filter(|t| !matches!(**t, "CapabilityStatement" | "OperationOutcome" | "Parameters"))
        .map(|t| {
            let mut search = vec![
                json!({"name": "_id", "type": "token", "definition": "http://hl7.org/fhir/SearchParameter/Resource-id"}),
                json!({"name": "_lastUpdated", "type": "date", "definition": "http://hl7.org/fhir/SearchParameter/Resource-lastUpdated"}),
            ];
            search.extend(params(t).iter().map(|p| {
                json!({"name": p.name, "type": p.kind.as_str(), "documentation": p.expression})
            }));
            let mut r = json!({
                "type": t,
                "interaction": [
                    {"code": "create"}, {"code": "read"}, {"code": "vread"},
                    {"code": "update"}, {"code": "search-type"}
                ],
                "versioning": "versioned",
                "readHistory": true,
                "updateCreate": true,
                "conditionalCreate": true,
                "searchParam": search,
            });
            let ops: Vec<Value> = OPERATIONS
                .iter()
                .filter(|(rt, ..)| rt == t)
                .map(|(_, name, def, doc)| json!({"name": name, "definition": def, "documentation": doc}))
                .collect();
            if !ops.is_empty() {
                r["operation"] = json!(ops);
            }
            r
        })
        .collect();
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-25",
        "publisher": "Carina",
        "kind": "instance",
        "software": {"name": "Carina", "version": software_version},
        "implementation": {"description": "Carina FHIR R4 endpoint", "url": base},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "documentation": "Resources are stored as sent (ids and meta are server-assigned). Unknown search parameters are ignored and reported in the searchset unless `Prefer: handling=strict`. `Prefer: return=minimal|representation|OperationOutcome` is honoured. Demo models: not for clinical use.",
            "resource": resources,
            "interaction": [{"code": "transaction"}, {"code": "batch"}],
        }]
    })
}
