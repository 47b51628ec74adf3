//! What a stored ImagingStudy starts: finding its pixels and analysing them. Pixels come from
//! instances Carina already holds (matched by study, series and SOP Instance UIDs), or are
//! fetched by WADO-RS from the study's DICOMweb Endpoint and ingested like any instance. The
//! analysis report (DiagnosticReport, Observations, heatmap Media, Device, Provenance) is
//! stored as FHIR resources that reference the ImagingStudy, its subject and its orders.

use std::collections::HashMap;

use bytes::Bytes;
use serde_json::{json, Value};

use super::Jobs;
use crate::analysis::pipeline::AnalyseError;
use crate::analysis::ProcessError;
use crate::fhir::index::normalise_reference;
use crate::imaging::MediaType;
use crate::ingest::Accepted;
use crate::ingest::IngestError;
use crate::outbound::wado::WadoError;
use crate::store::fhir::{Stored, Write};
use crate::store::StoreError;
use crate::store::{Query, Source};

/// The DICOM UIDs an ImagingStudy names.
#[derive(Debug, Clone, Default)]
pub struct StudyUids {
    /// Study Instance UID (from `identifier` with system `urn:dicom:uid`).
    pub study: Option<String>,
    /// (series UID, SOP Instance UIDs) in document order.
    pub series: Vec<(String, Vec<String>)>,
}

/// Reads the UIDs of an ImagingStudy.
pub fn uids(study: &Value) -> StudyUids {
    let study_uid = study["identifier"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["system"] == "urn:dicom:uid")
        .and_then(|i| i["value"].as_str())
        .map(|v| v.trim_start_matches("urn:oid:").to_string());
    let series = study["series"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| {
            let uid = s["uid"].as_str()?.to_string();
            let sops = s["instance"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| i["uid"].as_str().map(str::to_string))
                .collect();
            Some((uid, sops))
        })
        .collect();
    StudyUids {
        study: study_uid,
        series,
    }
}

/// The DICOMweb base URL of the study's `dicom-wado-rs` Endpoint: contained, in the same
/// Bundle, or stored here.
async fn wado_base(jobs: &Jobs, study: &Value, bundle: &HashMap<String, Value>) -> Option<String> {
    let mut refs: Vec<String> = Vec::new();
    for e in study["endpoint"].as_array().into_iter().flatten() {
        refs.extend(e["reference"].as_str().map(str::to_string));
    }
    for s in study["series"].as_array().into_iter().flatten() {
        for e in s["endpoint"].as_array().into_iter().flatten() {
            refs.extend(e["reference"].as_str().map(str::to_string));
        }
    }
    for r in refs {
        let endpoint = if let Some(local) = r.strip_prefix('#') {
            study["contained"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["id"] == local)
                .cloned()
        } else if let Some(v) = bundle.get(&normalise_reference(&r)) {
            Some(v.clone())
        } else if let Some((t, id)) = normalise_reference(&r).split_once('/') {
            if t == "Endpoint" {
                jobs.store
                    .fhir_read("Endpoint", id, None)
                    .await
                    .ok()
                    .flatten()
                    .map(|s| s.body)
            } else {
                None
            }
        } else {
            None
        };
        let Some(ep) = endpoint else { continue };
        let wado = ep["connectionType"]["code"] == "dicom-wado-rs";
        if let (true, Some(a)) = (wado, ep["address"].as_str()) {
            return Some(a.trim_end_matches('/').to_string());
        }
    }
    None
}

/// Whether `uid` is a DICOM UID (digits and dots, at most 64 characters): only such values go
/// into a WADO-RS path, so an ImagingStudy cannot steer the path with `/`, `?`, `#` or `..`.
fn is_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 64
        && uid.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && !uid.starts_with('.')
        && !uid.ends_with('.')
        && !uid.contains("..")
}

/// Fetches `{base}{path}` by WADO-RS through the outbound client and ingests every instance
/// (their analysis jobs leased to this process). Returns the instances stored.
async fn fetch_and_ingest(
    jobs: &Jobs,
    base: &str,
    path: &str,
) -> Result<Vec<Accepted>, StudyError> {
    let mut stored = Vec::new();
    for part in crate::outbound::wado::retrieve(&jobs.outbound, base, path).await? {
        stored.push(jobs.ingest.receive_claimed(part, Source::Wado).await?);
    }
    Ok(stored)
}

/// Why an ImagingStudy gave no report (stored as the job's note and shown to the client).
#[derive(Debug, thiserror::Error)]
pub enum StudyError {
    /// Nothing to analyse here, nowhere to fetch from, nothing attached.
    #[error("no instance of this study is stored here, it names no dicom-wado-rs Endpoint, and its Bundle holds no Binary or Media image")]
    NoPixels,
    /// An Endpoint but no Study Instance UID to retrieve.
    #[error("the ImagingStudy has no Study Instance UID identifier (system urn:dicom:uid)")]
    NoStudyUid,
    /// UIDs that must not go into a WADO-RS path.
    #[error("the ImagingStudy's UIDs are not DICOM UIDs; nothing fetched")]
    NotUids,
    /// The WADO-RS retrieve failed.
    #[error(transparent)]
    Fetch(#[from] WadoError),
    /// A fetched or attached instance was refused.
    #[error(transparent)]
    Ingest(#[from] IngestError),
    /// An instance's analysis failed.
    #[error("{sop}: {source}")]
    Instance {
        /// Its SOP Instance UID.
        sop: String,
        /// Why.
        source: ProcessError,
    },
    /// An attached instance's analysis failed.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// An attached PNG/JPEG's analysis failed.
    #[error(transparent)]
    Analyse(#[from] AnalyseError),
    /// No image model is loaded for an attached PNG/JPEG.
    #[error("no image model is loaded")]
    NoModel,
    /// Instances were found but none routed to a model.
    #[error("no instance could be analysed")]
    NothingAnalysed,
    /// The database or the blob folders failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Analyses the pixels of a stored ImagingStudy and stores the report. `bundle` maps
/// `Type/id` of the resources stored with it (to find an Endpoint in the same Bundle).
///
/// # Errors
/// [`StudyError`]: why there is no report (no pixels found, fetch failed, analysis failed).
pub async fn analyse_imaging_study(
    jobs: &Jobs,
    study: &Stored,
    bundle: &HashMap<String, Value>,
) -> Result<Vec<Stored>, StudyError> {
    let u = uids(&study.body);
    let wanted: Vec<String> = u.series.iter().flat_map(|(_, s)| s.clone()).collect();
    // 1. instances already here
    let mut have: Vec<String> = Vec::new();
    if let Some(s) = &u.study {
        let q = Query {
            study_uid: Some(s.clone()),
            limit: 1000,
            ..Query::default()
        };
        let found = jobs.store.search_instances(&q).await?;
        have = found
            .into_iter()
            .map(|i| i.sop_instance_uid)
            .filter(|sop| wanted.is_empty() || wanted.contains(sop))
            .collect();
    } else {
        for sop in &wanted {
            if jobs.store.instance(sop).await.ok().flatten().is_some() {
                have.push(sop.clone());
            }
        }
    }
    // 2. an image attached in the same Bundle (Binary or Media), when nothing is stored
    let need_more = have.is_empty() || wanted.iter().any(|s| !have.contains(s));
    let endpoint = if need_more {
        wado_base(jobs, &study.body, bundle).await
    } else {
        None
    };
    if have.is_empty() && endpoint.is_none() {
        if let Some((bytes, media)) = attached_image(bundle) {
            return analyse_attached(jobs, study, bytes, media).await;
        }
    }
    // 3. the rest by WADO-RS from the study's endpoint (their analysis jobs are claimed by this
    //    process: the one analysed below finishes its job, the others are released to workers)
    let mut fetch_note: Option<StudyError> = None;
    let mut claimed: HashMap<String, Accepted> = HashMap::new();
    if need_more {
        match (endpoint, &u.study) {
            (Some(_), Some(study_uid))
                if !is_uid(study_uid)
                    || u.series
                        .iter()
                        .any(|(se, sops)| !is_uid(se) || sops.iter().any(|x| !is_uid(x))) =>
            {
                fetch_note = Some(StudyError::NotUids);
            }
            (Some(base), Some(study_uid)) => {
                let paths: Vec<String> = if wanted.is_empty() {
                    vec![format!("/studies/{study_uid}")]
                } else {
                    u.series
                        .iter()
                        .flat_map(|(series, sops)| {
                            sops.iter().filter(|s| !have.contains(s)).map(move |sop| {
                                format!("/studies/{study_uid}/series/{series}/instances/{sop}")
                            })
                        })
                        .collect()
                };
                for p in paths {
                    match fetch_and_ingest(jobs, &base, &p).await {
                        Ok(got) => {
                            for a in got {
                                have.push(a.index.sop_instance_uid.clone());
                                claimed.insert(a.index.sop_instance_uid.clone(), a);
                            }
                        }
                        Err(e) => fetch_note = Some(e),
                    }
                }
            }
            (None, _) if have.is_empty() => return Err(StudyError::NoPixels),
            (_, None) if have.is_empty() => return Err(StudyError::NoStudyUid),
            _ => {}
        }
    }
    // 4. analyse the first instance that routes to a model
    let mut last_err = fetch_note.unwrap_or(StudyError::NothingAnalysed);
    let mut analysis = None;
    for sop in &have {
        let result = match claimed.remove(sop) {
            Some(accepted) => jobs.analyse_claimed(&accepted, None).await,
            None => jobs.analyser.process(sop, None).await,
        };
        match result {
            Ok(a) => {
                analysis = Some(a);
                break;
            }
            Err(source) => {
                last_err = StudyError::Instance {
                    sop: sop.clone(),
                    source,
                }
            }
        }
    }
    let owner = &jobs.settings.owner;
    for job in claimed.values().filter_map(|a| a.job.as_deref()) {
        if let Err(e) = jobs.store.release_job(job, owner).await {
            tracing::warn!(error = %e, "cannot release an analysis job (its lease will expire)");
        }
    }
    jobs.wake();
    match analysis {
        Some(a) => store_report(jobs, study, &a.bundle).await,
        None => Err(last_err),
    }
}

/// An image in a Binary or Media of the same Bundle: its bytes and media type.
fn attached_image(bundle: &HashMap<String, Value>) -> Option<(Bytes, MediaType)> {
    use base64::Engine as _;
    let mut keys: Vec<&String> = bundle.keys().collect();
    keys.sort();
    keys.into_iter().find_map(|k| {
        let r = &bundle[k];
        let (ct, data) = match r["resourceType"].as_str()? {
            "Binary" => (r["contentType"].as_str()?, r["data"].as_str()?),
            "Media" => (
                r.pointer("/content/contentType")?.as_str()?,
                r.pointer("/content/data")?.as_str()?,
            ),
            _ => return None,
        };
        let media = MediaType::from_content_type(ct)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data)
            .ok()?;
        Some((Bytes::from(bytes), media))
    })
}

/// Analyses an attached image: DICOM goes through ingest like any instance, PNG/JPEG straight
/// to the first image model.
async fn analyse_attached(
    jobs: &Jobs,
    study: &Stored,
    bytes: Bytes,
    media: MediaType,
) -> Result<Vec<Stored>, StudyError> {
    let analysis = if media == MediaType::Dicom {
        let accepted = jobs.ingest.receive_claimed(bytes, Source::Api).await?;
        jobs.analyse_claimed(&accepted, None).await?
    } else {
        let model = jobs.analyser.image_model(None).ok_or(StudyError::NoModel)?;
        let a = crate::analysis::pipeline::analyse(model.clone(), bytes, media, |_| None).await?;
        jobs.store.save_analysis(&a.record(), "fhir").await?;
        a
    };
    store_report(jobs, study, &analysis.bundle).await
}

/// Stores the analysis Bundle's resources with references to the ImagingStudy, its subject
/// and its orders; ids come from the analysis, so a re-run updates instead of duplicating.
async fn store_report(
    jobs: &Jobs,
    study: &Stored,
    report_bundle: &Value,
) -> Result<Vec<Stored>, StudyError> {
    let study_ref = json!({"reference": format!("ImagingStudy/{}", study.id)});
    let subject = study.body.get("subject").cloned();
    let based_on = study.body.get("basedOn").cloned();
    let mut map: HashMap<String, String> = HashMap::new();
    let entries = report_bundle["entry"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for e in &entries {
        if let (Some(f), Some(t), Some(id)) = (
            e["fullUrl"].as_str(),
            e["resource"]["resourceType"].as_str(),
            e["resource"]["id"].as_str(),
        ) {
            map.insert(f.to_string(), format!("{t}/{id}"));
        }
    }
    let mut writes = Vec::new();
    for e in entries {
        let mut r = e["resource"].clone();
        crate::fhir::bundle::replace_refs(&mut r, &map);
        let rt = r["resourceType"].as_str().unwrap_or("").to_string();
        match rt.as_str() {
            "DiagnosticReport" => {
                r["imagingStudy"] = json!([study_ref]);
                if let Some(b) = &based_on {
                    r["basedOn"] = b.clone();
                }
            }
            "Provenance" => {
                r["entity"] = json!([{"role": "source", "what": study_ref}]);
            }
            _ => {}
        }
        if matches!(rt.as_str(), "DiagnosticReport" | "Observation" | "Media") {
            match &subject {
                Some(s) => r["subject"] = s.clone(),
                None => {
                    if let Some(o) = r.as_object_mut() {
                        o.remove("subject");
                    }
                }
            }
        }
        let id = r["id"].as_str().unwrap_or("").to_string();
        writes.push(Write {
            resource_type: rt,
            id,
            body: r,
            if_match: None,
            fresh: false,
        });
    }
    Ok(jobs.store.fhir_write(writes).await?)
}
