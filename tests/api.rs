//! Router tests on the real router (tower `oneshot`, no socket) with the fixture models and a
//! real SQLite store: the /v1 API, errors as OperationOutcome, the legacy 2020 API, the docs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use base64::Engine as _;
use serde_json::Value;

use common::{app, get, post, sample, send};

const MB: usize = 1024 * 1024;
const COVID_JPG: &str = "tests/fixtures/images/hannover_4d98e1de.jpg";

fn resources<'a>(bundle: &'a Value, kind: &str) -> Vec<&'a Value> {
    bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["resource"])
        .filter(|r| r["resourceType"] == kind)
        .collect()
}

fn outcome(
    status: StatusCode,
    headers: &axum::http::HeaderMap,
    body: &[u8],
    want: StatusCode,
) -> Value {
    assert_eq!(status, want, "{}", String::from_utf8_lossy(body));
    assert_eq!(headers[header::CONTENT_TYPE], "application/fhir+json");
    let v: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(v["resourceType"], "OperationOutcome");
    assert!(!v["issue"][0]["diagnostics"].as_str().unwrap().is_empty());
    v
}

#[tokio::test]
async fn analyze_jpeg_returns_a_stored_fhir_bundle_with_heatmap() {
    let (app, _dir) = app(64 * MB).await;
    let (status, headers, body) =
        send(&app, post("/v1/analyze", "image/jpeg", sample(COVID_JPG))).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(headers[header::CONTENT_TYPE], "application/fhir+json");
    assert!(headers["server-timing"]
        .to_str()
        .unwrap()
        .contains("infer;dur="));
    let bundle: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(bundle["resourceType"], "Bundle");
    assert_eq!(bundle["type"], "collection");
    let report = resources(&bundle, "DiagnosticReport")[0];
    assert_eq!(report["status"], "final");
    assert_eq!(report["meta"]["security"][0]["code"], "AIAST");
    let obs = resources(&bundle, "Observation");
    assert_eq!(obs.len(), 3);
    let total: f64 = obs
        .iter()
        .map(|o| o["valueQuantity"]["value"].as_f64().unwrap())
        .sum();
    assert!(
        (total - 1.0).abs() < 1e-4,
        "probabilities sum to 1, got {total}"
    );
    let best = obs
        .iter()
        .max_by(|a, b| {
            a["valueQuantity"]["value"]
                .as_f64()
                .partial_cmp(&b["valueQuantity"]["value"].as_f64())
                .unwrap()
        })
        .unwrap();
    assert_eq!(
        report["conclusionCode"][0]["coding"][0], best["code"]["coding"][0],
        "conclusion is the most probable label"
    );
    assert_eq!(report["result"].as_array().unwrap().len(), 3);
    let media = resources(&bundle, "Media")[0];
    let png = base64::engine::general_purpose::STANDARD
        .decode(media["content"]["data"].as_str().unwrap())
        .unwrap();
    let overlay = image::load_from_memory(&png).unwrap();
    assert_eq!(
        (overlay.width(), overlay.height()),
        (512, 438),
        "overlay has the original's size"
    );
    assert_eq!(
        resources(&bundle, "Device")[0]["deviceName"][0]["name"],
        "tiny-gap"
    );
    assert_eq!(
        resources(&bundle, "Provenance")[0]["target"]
            .as_array()
            .unwrap()
            .len(),
        5
    );

    // stored and retrievable
    let location = headers[header::LOCATION].to_str().unwrap().to_string();
    let (status, _, body) = send(&app, get(&location)).await;
    assert_eq!(status, StatusCode::OK);
    let summary: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(summary["model"], "tiny-gap");
    assert_eq!(summary["cam_method"], "grad-cam");
    assert_eq!(
        summary["display"],
        report["conclusionCode"][0]["coding"][0]["display"]
    );
    let overlay_url = summary["overlay_url"].as_str().unwrap();
    assert_eq!(media["content"]["url"], overlay_url);
    let path = overlay_url.trim_start_matches("http://carina.test");
    let (status, headers, served) = send(&app, get(path)).await;
    assert_eq!(
        (status, headers[header::CONTENT_TYPE].to_str().unwrap()),
        (StatusCode::OK, "image/png")
    );
    assert_eq!(served, png, "served overlay equals the inlined one");
    let (_, _, stored) = send(&app, get(&format!("{location}/bundle"))).await;
    assert_eq!(serde_json::from_slice::<Value>(&stored).unwrap(), bundle);
    // the input is kept as uploaded: the same JPEG bytes, served as JPEG
    let (status, headers, input) = send(&app, get(&format!("{location}/input.png"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "image/jpeg");
    assert_eq!(input, sample(COVID_JPG), "the upload, not a re-encoding");
}

#[tokio::test]
async fn analyze_dicom_and_png_and_choose_a_model() {
    let (app, _dir) = app(64 * MB).await;
    let (status, _, body) = send(
        &app,
        post(
            "/v1/analyze?model=tiny-mlp-head",
            "application/dicom",
            sample("dicom-samples/derived_DX_covid_hannover.dcm"),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let bundle: Value = serde_json::from_slice(&body).unwrap();
    let report = resources(&bundle, "DiagnosticReport")[0];
    let study = report["imagingStudy"][0]["identifier"]["value"]
        .as_str()
        .unwrap();
    assert!(
        study.starts_with("urn:oid:1."),
        "study UID from the DICOM header: {study}"
    );
    assert_eq!(report["subject"]["type"], "Patient");
    assert_eq!(
        resources(&bundle, "Device")[0]["deviceName"][0]["name"],
        "tiny-mlp-head"
    );

    let img = image::open(common::root().join(COVID_JPG)).unwrap();
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let (status, _, _) = send(
        &app,
        post("/v1/analyze?model=tiny-maxpool", "image/png", png),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn client_mistakes_get_operation_outcomes_with_the_right_status() {
    let (app, _dir) = app(64 * MB).await;
    let (s, h, b) = send(&app, post("/v1/analyze", "text/plain", b"hello".to_vec())).await;
    outcome(s, &h, &b, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let (s, h, b) = send(
        &app,
        post(
            "/v1/analyze",
            "image/png",
            b"\x89PNG\r\n\x1a\nbroken".to_vec(),
        ),
    )
    .await;
    let v = outcome(s, &h, &b, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(v["issue"][0]["diagnostics"]
        .as_str()
        .unwrap()
        .contains("PNG"));
    let (s, h, b) = send(
        &app,
        post(
            "/v1/analyze",
            "application/dicom",
            b"not dicom at all".to_vec(),
        ),
    )
    .await;
    outcome(s, &h, &b, StatusCode::UNPROCESSABLE_ENTITY);
    // dicom-rs's RLE decoder panics on this file; Carina's own fallback decodes it
    let rle = sample("dicom-samples/D_CLUNIE_CT1_RLE_FRAGS.dcm");
    let (s, _, b) = send(&app, post("/v1/analyze", "application/dicom", rle)).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    let (s, h, b) = send(&app, post("/v1/analyze", "image/jpeg", Vec::new())).await;
    outcome(s, &h, &b, StatusCode::BAD_REQUEST);
    let (s, h, b) = send(
        &app,
        post("/v1/analyze?model=nope", "image/jpeg", sample(COVID_JPG)),
    )
    .await;
    outcome(s, &h, &b, StatusCode::BAD_REQUEST);
    let (s, h, b) = send(&app, get("/v1/results/not-a-uuid")).await;
    outcome(s, &h, &b, StatusCode::NOT_FOUND);
    let (s, h, b) = send(&app, get(&format!("/v1/results/{}", uuid::Uuid::new_v4()))).await;
    outcome(s, &h, &b, StatusCode::NOT_FOUND);

    let (small, _dir2) = common::app(10_000).await;
    let (s, h, b) = send(&small, post("/v1/analyze", "image/jpeg", sample(COVID_JPG))).await;
    outcome(s, &h, &b, StatusCode::PAYLOAD_TOO_LARGE);
    let (s, _, b) = send(
        &small,
        post(
            "/covid19/api/v1/predict/",
            "application/x-www-form-urlencoded",
            vec![b'a'; 20_000],
        ),
    )
    .await;
    assert_eq!(
        s,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        String::from_utf8_lossy(&b)
    );
}

fn urlencoded_b64(bytes: &[u8]) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    format!(
        "b64={}",
        b64.replace('+', "%2B")
            .replace('/', "%2F")
            .replace('=', "%3D")
    )
    .into_bytes()
}

#[tokio::test]
async fn legacy_api_is_drop_in() {
    let (app, _dir) = app(64 * MB).await;
    let (s, _, b) = send(&app, get("/covid19/api/v1/healthcheck")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        serde_json::from_slice::<Value>(&b).unwrap(),
        "Covid19 detector API is live!\n\n"
    );

    let (s, _, b) = send(
        &app,
        post(
            "/covid19/api/v1/predict/",
            "application/x-www-form-urlencoded",
            urlencoded_b64(&sample(COVID_JPG)),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["model_name"], "tiny-gap");
    let raw = v["X-Ray_Classfication_Raw_Result"][0].as_array().unwrap();
    assert_eq!(raw.len(), 3);
    let labels = ["Covid19", "Normal_Lung", "Pneumonia_Bacterial_Lung"];
    let best = (0..3)
        .max_by(|&a, &b| raw[a].as_f64().partial_cmp(&raw[b].as_f64()).unwrap())
        .unwrap();
    assert_eq!(v["X-Ray_Classification_Result"], labels[best]);

    // multipart, the heatmap endpoint, and the URLs it returns
    let b64 = base64::engine::general_purpose::STANDARD.encode(sample(COVID_JPG));
    let body = format!(
        "--XyZ\r\nContent-Disposition: form-data; name=\"b64\"\r\n\r\n{b64}\r\n--XyZ--\r\n"
    );
    let (s, _, b) = send(
        &app,
        post(
            "/covid19/api/v1/predict/heatmap",
            "multipart/form-data; boundary=XyZ",
            body.into_bytes(),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    let v: Value = serde_json::from_slice(&b).unwrap();
    let p_covid = v["X-Ray_Classfication_Raw_Result"][0][0].as_f64().unwrap();
    assert!(
        (v["X-Ray_Classification_Covid19_Probability"]
            .as_f64()
            .unwrap()
            - (p_covid * 100.0).round() / 100.0)
            .abs()
            < 1e-9
    );
    assert!(v["X-Ray_Classification_Result"]
        .as_str()
        .unwrap()
        .starts_with("Covid-19 "));
    // the input is served as it was uploaded (a JPEG here), the heatmap as PNG
    for (key, media) in [
        ("Input_Image", "image/jpeg"),
        ("Output_Heatmap", "image/png"),
    ] {
        let url = v[key].as_str().unwrap();
        let path = url
            .strip_prefix("http://carina.test")
            .expect("absolute URL on the request's host");
        let (s, h, file) = send(&app, get(path)).await;
        assert_eq!(
            (s, h[header::CONTENT_TYPE].to_str().unwrap()),
            (StatusCode::OK, media),
            "{key}"
        );
        assert_eq!(image::load_from_memory(&file).unwrap().width(), 512);
        if key == "Input_Image" {
            assert_eq!(
                file,
                sample(COVID_JPG),
                "the upload itself, not a re-encoding"
            );
        }
    }

    for bad in [&b"b64=%%%"[..], b"b64=bm90IGFuIGltYWdl", b"other=1"] {
        let (s, _, b) = send(
            &app,
            post(
                "/covid19/api/v1/predict/",
                "application/x-www-form-urlencoded",
                bad.to_vec(),
            ),
        )
        .await;
        assert_eq!(
            s,
            StatusCode::BAD_REQUEST,
            "{}",
            String::from_utf8_lossy(&b)
        );
        assert!(serde_json::from_slice::<Value>(&b).unwrap()["detail"].is_string());
    }
    let (s, _, _) = send(&app, get("/static/result/nothing_here.png")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn health_models_pages_and_every_documented_route_exists() {
    let (app, _dir) = app(64 * MB).await;
    let (s, _, b) = send(&app, get("/healthz")).await;
    assert_eq!((s, b.as_slice()), (StatusCode::OK, &b"ok"[..]));
    let (s, _, b) = send(&app, get("/readyz")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        serde_json::from_slice::<Value>(&b).unwrap()["models"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    let (_, _, b) = send(&app, get("/v1/models")).await;
    let models: Value = serde_json::from_slice(&b).unwrap();
    let methods: Vec<&str> = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["cam_method"].as_str().unwrap())
        .collect();
    assert_eq!(methods, ["grad-cam", "recipro-cam", "grad-cam"]);
    let (s, h, _) = send(&app, get("/docs")).await;
    assert_eq!(s, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(h[header::LOCATION], "/docs/");
    for page in ["/", "/docs/"] {
        let (s, h, b) = send(&app, get(page)).await;
        assert_eq!(s, StatusCode::OK);
        assert!(h[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html"));
        let html = String::from_utf8(b).unwrap();
        assert!(
            !html.contains("https://") && !html.contains("//cdn") && !html.contains("unpkg.com"),
            "{page} loads nothing from the internet"
        );
    }
    // the Swagger UI assets are in the binary, and the page reads our spec, with no online
    // validator
    for (asset, kind) in [
        ("swagger-ui-bundle.js", "javascript"),
        ("swagger-ui.css", "text/css"),
    ] {
        let (s, h, b) = send(&app, get(&format!("/docs/{asset}"))).await;
        assert_eq!(s, StatusCode::OK, "{asset}");
        assert!(h[header::CONTENT_TYPE].to_str().unwrap().contains(kind));
        assert!(b.len() > 50_000, "{asset} is the real asset");
    }
    let (_, _, b) = send(&app, get("/docs/swagger-initializer.js")).await;
    let init = String::from_utf8(b).unwrap();
    assert!(init.contains("\"/openapi.json\"") && init.contains("\"validatorUrl\": \"none\""));
    let (s, _, b) = send(&app, get("/openapi.json")).await;
    assert_eq!(s, StatusCode::OK);
    let spec: Value = serde_json::from_slice(&b).unwrap();
    assert!(spec["openapi"].as_str().unwrap().starts_with("3.1"));
    // schemas derived from the Rust types the handlers answer
    for schema in [
        "ModelInfo",
        "Job",
        "JobState",
        "ResultSummary",
        "LegacyPrediction",
        "OperationOutcome",
    ] {
        assert!(
            spec["components"]["schemas"][schema].is_object(),
            "{schema}"
        );
    }
    // every reference in the document resolves
    fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    out.push(r);
                }
                m.values().for_each(|x| refs(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&spec, &mut all);
    assert!(all.len() > 100);
    for r in all {
        let target = r.strip_prefix('#').and_then(|p| spec.pointer(p));
        assert!(target.is_some_and(Value::is_object), "{r} does not resolve");
    }
    // bodies that are bytes say so
    let png = &spec["paths"]["/v1/results/{id}/overlay.png"]["get"]["responses"]["200"];
    let schema = &png["content"]["image/png"]["schema"];
    let binary = spec
        .pointer(&schema["$ref"].as_str().unwrap()[1..])
        .unwrap();
    assert_eq!(
        (&binary["type"], &binary["format"]),
        (&"string".into(), &"binary".into())
    );
    let concrete = |path: &str| {
        path.replace("{id}", &uuid::Uuid::new_v4().to_string())
            .replace("{file}", "x.png")
            .replace("{study}", "1.2.3")
            .replace("{series}", "1.2.4")
            .replace("{instance}", "1.2.5")
            .replace("{sop}", "1.2.5")
            .replace("{frame}", "1")
            .replace("{type}", "Patient")
            .replace("{vid}", "1")
    };
    let all = ["get", "post", "put", "delete", "patch"];
    let paths = spec["paths"].as_object().unwrap();
    let (mut routed, mut refused) = (0, 0);
    for (path, ops) in paths {
        for method in all {
            let req = Request::builder()
                .method(method.to_uppercase().as_str())
                .uri(concrete(path))
                .body(Body::empty())
                .unwrap();
            let (s, _, b) = send(&app, req).await;
            if ops.get(method).is_some() {
                // every documented operation is routed: the router's own 404 (unknown path)
                // and 405 (unknown method) have empty bodies; ours always explain
                let router = [StatusCode::NOT_FOUND, StatusCode::METHOD_NOT_ALLOWED].contains(&s);
                assert!(
                    !(router && b.is_empty()),
                    "{method} {path} is documented but not routed: {s} {}",
                    String::from_utf8_lossy(&b)
                );
                routed += 1;
            } else {
                // and the reverse: no method is routed on a documented path that the spec
                // does not document
                assert!(
                    s == StatusCode::METHOD_NOT_ALLOWED && b.is_empty(),
                    "{method} {path} is routed but not documented"
                );
                refused += 1;
            }
        }
    }
    assert_eq!(routed, 51, "every operation of openapi.json was tried");
    assert!(refused > 150);
    // nor on the paths in between (`/v1`, `/dicomweb`, `/covid19/api/v1/predict`, ...)
    for path in paths.keys() {
        let mut prefix = String::new();
        for seg in path.trim_matches('/').split('/') {
            prefix = format!("{prefix}/{seg}");
            if paths.contains_key(&prefix) || paths.contains_key(&format!("{prefix}/")) {
                continue;
            }
            for method in all {
                let req = Request::builder()
                    .method(method.to_uppercase().as_str())
                    .uri(concrete(&prefix))
                    .body(Body::empty())
                    .unwrap();
                let (s, _, b) = send(&app, req).await;
                let undocumented = s == StatusCode::NOT_FOUND && b.is_empty();
                let fhir_type = prefix.starts_with("/fhir/") && prefix.matches('/').count() == 2;
                assert!(
                    undocumented || fhir_type,
                    "{method} {prefix} is routed but not documented"
                );
            }
        }
    }
    let (s, _, b) = send(&app, get("/no/such/route")).await;
    assert!(s == StatusCode::NOT_FOUND && b.is_empty());
}
