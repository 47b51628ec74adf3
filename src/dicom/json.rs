//! DICOM JSON (PS3.18 F.2): QIDO-RS result objects built from the index, the STOW-RS response,
//! and WADO-RS metadata of a stored file (Pixel Data replaced by a BulkDataURI).

use dicom_dictionary_std::tags;
use dicom_object::DefaultDicomObject;
use serde_json::{json, Map, Value};

use super::parse::InstanceIndex;

/// `{"vr": vr, "Value": [v]}` under the 8-hex-digit tag key; absent values give no attribute
/// for optional ones and an empty attribute (`{"vr": vr}`) when `always`.
fn put(m: &mut Map<String, Value>, tag: &str, vr: &str, v: Option<Value>, always: bool) {
    match v {
        Some(v) => {
            m.insert(tag.into(), json!({"vr": vr, "Value": [v]}));
        }
        None if always => {
            m.insert(tag.into(), json!({ "vr": vr }));
        }
        None => {}
    }
}

/// A UID attribute (always present).
fn put_uid(m: &mut Map<String, Value>, tag: &str, uid: &str) {
    put(m, tag, "UI", Some(uid.into()), true);
}

fn s(v: &Option<String>) -> Option<Value> {
    v.as_ref().map(|x| Value::from(x.as_str()))
}

fn pn(v: &Option<String>) -> Option<Value> {
    v.as_ref().map(|x| json!({ "Alphabetic": x }))
}

/// Study-level attributes (PS3.18 Table 10.6.3-3) plus the counts.
pub fn study_attributes(
    ix: &InstanceIndex,
    series: i64,
    instances: i64,
    modalities: &[String],
    base: &str,
) -> Value {
    let mut m = Map::new();
    put(&mut m, "00080020", "DA", s(&ix.study_date), true);
    put(&mut m, "00080030", "TM", s(&ix.study_time), true);
    put(&mut m, "00080050", "SH", s(&ix.accession_number), true);
    if !modalities.is_empty() {
        m.insert("00080061".into(), json!({"vr": "CS", "Value": modalities}));
    }
    put(&mut m, "00080090", "PN", pn(&ix.referring_physician), true);
    put(&mut m, "00081030", "LO", s(&ix.study_description), false);
    put(&mut m, "00100010", "PN", pn(&ix.patient_name), true);
    put(&mut m, "00100020", "LO", s(&ix.patient_id), true);
    put(&mut m, "00100030", "DA", s(&ix.patient_birth_date), true);
    put(&mut m, "00100040", "CS", s(&ix.patient_sex), true);
    put_uid(&mut m, "0020000D", &ix.study_uid);
    put(&mut m, "00200010", "SH", s(&ix.study_id), true);
    put(&mut m, "00201206", "IS", Some(series.into()), true);
    put(&mut m, "00201208", "IS", Some(instances.into()), true);
    put(
        &mut m,
        "00081190",
        "UR",
        Some(format!("{base}/studies/{}", ix.study_uid).into()),
        true,
    );
    Value::Object(m)
}

/// Series-level attributes (PS3.18 Table 10.6.3-4).
pub fn series_attributes(ix: &InstanceIndex, instances: i64, base: &str) -> Value {
    let mut m = Map::new();
    put(&mut m, "00080060", "CS", s(&ix.modality), true);
    put(&mut m, "0008103E", "LO", s(&ix.series_description), false);
    put(&mut m, "00180015", "CS", s(&ix.body_part), false);
    put_uid(&mut m, "0020000D", &ix.study_uid);
    put_uid(&mut m, "0020000E", &ix.series_uid);
    put(
        &mut m,
        "00200011",
        "IS",
        ix.series_number.map(Value::from),
        true,
    );
    put(&mut m, "00201209", "IS", Some(instances.into()), true);
    put(
        &mut m,
        "00081190",
        "UR",
        Some(format!("{base}/studies/{}/series/{}", ix.study_uid, ix.series_uid).into()),
        true,
    );
    Value::Object(m)
}

/// Instance-level attributes (PS3.18 Table 10.6.3-5), with the study and series keys.
pub fn instance_attributes(ix: &InstanceIndex, base: &str) -> Value {
    let mut m = Map::new();
    put_uid(&mut m, "00080016", &ix.sop_class_uid);
    put_uid(&mut m, "00080018", &ix.sop_instance_uid);
    put(&mut m, "00080060", "CS", s(&ix.modality), true);
    put_uid(&mut m, "00083002", &ix.transfer_syntax);
    put_uid(&mut m, "0020000D", &ix.study_uid);
    put_uid(&mut m, "0020000E", &ix.series_uid);
    put(
        &mut m,
        "00200013",
        "IS",
        ix.instance_number.map(Value::from),
        true,
    );
    put(&mut m, "00280008", "IS", ix.frames.map(Value::from), false);
    put(&mut m, "00280010", "US", ix.rows.map(Value::from), false);
    put(&mut m, "00280011", "US", ix.columns.map(Value::from), false);
    put(
        &mut m,
        "00081190",
        "UR",
        Some(instance_url(ix, base).into()),
        true,
    );
    Value::Object(m)
}

/// The WADO-RS URL of an instance.
pub fn instance_url(ix: &InstanceIndex, base: &str) -> String {
    format!(
        "{base}/studies/{}/series/{}/instances/{}",
        ix.study_uid, ix.series_uid, ix.sop_instance_uid
    )
}

/// One entry of a STOW-RS response sequence.
#[derive(Debug, Clone)]
pub struct StowItem {
    /// SOP Class UID (empty when unknown).
    pub sop_class_uid: String,
    /// SOP Instance UID (empty when unknown).
    pub sop_instance_uid: String,
    /// RetrieveURL for a stored instance.
    pub retrieve_url: Option<String>,
    /// FailureReason for a failed one.
    pub failure: Option<u16>,
    /// Why (not part of the standard attributes; sent as an extra text attribute for humans).
    pub comment: Option<String>,
}

impl StowItem {
    /// A failed instance: its UIDs (empty when unknown), FailureReason and why.
    pub fn failed(sop_class_uid: &str, sop_instance_uid: &str, failure: u16, why: String) -> Self {
        Self {
            sop_class_uid: sop_class_uid.to_string(),
            sop_instance_uid: sop_instance_uid.to_string(),
            retrieve_url: None,
            failure: Some(failure),
            comment: Some(why),
        }
    }
}

fn stow_item(it: &StowItem) -> Value {
    let mut m = Map::new();
    let uid = |v: &str| {
        if v.is_empty() {
            None
        } else {
            Some(Value::from(v))
        }
    };
    put(&mut m, "00081150", "UI", uid(&it.sop_class_uid), true);
    put(&mut m, "00081155", "UI", uid(&it.sop_instance_uid), true);
    if let Some(u) = &it.retrieve_url {
        put(&mut m, "00081190", "UR", Some(u.as_str().into()), true);
    }
    if let Some(f) = it.failure {
        put(&mut m, "00081197", "US", Some(f.into()), true);
    }
    if let Some(c) = &it.comment {
        // Error Comment (0000,0902) is a command element; (0008,0202)... no standard slot in
        // the data set, so use Text Value (0040,A160), which viewers show as text.
        put(&mut m, "0040A160", "UT", Some(c.as_str().into()), true);
    }
    Value::Object(m)
}

/// The STOW-RS response data set (PS3.18 10.5.3).
pub fn stow_response(study_url: Option<&str>, stored: &[StowItem], failed: &[StowItem]) -> Value {
    let mut m = Map::new();
    if let Some(u) = study_url {
        put(&mut m, "00081190", "UR", Some(u.into()), true);
    }
    if !failed.is_empty() {
        m.insert(
            "00081198".into(),
            json!({"vr": "SQ", "Value": failed.iter().map(stow_item).collect::<Vec<_>>()}),
        );
    }
    if !stored.is_empty() {
        m.insert(
            "00081199".into(),
            json!({"vr": "SQ", "Value": stored.iter().map(stow_item).collect::<Vec<_>>()}),
        );
    }
    Value::Object(m)
}

/// WADO-RS metadata of a stored object: every attribute, with Pixel Data given as a
/// BulkDataURI to the instance itself (frame retrieval is not offered; the instance is).
///
/// # Errors
/// When the object cannot be serialised.
pub fn metadata(obj: &DefaultDicomObject, instance_url: &str) -> Result<Value, serde_json::Error> {
    let mut header = obj.clone().into_inner();
    let had_pixels = header.remove_element(tags::PIXEL_DATA);
    let mut v = dicom_json::to_value(&header)?;
    if let (true, Value::Object(m)) = (had_pixels, &mut v) {
        m.insert(
            "7FE00010".into(),
            json!({"vr": "OB", "BulkDataURI": instance_url}),
        );
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stow_response_has_the_standard_sequences() {
        let ok = StowItem {
            sop_class_uid: "1.2".into(),
            sop_instance_uid: "1.2.3".into(),
            retrieve_url: Some("http://h/dicomweb/studies/9/series/8/instances/1.2.3".into()),
            failure: None,
            comment: None,
        };
        let bad = StowItem {
            sop_class_uid: String::new(),
            sop_instance_uid: String::new(),
            retrieve_url: None,
            failure: Some(0xC000),
            comment: Some("not DICOM".into()),
        };
        let v = stow_response(Some("http://h/dicomweb/studies/9"), &[ok], &[bad]);
        assert_eq!(v["00081199"]["Value"][0]["00081155"]["Value"][0], "1.2.3");
        assert_eq!(v["00081198"]["Value"][0]["00081197"]["Value"][0], 0xC000);
        assert_eq!(v["00081198"]["Value"][0]["00081155"], json!({"vr": "UI"}));
    }
}
