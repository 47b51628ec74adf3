//! The audit trail of a real `carina serve` process: FHIR writes, reads and searches, a STOW-RS
//! upload, a DIMSE association and C-STORE from dcmtk `storescu`, and a refused association each
//! leave an AuditEvent (searchable at /fhir/AuditEvent, read-only), and each event also reaches
//! a real syslog daemon (Debian's rsyslog, listening on TCP) as an RFC 5424 message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::root;
use common::server::{free_port, request, start_with};

struct Rsyslog(Child);

impl Drop for Rsyslog {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rsyslog(dir: &std::path::Path, port: u16) -> (Rsyslog, std::path::PathBuf) {
    let out = dir.join("audit.log");
    let conf = dir.join("rsyslog.conf");
    std::fs::write(
        &conf,
        format!(
            "global(workDirectory=\"{d}\")\nmodule(load=\"imtcp\")\n\
             input(type=\"imtcp\" port=\"{port}\" address=\"127.0.0.1\")\n\
             template(name=\"raw\" type=\"string\" string=\"%rawmsg%\\n\")\n\
             *.* action(type=\"omfile\" file=\"{o}\" template=\"raw\")\n",
            d = dir.display(),
            o = out.display()
        ),
    )
    .unwrap();
    let child = Command::new("rsyslogd")
        .args(["-n", "-f"])
        .arg(&conf)
        .arg("-i")
        .arg(dir.join("rsyslog.pid"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("rsyslogd (scripts/setup.sh --test installs Debian's rsyslog)");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "rsyslogd did not listen");
        std::thread::sleep(Duration::from_millis(100));
    }
    (Rsyslog(child), out)
}

fn events(http: std::net::SocketAddr) -> Vec<Value> {
    let a = request(http, "GET", "/fhir/AuditEvent?_count=1000", &[], &[]).unwrap();
    assert_eq!(a.0, 200, "{}", String::from_utf8_lossy(&a.2));
    let b: Value = serde_json::from_slice(&a.2).unwrap();
    b["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"].clone())
        .collect()
}

fn has(events: &[Value], f: impl Fn(&Value) -> bool) -> bool {
    events.iter().any(f)
}

#[test]
fn every_access_leaves_an_audit_event_in_the_database_and_in_syslog() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (_rsyslog, log) = rsyslog(dir.path(), port);
    let dimse = free_port();
    let config = dir.path().join("carina.toml");
    std::fs::write(
        &config,
        format!(
            "[audit]\nsyslog = \"127.0.0.1:{port}\"\n[dicom]\ndimse = \"127.0.0.1:{dimse}\"\n\
             allowed_calling_aes = [\"MODALITY@127.0.0.1\"]\n"
        ),
    )
    .unwrap();
    let s = start_with(
        &dir.path().join("data"),
        &[("CARINA_WORKERS", "0"), ("CARINA_FHIR_SYNC_WAIT_SECS", "0")],
        Some(&config),
    );
    let fhir = [("Content-Type", "application/fhir+json")];
    // a FHIR create, a read and a search
    let patient = json!({"resourceType": "Patient", "id": "a1", "gender": "female"});
    let a = request(
        s.http,
        "PUT",
        "/fhir/Patient/a1",
        &fhir,
        patient.to_string().as_bytes(),
    )
    .unwrap();
    assert_eq!(a.0, 201);
    assert_eq!(
        request(s.http, "GET", "/fhir/Patient/a1", &[], &[])
            .unwrap()
            .0,
        200
    );
    assert_eq!(
        request(s.http, "GET", "/fhir/Patient?gender=female", &[], &[])
            .unwrap()
            .0,
        200
    );
    // a failed write
    let a = request(s.http, "POST", "/fhir/Patient", &fhir, b"{").unwrap();
    assert_eq!(a.0, 400);
    // the trail is read-only
    let a = request(
        s.http,
        "POST",
        "/fhir/AuditEvent",
        &fhir,
        br#"{"resourceType":"AuditEvent"}"#,
    )
    .unwrap();
    assert_eq!(a.0, 405);
    // DIMSE: an accepted association with a C-STORE, and a refused calling AE
    let sample = root().join("dicom-samples/CT_small.dcm");
    let st = Command::new("storescu")
        .args([
            "-aec",
            "CARINA",
            "-aet",
            "MODALITY",
            "127.0.0.1",
            &dimse.to_string(),
        ])
        .arg(&sample)
        .output()
        .unwrap();
    assert!(st.status.success(), "{st:?}");
    let rogue = Command::new("echoscu")
        .args([
            "-aec",
            "CARINA",
            "-aet",
            "ROGUE",
            "127.0.0.1",
            &dimse.to_string(),
        ])
        .output()
        .unwrap();
    assert!(!rogue.status.success());
    let sop = carina::dicom::parse_instance(&std::fs::read(&sample).unwrap())
        .unwrap()
        .index
        .sop_instance_uid;

    let ev = events(s.http);
    let who = |e: &Value| {
        e["agent"][0]["who"]["identifier"]["value"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    let what = |e: &Value| e["entity"].to_string();
    assert!(
        has(&ev, |e| e["action"] == "C"
            && e["subtype"][0]["code"] == "create"
            && what(e).contains("Patient/a1")),
        "create"
    );
    assert!(
        has(&ev, |e| e["action"] == "R"
            && e["subtype"][0]["code"] == "read"
            && what(e).contains("Patient/a1")),
        "read"
    );
    assert!(
        has(&ev, |e| e["subtype"][0]["code"] == "search-type"
            && what(e).contains("gender=female")),
        "search"
    );
    assert!(
        has(&ev, |e| e["action"] == "C" && e["outcome"] == "4"),
        "failed write"
    );
    assert!(
        has(&ev, |e| e["type"]["code"] == "110104"
            && who(e) == "AE:MODALITY"
            && what(e).contains(&sop)
            && e["agent"][0]["network"]["address"] == "127.0.0.1"),
        "C-STORE, with the calling AE and its address"
    );
    assert!(
        has(&ev, |e| e["type"]["code"] == "110108"
            && who(e) == "AE:MODALITY"),
        "association"
    );
    assert!(
        has(&ev, |e| e["type"]["code"] == "110113"
            && who(e) == "AE:ROGUE"),
        "refused association"
    );
    for e in &ev {
        carina::fhir::validate::check_resource(e, "AuditEvent").unwrap();
    }
    // and the syslog collector received them (RFC 5424, our APP-NAME and MSGID)
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(&sop) && text.contains("Patient/a1") && text.contains("AE:ROGUE") {
            assert!(text.contains("carina"), "{text}");
            assert!(text.contains("AuditEvent"), "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "syslog got: {text}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
