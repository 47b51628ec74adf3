//! The Patient compartment, as far as patient-level tokens need it: which resources belong to a
//! patient, and the search parameter that limits a search to one patient.

use serde_json::Value;

use super::index::{normalise_reference, params};

/// The elements whose reference puts a resource in a patient's compartment (the R4
/// CompartmentDefinition's most common ones: `subject`, `patient`, `beneficiary`,
/// `individual`).
const PATIENT_ELEMENTS: [&str; 4] = ["subject", "patient", "beneficiary", "individual"];

/// Whether `resource` (of `resource_type`) is in `Patient/{patient}`'s compartment: the
/// Patient itself, or a resource whose subject/patient/beneficiary/individual references it.
pub fn contains(resource_type: &str, resource: &Value, patient: &str) -> bool {
    if resource_type == "Patient" {
        return resource["id"].as_str() == Some(patient);
    }
    let wanted = format!("Patient/{patient}");
    PATIENT_ELEMENTS.iter().any(|e| {
        resource[*e]["reference"]
            .as_str()
            .is_some_and(|r| normalise_reference(r) == wanted)
    })
}

/// The search parameter and value that limit a search of `resource_type` to the patient:
/// `_id` for Patient, `patient` where the type has it; `None` where the type cannot be
/// limited (such searches are refused to patient-level tokens).
pub fn search_limit(resource_type: &str, patient: &str) -> Option<(String, String)> {
    if resource_type == "Patient" {
        return Some(("_id".into(), patient.to_string()));
    }
    params(resource_type)
        .iter()
        .any(|p| p.name == "patient")
        .then(|| ("patient".into(), format!("Patient/{patient}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn membership_follows_the_patient_references() {
        let obs = json!({"resourceType": "Observation", "subject": {"reference": "Patient/p1"}});
        assert!(contains("Observation", &obs, "p1"));
        assert!(!contains("Observation", &obs, "p2"));
        let abs = json!({"subject": {"reference": "http://x.example/fhir/Patient/p1/_history/3"}});
        assert!(contains("Observation", &abs, "p1"));
        let group = json!({"subject": {"reference": "Group/p1"}});
        assert!(!contains("Observation", &group, "p1"));
        assert!(contains("Patient", &json!({"id": "p1"}), "p1"));
        assert!(!contains("Patient", &json!({"id": "p2"}), "p1"));
        assert!(!contains("Organization", &json!({"id": "p1"}), "p1"));
        assert_eq!(
            search_limit("Observation", "p1"),
            Some(("patient".into(), "Patient/p1".into()))
        );
        assert_eq!(
            search_limit("Patient", "p1"),
            Some(("_id".into(), "p1".into()))
        );
        assert_eq!(search_limit("Organization", "p1"), None);
    }
}
