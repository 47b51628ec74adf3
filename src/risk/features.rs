//! Lab-result Observations (LOINC + UCUM) → the feature vector of a tabular risk model, per
//! the `[[features]]` of its manifest: the latest value inside the window, converted to the
//! model's unit, implausible values refused with a warning, then the missing-feature policy.

use chrono::{DateTime, Duration, NaiveDate, Utc};
use serde::Deserialize;
use serde_json::Value;

/// LOINC code system.
pub const LOINC: &str = "http://loinc.org";
/// LOINC "Age" (derived from Patient.birthDate when no such Observation exists).
pub const LOINC_AGE: &str = "30525-0";

/// What to do when a feature has no usable value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Missing {
    /// No assessment without it.
    Reject,
    /// Use the manifest's `impute` value (the training median).
    Median,
}

/// Another unit the feature may arrive in: value × factor = value in the model's unit.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AltUnit {
    /// UCUM code.
    pub unit: String,
    /// Multiplier into the model's unit.
    pub factor: f64,
}

/// One `[[features]]` entry of a tabular manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureSpec {
    /// Name (model input order is manifest order).
    pub name: String,
    /// LOINC code.
    pub loinc: String,
    /// UCUM unit the model expects.
    pub unit: String,
    /// Display text.
    pub display: String,
    /// Other accepted units.
    #[serde(default)]
    pub alternative_units: Vec<AltUnit>,
    /// Lowest plausible value (model unit).
    pub plausible_min: f64,
    /// Highest plausible value (model unit).
    pub plausible_max: f64,
    /// Missing-value policy.
    pub missing: Missing,
    /// Value used by [`Missing::Median`].
    pub impute: Option<f64>,
}

impl FeatureSpec {
    /// Parses the manifest's `[[features]]`.
    ///
    /// # Errors
    /// A message naming the bad entry.
    pub fn from_manifest(values: &[toml::Value]) -> Result<Vec<Self>, String> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let spec: Self = v
                    .clone()
                    .try_into()
                    .map_err(|e: toml::de::Error| format!("features[{i}]: {e}"))?;
                if spec.missing == Missing::Median && spec.impute.is_none() {
                    return Err(format!(
                        "features[{i}] ({}): missing = \"median\" needs `impute`",
                        spec.name
                    ));
                }
                Ok(spec)
            })
            .collect()
    }

    /// Factor converting `unit` into the model's unit, if it is one this feature accepts.
    pub fn factor(&self, unit: &str) -> Option<f64> {
        if unit == self.unit {
            return Some(1.0);
        }
        self.alternative_units
            .iter()
            .find(|a| a.unit == unit)
            .map(|a| a.factor)
    }
}

/// A resource given to the mapper, with the reference other resources use for it.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    /// `Observation/123` (or a Bundle fullUrl) when known.
    pub reference: Option<String>,
    /// The resource.
    pub resource: &'a Value,
}

/// Where one feature's value came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// An Observation (its reference, when known).
    Observation(Option<String>),
    /// Computed from Patient.birthDate.
    BirthDate,
    /// The manifest's imputation value.
    Imputed,
}

/// The mapped feature vector.
#[derive(Debug, Clone)]
pub struct Features {
    /// Values in model order.
    pub values: Vec<f32>,
    /// Where each came from.
    pub sources: Vec<Source>,
    /// Warnings (implausible values, unknown units) and imputations, for the note.
    pub notes: Vec<String>,
}

/// Why no vector could be built.
#[derive(Debug, Clone, thiserror::Error)]
#[error("no usable value for {}: the model's policy for it is 'reject'{}", .missing.join(", "), if .notes.is_empty() { String::new() } else { format!(" ({})", .notes.join("; ")) })]
pub struct MissingFeatures {
    /// Displays of the missing features.
    pub missing: Vec<String>,
    /// Warnings met on the way.
    pub notes: Vec<String>,
}

fn when(obs: &Value) -> Option<DateTime<Utc>> {
    let s = obs
        .get("effectiveDateTime")
        .or_else(|| obs.get("effectiveInstant"))
        .or_else(|| obs.pointer("/effectivePeriod/end"))
        .or_else(|| obs.pointer("/effectivePeriod/start"))
        .or_else(|| obs.get("issued"))
        .and_then(Value::as_str)?;
    let (lo, _) = crate::fhir::index::date_range(s)?;
    DateTime::parse_from_rfc3339(&lo).ok().map(|t| t.to_utc())
}

fn has_code(obs: &Value, code: &str) -> bool {
    obs.pointer("/code/coding")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.get("system").and_then(Value::as_str) == Some(LOINC)
                    && c.get("code").and_then(Value::as_str) == Some(code)
            })
        })
}

/// Whole years from `birth` (a FHIR date) to `at`.
pub fn age_years(birth: &str, at: DateTime<Utc>) -> Option<f64> {
    let d = match birth.len() {
        4 => NaiveDate::from_ymd_opt(birth.parse().ok()?, 7, 1)?,
        7 => NaiveDate::parse_from_str(&format!("{birth}-15"), "%Y-%m-%d").ok()?,
        _ => NaiveDate::parse_from_str(birth.get(..10)?, "%Y-%m-%d").ok()?,
    };
    let today = at.date_naive();
    let mut years = today.years_since(d)?;
    if years > 200 {
        years = 200;
    }
    Some(f64::from(years))
}

/// Maps `observations` (and the patient, for age) to the vector of `specs`, as of `as_of`
/// with a look-back `window`.
///
/// # Errors
/// [`MissingFeatures`] when a feature with the `reject` policy has no usable value.
pub fn map(
    specs: &[FeatureSpec],
    observations: &[Input<'_>],
    patient: Option<&Value>,
    as_of: DateTime<Utc>,
    window: Duration,
) -> Result<Features, MissingFeatures> {
    let mut out = Features {
        values: Vec::with_capacity(specs.len()),
        sources: Vec::with_capacity(specs.len()),
        notes: Vec::new(),
    };
    let mut missing = Vec::new();
    for spec in specs {
        let mut candidates: Vec<(DateTime<Utc>, &Input<'_>)> = observations
            .iter()
            .filter(|o| has_code(o.resource, &spec.loinc))
            .filter(|o| {
                !matches!(
                    o.resource.get("status").and_then(Value::as_str),
                    Some("cancelled" | "entered-in-error" | "registered")
                )
            })
            .filter_map(|o| when(o.resource).map(|t| (t, o)))
            .filter(|(t, _)| *t <= as_of + Duration::minutes(5) && *t >= as_of - window)
            .collect();
        candidates.sort_by_key(|c| std::cmp::Reverse(c.0));
        let mut found = None;
        for (_, o) in candidates {
            let q = o.resource.get("valueQuantity");
            let value = q.and_then(|q| q.get("value")).and_then(Value::as_f64);
            let unit = q
                .and_then(|q| q.get("code").or_else(|| q.get("unit")))
                .and_then(Value::as_str)
                .unwrap_or("");
            let Some(value) = value else {
                out.notes.push(format!(
                    "{}: an Observation without a numeric valueQuantity was skipped",
                    spec.display
                ));
                continue;
            };
            let Some(factor) = spec.factor(unit) else {
                out.notes.push(format!(
                    "{}: unit '{unit}' cannot be converted to {}; value skipped",
                    spec.display, spec.unit
                ));
                continue;
            };
            let v = value * factor;
            if !(spec.plausible_min..=spec.plausible_max).contains(&v) {
                out.notes.push(format!(
                    "{}: implausible value {v} {} rejected (plausible {}..{})",
                    spec.display, spec.unit, spec.plausible_min, spec.plausible_max
                ));
                continue;
            }
            found = Some((v, Source::Observation(o.reference.clone())));
            break;
        }
        if found.is_none() && spec.loinc == LOINC_AGE {
            if let Some(age) = patient
                .and_then(|p| p.get("birthDate"))
                .and_then(Value::as_str)
                .and_then(|b| age_years(b, as_of))
            {
                found = Some((age, Source::BirthDate));
            }
        }
        match found {
            Some((v, src)) => {
                out.values.push(v as f32);
                out.sources.push(src);
            }
            None => match (spec.missing, spec.impute) {
                (Missing::Median, Some(m)) => {
                    out.notes.push(format!(
                        "{}: no value in the last {} h; training median {m} {} used",
                        spec.display,
                        window.num_hours(),
                        spec.unit
                    ));
                    out.values.push(m as f32);
                    out.sources.push(Source::Imputed);
                }
                _ => missing.push(spec.display.clone()),
            },
        }
    }
    if missing.is_empty() {
        Ok(out)
    } else {
        Err(MissingFeatures {
            missing,
            notes: out.notes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn specs() -> Vec<FeatureSpec> {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/models/icu-mortality-risk/model.toml"
        ))
        .unwrap();
        let v: toml::Value = toml::from_str(&text).unwrap();
        FeatureSpec::from_manifest(v["features"].as_array().unwrap()).unwrap()
    }

    fn obs(code: &str, value: f64, unit: &str, when: &str) -> Value {
        json!({"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": LOINC, "code": code}]},
            "effectiveDateTime": when,
            "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}})
    }

    #[test]
    fn latest_in_window_converted_checked_and_imputed() {
        let now = DateTime::parse_from_rfc3339("2026-01-10T12:00:00Z")
            .unwrap()
            .to_utc();
        let o = [
            obs("2532-0", 5.0, "ukat/L", "2026-01-10T08:00:00Z"), // 300 U/L, latest
            obs("2532-0", 900.0, "U/L", "2026-01-09T08:00:00Z"),
            obs("2532-0", 100.0, "U/L", "2025-12-01T08:00:00Z"), // outside the window
            obs("736-9", 250.0, "%", "2026-01-10T09:00:00Z"),    // implausible
            obs("30522-7", 3.0, "mg/dL", "2026-01-10T09:00:00Z"), // 30 mg/L
            obs("30522-7", 3.0, "mmol/L", "2026-01-10T10:00:00Z"), // unknown unit
        ];
        let inputs: Vec<Input<'_>> = o
            .iter()
            .enumerate()
            .map(|(i, r)| Input {
                reference: Some(format!("Observation/{i}")),
                resource: r,
            })
            .collect();
        let patient = json!({"resourceType": "Patient", "birthDate": "1956-01-11"});
        let f = map(&specs(), &inputs, Some(&patient), now, Duration::hours(72)).unwrap();
        assert_eq!(f.values, vec![69.0, 300.0, 13.05, 30.0]);
        assert_eq!(f.sources[0], Source::BirthDate);
        assert_eq!(
            f.sources[1],
            Source::Observation(Some("Observation/0".into()))
        );
        assert_eq!(f.sources[2], Source::Imputed);
        assert!(f.notes.iter().any(|n| n.contains("implausible value 250")));
        assert!(f.notes.iter().any(|n| n.contains("'mmol/L'")));
        // age is required: without a birth date or an age Observation, no vector
        let e = map(&specs(), &inputs, None, now, Duration::hours(72)).unwrap_err();
        assert_eq!(e.missing, vec!["Age".to_string()]);
    }
}
