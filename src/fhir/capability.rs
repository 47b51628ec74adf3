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

/// The OAuth2 endpoints of the authorization server, when authorization is on.
#[derive(Debug, Clone, Default)]
pub struct Security {
    /// Token endpoint.
    pub token: Option<String>,
    /// Authorization endpoint.
    pub authorize: Option<String>,
}

/// `rest.security`: SMART-on-FHIR with the `oauth-uris` extension, or a note that the server
/// runs without authorization.
fn security(s: Option<&Security>) -> Value {
    let Some(s) = s else {
        return json!({
            "cors": false,
            "description": "Authorization is off (auth.mode = none or no [auth] section): this server is for a loopback address or a closed test network only."
        });
    };
    let mut uris = Vec::new();
    if let Some(t) = &s.token {
        uris.push(json!({"url": "token", "valueUri": t}));
    }
    if let Some(a) = &s.authorize {
        uris.push(json!({"url": "authorize", "valueUri": a}));
    }
    json!({
        "cors": false,
        "service": [{
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR"}],
            "text": "OAuth2 bearer tokens (SMART App Launch 2.x / Backend Services scopes)"
        }],
        "extension": [{
            "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
            "extension": uris
        }],
        "description": "Bearer JWT access tokens from the configured issuer; SMART v2 scopes (system/, user/, patient/ with cruds) and v1 (.read/.write/.*). Patient-level tokens see their patient's compartment only. See /.well-known/smart-configuration."
    })
}

/// Builds the CapabilityStatement; `auth` describes the authorization server when
/// authorization is on.
pub fn statement(base: &str, software_version: &str, auth: Option<&Security>) -> Value {
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
            "security": security(auth),
            "documentation": "Resources are stored as sent (ids and meta are server-assigned). Unknown search parameters are ignored and reported in the searchset unless `Prefer: handling=strict`. `Prefer: return=minimal|representation|OperationOutcome` is honoured. Demo models: not for clinical use.",
            "resource": resources,
            "interaction": [{"code": "transaction"}, {"code": "batch"}],
        }]
    })
}
