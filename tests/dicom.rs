//! The DICOM node end to end on the real router and a real SQLite store: STOW-RS (mixed good
//! and bad parts, wrong study), QIDO-RS, WADO-RS (instance, metadata, rendered), idempotent
//! re-sends, the analysis worker making a Secondary Capture, the bad-input corpus, and the
//! decoders against pydicom's reference decode.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::Value;

use common::{app_with_ingest, get, root, sample, send};

const MB: usize = 1024 * 1024;
const COVID: &str = "dicom-samples/derived_DX_covid_hannover.dcm";

/// A STOW-RS request with one part per `(content type, bytes)`.
fn stow(uri: &str, parts: &[(&str, Vec<u8>)]) -> Request<Body> {
    let boundary = "XxCarinaTestBoundaryxX";
    let mut body = Vec::new();
    for (ct, data) in parts {
        body.extend_from_slice(format!("--{boundary}\r\nContent-Type: {ct}\r\n\r\n").as_bytes());
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    Request::post(uri)
        .header(
            header::CONTENT_TYPE,
            format!("multipart/related; type=\"application/dicom\"; boundary={boundary}"),
        )
        .header(header::HOST, "carina.test")
        .body(Body::from(body))
        .unwrap()
}

fn json(b: &[u8]) -> Value {
    serde_json::from_slice(b).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(b)))
}

fn first(v: &Value, tag: &str) -> Value {
    v[tag]["Value"][0].clone()
}

fn uids(path: &str) -> (String, String, String) {
    let p = carina::dicom::parse_instance(&sample(path)).unwrap().index;
    (p.study_uid, p.series_uid, p.sop_instance_uid)
}

#[tokio::test]
async fn stow_stores_good_parts_refuses_bad_ones_and_qido_wado_find_them() {
    let (app, _dir, _) = app_with_ingest(64 * MB).await;
    let (s, h, b) = send(
        &app,
        stow(
            "/dicomweb/studies",
            &[
                ("application/dicom", sample(COVID)),
                ("application/dicom", sample("dicom-samples/CT_small.dcm")),
                (
                    "application/dicom",
                    sample("dicom-samples/MR_small_RLE.dcm"),
                ),
                ("application/dicom", b"this is not DICOM".to_vec()),
            ],
        ),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "some stored, one failed");
    assert_eq!(h[header::CONTENT_TYPE], "application/dicom+json");
    let v = json(&b);
    assert_eq!(v["00081199"]["Value"].as_array().unwrap().len(), 3);
    let failed = &v["00081198"]["Value"][0];
    assert_eq!(first(failed, "00081197"), 0xC000, "cannot understand");

    let (study, series, sop) = uids(COVID);
    let stored_urls: Vec<String> = v["00081199"]["Value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| first(i, "00081190").as_str().unwrap().to_string())
        .collect();
    assert!(stored_urls.contains(&format!(
        "http://carina.test/dicomweb/studies/{study}/series/{series}/instances/{sop}"
    )));

    // QIDO: studies by PatientID (wildcard), by modality, by date range; series; instances
    let patient = carina::dicom::parse_instance(&sample(COVID))
        .unwrap()
        .index
        .patient_id
        .unwrap();
    let (s, _, b) = send(&app, get(&format!("/dicomweb/studies?PatientID={patient}"))).await;
    assert_eq!(s, StatusCode::OK);
    let studies = json(&b);
    assert_eq!(studies.as_array().unwrap().len(), 1, "{studies}");
    assert_eq!(first(&studies[0], "0020000D"), study.as_str());
    assert_eq!(first(&studies[0], "00201208"), 1);
    let (_, _, b) = send(&app, get("/dicomweb/studies?limit=2")).await;
    assert_eq!(json(&b).as_array().unwrap().len(), 2, "limit applies");
    let (_, _, b) = send(&app, get("/dicomweb/studies?limit=2&offset=2")).await;
    assert_eq!(json(&b).as_array().unwrap().len(), 1, "offset applies");
    let (_, _, b) = send(&app, get("/dicomweb/studies?ModalitiesInStudy=CT")).await;
    assert_eq!(json(&b).as_array().unwrap().len(), 1);
    let (_, _, b) = send(&app, get("/dicomweb/studies?StudyDate=19000101-19000102")).await;
    assert_eq!(json(&b).as_array().unwrap().len(), 0, "date range excludes");
    let (_, _, b) = send(&app, get("/dicomweb/studies?StudyDate=19000101-")).await;
    let dated = json(&b).as_array().unwrap().len();
    assert!(dated >= 1, "open range includes studies with a date");
    let (s, _, _) = send(&app, get("/dicomweb/studies?StudyDate=yesterday")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _, _) = send(&app, get("/dicomweb/studies?ShoeSize=9")).await;
    assert_eq!(
        s,
        StatusCode::BAD_REQUEST,
        "unsupported keys are refused, not ignored"
    );
    let (_, _, b) = send(&app, get(&format!("/dicomweb/studies/{study}/series"))).await;
    let ser = json(&b);
    assert_eq!(first(&ser[0], "0020000E"), series.as_str());
    assert_eq!(first(&ser[0], "00080060"), "DX");
    let (_, _, b) = send(
        &app,
        get(&format!(
            "/dicomweb/studies/{study}/series/{series}/instances"
        )),
    )
    .await;
    let inst = json(&b);
    assert_eq!(first(&inst[0], "00080018"), sop.as_str());
    let (_, _, b) = send(&app, get("/dicomweb/instances?Modality=MR")).await;
    assert_eq!(json(&b).as_array().unwrap().len(), 1);

    // WADO: instance retrieve gives back the very bytes sent
    let url = format!("/dicomweb/studies/{study}/series/{series}/instances/{sop}");
    let (s, h, b) = send(&app, get(&url)).await;
    assert_eq!(s, StatusCode::OK);
    let ct = h[header::CONTENT_TYPE].to_str().unwrap().to_string();
    assert!(
        ct.starts_with("multipart/related; type=\"application/dicom\""),
        "{ct}"
    );
    let original = sample(COVID);
    assert!(
        b.windows(original.len()).any(|w| w == original.as_slice()),
        "the part holds the original file"
    );
    let (s, _, b) = send(&app, get(&format!("/dicomweb/studies/{study}"))).await;
    assert_eq!(s, StatusCode::OK);
    assert!(b.windows(original.len()).any(|w| w == original.as_slice()));
    let (s, _, _) = send(&app, get("/dicomweb/studies/1.2.3.4")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // metadata: DICOM JSON, pixel data as a BulkDataURI
    let (s, _, b) = send(&app, get(&format!("{url}/metadata"))).await;
    assert_eq!(s, StatusCode::OK);
    let md = json(&b);
    assert_eq!(first(&md[0], "00080018"), sop.as_str());
    assert_eq!(md[0]["00280010"]["Value"][0], 419);
    assert!(md[0]["7FE00010"]["BulkDataURI"]
        .as_str()
        .unwrap()
        .ends_with(&sop));
    assert!(md[0]["7FE00010"].get("InlineBinary").is_none());

    // rendered: PNG by default, JPEG on request, 406 otherwise, 400 for frame 0
    let (s, h, b) = send(&app, get(&format!("{url}/rendered"))).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h[header::CONTENT_TYPE], "image/png");
    let img = image::load_from_memory(&b).unwrap();
    assert_eq!((img.width(), img.height()), (512, 419));
    let req = Request::get(format!("{url}/frames/1/rendered"))
        .header(header::ACCEPT, "image/jpeg")
        .body(Body::empty())
        .unwrap();
    let (s, h, b) = send(&app, req).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h[header::CONTENT_TYPE], "image/jpeg");
    assert!(b.starts_with(&[0xFF, 0xD8]));
    let req = Request::get(format!("{url}/rendered"))
        .header(header::ACCEPT, "image/gif")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&app, req).await.0, StatusCode::NOT_ACCEPTABLE);
    let (s, _, _) = send(&app, get(&format!("{url}/frames/0/rendered"))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _, _) = send(&app, get(&format!("{url}/frames/2/rendered"))).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "no second frame");
}

#[tokio::test]
async fn stow_to_a_study_fails_other_studies_instances_and_media_types_are_checked() {
    let (app, _dir, _) = app_with_ingest(64 * MB).await;
    let (study, _, _) = uids(COVID);
    let (s, _, b) = send(
        &app,
        stow(
            &format!("/dicomweb/studies/{study}"),
            &[
                ("application/dicom", sample(COVID)),
                ("application/dicom", sample("dicom-samples/CT_small.dcm")),
            ],
        ),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let v = json(&b);
    assert_eq!(v["00081199"]["Value"].as_array().unwrap().len(), 1);
    let failed = &v["00081198"]["Value"][0];
    assert_eq!(first(failed, "00081197"), 0xA900);
    let ct = uids("dicom-samples/CT_small.dcm").2;
    assert_eq!(
        first(failed, "00081155"),
        ct.as_str(),
        "the failed instance is named"
    );
    // none stored: 409
    let (s, _, b) = send(
        &app,
        stow(
            "/dicomweb/studies/1.2.3",
            &[("application/dicom", sample("dicom-samples/CT_small.dcm"))],
        ),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{}", String::from_utf8_lossy(&b));
    // not multipart/related: 415; related but of JSON parts: 415; no boundary: 400
    let req = Request::post("/dicomweb/studies")
        .header(header::CONTENT_TYPE, "application/dicom")
        .body(Body::from(sample(COVID)))
        .unwrap();
    assert_eq!(send(&app, req).await.0, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let req = Request::post("/dicomweb/studies")
        .header(
            header::CONTENT_TYPE,
            "multipart/related; type=\"application/dicom+json\"; boundary=x",
        )
        .body(Body::from("--x--"))
        .unwrap();
    assert_eq!(send(&app, req).await.0, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let req = Request::post("/dicomweb/studies")
        .header(
            header::CONTENT_TYPE,
            "multipart/related; type=\"application/dicom\"",
        )
        .body(Body::from("--x--"))
        .unwrap();
    assert_eq!(send(&app, req).await.0, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn chunked_stow_without_content_length_is_accepted() {
    let (app, _dir, _) = app_with_ingest(64 * MB).await;
    let req = stow("/dicomweb/studies", &[("application/dicom", sample(COVID))]);
    let (parts, body) = req.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    // the body arrives in 4 KiB chunks with no Content-Length, as with Transfer-Encoding: chunked
    let chunks: Vec<Result<axum::body::Bytes, std::io::Error>> = bytes
        .chunks(4096)
        .map(|c| Ok(axum::body::Bytes::copy_from_slice(c)))
        .collect();
    let req = Request::from_parts(parts, Body::from_stream(futures_util::stream::iter(chunks)));
    let (s, _, b) = send(&app, req).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    // a frame of a multi-frame image renders; a frame that does not exist is a 422
    let rle2 = sample("dicom-samples/SC_rgb_rle_2frame.dcm");
    let ix = carina::dicom::parse_instance(&rle2).unwrap().index;
    let (s, _, _) = send(
        &app,
        stow("/dicomweb/studies", &[("application/dicom", rle2)]),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let url = format!(
        "/dicomweb/studies/{}/series/{}/instances/{}",
        ix.study_uid, ix.series_uid, ix.sop_instance_uid
    );
    let (s, _, png) = send(&app, get(&format!("{url}/frames/2/rendered"))).await;
    assert_eq!(s, StatusCode::OK);
    let img = image::load_from_memory(&png).unwrap();
    assert_eq!((img.width(), img.height()), (100, 100));
    let (s, _, _) = send(&app, get(&format!("{url}/frames/3/rendered"))).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn too_large_stow_is_413() {
    let (app, _dir, _) = app_with_ingest(100 * 1024).await;
    let (s, _, _) = send(
        &app,
        stow("/dicomweb/studies", &[("application/dicom", sample(COVID))]),
    )
    .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
}

async fn wait_state(app: &Router, sop: &str) -> Value {
    for _ in 0..600 {
        let (s, _, b) = send(app, get(&format!("/v1/instances/{sop}"))).await;
        assert_eq!(s, StatusCode::OK);
        let v = json(&b);
        if !matches!(v["analysis_state"].as_str(), Some("pending" | "running")) {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("analysis of {sop} did not finish");
}

#[tokio::test]
async fn stored_instances_are_analysed_once_with_a_secondary_capture_in_the_study() {
    let t = common::test_app(64 * MB).await;
    let app = t.router.clone();
    let (study, _, sop) = uids(COVID);
    for _ in 0..2 {
        // the re-send is acknowledged and changes nothing
        let (s, _, _) = send(
            &app,
            stow(
                "/dicomweb/studies",
                &[
                    ("application/dicom", sample(COVID)),
                    ("application/dicom", sample("dicom-samples/CT_small.dcm")),
                    ("application/dicom", sample("dicom-samples/rtdose.dcm")),
                ],
            ),
        )
        .await;
        assert_eq!(s, StatusCode::OK);
    }
    // one analysis job: the CT and the RT Dose are stored as skipped by routing, the re-send
    // queues nothing, and the Secondary Capture result is not analysed again
    assert_eq!(t.run_jobs().await, 1);
    let st = wait_state(&app, &sop).await;
    assert_eq!(st["analysis_state"], "done", "{st}");
    let result_url = st["result_url"].as_str().unwrap().to_string();
    let ct = wait_state(&app, &uids("dicom-samples/CT_small.dcm").2).await;
    assert_eq!(ct["analysis_state"], "skipped");
    assert!(
        ct["analysis_reason"]
            .as_str()
            .unwrap()
            .contains("Modality=CT"),
        "{ct}"
    );
    let rt = wait_state(&app, &uids("dicom-samples/rtdose.dcm").2).await;
    assert!(
        rt["analysis_reason"]
            .as_str()
            .unwrap()
            .contains("not an image"),
        "{rt}"
    );

    // the study now holds the original and exactly one Secondary Capture result
    let (_, _, b) = send(&app, get(&format!("/v1/studies/{study}/instances"))).await;
    let all = json(&b);
    let results: Vec<&Value> = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["result_of"] == sop.as_str())
        .collect();
    assert_eq!(results.len(), 1, "{all}");
    let sc_url = {
        let r = results[0];
        format!(
            "/dicomweb/studies/{}/series/{}/instances/{}",
            r["study_uid"].as_str().unwrap(),
            r["series_uid"].as_str().unwrap(),
            r["sop_instance_uid"].as_str().unwrap()
        )
    };
    let (s, _, b) = send(&app, get(&format!("{sc_url}/metadata"))).await;
    assert_eq!(s, StatusCode::OK);
    let md = &json(&b)[0];
    let src = carina::dicom::parse_instance(&sample(COVID)).unwrap().index;
    assert_eq!(
        first(md, "00080016"),
        "1.2.840.10008.5.1.4.1.1.7",
        "Secondary Capture"
    );
    assert_eq!(first(md, "0020000D"), study.as_str());
    assert_eq!(first(md, "00100020"), src.patient_id.unwrap().as_str());
    assert_ne!(
        first(md, "0020000E"),
        src.series_uid.as_str(),
        "a new series"
    );
    assert_eq!(first(md, "00280301"), "YES", "burned-in annotation");
    assert_eq!(first(md, "00080070"), "Carina");
    assert_eq!(first(md, "00081090"), "tiny-gap");
    let source_ref = &md["00082112"]["Value"][0];
    assert_eq!(first(source_ref, "00081155"), sop.as_str());
    let (s, h, png) = send(&app, get(&format!("{sc_url}/rendered"))).await;
    assert_eq!(
        (s, h[header::CONTENT_TYPE].to_str().unwrap()),
        (StatusCode::OK, "image/png")
    );
    let img = image::load_from_memory(&png).unwrap().to_rgb8();
    assert_eq!(img.width(), 512);
    assert!(img.height() > 419, "band with the note above the picture");
    assert!(
        img.pixels().any(|p| p.0 == [255, 255, 0]),
        "yellow burned-in text"
    );

    // the report is stored under its result id
    let path = result_url.trim_start_matches("http://carina.test");
    let (s, _, b) = send(&app, get(&format!("{path}/bundle"))).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(json(&b)["resourceType"], "Bundle");

    // processing again (a crash between steps, a re-run) makes nothing new
    let again = t.state().jobs.analyser().process(&sop, None).await.unwrap();
    assert_eq!(
        format!("http://carina.test/v1/results/{}", again.id),
        result_url,
        "same analysis id"
    );
    let (_, _, b) = send(&app, get(&format!("/v1/studies/{study}/instances"))).await;
    assert_eq!(
        json(&b).as_array().unwrap().len(),
        all.as_array().unwrap().len()
    );
    // a late failure of an attempt whose lease was taken over does not undo a finished analysis
    t.store()
        .set_analysis_state(&sop, "failed", Some("database: pool timed out"), None)
        .await
        .unwrap();
    assert_eq!(wait_state(&app, &sop).await["analysis_state"], "done");
}

#[tokio::test]
async fn analyze_endpoint_stores_dicom_through_the_same_path() {
    let (app, _dir, _) = app_with_ingest(64 * MB).await;
    let req = Request::post("/v1/analyze")
        .header(header::CONTENT_TYPE, "application/dicom")
        .header(header::HOST, "carina.test")
        .body(Body::from(sample(COVID)))
        .unwrap();
    let (s, _, _) = send(&app, req).await;
    assert_eq!(s, StatusCode::OK);
    let (_, _, sop) = uids(COVID);
    let (s, _, b) = send(&app, get(&format!("/v1/instances/{sop}"))).await;
    assert_eq!(s, StatusCode::OK);
    let v = json(&b);
    assert_eq!(v["source"], "api");
    assert_eq!(v["analysis_state"], "done");
}

#[tokio::test]
async fn every_file_of_the_bad_corpus_is_refused_with_a_dicom_status_and_nothing_is_kept() {
    let (app, _dir, _) = app_with_ingest(64 * MB).await;
    let dir = root().join("tests/fixtures/dicom-bad");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
        .collect();
    files.sort();
    assert!(files.len() >= 20, "corpus present");
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        let (s, _, b) = send(
            &app,
            stow(
                "/dicomweb/studies",
                &[("application/dicom", std::fs::read(f).unwrap())],
            ),
        )
        .await;
        assert_eq!(
            s,
            StatusCode::CONFLICT,
            "{name}: {}",
            String::from_utf8_lossy(&b)
        );
        let reason = first(&json(&b)["00081198"]["Value"][0], "00081197");
        assert!(
            [0xC000, 0xA900].contains(&reason.as_u64().unwrap()),
            "{name}: {reason}"
        );
        let req = Request::post("/v1/analyze")
            .header(header::CONTENT_TYPE, "application/dicom")
            .body(Body::from(std::fs::read(f).unwrap()))
            .unwrap();
        let (s, _, _) = send(&app, req).await;
        assert!(s.is_client_error(), "{name}: /v1/analyze answered {s}");
    }
    let (_, _, b) = send(&app, get("/dicomweb/instances")).await;
    assert_eq!(json(&b).as_array().unwrap().len(), 0, "nothing stored");
    // and the server still works
    let (s, _, _) = send(
        &app,
        stow("/dicomweb/studies", &[("application/dicom", sample(COVID))]),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
}

/// Files Carina refuses to decode, each for a stated reason (README, "DICOM decoding").
const EXPECT_REFUSED: &[&str] = &[
    "rtdose",       // 32-bit samples: not an image to render
    "liver_1frame", // 1-bit segmentation
];

#[test]
fn decoders_match_the_pydicom_reference() {
    let out = tempfile::tempdir().unwrap();
    // CARINA_KEEP_DECODES=DIR keeps Carina's decodes for inspection
    let out_dir = std::env::var_os("CARINA_KEEP_DECODES")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| out.path().to_path_buf());
    std::fs::create_dir_all(&out_dir).unwrap();
    let samples = root().join("dicom-samples");
    for e in std::fs::read_dir(&samples).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "dcm") {
            continue;
        }
        let stem = p.file_stem().unwrap().to_string_lossy().to_string();
        let bytes = std::fs::read(&p).unwrap();
        let raw = carina::imaging::decode::raw_frame(&bytes, 0);
        let rendered = carina::imaging::decode(&bytes, carina::imaging::MediaType::Dicom);
        match (raw, rendered) {
            (Ok((shape, v)), Ok(img)) => {
                std::fs::write(
                    out_dir.join(format!("{stem}.raw.npy")),
                    carina::render::npy::encode_f32(&shape, &v),
                )
                .unwrap();
                let img = img.image;
                let (w, h) = (img.width() as usize, img.height() as usize);
                let (shape, px): (Vec<usize>, Vec<f32>) = match img {
                    image::DynamicImage::ImageLuma8(g) => (
                        vec![h, w],
                        g.into_raw().into_iter().map(f32::from).collect(),
                    ),
                    other => (
                        vec![h, w, 3],
                        other
                            .to_rgb8()
                            .into_raw()
                            .into_iter()
                            .map(f32::from)
                            .collect(),
                    ),
                };
                std::fs::write(
                    out_dir.join(format!("{stem}.rendered.npy")),
                    carina::render::npy::encode_f32(&shape, &px),
                )
                .unwrap();
            }
            (Err(e), _) | (_, Err(e)) => {
                std::fs::write(out_dir.join(format!("{stem}.error.txt")), e.to_string()).unwrap();
            }
        }
    }
    let py = root().join(".venv/bin/python");
    let res = std::process::Command::new(&py)
        .arg(root().join("tests/dicom/compare_decode.py"))
        .arg("--carina")
        .arg(&out_dir)
        .arg("--ref")
        .arg(root().join("tests/fixtures/dicom-ref"))
        .arg("--expect-refused")
        .args(EXPECT_REFUSED)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup.sh --test)", py.display()));
    let report = String::from_utf8_lossy(&res.stdout);
    println!("{report}");
    assert!(
        res.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&res.stderr)
    );
}

#[tokio::test]
async fn a_resend_with_other_content_is_refused_0111_and_the_stored_instance_kept() {
    let (app, _dir, ingest) = app_with_ingest(64 * MB).await;
    let original = sample("dicom-samples/CT_small.dcm");
    let (s, _, _) = send(
        &app,
        stow(
            "/dicomweb/studies",
            &[("application/dicom", original.clone())],
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    // identical again: an idempotent success
    let (s, _, _) = send(
        &app,
        stow(
            "/dicomweb/studies",
            &[("application/dicom", original.clone())],
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    // same SOP Instance UID, one pixel changed: refused with 0111, UIDs named
    let mut tampered = original.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 0xFF;
    let (s, _, b) = send(
        &app,
        stow("/dicomweb/studies", &[("application/dicom", tampered)]),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{}", String::from_utf8_lossy(&b));
    let failed = &json(&b)["00081198"]["Value"][0];
    assert_eq!(first(failed, "00081197"), 0x0111);
    let (_, _, sop) = uids("dicom-samples/CT_small.dcm");
    assert_eq!(first(failed, "00081155"), sop.as_str());
    let ix = ingest.store().instance(&sop).await.unwrap().unwrap();
    let kept = ingest.store().instance_file(&ix).await.unwrap().unwrap();
    assert_eq!(
        carina::dicom::parse::data_set_of(&kept),
        carina::dicom::parse::data_set_of(&original),
        "the first version is kept"
    );
}
