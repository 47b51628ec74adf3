//! Resource exhaustion against a real `carina serve` process with the shipped models: image
//! bombs (a JPEG inside DICOM, a PNG and a JPEG upload that declare 32768² or 60000² pixels in
//! a few hundred bytes), FHIR JSON bombs (deep, wide, over the FHIR limit), a search with
//! thousands of OR'd values, and a FHIR flood next to DICOM intake. Each is refused with a
//! clear 4xx (or 503 for the flood), and the server's peak memory (VmHWM from /proc) stays
//! within a bound. Times are printed, not asserted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::root;
use common::server::{request, start, start_with, Answer};

/// Peak resident memory of `pid` so far, in KiB.
fn peak_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Overwrites the first JPEG frame header's height and width (SOF0/SOF1/SOF2) in `bytes`.
fn patch_sof(bytes: &mut [u8], side: u16) {
    let at = bytes
        .windows(2)
        .position(|w| w[0] == 0xFF && matches!(w[1], 0xC0..=0xC2))
        .expect("a JPEG frame header");
    bytes[at + 5..at + 7].copy_from_slice(&side.to_be_bytes());
    bytes[at + 7..at + 9].copy_from_slice(&side.to_be_bytes());
}

fn png_bomb() -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        out.extend_from_slice(&crc.sum().to_be_bytes());
    }
    let mut p = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&60_000u32.to_be_bytes());
    ihdr.extend_from_slice(&60_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]); // 8-bit grey
    chunk(&mut p, b"IHDR", &ihdr);
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    z.write_all(&vec![0u8; 1 << 20]).unwrap();
    chunk(&mut p, b"IDAT", &z.finish().unwrap());
    chunk(&mut p, b"IEND", &[]);
    p
}

/// The deflated sample's file meta group, then a deflated data set of one 1 GiB OB element of
/// zeros (about 1 MiB compressed).
fn deflate_bomb() -> Vec<u8> {
    let sample = std::fs::read(root().join("dicom-samples/image_dfl.dcm")).unwrap();
    let data_set = carina::dicom::parse::data_set_of(&sample).unwrap();
    let mut out = sample[..sample.len() - data_set.len()].to_vec();
    let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    // (0009,1010) OB, reserved, 32-bit length
    z.write_all(&[0x09, 0x00, 0x10, 0x10, b'O', b'B', 0, 0])
        .unwrap();
    z.write_all(&(1u32 << 30).to_le_bytes()).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..1024 {
        z.write_all(&zeros).unwrap();
    }
    out.extend_from_slice(&z.finish().unwrap());
    out
}

fn stow_body(dicom: &[u8]) -> (String, Vec<u8>) {
    let boundary = "carina-limits";
    let mut body = format!("--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").into_bytes();
    body.extend_from_slice(dicom);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (
        format!("multipart/related; type=\"application/dicom\"; boundary={boundary}"),
        body,
    )
}

fn text(a: &Answer) -> String {
    String::from_utf8_lossy(&a.2).to_string()
}

/// Reads until the server closes the connection or `limit` passes; `None` when still open.
fn read_until_closed(s: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Some(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Some(got),
            Err(_) => return None,
        }
    }
}

#[test]
fn slow_clients_are_dropped_or_answered_408_and_in_flight_is_capped() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("carina.toml");
    std::fs::write(
        &config,
        "[http_limits]\nheader_timeout_secs = 1\nbody_idle_secs = 1\nmax_connections = 64\nmax_in_flight = 1\n",
    )
    .unwrap();
    let s = start_with(dir.path(), &[], Some(&config));
    let base = peak_kib(s.child.id());
    // 200 slowloris connections at once: at most 64 are taken in, each is dropped after its
    // head deadline, and memory stays flat
    let mut crowd: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut c = TcpStream::connect(s.http).unwrap();
            let _ = c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ");
            c
        })
        .collect();
    let t = Instant::now();
    for c in &mut crowd {
        assert!(
            read_until_closed(c, Duration::from_secs(30)).is_some(),
            "every slow connection is dropped in turn"
        );
    }
    let grew = peak_kib(s.child.id()).saturating_sub(base);
    println!(
        "200 slowloris connections dropped in {:.1} s; peak RSS grew by {} KiB",
        t.elapsed().as_secs_f64(),
        grew
    );
    assert!(grew < 32 * 1024, "peak memory grew by {grew} KiB");
    // slowloris: half a request head, then nothing: the connection is dropped
    let mut slow = TcpStream::connect(s.http).unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let t = Instant::now();
    let closed = read_until_closed(&mut slow, Duration::from_secs(20));
    assert!(
        closed.is_some(),
        "a connection that never finishes its head is dropped"
    );
    println!("slow head dropped after {:.1} s", t.elapsed().as_secs_f64());
    // a body that stops arriving: 408 (and meanwhile it holds the only in-flight slot)
    let mut stalled = TcpStream::connect(s.http).unwrap();
    stalled
        .write_all(b"POST /fhir/Patient HTTP/1.1\r\nHost: x\r\nContent-Type: application/fhir+json\r\nContent-Length: 100\r\n\r\n{\"resourceType\"")
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let busy = request(s.http, "GET", "/fhir/metadata", &[], &[]).unwrap();
    assert_eq!(
        busy.0,
        503,
        "the one in-flight slot is taken: {}",
        text(&busy)
    );
    assert!(busy.1.contains_key("retry-after"));
    let answer = read_until_closed(&mut stalled, Duration::from_secs(20)).unwrap();
    let head = String::from_utf8_lossy(&answer);
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    // the server is fine afterwards
    assert_eq!(
        request(s.http, "GET", "/fhir/metadata", &[], &[])
            .unwrap()
            .0,
        200
    );
}

#[test]
fn bombs_are_refused_without_the_memory_they_ask_for() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), &[("CARINA_FHIR_MAX_BODY_MB", "4")]);
    let pid = s.child.id();
    let dicom = std::fs::read(root().join("dicom-samples/derived_DX_covid_hannover.dcm")).unwrap();
    // warm up: one real analysis (the inference and Grad-CAM buffers count in the baseline)
    let a = request(
        s.http,
        "POST",
        "/v1/analyze",
        &[("Content-Type", "application/dicom")],
        &dicom,
    )
    .unwrap();
    assert_eq!(a.0, 200, "{}", text(&a));
    let base = peak_kib(pid);

    let mut jpeg_dicom = std::fs::read(root().join("dicom-samples/SC_rgb_jpeg_dcmtk.dcm")).unwrap();
    patch_sof(&mut jpeg_dicom, 32768);
    let mut jpeg =
        std::fs::read(root().join("tests/fixtures/images/hannover_4d98e1de.jpg")).unwrap();
    patch_sof(&mut jpeg, 32768);
    let mut report = Vec::new();
    let mut check = |what: &str, a: Answer, want: u16, says: &str| {
        assert_eq!(a.0, want, "{what}: {}", text(&a));
        assert!(text(&a).contains(says), "{what}: {}", text(&a));
        report.push(what.to_string());
    };
    let t = Instant::now();
    let a = request(
        s.http,
        "POST",
        "/v1/analyze",
        &[("Content-Type", "application/dicom")],
        &jpeg_dicom,
    )
    .unwrap();
    check(
        "DICOM with a 32768² JPEG, /v1/analyze",
        a,
        422,
        "declares 32768 x 32768",
    );
    let (ct, body) = stow_body(&jpeg_dicom);
    let a = request(
        s.http,
        "POST",
        "/dicomweb/studies",
        &[("Content-Type", &ct)],
        &body,
    )
    .unwrap();
    check(
        "DICOM with a 32768² JPEG, STOW-RS",
        a,
        409,
        "declares 32768 x 32768",
    );
    let a = request(
        s.http,
        "POST",
        "/v1/analyze",
        &[("Content-Type", "image/png")],
        &png_bomb(),
    )
    .unwrap();
    check("PNG declaring 60000²", a, 422, "");
    let a = request(
        s.http,
        "POST",
        "/v1/analyze",
        &[("Content-Type", "image/jpeg")],
        &jpeg,
    )
    .unwrap();
    check("JPEG declaring 32768²", a, 422, "");
    let (ct, body) = stow_body(&deflate_bomb());
    let a = request(
        s.http,
        "POST",
        "/dicomweb/studies",
        &[("Content-Type", &ct)],
        &body,
    )
    .unwrap();
    check(
        "deflated data set inflating to 1 GiB, STOW-RS",
        a,
        409,
        "inflates to more than",
    );
    let fhir = [("Content-Type", "application/fhir+json")];
    let deep = "[".repeat(1_000_000);
    let a = request(s.http, "POST", "/fhir/Patient", &fhir, deep.as_bytes()).unwrap();
    check("FHIR JSON 1,000,000 levels deep", a, 400, "nests deeper");
    let wide = format!(
        "{{\"resourceType\":\"Patient\",\"name\":[{}{{}}]}}",
        "{},".repeat(1_000_000)
    );
    let a = request(s.http, "POST", "/fhir/Patient", &fhir, wide.as_bytes()).unwrap();
    check("FHIR JSON array of 1,000,000 elements", a, 400, "more than");
    let big = vec![b' '; 5 << 20];
    let a = request(s.http, "POST", "/fhir/Patient", &fhir, &big).unwrap();
    check("FHIR body over its 4 MiB limit", a, 413, "");
    let ors: Vec<String> = (0..5000).map(|i| format!("id{i}")).collect();
    let a = request(
        s.http,
        "GET",
        &format!("/fhir/Patient?_id={}", ors.join(",")),
        &[],
        &[],
    )
    .unwrap();
    check("search with 5000 OR'd values", a, 400, "at most");
    let elapsed = t.elapsed();
    let grew = peak_kib(pid).saturating_sub(base);
    println!(
        "{} bombs refused in {:.0} ms in all; peak RSS {} MiB before, grew by {} MiB",
        report.len(),
        elapsed.as_secs_f64() * 1000.0,
        base / 1024,
        grew / 1024
    );
    assert!(grew < 64 * 1024, "peak memory grew by {} MiB", grew / 1024);
    // and the server still works
    let a = request(
        s.http,
        "POST",
        "/v1/analyze",
        &[("Content-Type", "application/dicom")],
        &dicom,
    )
    .unwrap();
    assert_eq!(a.0, 200);
}

#[test]
fn a_fhir_flood_does_not_lock_dicom_intake_out() {
    let dir = tempfile::tempdir().unwrap();
    // no workers: nothing drains the queue during the test
    let s = start(
        dir.path(),
        &[
            ("CARINA_WORKERS", "0"),
            ("CARINA_MAX_BACKLOG", "100"),
            ("CARINA_FHIR_SYNC_WAIT_SECS", "0"),
        ],
    );
    let n = 11_000;
    let entries: Vec<Value> = (0..n)
        .map(|i| {
            json!({"resource": {"resourceType": "Patient", "id": format!("p{i}"), "gender": "female", "birthDate": "1950-01-01"},
                   "request": {"method": "PUT", "url": format!("Patient/p{i}")}})
        })
        .collect();
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": entries}).to_string();
    let fhir = [("Content-Type", "application/fhir+json")];
    let base = peak_kib(s.child.id());
    let t = Instant::now();
    let a = request(s.http, "POST", "/fhir", &fhir, tx.as_bytes()).unwrap();
    assert_eq!(a.0, 200, "{}", text(&a));
    let grew = peak_kib(s.child.id()).saturating_sub(base);
    println!(
        "{n} Patients ({} MiB of JSON): peak RSS grew by {} MiB",
        tx.len() >> 20,
        grew >> 10
    );
    assert!(grew < 256 * 1024, "peak memory grew by {} MiB", grew >> 10);
    println!(
        "transaction of {n} Patients stored in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // one pending risk job per patient, whatever the number of writes
    let again =
        json!({"resourceType": "Patient", "id": "p7", "gender": "male", "birthDate": "1951-01-01"});
    // the FHIR backlog is full now: further FHIR writes wait (503 + Retry-After) …
    let a = request(
        s.http,
        "PUT",
        "/fhir/Patient/p7",
        &fhir,
        again.to_string().as_bytes(),
    )
    .unwrap();
    assert_eq!(a.0, 503, "{}", text(&a));
    assert!(a.1.contains_key("retry-after"));
    // … but DICOM intake, which counts imaging jobs, still accepts
    let dicom = std::fs::read(root().join("dicom-samples/derived_DX_covid_hannover.dcm")).unwrap();
    let (ct, body) = stow_body(&dicom);
    let a = request(
        s.http,
        "POST",
        "/dicomweb/studies",
        &[("Content-Type", &ct)],
        &body,
    )
    .unwrap();
    assert_eq!(a.0, 200, "{}", text(&a));
    let a = request(
        s.http,
        "GET",
        "/v1/jobs?kind=risk&subject=Patient/p7",
        &[],
        &[],
    )
    .unwrap();
    let jobs: Value = serde_json::from_slice(&a.2).unwrap();
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 1, "{jobs}");
}
