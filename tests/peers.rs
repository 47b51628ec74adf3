//! Carina over real sockets with real peers: dicomweb-client (STOW, QIDO, WADO) against the
//! HTTP server; result export to PACS destinations — a DIMSE C-STORE SCP and a STOW-RS server
//! (each another Carina node) plus a destination that is down (retried with backoff, then
//! failed, no loop); and Orthanc (Debian `orthanc` + `orthanc-dicomweb`, started here on
//! loopback ports by tests/orthanc/orthanc.py) as the PACS that sends to Carina by C-STORE and
//! receives Carina's results by C-STORE and by STOW-RS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use carina::outbound::AllowEntry;
use std::net::SocketAddr;
use std::time::Duration;

use carina::ingest::dimse;
use carina::ingest::Ingest;
use carina::outbound::export::{Destination, DestinationKind};
use carina::store::Source;

use common::root;

struct Node {
    http: SocketAddr,
    dimse: SocketAddr,
    ingest: Ingest,
    outbound: carina::outbound::Outbound,
    _dir: tempfile::TempDir,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Node {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A whole Carina node on loopback ports: HTTP, DIMSE, analysis worker, exporter.
async fn node(destinations: Vec<Destination>) -> Node {
    let t = common::TestApp::builder()
        .configure(|s| s.dicom.destinations = destinations)
        .build()
        .await;
    let dimse_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dimse_addr = dimse_l.local_addr().unwrap();
    let (http_addr, http) = t.serve_http().await;
    let ingest = t.ingest();
    let tasks = vec![
        http,
        tokio::spawn(dimse::serve(
            dimse_l,
            t.settings.dicom.scp_options(64 << 20),
            ingest.clone(),
            std::future::pending(),
        )),
        t.spawn_workers(),
        tokio::spawn(t.app.exporter.clone().run(std::future::pending())),
    ];
    Node {
        http: http_addr,
        dimse: dimse_addr,
        ingest,
        outbound: t.state().outbound.clone(),
        _dir: t.dir,
        tasks,
    }
}

fn sample(name: &str) -> String {
    root()
        .join("dicom-samples")
        .join(name)
        .to_string_lossy()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dicomweb_client_stores_searches_and_retrieves() {
    let n = node(Vec::new()).await;
    let files = [
        "derived_DX_covid_hannover.dcm",
        "derived_DX_normal_nih-cxr14.dcm",
        "CT_small.dcm",
        "MR_small_jp2klossless.dcm",
        "SC_rgb_small_odd.dcm",
    ];
    let mut cmd = std::process::Command::new(root().join(".venv/bin/python"));
    cmd.arg(root().join("tests/dicom/dicomweb_check.py"))
        .args(["--url", &format!("http://{}", n.http), "--files"])
        .args(files.map(sample));
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&report)
        .unwrap_or_else(|e| panic!("{e}: {report}\n{}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(v["ok"], true, "{v:#}");
    assert!(v["passed"].as_u64().unwrap() >= 12, "{v:#}");
}

async fn exports_of(ingest: &Ingest, sop: &str) -> Vec<carina::store::ExportRow> {
    ingest.store().exports(Some(sop), None, 100).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_are_exported_by_c_store_and_stow_and_a_dead_destination_gives_up() {
    let pacs = node(Vec::new()).await; // receives by C-STORE
    let web = node(Vec::new()).await; // receives by STOW-RS
    let dest = |name: &str, kind, address: Option<String>, url: Option<String>| Destination {
        name: name.into(),
        kind,
        address,
        ae_title: Some("CARINA".into()),
        url,
        max_attempts: Some(2),
        backoff_secs: Some(1),
    };
    // a port nothing listens on
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let src = node(vec![
        dest(
            "pacs",
            DestinationKind::Dimse,
            Some(pacs.dimse.to_string()),
            None,
        ),
        dest(
            "web",
            DestinationKind::Stow,
            None,
            Some(format!("http://{}/dicomweb", web.http)),
        ),
        dest(
            "down",
            DestinationKind::Dimse,
            Some(dead_addr.to_string()),
            None,
        ),
    ])
    .await;
    let bytes = std::fs::read(sample("derived_DX_covid_hannover.dcm")).unwrap();
    let a = src
        .ingest
        .receive(bytes.into(), Source::Stow, None)
        .await
        .unwrap();
    let sop = a.index.sop_instance_uid;
    // wait for the analysis, its Secondary Capture, and the three exports to settle
    let mut sc = None;
    for _ in 0..400 {
        let st = src
            .ingest
            .store()
            .study_status(&a.index.study_uid)
            .await
            .unwrap();
        sc = st
            .iter()
            .find(|i| i.result_of.as_deref() == Some(&sop))
            .cloned();
        if let Some(sc) = &sc {
            let ex = exports_of(&src.ingest, &sc.sop_instance_uid).await;
            if ex.len() == 3 && ex.iter().all(|e| e.state != "pending") {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sc = sc.expect("a Secondary Capture was made");
    let ex = exports_of(&src.ingest, &sc.sop_instance_uid).await;
    let by = |n: &str| ex.iter().find(|e| e.destination == n).unwrap().clone();
    assert_eq!(by("pacs").state, "sent", "{ex:?}");
    assert_eq!(by("web").state, "sent", "{ex:?}");
    let down = by("down");
    assert_eq!(
        (down.state.as_str(), down.attempts),
        ("failed", 2),
        "{down:?}"
    );
    assert!(
        down.last_error.unwrap().contains("association"),
        "the reason is kept"
    );
    // each export, and the final failure, is in the sender's audit trail
    let trail = http_get(src.http, "/fhir/AuditEvent?_count=1000").await;
    for what in [
        "export to pacs: sent",
        "export to web: sent",
        "export to down: failed",
    ] {
        assert!(trail.contains(what), "{what}: {trail}");
    }
    for receiver in [&pacs, &web] {
        let got = receiver
            .ingest
            .store()
            .instance(&sc.sop_instance_uid)
            .await
            .unwrap();
        let got = got.expect("the destination stored the result");
        assert_eq!(got.sop_class_uid, "1.2.840.10008.5.1.4.1.1.7");
    }
    let st = pacs
        .ingest
        .store()
        .instance_status(&sc.sop_instance_uid)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(st.source, "dimse");
    // the export status is visible through the API
    let body = http_get(src.http, "/v1/exports?state=failed").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v[0]["destination"], "down");
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// A running Orthanc, killed when dropped.
struct Orthanc {
    dir: tempfile::TempDir,
    http: String,
}

impl Drop for Orthanc {
    fn drop(&mut self) {
        let _ = std::process::Command::new("python3")
            .arg(root().join("tests/orthanc/orthanc.py"))
            .args(["stop", "--kill", "--dir"])
            .arg(self.dir.path())
            .output();
    }
}

fn orthanc_cli(args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new("python3")
        .arg(root().join("tests/orthanc/orthanc.py"))
        .args(args)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "orthanc.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_orthanc(dicom_port: u16, aet: &str, modality: Option<String>) -> Orthanc {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_string_lossy().to_string();
    let port = dicom_port.to_string();
    let mut args = vec!["start", "--dir", &d, "--dicom-port", &port, "--aet", aet];
    if let Some(m) = &modality {
        args.extend(["--modality", m]);
    }
    let args: Vec<String> = args.into_iter().map(String::from).collect();
    let v = tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        orthanc_cli(&a)
    })
    .await
    .unwrap();
    Orthanc {
        http: v["http"].as_str().unwrap().to_string(),
        dir,
    }
}

async fn orthanc_sops(o: &Orthanc) -> Vec<String> {
    let http = o.http.clone();
    let v = tokio::task::spawn_blocking(move || orthanc_cli(&["instances", "--http", &http]))
        .await
        .unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| i["SOPInstanceUID"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orthanc_sends_studies_to_carina_and_receives_its_results() {
    let (pacs_port, web_port) = (free_port(), free_port());
    // Carina exports to Orthanc "PACS" by C-STORE and to Orthanc "WEB" by STOW-RS; the STOW
    // URL needs WEB's HTTP port, which Orthanc picks, so WEB starts first.
    let web = start_orthanc(web_port, "WEB", None).await;
    let mut destinations = vec![Destination {
        name: "orthanc-dimse".into(),
        kind: DestinationKind::Dimse,
        address: Some(format!("127.0.0.1:{pacs_port}")),
        ae_title: Some("PACS".into()),
        url: None,
        max_attempts: Some(5),
        backoff_secs: Some(1),
    }];
    destinations.push(Destination {
        name: "orthanc-stow".into(),
        kind: DestinationKind::Stow,
        address: None,
        ae_title: None,
        url: Some(format!("{}/dicom-web", web.http)),
        max_attempts: Some(5),
        backoff_secs: Some(1),
    });
    let carina = node(destinations).await;
    let pacs = start_orthanc(
        pacs_port,
        "PACS",
        Some(format!("carina=CARINA@127.0.0.1:{}", carina.dimse.port())),
    )
    .await;

    // the PACS holds a study and pushes it to Carina (its REST /modalities/carina/store)
    let http = pacs.http.clone();
    let file = sample("derived_DX_covid_hannover.dcm");
    let sent = tokio::task::spawn_blocking(move || {
        let up = orthanc_cli(&["upload", "--http", &http, &file]);
        let id = up[0]["id"].as_str().unwrap().to_string();
        orthanc_cli(&["send", "--http", &http, "--modality", "carina", &id])
    })
    .await
    .unwrap();
    let original = carina::dicom::parse_instance(
        &std::fs::read(sample("derived_DX_covid_hannover.dcm")).unwrap(),
    )
    .unwrap()
    .index;
    let st = carina
        .ingest
        .store()
        .instance_status(&original.sop_instance_uid)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("Carina did not get the instance: {sent}"));
    assert_eq!(st.source, "dimse");

    // Carina analyses it and both Orthancs receive the Secondary Capture
    let mut sc = None;
    for _ in 0..400 {
        let all = carina
            .ingest
            .store()
            .study_status(&original.study_uid)
            .await
            .unwrap();
        sc = all
            .iter()
            .find(|i| i.result_of.as_deref() == Some(original.sop_instance_uid.as_str()))
            .map(|i| i.sop_instance_uid.clone());
        if let Some(sc) = &sc {
            let ex = exports_of(&carina.ingest, sc).await;
            if ex.len() == 2 && ex.iter().all(|e| e.state != "pending") {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sc = sc.expect("a Secondary Capture was made");
    let ex = exports_of(&carina.ingest, &sc).await;
    assert!(ex.iter().all(|e| e.state == "sent"), "{ex:?}");
    let in_pacs = orthanc_sops(&pacs).await;
    assert!(
        in_pacs.contains(&sc),
        "PACS has the result by C-STORE: {in_pacs:?}"
    );
    assert!(in_pacs.contains(&original.sop_instance_uid));
    let in_web = orthanc_sops(&web).await;
    assert_eq!(in_web, vec![sc], "WEB has the result by STOW-RS");
}

/// One HTTP/1.1 request; returns the status line's code, the headers and the body.
async fn http_send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String, String) {
    http_send_with(addr, method, path, "", body).await
}

/// [`http_send`] with extra header lines (each ending in CRLF).
async fn http_send_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    extra: &str,
    body: &str,
) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}Content-Type: application/fhir+json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    (code, head.to_string(), body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imaging_study_pixels_come_from_orthanc_by_wado_rs() {
    let n = node(Vec::new()).await;
    let pacs = start_orthanc(free_port(), "PACS", None).await;
    let http = pacs.http.clone();
    let file = sample("derived_DX_covid_hannover.dcm");
    tokio::task::spawn_blocking(move || orthanc_cli(&["upload", "--http", &http, &file]))
        .await
        .unwrap();
    let http = pacs.http.clone();
    let inst = tokio::task::spawn_blocking(move || orthanc_cli(&["instances", "--http", &http]))
        .await
        .unwrap()[0]
        .clone();
    let (study, series, sop) = (
        inst["StudyInstanceUID"].as_str().unwrap(),
        inst["SeriesInstanceUID"].as_str().unwrap(),
        inst["SOPInstanceUID"].as_str().unwrap(),
    );
    assert!(n.ingest.store().instance(sop).await.unwrap().is_none());
    // an EHR posts the order's ImagingStudy with the PACS's DICOMweb Endpoint
    let bundle = serde_json::json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:00000000-0000-4000-8000-00000000e001", "request": {"method": "POST", "url": "Endpoint"},
         "resource": {"resourceType": "Endpoint", "status": "active",
            "connectionType": {"system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type", "code": "dicom-wado-rs"},
            "payloadType": [{"text": "DICOM"}], "address": format!("{}/dicom-web", pacs.http)}},
        {"fullUrl": "urn:uuid:00000000-0000-4000-8000-00000000e002", "request": {"method": "POST", "url": "Patient"},
         "resource": {"resourceType": "Patient", "gender": "female"}},
        {"fullUrl": "urn:uuid:00000000-0000-4000-8000-00000000e003", "request": {"method": "POST", "url": "ImagingStudy"},
         "resource": {"resourceType": "ImagingStudy", "status": "available",
            "identifier": [{"system": "urn:dicom:uid", "value": format!("urn:oid:{study}")}],
            "subject": {"reference": "urn:uuid:00000000-0000-4000-8000-00000000e002"},
            "endpoint": [{"reference": "urn:uuid:00000000-0000-4000-8000-00000000e001"}],
            "series": [{"uid": series, "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "DX"},
                "instance": [{"uid": sop, "sopClass": {"system": "urn:ietf:rfc:3986", "code": "urn:oid:1.2.840.10008.5.1.4.1.1.1.1"}}]}]}}
    ]});
    // not on the outbound allow-list: Orthanc (a loopback port) is not called at all
    let (code, head, _) = http_send(n.http, "POST", "/fhir", &bundle.to_string()).await;
    assert_eq!(code, 200, "{head}");
    assert!(head.contains("not on the outbound allow-list"), "{head}");
    assert!(n.ingest.store().instance(sop).await.unwrap().is_none());
    // allowed by name, but the name resolves to loopback and the entry does not allow
    // private addresses: refused on the resolved address
    let by_name = format!("{}/dicom-web", pacs.http.replace("127.0.0.1", "localhost"));
    n.outbound
        .allow(&AllowEntry {
            url: by_name.clone(),
            allow_private: false,
        })
        .unwrap();
    let renamed = bundle
        .to_string()
        .replace(&format!("{}/dicom-web", pacs.http), &by_name);
    let (code, head, _) = http_send(n.http, "POST", "/fhir", &renamed).await;
    assert_eq!(code, 200, "{head}");
    assert!(head.contains("non-public address"), "{head}");
    assert!(n.ingest.store().instance(sop).await.unwrap().is_none());
    // the PACS allowed, private addresses included: fetched
    n.outbound
        .allow(&AllowEntry {
            url: format!("{}/dicom-web", pacs.http),
            allow_private: true,
        })
        .unwrap();
    let (code, head, body) = http_send(n.http, "POST", "/fhir", &bundle.to_string()).await;
    assert_eq!(code, 200, "{head}\n{body}");
    let link = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("link:"))
        .unwrap_or_else(|| panic!("no Link to the report: {head}"));
    let report = link.split('<').nth(1).unwrap().split('>').next().unwrap();
    let report_path = report
        .split_once("/fhir/")
        .map(|(_, p)| format!("/fhir/{p}"))
        .unwrap();
    // the instance came by WADO-RS and was stored like any other
    let st = n
        .ingest
        .store()
        .instance_status(sop)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(st.source, "wado");
    // its analysis job is finished by the request that fetched it, not left leased
    let jobs = n
        .ingest
        .store()
        .jobs(
            None,
            Some(carina::store::JobKind::Analyse),
            Some(sop),
            10,
            0,
        )
        .await
        .unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].state, carina::store::JobState::Done, "{jobs:?}");
    // the report references the ImagingStudy and its subject, and is searchable
    let resp: serde_json::Value = serde_json::from_str(&body).unwrap();
    let study_loc = resp["entry"][2]["response"]["location"].as_str().unwrap();
    let study_ref = study_loc.split("/_history").next().unwrap();
    let patient_ref = resp["entry"][1]["response"]["location"]
        .as_str()
        .unwrap()
        .split("/_history")
        .next()
        .unwrap()
        .to_string();
    let dr: serde_json::Value =
        serde_json::from_str(&http_get(n.http, &report_path).await).unwrap();
    assert_eq!(dr["resourceType"], "DiagnosticReport");
    assert_eq!(dr["imagingStudy"][0]["reference"], study_ref);
    assert_eq!(dr["subject"]["reference"], patient_ref);
    assert!(!dr["result"].as_array().unwrap().is_empty());
    let found: serde_json::Value = serde_json::from_str(
        &http_get(
            n.http,
            &format!("/fhir/DiagnosticReport?imaging-study={study_ref}"),
        )
        .await,
    )
    .unwrap();
    assert_eq!(found["total"], 1);
    let media: serde_json::Value = serde_json::from_str(
        &http_get(n.http, &format!("/fhir/Media?subject={patient_ref}")).await,
    )
    .unwrap();
    assert_eq!(media["total"], 1, "the heatmap Media is stored");
    // the same study again with Prefer: respond-async (pixels are here now): 202, then the
    // status endpoint ends with the ImagingStudy and its report
    let again = serde_json::json!({"resourceType": "ImagingStudy", "status": "available",
        "subject": {"reference": patient_ref},
        "identifier": [{"system": "urn:dicom:uid", "value": format!("urn:oid:{study}")}]});
    let (code, head, _) = http_send_with(
        n.http,
        "POST",
        "/fhir/ImagingStudy",
        "Prefer: respond-async\r\n",
        &again.to_string(),
    )
    .await;
    assert_eq!(code, 202, "{head}");
    let status_url = head
        .lines()
        .find_map(|l| l.strip_prefix("content-location: "))
        .unwrap_or_else(|| panic!("{head}"));
    let status_path = format!("/fhir/{}", status_url.split_once("/fhir/").unwrap().1);
    let mut done = None;
    for _ in 0..120 {
        let (code, _, body) = http_send(n.http, "GET", &status_path, "").await;
        if code == 200 {
            done = Some(body);
            break;
        }
        assert_eq!(code, 202);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let done: serde_json::Value = serde_json::from_str(&done.expect("finished")).unwrap();
    assert_eq!(done["type"], "batch-response");
    assert_eq!(done["entry"][0]["response"]["status"], "201 Created");
    assert_eq!(done["entry"][0]["resource"]["resourceType"], "ImagingStudy");
    assert_eq!(
        done["entry"][1]["resource"]["resourceType"],
        "DiagnosticReport"
    );
    let new_study = format!(
        "ImagingStudy/{}",
        done["entry"][0]["resource"]["id"].as_str().unwrap()
    );
    assert_eq!(
        done["entry"][1]["resource"]["imagingStudy"][0]["reference"],
        new_study
    );
    // an ImagingStudy whose pixels are nowhere: stored, and the answer says why no report
    let lonely = serde_json::json!({"resourceType": "ImagingStudy", "status": "available",
        "subject": {"display": "unknown"},
        "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.3.4.5.6"}]});
    let (code, head, _) =
        http_send(n.http, "POST", "/fhir/ImagingStudy", &lonely.to_string()).await;
    assert_eq!(code, 201);
    assert!(
        head.to_ascii_lowercase()
            .contains("x-carina-analysis: no instance"),
        "{head}"
    );
}
