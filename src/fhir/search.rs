//! Search requests: query-string parameters → a [`SearchQuery`] the store runs. Parameters are
//! ANDed; comma-separated values within one parameter are ORed (FHIR R4 3.1.1.4).

use super::index::{date_range, normalise_reference, params, Kind};
use super::FhirError;

pub use crate::store::fhir::{Cond, Prefix, SearchPage, SearchQuery};

/// Default and largest page size.
pub const DEFAULT_COUNT: u32 = 50;
/// Largest accepted `_count`.
pub const MAX_COUNT: u32 = 1000;

/// Most parameters in one search.
pub const MAX_PARAMS: usize = 50;
/// Most values in one search, OR'd values counted one by one (each becomes SQL).
pub const MAX_VALUES: usize = 200;

/// Parses the query string pairs of a search on `resource_type`. Unknown parameters are
/// ignored and reported (or refused when `strict`, from `Prefer: handling=strict`).
///
/// # Errors
/// [`FhirError::Invalid`] for malformed values, and for unknown parameters when `strict`.
pub fn parse(
    resource_type: &str,
    pairs: &[(String, String)],
    strict: bool,
) -> Result<SearchQuery, FhirError> {
    let mut q = SearchQuery {
        count: DEFAULT_COUNT,
        ..Default::default()
    };
    let defs = params(resource_type);
    let values: usize = pairs.iter().map(|(_, v)| v.split(',').count()).sum();
    if pairs.len() > MAX_PARAMS || values > MAX_VALUES {
        return Err(FhirError::Invalid(format!(
            "a search takes at most {MAX_PARAMS} parameters and {MAX_VALUES} values (OR'd values count one each); this one has {} and {values}",
            pairs.len()
        )));
    }
    for (key, raw) in pairs {
        let (name, modifier) = match key.split_once(':') {
            Some((n, m)) => (n, Some(m)),
            None => (key.as_str(), None),
        };
        let bad = |why: String| FhirError::Invalid(format!("search parameter '{key}': {why}"));
        match name {
            "_count" => {
                q.count = raw
                    .parse::<u32>()
                    .map_err(|_| bad("not a non-negative integer".into()))?
                    .min(MAX_COUNT);
                q.used.push((key.clone(), raw.clone()));
                continue;
            }
            "_offset" => {
                q.offset = raw
                    .parse()
                    .map_err(|_| bad("not a non-negative integer".into()))?;
                continue;
            }
            "_total" => {
                q.no_total = match raw.as_str() {
                    "none" => true,
                    // an estimate is allowed to be exact
                    "estimate" | "accurate" => false,
                    _ => return Err(bad("not none, estimate or accurate".into())),
                };
                q.used.push((key.clone(), raw.clone()));
                continue;
            }
            "_format" | "_pretty" => continue,
            _ => {}
        }
        if let Some(m) = modifier {
            let why = format!("modifier ':{m}' is not supported");
            if strict {
                return Err(bad(why));
            }
            q.ignored.push(format!("{key}: {why}"));
            continue;
        }
        let mut clause = Vec::new();
        for v in raw.split(',').filter(|v| !v.is_empty()) {
            let cond = match name {
                "_id" => Cond::Id(v.to_string()),
                "_lastUpdated" => {
                    let (prefix, lo, hi) = date_value(v).map_err(bad)?;
                    Cond::LastUpdated(prefix, lo, hi)
                }
                _ => {
                    let Some(def) = defs.iter().find(|d| d.name == name) else {
                        let why = format!("not a supported search parameter of {resource_type}");
                        if strict {
                            return Err(bad(why));
                        }
                        q.ignored.push(format!("{key}: {why}"));
                        clause.clear();
                        break;
                    };
                    match def.kind {
                        Kind::Token => {
                            let (system, code) = match v.split_once('|') {
                                None => (None, Some(v.to_string())),
                                Some(("", c)) => (Some(None), Some(c.to_string())),
                                Some((s, "")) => (Some(Some(s.to_string())), None),
                                Some((s, c)) => (Some(Some(s.to_string())), Some(c.to_string())),
                            };
                            Cond::Token {
                                param: def.name,
                                system,
                                code,
                            }
                        }
                        Kind::Reference => {
                            let value = if v.contains('/') || v.starts_with("urn:") {
                                normalise_reference(v)
                            } else if def.name == "patient" {
                                format!("Patient/{v}")
                            } else {
                                return Err(bad(format!("'{v}': give the reference as Type/id")));
                            };
                            Cond::Reference {
                                param: def.name,
                                value,
                            }
                        }
                        Kind::Date => {
                            let (prefix, lo, hi) = date_value(v).map_err(bad)?;
                            Cond::Date {
                                param: def.name,
                                prefix,
                                lo,
                                hi,
                            }
                        }
                    }
                }
            };
            clause.push(cond);
        }
        if !clause.is_empty() {
            q.used.push((key.clone(), raw.clone()));
            q.clauses.push(clause);
        }
    }
    Ok(q)
}

fn date_value(v: &str) -> Result<(Prefix, String, String), String> {
    let (prefix, rest) = match v.get(..2) {
        Some("eq") => (Prefix::Eq, &v[2..]),
        Some("ne") => (Prefix::Ne, &v[2..]),
        Some("gt") => (Prefix::Gt, &v[2..]),
        Some("lt") => (Prefix::Lt, &v[2..]),
        Some("ge") => (Prefix::Ge, &v[2..]),
        Some("le") => (Prefix::Le, &v[2..]),
        Some("sa") => (Prefix::Sa, &v[2..]),
        Some("eb") => (Prefix::Eb, &v[2..]),
        Some("ap") => (Prefix::Eq, &v[2..]),
        _ => (Prefix::Eq, v),
    };
    let (lo, hi) =
        date_range(rest).ok_or_else(|| format!("'{rest}' is not a FHIR date or dateTime"))?;
    Ok((prefix, lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn parses_tokens_references_dates_and_paging() {
        let q = parse(
            "Observation",
            &pairs(&[
                ("code", "http://loinc.org|2532-0,736-9"),
                ("patient", "p1"),
                ("date", "ge2020-01"),
                ("_count", "5000"),
                ("foo", "1"),
            ]),
            false,
        )
        .unwrap();
        assert_eq!(q.clauses.len(), 3);
        assert_eq!(q.clauses[0].len(), 2);
        assert_eq!(
            q.clauses[1][0],
            Cond::Reference {
                param: "patient",
                value: "Patient/p1".into()
            }
        );
        assert!(
            matches!(&q.clauses[2][0], Cond::Date { prefix: Prefix::Ge, lo, .. } if lo == "2020-01-01T00:00:00.000Z")
        );
        assert_eq!(q.count, MAX_COUNT);
        assert_eq!(q.ignored.len(), 1);
        assert!(parse("Observation", &pairs(&[("foo", "1")]), true).is_err());
        assert!(parse("Observation", &pairs(&[("date", "soon")]), false).is_err());
    }
}
