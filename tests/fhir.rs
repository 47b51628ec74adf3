//! The FHIR R4 endpoint on the real router (tower `oneshot`) with the shipped models and a real
//! SQLite store: every official example and Synthea bundle in, read back unchanged; search;
//! transactions and batches; errors as OperationOutcome; lab Observations → RiskAssessment by
//! the local ONNX model; produced resources through both external R4 validators.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{header, HeaderMap, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use common::{load_options, root};

const FHIR: &str = "application/fhir+json";

fn shipped() -> Arc<carina::inference::Registry> {
    static REG: OnceLock<Arc<carina::inference::Registry>> = OnceLock::new();
    REG.get_or_init(|| {
        Arc::new(
            carina::inference::Registry::load(&root().join("models"), &load_options()).unwrap(),
        )
    })
    .clone()
}

async fn app(max_body: usize) -> (Router, tempfile::TempDir) {
    app_with(max_body, &carina::risk::RiskSettings::default()).await
}

async fn app_with(
    max_body: usize,
    risk: &carina::risk::RiskSettings,
) -> (Router, tempfile::TempDir) {
    app_full(max_body, risk, std::time::Duration::from_secs(60)).await
}

async fn app_full(
    max_body: usize,
    risk: &carina::risk::RiskSettings,
    wait: std::time::Duration,
) -> (Router, tempfile::TempDir) {
    let models = tokio::task::spawn_blocking(shipped).await.unwrap();
    let risk = risk.clone();
    let t = common::TestApp::builder()
        .with_models(models)
        .max_body(max_body)
        .configure(|s| {
            s.risk = risk;
            s.fhir_sync_wait_secs = wait.as_secs();
        })
        .build()
        .await;
    assert!(
        t.state().risk.is_some(),
        "the shipped tabular model is loaded"
    );
    t.spawn_workers();
    (t.router, t.dir)
}

async fn send(app: &Router, req: Request<Body>) -> (StatusCode, HeaderMap, Value) {
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
    };
    (status, headers, body)
}

fn req(method: &str, uri: &str, body: Option<&Value>) -> Request<Body> {
    let b = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::HOST, "carina.test")
        .header(header::CONTENT_TYPE, FHIR);
    match body {
        Some(v) => b.body(Body::from(v.to_string())).unwrap(),
        None => b.body(Body::empty()).unwrap(),
    }
}

async fn get(app: &Router, uri: &str) -> (StatusCode, HeaderMap, Value) {
    send(app, req("GET", uri, None)).await
}

/// Asserts an OperationOutcome answer with `want` and returns its diagnostics.
fn outcome(got: &(StatusCode, HeaderMap, Value), want: StatusCode) -> String {
    assert_eq!(got.0, want, "{}", got.2);
    assert!(got.1[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with(FHIR));
    assert_eq!(got.2["resourceType"], "OperationOutcome", "{}", got.2);
    got.2["issue"][0]["diagnostics"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The resource without what the server assigns (`id`, `meta.versionId`, `meta.lastUpdated`).
fn strip(v: &Value) -> Value {
    let mut v = v.clone();
    let o = v.as_object_mut().unwrap();
    o.remove("id");
    if let Some(m) = o.get_mut("meta").and_then(Value::as_object_mut) {
        m.remove("versionId");
        m.remove("lastUpdated");
        if m.is_empty() {
            o.remove("meta");
        }
    }
    v
}

fn json_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    v.sort();
    v
}

/// Fixture files, plus the full shared data set when this machine has it.
fn example_files() -> Vec<PathBuf> {
    let mut v = json_files(&root().join("tests/fixtures/fhir/examples"));
    v.extend(json_files(&root().join("tests/fixtures/fhir/bundles")));
    for shared in [
        "../shared/data/fhir/examples",
        "../shared/data/fhir/bundles",
    ] {
        let d = root().join(shared);
        if d.is_dir() {
            v.extend(json_files(&d));
        }
    }
    v
}

#[tokio::test]
async fn every_example_is_stored_and_read_back_unchanged() {
    let (app, _d) = app(64 << 20).await;
    let files = example_files();
    // 59 committed fixtures (48 examples, 11 bundles), more when ../shared is present
    assert!(files.len() >= 59, "{} files", files.len());
    for f in &files {
        let original: Value = serde_json::from_slice(&std::fs::read(f).unwrap()).unwrap();
        let rt = original["resourceType"].as_str().unwrap().to_string();
        let (s, h, body) = send(&app, req("POST", &format!("/fhir/{rt}"), Some(&original))).await;
        assert_eq!(s, StatusCode::CREATED, "{}: {body}", f.display());
        let location = h[header::LOCATION].to_str().unwrap().to_string();
        assert!(
            location.starts_with(&format!("http://carina.test/fhir/{rt}/")),
            "{location}"
        );
        assert!(location.ends_with("/_history/1"), "{location}");
        assert_eq!(h[header::ETAG], "W/\"1\"");
        let id = body["id"].as_str().unwrap().to_string();
        assert_eq!(body["meta"]["versionId"], "1");
        let (s, h, read) = get(&app, &format!("/fhir/{rt}/{id}")).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(h[header::ETAG], "W/\"1\"");
        assert_eq!(
            strip(&read),
            strip(&original),
            "{} changed on the way",
            f.display()
        );
        let (s, _, v1) = get(&app, &format!("/fhir/{rt}/{id}/_history/1")).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v1, read);
    }
}

#[tokio::test]
async fn synthea_transaction_is_atomic_resolves_references_and_assesses_risk() {
    let (app, _d) = app(64 << 20).await;
    let path = root().join(
        "tests/fixtures/fhir/bundles/synthea_Alberto_Atencio_fc712d1f-5a2e-4407-9c55-a2a2bad623c2.json",
    );
    let bundle: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let n = bundle["entry"].as_array().unwrap().len();
    let (s, _, resp) = send(&app, req("POST", "/fhir", Some(&bundle))).await;
    assert_eq!(s, StatusCode::OK, "{resp}");
    assert_eq!(resp["type"], "transaction-response");
    let entries = resp["entry"].as_array().unwrap();
    assert_eq!(entries.len(), n);
    let mut patient_id = String::new();
    for (e, orig) in entries.iter().zip(bundle["entry"].as_array().unwrap()) {
        assert_eq!(e["response"]["status"], "201 Created");
        let loc = e["response"]["location"].as_str().unwrap();
        let (s, _, r) = get(
            &app,
            &format!("/fhir/{}", loc.split("/_history").next().unwrap()),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{loc}");
        assert!(
            !r.to_string().contains("urn:uuid:"),
            "{loc}: placeholders are rewritten"
        );
        // unchanged apart from id, meta and the rewritten references
        let mut want = strip(&orig["resource"]);
        let mut got = strip(&r);
        for v in [&mut want, &mut got] {
            blank_references(v);
        }
        assert_eq!(got, want, "{loc}");
        if r["resourceType"] == "Patient" {
            patient_id = r["id"].as_str().unwrap().to_string();
        }
    }
    // references point at the stored Patient
    let (_, _, enc) = get(
        &app,
        &format!("/fhir/Observation?patient={patient_id}&_count=1"),
    )
    .await;
    assert!(enc["total"].as_i64().unwrap() > 0);
    assert_eq!(
        enc["entry"][0]["resource"]["subject"]["reference"],
        format!("Patient/{patient_id}")
    );

    // the Patient triggered an ICU-risk assessment by the local model: age from the birth date,
    // the labs (absent in Synthea) imputed with the training medians
    let (_, _, ra) = get(&app, &format!("/fhir/RiskAssessment?patient={patient_id}")).await;
    assert_eq!(ra["total"], 1, "{ra}");
    let ra = &ra["entry"][0]["resource"];
    let patient = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["resource"]["resourceType"] == "Patient")
        .unwrap();
    let birth = patient["resource"]["birthDate"].as_str().unwrap();
    let age = carina::risk::features::age_years(birth, chrono::Utc::now()).unwrap() as f32;
    let model = shipped().tabular[0].clone();
    let want = tokio::task::spawn_blocking(move || model.predict(&[age, 350.0, 13.05, 53.8]))
        .await
        .unwrap()
        .unwrap();
    let p = ra["prediction"][0]["probabilityDecimal"].as_f64().unwrap();
    assert!((p - f64::from(want)).abs() < 1e-5, "{p} vs {want}");
    let q = ra["prediction"][0]["qualitativeRisk"]["coding"][0]["code"]
        .as_str()
        .unwrap();
    assert_eq!(
        q,
        if p >= 0.5 {
            "high"
        } else if p >= 0.2 {
            "moderate"
        } else {
            "low"
        }
    );
    let note = ra["note"][0]["text"].as_str().unwrap();
    assert!(
        note.contains("imputed") && note.contains("from birth date"),
        "{note}"
    );
    assert_eq!(ra["meta"]["security"][0]["code"], "AIAST");
    let (_, _, prov) = get(
        &app,
        &format!(
            "/fhir/Provenance?target=RiskAssessment/{}",
            ra["id"].as_str().unwrap()
        ),
    )
    .await;
    assert_eq!(prov["total"], 1);
    let reason = prov["entry"][0]["resource"]["reason"][0]["text"]
        .as_str()
        .unwrap();
    assert!(reason.contains("local ONNX model"), "{reason}");

    // posting the same transaction again stores new resources, but the features of the new
    // patient are computed separately; re-saving the existing patient unchanged does not
    // make a new assessment
    let (_, _, pat) = get(&app, &format!("/fhir/Patient/{patient_id}")).await;
    let (s, _, _) = send(
        &app,
        req("PUT", &format!("/fhir/Patient/{patient_id}"), Some(&pat)),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (_, _, ra2) = get(&app, &format!("/fhir/RiskAssessment?patient={patient_id}")).await;
    assert_eq!(ra2["total"], 1, "unchanged features: no new assessment");

    // a lab result for this patient changes a feature: a new assessment citing it
    let ldh = json!({"resourceType": "Observation", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2532-0"}]},
        "subject": {"reference": format!("Patient/{patient_id}")},
        "effectiveDateTime": chrono::Utc::now().to_rfc3339(),
        "valueQuantity": {"value": 9.5, "unit": "ukat/L", "system": "http://unitsofmeasure.org", "code": "ukat/L"}});
    let (s, _, obs) = send(&app, req("POST", "/fhir/Observation", Some(&ldh))).await;
    assert_eq!(s, StatusCode::CREATED);
    let (_, _, ra3) = get(&app, &format!("/fhir/RiskAssessment?patient={patient_id}")).await;
    assert_eq!(ra3["total"], 2, "{ra3}");
    let newest = &ra3["entry"][0]["resource"];
    assert_eq!(
        newest["basis"][0]["reference"],
        format!("Observation/{}", obs["id"].as_str().unwrap())
    );
    assert!(newest["note"][0]["text"]
        .as_str()
        .unwrap()
        .contains("ldh = 570 U/L (observed)"));
    // an implausible value is refused with a warning, the previous one stays in use
    let mut bad = ldh.clone();
    bad["valueQuantity"] = json!({"value": 99999, "unit": "U/L", "system": "http://unitsofmeasure.org", "code": "U/L"});
    let (s, _, _) = send(&app, req("POST", "/fhir/Observation", Some(&bad))).await;
    assert_eq!(s, StatusCode::CREATED, "the Observation itself is stored");

    // produced resources pass both external R4 validators
    let out = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for (i, r) in [newest.clone(), prov["entry"][0]["resource"].clone()]
        .iter()
        .enumerate()
    {
        let f = out.path().join(format!("r{i}.json"));
        std::fs::write(&f, r.to_string()).unwrap();
        files.push(f);
    }
    let (_, _, dev) = get(&app, "/fhir/Device?_count=5").await;
    let f = out.path().join("device.json");
    std::fs::write(&f, dev["entry"][0]["resource"].to_string()).unwrap();
    files.push(f);
    let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    common::validate_fhir(&refs);
}

fn blank_references(v: &mut Value) {
    match v {
        Value::Object(o) => {
            for (k, x) in o.iter_mut() {
                if k == "reference" && x.is_string() {
                    *x = json!("-");
                } else {
                    blank_references(x);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(blank_references),
        _ => {}
    }
}

/// A Synthea transaction of 138 resources (about 600 search index rows, written several hundred
/// per statement): every search on it matches exactly what the bundle holds, counted here from
/// the bundle itself; an update moves a resource's index rows, and a resource written twice in
/// one transaction is found only by its last version.
#[tokio::test]
async fn a_large_transaction_is_indexed_whole_and_search_follows_updates() {
    let (app, _d) = app(64 << 20).await;
    let path = root().join(
        "tests/fixtures/fhir/bundles/synthea_Alfreda_Wyman_3287b938-4670-47eb-91e5-e0ce3df71405.json",
    );
    let bundle: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let (s, _, resp) = send(&app, req("POST", "/fhir", Some(&bundle))).await;
    assert_eq!(s, StatusCode::OK, "{resp}");
    let patient = resp["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["response"]["location"].as_str())
        .find_map(|l| l.strip_prefix("Patient/"))
        .and_then(|l| l.split('/').next())
        .unwrap()
        .to_string();
    let obs: Vec<&Value> = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["resource"])
        .filter(|r| r["resourceType"] == "Observation")
        .collect();
    let with_code = |code: &str| {
        obs.iter()
            .filter(|o| {
                o["code"]["coding"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|c| c["code"] == code)
            })
            .count() as i64
    };
    let since_2015 = obs
        .iter()
        .filter(|o| o["effectiveDateTime"].as_str().unwrap() >= "2015-01-01")
        .count() as i64;
    let (height, weight) = (with_code("8302-2"), with_code("29463-7"));
    assert!(obs.len() > 50 && height > 1 && weight > 1 && since_2015 > 1);
    let total = |q: String| {
        let app = app.clone();
        async move {
            let (s, _, b) = get(&app, &format!("/fhir/Observation?{q}")).await;
            assert_eq!(s, StatusCode::OK, "{q}: {b}");
            b["total"].as_i64().unwrap()
        }
    };
    let p = format!("patient=Patient/{patient}");
    assert_eq!(total(format!("{p}&_count=0")).await, obs.len() as i64);
    assert_eq!(
        total(format!("{p}&code=http://loinc.org|8302-2")).await,
        height
    );
    assert_eq!(
        total(format!("{p}&code=8302-2,http://loinc.org|29463-7")).await,
        height + weight,
        "OR'd codes"
    );
    assert_eq!(total(format!("{p}&date=ge2015-01-01")).await, since_2015);
    assert_eq!(total(format!("{p}&code=http://loinc.org|00000-0")).await, 0);
    assert_eq!(total("patient=Patient/nobody".into()).await, 0);

    // an update re-indexes: the old code no longer finds the resource, the new one does
    let (_, _, hit) = get(
        &app,
        &format!("/fhir/Observation?{p}&code=http://loinc.org|8302-2&_count=1"),
    )
    .await;
    let mut o = hit["entry"][0]["resource"].clone();
    let id = o["id"].as_str().unwrap().to_string();
    o["code"]["coding"][0]["code"] = json!("8302-2-moved");
    let (s, _, _) = send(
        &app,
        req("PUT", &format!("/fhir/Observation/{id}"), Some(&o)),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        total(format!("{p}&code=http://loinc.org|8302-2")).await,
        height - 1
    );
    assert_eq!(total(format!("_id={id}&code=8302-2-moved")).await, 1);

    // the same resource twice in one transaction: only its last version is indexed
    let twice = |code: &str| {
        json!({"fullUrl": "Observation/twice", "request": {"method": "PUT", "url": "Observation/twice"},
            "resource": {"resourceType": "Observation", "id": "twice", "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                "subject": {"reference": format!("Patient/{patient}")}}})
    };
    let tx = json!({"resourceType": "Bundle", "type": "transaction",
        "entry": [twice("first-code"), twice("last-code")]});
    let (s, _, b) = send(&app, req("POST", "/fhir", Some(&tx))).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(total("_id=twice&code=first-code".into()).await, 0);
    assert_eq!(total("_id=twice&code=last-code".into()).await, 1);
}

#[tokio::test]
async fn errors_are_operation_outcomes_with_the_right_status() {
    let (app, _d) = app(1 << 20).await;
    let patient = json!({"resourceType": "Patient", "gender": "female", "birthDate": "1950-01-01"});
    let r = send(
        &app,
        Request::post("/fhir/Patient")
            .header(header::CONTENT_TYPE, FHIR)
            .body(Body::from("{nope"))
            .unwrap(),
    )
    .await;
    assert!(outcome(&r, StatusCode::BAD_REQUEST).contains("not valid JSON"));
    let r = send(&app, req("POST", "/fhir/Foo", Some(&patient))).await;
    outcome(&r, StatusCode::NOT_FOUND);
    let r = get(&app, "/fhir/Foo/1").await;
    outcome(&r, StatusCode::NOT_FOUND);
    let r = send(&app, req("POST", "/fhir/Observation", Some(&patient))).await;
    assert!(outcome(&r, StatusCode::BAD_REQUEST).contains("the body is a Patient"));
    let bogus = json!({"resourceType": "Patient", "gender": "female", "nickname": "x"});
    let r = send(&app, req("POST", "/fhir/Patient", Some(&bogus))).await;
    assert!(
        outcome(&r, StatusCode::BAD_REQUEST).contains("nickname"),
        "names the element"
    );
    let obs = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": "urn:uuid:0f0e7f2e-1111-4a3c-9a37-000000000000"}});
    let r = send(&app, req("POST", "/fhir/Observation", Some(&obs))).await;
    assert!(outcome(&r, StatusCode::UNPROCESSABLE_ENTITY).contains("Observation.subject.reference"));
    let big = json!({"resourceType": "Patient", "text": {"status": "generated", "div": format!("<div xmlns=\"http://www.w3.org/1999/xhtml\">{}</div>", "x".repeat(2 << 20))}});
    let r = send(&app, req("POST", "/fhir/Patient", Some(&big))).await;
    outcome(&r, StatusCode::PAYLOAD_TOO_LARGE);
    let r = send(
        &app,
        Request::post("/fhir/Patient")
            .header(header::CONTENT_TYPE, "application/xml")
            .body(Body::from("<Patient/>"))
            .unwrap(),
    )
    .await;
    outcome(&r, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let r = get(&app, "/fhir/Patient/does-not-exist").await;
    outcome(&r, StatusCode::NOT_FOUND);

    // update: id checks and If-Match
    let (s, _, p) = send(&app, req("POST", "/fhir/Patient", Some(&patient))).await;
    assert_eq!(s, StatusCode::CREATED);
    let id = p["id"].as_str().unwrap();
    let r = send(&app, req("PUT", "/fhir/Patient/other", Some(&p))).await;
    assert!(outcome(&r, StatusCode::BAD_REQUEST).contains("does not match"));
    let mut stale = req("PUT", &format!("/fhir/Patient/{id}"), Some(&p));
    stale
        .headers_mut()
        .insert(header::IF_MATCH, "W/\"7\"".parse().unwrap());
    outcome(&send(&app, stale).await, StatusCode::PRECONDITION_FAILED);
    let mut ok = req("PUT", &format!("/fhir/Patient/{id}"), Some(&p));
    ok.headers_mut()
        .insert(header::IF_MATCH, "W/\"1\"".parse().unwrap());
    let (s, h, p2) = send(&app, ok).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h[header::ETAG], "W/\"2\"");
    assert_eq!(p2["meta"]["versionId"], "2");
    let (s, _, v1) = get(&app, &format!("/fhir/Patient/{id}/_history/1")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v1["meta"]["versionId"], "1");
    outcome(
        &get(&app, &format!("/fhir/Patient/{id}/_history/9")).await,
        StatusCode::NOT_FOUND,
    );

    // a transaction with an unresolvable placeholder stores nothing
    let (_, _, before) = get(&app, "/fhir/Patient").await;
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:7e0e1c3a-0000-4000-8000-000000000001", "resource": patient, "request": {"method": "POST", "url": "Patient"}},
        {"resource": obs, "request": {"method": "POST", "url": "Observation"}}
    ]});
    let r = send(&app, req("POST", "/fhir", Some(&tx))).await;
    assert!(
        outcome(&r, StatusCode::BAD_REQUEST).contains("Bundle.entry[1].resource.subject.reference")
    );
    let (_, _, after) = get(&app, "/fhir/Patient").await;
    assert_eq!(before["total"], after["total"], "atomic: nothing stored");

    // a batch answers each entry on its own
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": patient, "request": {"method": "POST", "url": "Patient"}},
        {"resource": bogus, "request": {"method": "POST", "url": "Patient"}},
        {"request": {"method": "GET", "url": format!("Patient/{id}")}}
    ]});
    let (s, _, resp) = send(&app, req("POST", "/fhir", Some(&batch))).await;
    assert_eq!(s, StatusCode::OK, "{resp}");
    assert_eq!(resp["type"], "batch-response");
    assert_eq!(resp["entry"][0]["response"]["status"], "201 Created");
    assert!(resp["entry"][1]["response"]["status"]
        .as_str()
        .unwrap()
        .starts_with("400"));
    assert_eq!(
        resp["entry"][1]["response"]["outcome"]["resourceType"],
        "OperationOutcome"
    );
    assert_eq!(resp["entry"][2]["resource"]["id"], id);
}

#[tokio::test]
async fn search_prefer_and_capability() {
    let (app, _d) = app(1 << 20).await;
    let mut ids = Vec::new();
    for (i, (code, day, status)) in [
        ("2532-0", "2020-02-01", "final"),
        ("736-9", "2020-02-02", "final"),
        ("2532-0", "2020-03-05", "amended"),
    ]
    .iter()
    .enumerate()
    {
        let o = json!({"resourceType": "Observation", "status": status,
            "identifier": [{"system": "urn:lab", "value": format!("L{i}")}],
            "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
            "subject": {"reference": "Patient/p1"}, "effectiveDateTime": day,
            "valueQuantity": {"value": 1, "unit": "U/L"}});
        let (s, _, b) = send(&app, req("POST", "/fhir/Observation", Some(&o))).await;
        assert_eq!(s, StatusCode::CREATED);
        ids.push(b["id"].as_str().unwrap().to_string());
    }
    let total = |b: &Value| b["total"].as_i64().unwrap();
    let q = |s: &'static str| s;
    for (query, want) in [
        (q("code=2532-0"), 2),
        (q("code=http://loinc.org|736-9"), 1),
        (q("code=http://other|736-9"), 0),
        (q("code=2532-0,736-9"), 3),
        (q("patient=p1"), 3),
        (q("subject=Patient/p1&code=736-9"), 1),
        (q("patient=p2"), 0),
        (q("date=2020-02"), 2),
        (q("date=ge2020-02-02"), 2),
        (q("date=lt2020-02-02"), 1),
        (q("date=gt2020-02-02&date=le2020-12"), 1),
        (q("status=amended"), 1),
        (q("identifier=urn:lab|L1"), 1),
        (q("_lastUpdated=gt2020-01-01"), 3),
        (q("_lastUpdated=lt2020-01-01"), 0),
    ] {
        let (s, _, b) = get(&app, &format!("/fhir/Observation?{query}")).await;
        assert_eq!(s, StatusCode::OK, "{query}: {b}");
        assert_eq!(total(&b), want, "{query}");
        assert_eq!(b["type"], "searchset");
    }
    let (_, _, b) = get(&app, &format!("/fhir/Observation?_id={}", ids[1])).await;
    assert_eq!(b["entry"][0]["resource"]["id"], ids[1].as_str());
    // paging: follow `next` until the end
    let mut seen = Vec::new();
    let mut url = "/fhir/Observation?patient=p1&_count=2".to_string();
    loop {
        let (_, _, b) = get(&app, &url).await;
        for e in b["entry"].as_array().unwrap() {
            seen.push(e["resource"]["id"].as_str().unwrap().to_string());
        }
        match b["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
        {
            Some(l) => {
                url = l["url"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("http://carina.test")
                    .to_string()
            }
            None => break,
        }
    }
    seen.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(seen, want);
    // _total=none: no count, yet the same pages, with `next` exactly while matches follow
    let mut pages = Vec::new();
    let mut url = "/fhir/Observation?patient=p1&_count=2&_total=none".to_string();
    loop {
        let (s, _, b) = get(&app, &url).await;
        assert_eq!(s, StatusCode::OK, "{b}");
        assert!(b.get("total").is_none(), "{b}");
        pages.push(b["entry"].as_array().unwrap().len());
        let next = b["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
            .map(|l| l["url"].as_str().unwrap().to_string());
        match next {
            Some(n) => {
                assert!(n.contains("_total=none"), "{n}");
                url = n
                    .split_once("/fhir/")
                    .map(|(_, p)| format!("/fhir/{p}"))
                    .unwrap();
            }
            None => break,
        }
    }
    assert_eq!(pages, vec![2, 1]);
    let (_, _, b) = get(&app, "/fhir/Observation?patient=p1&_total=accurate").await;
    assert_eq!(total(&b), 3);
    outcome(
        &get(&app, "/fhir/Observation?_total=maybe").await,
        StatusCode::BAD_REQUEST,
    );
    // unknown parameters: reported, or refused with handling=strict
    let (_, _, b) = get(&app, "/fhir/Observation?foo=1").await;
    assert_eq!(total(&b), 3);
    assert_eq!(
        b["entry"].as_array().unwrap().last().unwrap()["search"]["mode"],
        "outcome"
    );
    let mut strict = req("GET", "/fhir/Observation?foo=1", None);
    strict
        .headers_mut()
        .insert("prefer", "handling=strict".parse().unwrap());
    outcome(&send(&app, strict).await, StatusCode::BAD_REQUEST);
    outcome(
        &get(&app, "/fhir/Observation?date=soon").await,
        StatusCode::BAD_REQUEST,
    );

    // Prefer: return=
    let p = json!({"resourceType": "Patient", "gender": "male"});
    let mut minimal = req("POST", "/fhir/Patient", Some(&p));
    minimal
        .headers_mut()
        .insert("prefer", "return=minimal".parse().unwrap());
    let (s, h, b) = send(&app, minimal).await;
    assert_eq!(s, StatusCode::CREATED);
    assert!(b.is_null() && h.contains_key(header::LOCATION));
    let mut oo = req("POST", "/fhir/Patient", Some(&p));
    oo.headers_mut()
        .insert("prefer", "return=OperationOutcome".parse().unwrap());
    let (s, _, b) = send(&app, oo).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(b["resourceType"], "OperationOutcome");

    // the CapabilityStatement is what the router serves
    let (s, _, cs) = get(&app, "/fhir/metadata").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(cs["fhirVersion"], "4.0.1");
    let res = cs["rest"][0]["resource"].as_array().unwrap();
    let obs = res.iter().find(|r| r["type"] == "Observation").unwrap();
    let params: Vec<&str> = obs["searchParam"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for want in [
        "_id",
        "_lastUpdated",
        "patient",
        "subject",
        "code",
        "date",
        "status",
        "identifier",
    ] {
        assert!(params.contains(&want), "{want}");
        let (s, _, _) = get(&app, &format!("/fhir/Observation?{want}=x")).await;
        assert_ne!(s, StatusCode::NOT_FOUND);
    }
    let ra = res.iter().find(|r| r["type"] == "RiskAssessment").unwrap();
    assert_eq!(ra["operation"][0]["name"], "predict");
    let out = tempfile::tempdir().unwrap();
    let f = out.path().join("cs.json");
    std::fs::write(&f, cs.to_string()).unwrap();
    common::validate_fhir(&[f.as_path()]);
}

#[tokio::test]
async fn predict_operation_from_a_bundle_or_a_stored_subject() {
    let (app, _d) = app(1 << 20).await;
    let now = chrono::Utc::now().to_rfc3339();
    let lab = |code: &str, v: f64, unit: &str| {
        json!({"resourceType": "Observation", "id": format!("o{code}"), "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]}, "effectiveDateTime": now,
        "valueQuantity": {"value": v, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}})
    };
    let bundle = json!({"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": lab("30525-0", 75.0, "a")},
        {"resource": lab("2532-0", 700.0, "U/L")},
        {"resource": lab("736-9", 4.0, "%")},
        {"resource": lab("30522-7", 150.0, "mg/L")},
    ]});
    let (s, _, b) = send(
        &app,
        req("POST", "/fhir/RiskAssessment/$predict", Some(&bundle)),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let ra = &b["entry"][0]["resource"];
    assert_eq!(ra["resourceType"], "RiskAssessment");
    // the training script recorded this example's probability with Python onnxruntime
    let metrics: Value = serde_json::from_slice(
        &std::fs::read(root().join("models/icu-mortality-risk/metrics.json")).unwrap(),
    )
    .unwrap();
    let want = metrics["examples"]["age 75, LDH 700, lymph 4 %, hsCRP 150"]
        .as_f64()
        .unwrap();
    let p = ra["prediction"][0]["probabilityDecimal"].as_f64().unwrap();
    assert!((p - want).abs() < 1e-5, "{p} vs {want}");
    assert_eq!(
        ra["prediction"][0]["qualitativeRisk"]["coding"][0]["code"],
        "high"
    );
    assert_eq!(ra["basis"].as_array().unwrap().len(), 4);
    // without age (policy: reject) → 422 naming it
    let mut no_age = bundle.clone();
    no_age["entry"].as_array_mut().unwrap().remove(0);
    let r = send(
        &app,
        req("POST", "/fhir/RiskAssessment/$predict", Some(&no_age)),
    )
    .await;
    assert!(outcome(&r, StatusCode::UNPROCESSABLE_ENTITY).contains("Age"));
    // Parameters naming a stored patient: stored and searchable
    let (_, _, p) = send(
        &app,
        req(
            "POST",
            "/fhir/Patient",
            Some(&json!({"resourceType": "Patient", "birthDate": "1960-05-01"})),
        ),
    )
    .await;
    let pid = p["id"].as_str().unwrap();
    let params = json!({"resourceType": "Parameters", "parameter": [{"name": "subject", "valueReference": {"reference": format!("Patient/{pid}")}}]});
    let (s, _, b) = send(
        &app,
        req("POST", "/fhir/RiskAssessment/$predict", Some(&params)),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (_, _, found) = get(&app, &format!("/fhir/RiskAssessment?subject=Patient/{pid}")).await;
    assert_eq!(
        found["total"], 2,
        "one from the Patient create, one asked for"
    );
    let r = send(&app, req("POST", "/fhir/RiskAssessment/$predict", Some(&json!({"resourceType": "Parameters", "parameter": [{"name": "subject", "valueReference": {"reference": "Patient/nobody"}}]})))).await;
    outcome(&r, StatusCode::UNPROCESSABLE_ENTITY);
    outcome(
        &send(
            &app,
            req("POST", "/fhir/Observation/$everything", Some(&params)),
        )
        .await,
        StatusCode::METHOD_NOT_ALLOWED,
    );
}

/// The IRIS emulator (tests/iris/emulator.py), killed on drop.
struct Emulator {
    child: std::process::Child,
    port: u16,
}

impl Emulator {
    fn start() -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new(root().join(".venv/bin/python"))
            .arg(root().join("tests/iris/emulator.py"))
            .args(["--port", "0", "--user", "carina", "--password", "s3cret"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect(".venv exists (scripts/setup.sh --test)");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("listening ")
            .unwrap()
            .parse()
            .unwrap();
        Self { child, port }
    }

    fn control(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        use std::io::{Read, Write};
        write!(
            stream,
            "{method} {path} HTTP/1.0\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap()
    }

    fn mode(&self, mode: &str) {
        self.control("POST", "/_emulator/mode", Some(json!({"mode": mode})));
    }

    fn state(&self) -> Value {
        self.control("GET", "/_emulator/state", None)
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn iris_emulator_backend_with_fallback_and_circuit_breaker() {
    let emu = Emulator::start();
    let risk: carina::risk::RiskSettings = toml::from_str(&format!(
        r#"
        [iris]
        url = "http://127.0.0.1:{}"
        username = "carina"
        password = "s3cret"
        timeout_ms = 500
        retries = 1
        backoff_ms = 50
        breaker_failures = 3
        breaker_cooldown_secs = 2
        "#,
        emu.port
    ))
    .unwrap();
    let (app, _d) = app_with(1 << 20, &risk).await;
    let now = chrono::Utc::now().to_rfc3339();
    let lab = |code: &str, v: f64, unit: &str| {
        json!({"resourceType": "Observation", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]}, "effectiveDateTime": now,
        "valueQuantity": {"value": v, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}})
    };
    let bundle = json!({"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": lab("30525-0", 75.0, "a")}, {"resource": lab("2532-0", 700.0, "U/L")},
        {"resource": lab("736-9", 4.0, "%")}, {"resource": lab("30522-7", 150.0, "mg/L")}]});
    let model = shipped().tabular[0].clone();
    let local = f64::from(
        tokio::task::spawn_blocking(move || model.predict(&[75.0, 700.0, 4.0, 150.0]))
            .await
            .unwrap()
            .unwrap(),
    );
    let (app, bundle) = (&app, &bundle);
    let ask = || async move {
        let (s, _, b) = send(
            app,
            req("POST", "/fhir/RiskAssessment/$predict", Some(bundle)),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{b}");
        let entries = b["entry"].as_array().unwrap().clone();
        let ra = entries
            .iter()
            .find(|e| e["resource"]["resourceType"] == "RiskAssessment")
            .unwrap()["resource"]
            .clone();
        let prov = entries
            .iter()
            .find(|e| e["resource"]["resourceType"] == "Provenance")
            .unwrap()["resource"]
            .clone();
        let p = ra["prediction"][0]["probabilityDecimal"].as_f64().unwrap();
        (p, prov["reason"][0]["text"].as_str().unwrap().to_string())
    };

    // a Synthea patient posted as a transaction is assessed by IRIS
    let synthea: Value = serde_json::from_slice(
        &std::fs::read(root().join(
            "tests/fixtures/fhir/bundles/synthea_Alfreda_Wyman_3287b938-4670-47eb-91e5-e0ce3df71405.json",
        ))
        .unwrap(),
    )
    .unwrap();
    let (s, _, resp) = send(app, req("POST", "/fhir", Some(&synthea))).await;
    assert_eq!(s, StatusCode::OK);
    let patient = resp["entry"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|e| {
            e["response"]["location"]
                .as_str()
                .filter(|l| l.starts_with("Patient/"))
        })
        .unwrap()
        .split("/_history")
        .next()
        .unwrap()
        .to_string();
    let (_, _, found) = get(app, &format!("/fhir/RiskAssessment?subject={patient}")).await;
    assert_eq!(found["total"], 1, "{found}");
    let ra = &found["entry"][0]["resource"];
    let st = emu.state();
    let p = ra["prediction"][0]["probabilityDecimal"].as_f64().unwrap();
    assert!(
        (p - st["last"].as_f64().unwrap()).abs() < 1e-6,
        "{p} vs {st}"
    );
    let (_, _, prov) = get(
        app,
        &format!(
            "/fhir/Provenance?target=RiskAssessment/{}",
            ra["id"].as_str().unwrap()
        ),
    )
    .await;
    let why = prov["entry"][0]["resource"]["reason"][0]["text"]
        .as_str()
        .unwrap();
    assert!(
        why.contains("IRIS IntegratedML model IcuDeathRisk"),
        "{why}"
    );
    assert_eq!(st["calls"], 1);

    // IRIS answers $predict too: its probability, and the Provenance names it
    let (p, why) = ask().await;
    let st = emu.state();
    assert!(
        (p - st["last"].as_f64().unwrap()).abs() < 1e-6,
        "{p} vs {st}"
    );
    assert!(
        why.contains("IRIS IntegratedML model IcuDeathRisk"),
        "{why}"
    );
    assert_eq!(st["calls"], 2);

    // each failure falls back to the local model, with the reason recorded
    for (mode, reason, calls) in [
        ("auth", "refused the credentials", 1), // not retried
        ("sql", "SQL error", 1),                // not retried
    ] {
        emu.mode(mode);
        let before = emu.state()["calls"].as_i64().unwrap();
        let (p, why) = ask().await;
        assert!((p - local).abs() < 1e-5, "{mode}: {p} vs local {local}");
        assert!(
            why.contains("local ONNX model") && why.contains(reason),
            "{mode}: {why}"
        );
        assert_eq!(
            emu.state()["calls"].as_i64().unwrap() - before,
            calls,
            "{mode}"
        );
    }
    // third consecutive failure: 5xx, retried once; it opens the circuit
    emu.mode("5xx");
    let before = emu.state()["calls"].as_i64().unwrap();
    let (p, why) = ask().await;
    assert!((p - local).abs() < 1e-5);
    assert!(why.contains("unavailable"), "{why}");
    assert_eq!(
        emu.state()["calls"].as_i64().unwrap() - before,
        2,
        "one retry"
    );
    // open circuit: IRIS is not called at all
    emu.mode("ok");
    let before = emu.state()["calls"].as_i64().unwrap();
    let (p, why) = ask().await;
    assert!((p - local).abs() < 1e-5);
    assert!(why.contains("circuit open"), "{why}");
    assert_eq!(emu.state()["calls"].as_i64().unwrap(), before);
    // after the cool-down IRIS is tried again and answers
    tokio::time::sleep(std::time::Duration::from_millis(2200)).await;
    let (_, why) = ask().await;
    assert!(why.contains("IRIS IntegratedML"), "{why}");
    // a timeout is a failure too
    emu.mode("timeout");
    let (p, why) = ask().await;
    assert!((p - local).abs() < 1e-5);
    assert!(why.contains("no answer within 500 ms"), "{why}");
    // and so is IRIS being down altogether
    drop(emu);
    let (p, why) = ask().await;
    assert!((p - local).abs() < 1e-5);
    assert!(
        why.contains("cannot connect") || why.contains("circuit open"),
        "{why}"
    );
}

#[tokio::test]
async fn imaging_study_with_the_image_in_the_bundle() {
    use base64::Engine as _;
    let (app, _d) = app(16 << 20).await;
    let b64 = |p: &str| {
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(root().join(p)).unwrap())
    };
    for (kind, attachment) in [
        (
            "Binary",
            json!({"resourceType": "Binary", "contentType": "image/jpeg", "data": b64("tests/fixtures/images/hannover_4d98e1de.jpg")}),
        ),
        (
            "Media",
            json!({"resourceType": "Media", "status": "completed",
            "content": {"contentType": "application/dicom", "data": b64("dicom-samples/derived_DX_normal_nih-cxr14.dcm")}}),
        ),
    ] {
        let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": "urn:uuid:00000000-0000-4000-8000-0000000000b1", "request": {"method": "POST", "url": "Patient"},
             "resource": {"resourceType": "Patient", "gender": "male"}},
            {"fullUrl": "urn:uuid:00000000-0000-4000-8000-0000000000b2", "request": {"method": "POST", "url": kind}, "resource": attachment},
            {"fullUrl": "urn:uuid:00000000-0000-4000-8000-0000000000b3", "request": {"method": "POST", "url": "ImagingStudy"},
             "resource": {"resourceType": "ImagingStudy", "status": "available",
                "subject": {"reference": "urn:uuid:00000000-0000-4000-8000-0000000000b1"}}}
        ]});
        let (s, h, body) = send(&app, req("POST", "/fhir", Some(&tx))).await;
        assert_eq!(s, StatusCode::OK, "{kind}: {body}");
        let link = h
            .get(header::LINK)
            .unwrap_or_else(|| panic!("{kind}: no report link: {h:?}"))
            .to_str()
            .unwrap();
        let report = link
            .split("/fhir/")
            .nth(1)
            .unwrap()
            .split('>')
            .next()
            .unwrap();
        let (s, _, dr) = get(&app, &format!("/fhir/{report}")).await;
        assert_eq!(s, StatusCode::OK);
        let study = body["entry"][2]["response"]["location"]
            .as_str()
            .unwrap()
            .split("/_history")
            .next()
            .unwrap()
            .to_string();
        let patient = body["entry"][0]["response"]["location"]
            .as_str()
            .unwrap()
            .split("/_history")
            .next()
            .unwrap()
            .to_string();
        assert_eq!(dr["imagingStudy"][0]["reference"], study, "{kind}");
        assert_eq!(dr["subject"]["reference"], patient, "{kind}");
        assert!(
            dr["conclusion"].as_str().unwrap().contains("AI suggestion"),
            "{kind}"
        );
        let (_, _, media) = get(&app, &format!("/fhir/Media?subject={patient}")).await;
        assert_eq!(media["total"], 1, "{kind}: the heatmap Media");
        let (_, _, prov) = get(&app, &format!("/fhir/Provenance?target={report}")).await;
        assert_eq!(prov["total"], 1, "{kind}");
        // the stored report passes both external R4 validators
        let out = tempfile::tempdir().unwrap();
        let f = out.path().join("dr.json");
        std::fs::write(&f, dr.to_string()).unwrap();
        common::validate_fhir(&[f.as_path()]);
    }
}

#[tokio::test]
async fn a_slow_analysis_answers_at_the_wait_and_finishes_after() {
    use base64::Engine as _;
    let (app, _d) = app_full(
        16 << 20,
        &carina::risk::RiskSettings::default(),
        std::time::Duration::ZERO,
    )
    .await;
    let jpg = base64::engine::general_purpose::STANDARD
        .encode(std::fs::read(root().join("tests/fixtures/images/hannover_4d98e1de.jpg")).unwrap());
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "POST", "url": "Binary"}, "resource": {"resourceType": "Binary", "contentType": "image/jpeg", "data": jpg}},
        {"request": {"method": "POST", "url": "ImagingStudy"},
         "resource": {"resourceType": "ImagingStudy", "status": "available", "subject": {"display": "anonymous"}}}
    ]});
    let (s, h, body) = send(&app, req("POST", "/fhir", Some(&tx))).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert!(h.get(header::LINK).is_none());
    let note = h["x-carina-analysis"].to_str().unwrap();
    assert!(note.contains("still running after 0 s"), "{note}");
    let study = body["entry"][1]["response"]["location"]
        .as_str()
        .unwrap()
        .split("/_history")
        .next()
        .unwrap()
        .to_string();
    let mut found = 0;
    for _ in 0..100 {
        let (_, _, b) = get(
            &app,
            &format!("/fhir/DiagnosticReport?imaging-study={study}"),
        )
        .await;
        found = b["total"].as_i64().unwrap();
        if found == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(found, 1, "the analysis finished after the answer");
}

/// Concurrent writes (several handlers at once, as under load): creates all succeed; racing
/// updates of one resource either succeed or get 409 (send again), never a 500, and the version
/// history stays gapless.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_succeed_or_conflict_never_fail() {
    let (app, _d) = app(1 << 20).await;
    let patient = json!({"resourceType": "Patient", "id": "race", "gender": "female"});
    let (s, _, _) = send(&app, req("PUT", "/fhir/Patient/race", Some(&patient))).await;
    assert_eq!(s, StatusCode::CREATED);
    let mut tasks = Vec::new();
    for i in 0..24 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                let obs = json!({"resourceType": "Observation", "status": "final",
                    "code": {"text": format!("note {i}")}, "subject": {"reference": "Patient/race"}});
                send(&app, req("POST", "/fhir/Observation", Some(&obs))).await.0
            } else {
                let p = json!({"resourceType": "Patient", "id": "race", "gender": "female",
                    "birthDate": format!("19{:02}-01-01", 50 + i)});
                send(&app, req("PUT", "/fhir/Patient/race", Some(&p))).await.0
            }
        }));
    }
    let mut updated = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        let s = t.await.unwrap();
        if i % 2 == 0 {
            assert_eq!(s, StatusCode::CREATED);
        } else {
            assert!(s == StatusCode::OK || s == StatusCode::CONFLICT, "{s}");
            updated += usize::from(s == StatusCode::OK);
        }
    }
    assert!(updated >= 1);
    let (_, _, found) = get(&app, "/fhir/Observation?subject=Patient/race").await;
    assert_eq!(found["total"], 12);
    let (_, _, p) = get(&app, "/fhir/Patient/race").await;
    assert_eq!(
        p["meta"]["versionId"],
        (1 + updated).to_string(),
        "one version per success"
    );
}

/// Server-side request forgery: an ImagingStudy's Endpoint is only fetched when the outbound
/// allow-list covers it and its resolved address is permitted. Two loopback listeners count
/// connections: neither the allow-listed one (reached only through tricks) nor the victim is
/// ever called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imaging_study_endpoints_outside_the_allow_list_are_never_fetched() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let hits = Arc::new(AtomicUsize::new(0));
    let mut ports = Vec::new();
    for _ in 0..2 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        ports.push(l.local_addr().unwrap().port());
        let hits = hits.clone();
        tokio::spawn(async move {
            while let Ok((_s, _)) = l.accept().await {
                hits.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    let (allowed, victim) = (ports[0], ports[1]);
    let settings = carina::outbound::OutboundSettings {
        allow: vec![
            carina::outbound::AllowEntry {
                url: format!("http://127.0.0.1:{allowed}/dicom-web"),
                allow_private: true,
            },
            carina::outbound::AllowEntry {
                url: format!("http://localhost:{victim}/dicom-web"),
                allow_private: false,
            },
            carina::outbound::AllowEntry {
                url: format!("http://[::ffff:127.0.0.1]:{victim}/dicom-web"),
                allow_private: false,
            },
        ],
        ..Default::default()
    };
    let models = tokio::task::spawn_blocking(shipped).await.unwrap();
    let t = common::TestApp::builder()
        .with_models(models)
        .configure(|s| {
            s.outbound = settings;
            s.allowed_hosts = Vec::new();
        })
        .build()
        .await;
    t.spawn_workers();
    let app = t.router.clone();
    let study = |address: &str, uid: &str| {
        json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": "urn:uuid:00000000-0000-4000-8000-00000000f001", "request": {"method": "POST", "url": "Endpoint"},
             "resource": {"resourceType": "Endpoint", "status": "active",
                "connectionType": {"system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type", "code": "dicom-wado-rs"},
                "payloadType": [{"text": "DICOM"}], "address": address}},
            {"request": {"method": "POST", "url": "ImagingStudy"},
             "resource": {"resourceType": "ImagingStudy", "status": "available",
                "identifier": [{"system": "urn:dicom:uid", "value": format!("urn:oid:{uid}")}],
                "subject": {"reference": "Patient/x"},
                "endpoint": [{"reference": "urn:uuid:00000000-0000-4000-8000-00000000f001"}]}}
        ]})
    };
    let cases = [
        (
            format!("http://127.0.0.1:{victim}/x"),
            "1.2.3",
            "not on the outbound allow-list",
        ),
        (
            "http://169.254.169.254/latest/meta-data".to_string(),
            "1.2.3",
            "not on the outbound allow-list",
        ),
        (
            format!("http://localhost:{victim}/dicom-web"),
            "1.2.3",
            "non-public address",
        ),
        (
            format!("http://[::ffff:127.0.0.1]:{victim}/dicom-web"),
            "1.2.3",
            "non-public address",
        ),
        (
            format!("http://127.0.0.1:{allowed}/dicom-web?@127.0.0.1:{victim}"),
            "1.2.3",
            "query or fragment",
        ),
        (
            format!("http://127.0.0.1:{allowed}/dicom-web#@127.0.0.1:{victim}"),
            "1.2.3",
            "query or fragment",
        ),
        (
            format!("http://127.0.0.1:{victim}/x?http://127.0.0.1:{allowed}/dicom-web"),
            "1.2.3",
            "query or fragment",
        ),
        (
            format!("http://user@127.0.0.1:{allowed}/dicom-web"),
            "1.2.3",
            "not fetched",
        ),
        (
            format!("http://127.0.0.1:{allowed}/dicom-web"),
            "1.2/../../admin?x=",
            "not DICOM UIDs",
        ),
    ];
    for (address, uid, why) in &cases {
        let got = send(&app, req("POST", "/fhir", Some(&study(address, uid)))).await;
        assert_eq!(got.0, StatusCode::OK, "{address}: {}", got.2);
        let notes: Vec<String> = got
            .1
            .get_all("x-carina-analysis")
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect();
        assert!(
            notes.iter().any(|n| n.contains(why)),
            "{address}: expected '{why}' in {notes:?}"
        );
        assert!(
            notes
                .iter()
                .all(|n| !n.contains("Connection") && !n.contains("HTTP/1.1")),
            "no peer answer is echoed: {notes:?}"
        );
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0, "no connection was made");
}
