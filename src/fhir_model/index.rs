//! Search parameters: which ones each resource type supports, and the index values extracted
//! from a resource when it is stored (tokens, references, date ranges).

use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveDateTime, TimeZone, Utc};
use serde_json::Value;

use super::types::is_resource_type;

/// How a search parameter matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `[system|]code` against Coding, Identifier or code values.
    Token,
    /// `[Type/]id` against Reference.reference.
    Reference,
    /// `[prefix]date` against date, dateTime, instant and Period values.
    Date,
}

impl Kind {
    /// FHIR search parameter type name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Token => "token",
            Kind::Reference => "reference",
            Kind::Date => "date",
        }
    }
}

/// One supported search parameter.
#[derive(Debug, Clone, Copy)]
pub struct ParamDef {
    /// Name in the query string.
    pub name: &'static str,
    /// Matching.
    pub kind: Kind,
    /// The elements it reads (FHIRPath-like, for the CapabilityStatement).
    pub expression: &'static str,
}

const fn p(name: &'static str, kind: Kind, expression: &'static str) -> ParamDef {
    ParamDef {
        name,
        kind,
        expression,
    }
}

/// The search parameters of `resource_type` besides `_id` and `_lastUpdated` (which every type
/// has).
pub fn params(resource_type: &str) -> &'static [ParamDef] {
    use Kind::{Date, Reference, Token};
    match resource_type {
        "Observation" => {
            const {
                &[
                    p(
                        "patient",
                        Reference,
                        "Observation.subject.where(resolve() is Patient)",
                    ),
                    p("subject", Reference, "Observation.subject"),
                    p("code", Token, "Observation.code"),
                    p("date", Date, "Observation.effective"),
                    p("status", Token, "Observation.status"),
                    p("identifier", Token, "Observation.identifier"),
                ]
            }
        }
        "DiagnosticReport" => {
            const {
                &[
                    p(
                        "patient",
                        Reference,
                        "DiagnosticReport.subject.where(resolve() is Patient)",
                    ),
                    p("subject", Reference, "DiagnosticReport.subject"),
                    p("code", Token, "DiagnosticReport.code"),
                    p("date", Date, "DiagnosticReport.effective"),
                    p("status", Token, "DiagnosticReport.status"),
                    p("identifier", Token, "DiagnosticReport.identifier"),
                    p("based-on", Reference, "DiagnosticReport.basedOn"),
                    p("imaging-study", Reference, "DiagnosticReport.imagingStudy"),
                ]
            }
        }
        "RiskAssessment" => {
            const {
                &[
                    p(
                        "patient",
                        Reference,
                        "RiskAssessment.subject.where(resolve() is Patient)",
                    ),
                    p("subject", Reference, "RiskAssessment.subject"),
                    p("code", Token, "RiskAssessment.code"),
                    p("method", Token, "RiskAssessment.method"),
                    p("date", Date, "RiskAssessment.occurrence"),
                    p("status", Token, "RiskAssessment.status"),
                    p("identifier", Token, "RiskAssessment.identifier"),
                ]
            }
        }
        "ImagingStudy" => {
            const {
                &[
                    p(
                        "patient",
                        Reference,
                        "ImagingStudy.subject.where(resolve() is Patient)",
                    ),
                    p("subject", Reference, "ImagingStudy.subject"),
                    p("date", Date, "ImagingStudy.started"),
                    p("started", Date, "ImagingStudy.started"),
                    p("status", Token, "ImagingStudy.status"),
                    p("identifier", Token, "ImagingStudy.identifier"),
                ]
            }
        }
        "Media" => {
            const {
                &[
                    p(
                        "patient",
                        Reference,
                        "Media.subject.where(resolve() is Patient)",
                    ),
                    p("subject", Reference, "Media.subject"),
                    p("date", Date, "Media.created"),
                    p("created", Date, "Media.created"),
                    p("status", Token, "Media.status"),
                    p("identifier", Token, "Media.identifier"),
                ]
            }
        }
        "Provenance" => {
            const {
                &[
                    p(
                        "patient",
                        Reference,
                        "Provenance.target.where(resolve() is Patient)",
                    ),
                    p("target", Reference, "Provenance.target"),
                    p("date", Date, "Provenance.recorded"),
                    p("recorded", Date, "Provenance.recorded"),
                ]
            }
        }
        "Device" => {
            const {
                &[
                    p("patient", Reference, "Device.patient"),
                    p("type", Token, "Device.type"),
                    p("status", Token, "Device.status"),
                    p("identifier", Token, "Device.identifier"),
                ]
            }
        }
        "Patient" => {
            const {
                &[
                    p("identifier", Token, "Patient.identifier"),
                    p("birthdate", Date, "Patient.birthDate"),
                ]
            }
        }
        _ => &[],
    }
}

/// One index row: parameter, token system (tokens only), value, and the exclusive end of a
/// date range (dates only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Parameter name.
    pub param: &'static str,
    /// Token system, when there is one.
    pub system: Option<String>,
    /// Token code, normalised reference (`Patient/123`), or start of a date range.
    pub value: String,
    /// End of a date range (exclusive).
    pub value_hi: Option<String>,
}

/// The index rows of `resource` for its type's parameters.
pub fn extract(resource_type: &str, resource: &Value) -> Vec<Entry> {
    let mut out = Vec::new();
    for def in params(resource_type) {
        let values = elements(resource, def.expression);
        for v in values {
            match def.kind {
                Kind::Token => tokens(v, &mut |system, value| {
                    out.push(Entry {
                        param: def.name,
                        system,
                        value,
                        value_hi: None,
                    })
                }),
                Kind::Reference => {
                    if let Some(r) = v.get("reference").and_then(Value::as_str) {
                        let r = normalise_reference(r);
                        if def.name == "patient" && !r.starts_with("Patient/") {
                            continue;
                        }
                        out.push(Entry {
                            param: def.name,
                            system: None,
                            value: r,
                            value_hi: None,
                        });
                    }
                }
                Kind::Date => {
                    if let Some((lo, hi)) = date_value_range(v) {
                        out.push(Entry {
                            param: def.name,
                            system: None,
                            value: lo,
                            value_hi: Some(hi),
                        });
                    }
                }
            }
        }
    }
    out
}

/// The JSON values an expression names: `Type.element` (with `[x]` choices expanded by
/// prefix); the `.where(...)` part is applied by the caller.
fn elements<'a>(resource: &'a Value, expression: &str) -> Vec<&'a Value> {
    let path = expression.split(".where(").next().unwrap_or(expression);
    let Some(element) = path.split('.').nth(1) else {
        return Vec::new();
    };
    let Some(obj) = resource.as_object() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut push = |v: &'a Value| match v {
        Value::Array(a) => out.extend(a.iter()),
        other => out.push(other),
    };
    if let Some(v) = obj.get(element) {
        push(v);
    } else {
        // choice element: effective → effectiveDateTime / effectivePeriod / ...
        for (k, v) in obj {
            if k.len() > element.len()
                && k.starts_with(element)
                && k[element.len()..].starts_with(|c: char| c.is_ascii_uppercase())
            {
                push(v);
            }
        }
    }
    out
}

/// Tokens of a code, Coding, CodeableConcept or Identifier value.
fn tokens(v: &Value, emit: &mut dyn FnMut(Option<String>, String)) {
    let s = |k: &str, o: &Value| o.get(k).and_then(Value::as_str).map(str::to_string);
    match v {
        Value::String(code) => emit(None, code.clone()),
        Value::Object(_) => {
            if let Some(codings) = v.get("coding").and_then(Value::as_array) {
                for c in codings {
                    if let Some(code) = s("code", c) {
                        emit(s("system", c), code);
                    }
                }
            } else if let Some(value) = s("value", v) {
                emit(s("system", v), value); // Identifier
            } else if let Some(code) = s("code", v) {
                emit(s("system", v), code); // Coding
            }
        }
        _ => {}
    }
}

/// `http://host/fhir/Patient/1/_history/2` → `Patient/1`; `urn:uuid:…` and fragments as given.
pub fn normalise_reference(r: &str) -> String {
    if r.starts_with("urn:") || r.starts_with('#') {
        return r.to_string();
    }
    let parts: Vec<&str> = r.split('/').collect();
    let hist = parts.iter().position(|p| *p == "_history");
    let parts = &parts[..hist.unwrap_or(parts.len())];
    if parts.len() >= 2 {
        let (t, id) = (parts[parts.len() - 2], parts[parts.len() - 1]);
        if is_resource_type(t) {
            return format!("{t}/{id}");
        }
    }
    r.to_string()
}

/// Format of stored instants: sortable as text.
const FMT: &str = "%Y-%m-%dT%H:%M:%S%.3fZ";

/// An instant as stored for `_lastUpdated` and date indexes.
pub fn instant(t: DateTime<Utc>) -> String {
    t.format(FMT).to_string()
}

/// The `[start, end)` range, as stored text, of a date/dateTime/instant string or a Period.
fn date_value_range(v: &Value) -> Option<(String, String)> {
    match v {
        Value::String(s) => date_range(s),
        Value::Object(o) => {
            let start = o.get("start").and_then(Value::as_str).and_then(date_range);
            let end = o.get("end").and_then(Value::as_str).and_then(date_range);
            match (start, end) {
                (Some((lo, _)), Some((_, hi))) => Some((lo, hi)),
                (Some((lo, _)), None) => Some((lo, "9999-12-31T23:59:59.999Z".into())),
                (None, Some((_, hi))) => Some(("0001-01-01T00:00:00.000Z".into(), hi)),
                (None, None) => None,
            }
        }
        _ => None,
    }
}

/// Parses a FHIR date, dateTime or instant (any precision) into the `[start, end)` range it
/// covers, in UTC; dates without a zone are taken as UTC.
pub fn date_range(s: &str) -> Option<(String, String)> {
    let s = s.trim();
    let (lo, hi): (DateTime<Utc>, DateTime<Utc>) = match s.len() {
        4 => {
            let y: i32 = s.parse().ok()?;
            (ymd(y, 1, 1)?, ymd(y + 1, 1, 1)?)
        }
        7 => {
            let y: i32 = s.get(..4)?.parse().ok()?;
            let m: u32 = s.get(5..7)?.parse().ok()?;
            let lo = ymd(y, m, 1)?;
            let hi = if m == 12 {
                ymd(y + 1, 1, 1)?
            } else {
                ymd(y, m + 1, 1)?
            };
            (lo, hi)
        }
        10 => {
            let d = NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
            let lo = Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0)?);
            (lo, lo + Duration::days(1))
        }
        _ => {
            let t = DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&Utc))
                .or_else(|_| {
                    // minute precision (search values) or no zone
                    NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
                        .or_else(|_| NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M"))
                        .map(|n| Utc.from_utc_datetime(&n))
                })
                .ok()?;
            let seconds_only = !s.contains('.');
            let width = if seconds_only {
                Duration::seconds(1)
            } else {
                Duration::milliseconds(1)
            };
            (t, t + width)
        }
    };
    if lo.year() < 1 {
        return None;
    }
    Some((instant(lo), instant(hi)))
}

fn ymd(y: i32, m: u32, d: u32) -> Option<DateTime<Utc>> {
    Some(Utc.from_utc_datetime(&NaiveDate::from_ymd_opt(y, m, d)?.and_hms_opt(0, 0, 0)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn observation_index_rows() {
        let obs = json!({
            "resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "2532-0"}]},
            "subject": {"reference": "http://x/fhir/Patient/p1/_history/3"},
            "effectivePeriod": {"start": "2020-02-01", "end": "2020-02-03T10:00:00Z"},
            "identifier": [{"system": "urn:lab", "value": "A1"}]
        });
        let rows = extract("Observation", &obs);
        let find = |p: &str| {
            rows.iter()
                .filter(|r| r.param == p)
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(find("patient")[0].value, "Patient/p1");
        assert_eq!(find("subject")[0].value, "Patient/p1");
        assert_eq!(find("code")[0].system.as_deref(), Some("http://loinc.org"));
        assert_eq!(find("status")[0].value, "final");
        assert_eq!(find("identifier")[0].value, "A1");
        let d = &find("date")[0];
        assert_eq!(d.value, "2020-02-01T00:00:00.000Z");
        assert_eq!(d.value_hi.as_deref(), Some("2020-02-03T10:00:01.000Z"));
    }

    #[test]
    fn date_precision_ranges() {
        assert_eq!(
            date_range("2020-12").unwrap(),
            (
                "2020-12-01T00:00:00.000Z".into(),
                "2021-01-01T00:00:00.000Z".into()
            )
        );
        assert_eq!(
            date_range("2020-01-01T10:00:00+02:00").unwrap().0,
            "2020-01-01T08:00:00.000Z"
        );
        assert!(date_range("yesterday").is_none());
        assert!(date_range("2020-13").is_none());
    }
}
