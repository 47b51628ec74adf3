//! The DIMSE SCP against real peers: dcmtk's `echoscu`/`storescu` and pynetdicom
//! (tests/dicom/dimse_client.py). Checks C-ECHO, C-STORE of several transfer syntaxes (stored
//! byte-for-byte as received), AE title rules, failure statuses for bad data, the free-space
//! watermark, and that a re-send makes no duplicate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::process::Command;

use carina::config::DicomSettings;
use carina::ingest::dimse;
use carina::ingest::Ingest;
use serde_json::{json, Value};

use common::root;

struct Scp {
    addr: SocketAddr,
    ingest: Ingest,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Scp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn scp(settings: DicomSettings, min_free_mb: u64) -> Scp {
    scp_with_limit(settings, min_free_mb, 16 * 1024 * 1024).await
}

async fn scp_with_limit(settings: DicomSettings, min_free_mb: u64, max_instance: usize) -> Scp {
    let t = common::TestApp::builder()
        .configure(|s| {
            s.dicom = settings;
            s.dicom.min_free_mb = min_free_mb;
        })
        .build()
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ingest = t.ingest();
    let task = tokio::spawn(dimse::serve(
        listener,
        t.settings.dicom.scp_options(max_instance),
        ingest.clone(),
        std::future::pending(),
    ));
    Scp {
        addr,
        ingest,
        _dir: t.dir,
        task,
    }
}

/// Runs a blocking peer program off the runtime.
async fn run(cmd: Command) -> std::process::Output {
    let mut cmd = cmd;
    tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}: install dcmtk and the .venv (scripts/setup.sh --test)"))
}

fn dcmtk(tool: &str, addr: SocketAddr, aec: &str, aet: &str) -> Command {
    let mut c = Command::new(tool);
    c.args(["-aec", aec, "-aet", aet, "-to", "20"])
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string());
    c
}

fn pynetdicom(op: &str, addr: SocketAddr, extra: &[&str]) -> Command {
    let mut c = Command::new(root().join(".venv/bin/python"));
    c.arg(root().join("tests/dicom/dimse_client.py"))
        .arg(op)
        .args([
            "--host",
            &addr.ip().to_string(),
            "--port",
            &addr.port().to_string(),
        ])
        .args(extra);
    c
}

fn lines(out: &std::process::Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn sample(name: &str) -> String {
    root()
        .join("dicom-samples")
        .join(name)
        .to_string_lossy()
        .to_string()
}

#[tokio::test]
async fn echo_and_store_from_dcmtk_and_pynetdicom() {
    let s = scp(DicomSettings::default(), 0).await;
    let out = run(dcmtk("echoscu", s.addr, "CARINA", "MODALITY")).await;
    assert!(
        out.status.success(),
        "echoscu: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // dcmtk storescu: native, JPEG baseline and RLE files, each proposed in its own syntax
    let files = [
        ("derived_DX_covid_hannover.dcm", None),
        ("derived_DX_normal_nih-cxr14.dcm", Some("-xy")), // JPEG baseline
        ("SC_rgb_rle_2frame.dcm", Some("-xr")),           // RLE lossless, colour
        ("CT_small.dcm", None),
    ];
    for (f, propose) in files {
        let mut cmd = dcmtk("storescu", s.addr, "CARINA", "MODALITY");
        cmd.args(propose).arg(sample(f));
        let out = run(cmd).await;
        assert!(
            out.status.success(),
            "storescu {f}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let files = files.map(|(f, _)| f);
    for f in files {
        let original = std::fs::read(sample(f)).unwrap();
        let ix = carina::dicom::parse_instance(&original).unwrap().index;
        let stored = s
            .ingest
            .store()
            .instance(&ix.sop_instance_uid)
            .await
            .unwrap();
        let stored = stored.unwrap_or_else(|| panic!("{f} not stored"));
        assert_eq!(
            stored.transfer_syntax, ix.transfer_syntax,
            "{f} kept its syntax"
        );
        let file = s
            .ingest
            .store()
            .instance_file(&stored)
            .await
            .unwrap()
            .unwrap();
        // dcmtk re-encodes the data set it sends (group lengths, padding), so compare content
        let raw = |b: &[u8]| carina::imaging::decode::raw_frame(b, 0).unwrap();
        assert_eq!(raw(&original), raw(&file), "{f}: same pixels");
        let st = s
            .ingest
            .store()
            .instance_status(&ix.sop_instance_uid)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(st.source, "dimse");
    }

    // pynetdicom: echo, store (JPEG 2000 and deflate too), then the same again: no duplicate
    let out = run(pynetdicom("echo", s.addr, &["--aec", "CARINA"])).await;
    assert_eq!(lines(&out)[0]["status"], 0, "{out:?}");
    let more = [
        "MR_small_jp2klossless.dcm",
        "image_dfl.dcm",
        "SC_rgb_small_odd.dcm",
    ];
    for _ in 0..2 {
        let mut args = vec!["--aec", "CARINA", "--raw"];
        let paths: Vec<String> = more.iter().map(|f| sample(f)).collect();
        args.extend(paths.iter().map(String::as_str));
        let out = run(pynetdicom("store", s.addr, &args)).await;
        let got = lines(&out);
        assert_eq!(got.len(), more.len(), "{out:?}");
        for l in &got {
            assert_eq!(l["status"], 0, "{l}");
        }
    }
    for f in more {
        // pynetdicom --raw sends the file's data set bytes as they are: stored byte for byte
        let original = std::fs::read(sample(f)).unwrap();
        let ix = carina::dicom::parse_instance(&original).unwrap().index;
        let stored = s
            .ingest
            .store()
            .instance(&ix.sop_instance_uid)
            .await
            .unwrap()
            .unwrap();
        let file = s
            .ingest
            .store()
            .instance_file(&stored)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            dataset(&original),
            dataset(&file),
            "{f}: data set stored byte for byte"
        );
    }
    assert_eq!(
        stored_count(&s).await,
        files.len() + more.len(),
        "re-sends made no duplicates"
    );
}

async fn stored_count(s: &Scp) -> usize {
    let all = carina::store::Query {
        limit: 1000,
        ..Default::default()
    };
    s.ingest.store().search_instances(&all).await.unwrap().len()
}

/// The bytes after the file meta group.
fn dataset(part10: &[u8]) -> Vec<u8> {
    let gl = u32::from_le_bytes([part10[140], part10[141], part10[142], part10[143]]) as usize;
    part10[144 + gl..].to_vec()
}

#[tokio::test]
async fn bad_data_gets_failure_statuses_not_success() {
    let s = scp(DicomSettings::default(), 0).await;
    let bad = root().join("tests/fixtures/dicom-bad");
    let cases = [
        ("missing_pixel_data.dcm", 0xA900),
        ("missing_sop_instance_uid_ds_only.dcm", 0xA900),
        ("short_pixel_data.dcm", 0xC000),
    ];
    for (f, want) in cases {
        let p = bad.join(f).to_string_lossy().to_string();
        let out = run(pynetdicom(
            "store",
            s.addr,
            &["--aec", "CARINA", "--raw", &p],
        ))
        .await;
        let got = lines(&out);
        assert_eq!(
            got.first().map(|l| l["status"].clone()),
            Some(Value::from(want)),
            "{f}: {out:?}"
        );
    }
    assert_eq!(stored_count(&s).await, 0, "nothing failed was kept");
}

#[tokio::test]
async fn an_instance_over_the_size_limit_gets_a700_and_is_not_kept() {
    let s = scp_with_limit(DicomSettings::default(), 0, 10 * 1024).await;
    let p = sample("CT_small.dcm"); // 39 KB
    let out = run(pynetdicom("store", s.addr, &["--aec", "CARINA", &p])).await;
    let got = lines(&out);
    assert_eq!(
        got.first().map(|l| l["status"].clone()),
        Some(Value::from(0xA700)),
        "{out:?}"
    );
    assert_eq!(stored_count(&s).await, 0);
    // an instance within the limit is still stored
    let small = sample("SC_rgb_small_odd.dcm");
    let out = run(pynetdicom("store", s.addr, &["--aec", "CARINA", &small])).await;
    assert_eq!(lines(&out)[0]["status"], 0, "{out:?}");
}

/// Asserts pynetdicom received an A-ASSOCIATE-RJ of the given kind. Its own decode of the PDU
/// (debug log) is checked, not its exit status: pynetdicom 3.0.4 sometimes reports a received
/// rejection as an abort when the RJ arrives very fast.
fn assert_rejected(out: &std::process::Output, result: &str) {
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("INCOMING A-ASSOCIATE-RJ PDU"), "{log}");
    assert!(
        log.contains(&format!("Result:    Rejected ({result})")),
        "{log}"
    );
}

#[tokio::test]
async fn associations_are_refused_by_ae_rules_and_when_disk_is_short() {
    // wrong called AE title: permanent rejection by the service user
    let s = scp(DicomSettings::default(), 0).await;
    let out = run(pynetdicom("echo", s.addr, &["--aec", "NOTCARINA", "-v"])).await;
    assert_rejected(&out, "Permanent");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Called AE title not recognised"));

    // calling AE not on the allow-list
    let allow = DicomSettings {
        allowed_calling_aes: vec!["PACS".into()],
        ..DicomSettings::default()
    };
    let s = scp(allow, 0).await;
    let out = run(pynetdicom(
        "echo",
        s.addr,
        &["--aec", "CARINA", "--aet", "ROGUE", "-v"],
    ))
    .await;
    assert_rejected(&out, "Permanent");
    let out = run(pynetdicom(
        "echo",
        s.addr,
        &["--aec", "CARINA", "--aet", "PACS"],
    ))
    .await;
    assert!(out.status.success(), "{out:?}");

    // free space below the watermark: transient rejection before any data is sent
    let s = scp(DicomSettings::default(), u64::MAX / (1024 * 1024)).await;
    let out = run(pynetdicom("echo", s.addr, &["--aec", "CARINA", "-v"])).await;
    assert_rejected(&out, "Transient");
    let mut cmd = dcmtk("storescu", s.addr, "CARINA", "MODALITY");
    cmd.arg(sample("CT_small.dcm"));
    let out = run(cmd).await;
    assert!(
        !out.status.success(),
        "storescu must not succeed when disk is short"
    );
    assert_eq!(stored_count(&s).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_are_taken_after_the_request_and_idle_or_oversized_peers_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let settings = DicomSettings {
        max_associations: 1,
        idle_timeout_secs: 1,
        allowed_calling_aes: vec!["PACS@127.0.0.1".into(), "REMOTE@10.9.9.9".into()],
        ..DicomSettings::default()
    };
    let s = scp(settings, 0).await;
    // AE@host: the right title from the wrong address is refused
    let out = run(pynetdicom(
        "echo",
        s.addr,
        &["--aec", "CARINA", "--aet", "REMOTE", "-v"],
    ))
    .await;
    assert_rejected(&out, "Permanent");
    // a connection that never sends an A-ASSOCIATE-RQ does not take the only slot
    let mut idle = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let out = run(pynetdicom(
        "echo",
        s.addr,
        &["--aec", "CARINA", "--aet", "PACS"],
    ))
    .await;
    assert!(out.status.success(), "{out:?}");
    // an association that goes silent is closed after the idle timeout (1 s here)
    let py = format!(
        "import sys,time\nfrom pynetdicom import AE\nae=AE(ae_title='PACS')\nae.add_requested_context('1.2.840.10008.1.1')\n\
         a=ae.associate('{}',{},ae_title='CARINA')\nassert a.is_established\ntime.sleep(4)\nprint('alive' if a.is_established else 'closed')\n",
        s.addr.ip(),
        s.addr.port()
    );
    let out = run({
        let mut c = Command::new(root().join(".venv/bin/python"));
        c.args(["-c", &py]);
        c
    })
    .await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "closed",
        "{out:?}"
    );
    // a command set over 64 KiB aborts the association (a real C-ECHO-RQ is ~70 bytes); the
    // idle timeout is long here, so only the cap can end it
    let patient = scp(
        DicomSettings {
            idle_timeout_secs: 60,
            ..DicomSettings::default()
        },
        0,
    )
    .await;
    let py = format!(
        "from pynetdicom import AE\nfrom pynetdicom.pdu_primitives import P_DATA\nimport time\n\
         ae=AE(ae_title='PACS')\nae.add_requested_context('1.2.840.10008.1.1')\n\
         a=ae.associate('{}',{},ae_title='CARINA')\nassert a.is_established\n\
         for i in range(20):\n    p=P_DATA(); p.presentation_data_value_list=[[1, b'\\x01' + b'\\0'*8000]]; a.dul.send_pdu(p)\n\
         time.sleep(2)\nprint('aborted' if a.is_aborted or not a.is_established else 'alive')\n",
        patient.addr.ip(),
        patient.addr.port()
    );
    let out = run({
        let mut c = Command::new(root().join(".venv/bin/python"));
        c.args(["-c", &py]);
        c
    })
    .await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "aborted",
        "{out:?}"
    );
    // the connection that never associated was dropped after 10 s, not kept forever
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(std::time::Duration::from_secs(20), idle.read(&mut buf))
        .await
        .expect("the server closes a connection that never associates")
        .unwrap_or(0);
    assert_eq!(n, 0);
    let _ = idle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_store_of_other_content_under_a_stored_uid_gets_0111() {
    let s = scp(DicomSettings::default(), 0).await;
    let dir = tempfile::tempdir().unwrap();
    let original = std::fs::read(sample("CT_small.dcm")).unwrap();
    let mut tampered = original.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 0xFF;
    let (a, b) = (dir.path().join("a.dcm"), dir.path().join("b.dcm"));
    std::fs::write(&a, &original).unwrap();
    std::fs::write(&b, &tampered).unwrap();
    let out = run(pynetdicom(
        "store",
        s.addr,
        &[
            "--raw",
            a.to_str().unwrap(),
            a.to_str().unwrap(),
            b.to_str().unwrap(),
        ],
    ))
    .await;
    let statuses: Vec<Value> = lines(&out).iter().map(|l| l["status"].clone()).collect();
    assert_eq!(statuses, vec![json!(0), json!(0), json!(0x0111)], "{out:?}");
    assert_eq!(stored_count(&s).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pdu_larger_than_max_pdu_aborts_the_association() {
    let s = scp(
        DicomSettings {
            idle_timeout_secs: 60,
            max_pdu: 65536,
            ..DicomSettings::default()
        },
        0,
    )
    .await;
    // one P-DATA-TF of ~200 KB (a data fragment, so the command-set cap is not what ends it)
    let py = format!(
        "from pynetdicom import AE\nfrom pynetdicom.pdu_primitives import P_DATA\nimport time\n\
         ae=AE(ae_title='PACS')\nae.add_requested_context('1.2.840.10008.1.1')\n\
         a=ae.associate('{}',{},ae_title='CARINA')\nassert a.is_established\n\
         p=P_DATA(); p.presentation_data_value_list=[[1, b'\\x00' + b'\\0'*200000]]; a.dul.send_pdu(p)\n\
         time.sleep(2)\nprint('aborted' if a.is_aborted or not a.is_established else 'alive')\n",
        s.addr.ip(),
        s.addr.port()
    );
    let out = run({
        let mut c = Command::new(root().join(".venv/bin/python"));
        c.args(["-c", &py]);
        c
    })
    .await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "aborted",
        "{out:?}"
    );
}
