//! Crash, fault and scale-out tests against real `carina serve` processes (the debug binary),
//! real clients and real infrastructure:
//! - kill -9 at random moments during streams of STOW-RS (HTTP) and C-STORE (pynetdicom)
//!   uploads, 20 trials on one data folder: every acknowledged instance is stored, analysed
//!   exactly once (one job, one Secondary Capture), and every visible blob is whole;
//! - two replicas sharing PostgreSQL and the blob folder behind Debian's HAProxy with
//!   `docker/haproxy.cfg` (replicas found through DNS: `tests/haproxy/dns_stub.py`);
//! - a private PostgreSQL restarted under load: clear 503s while it is down, recovery without a
//!   restart of Carina, nothing acknowledged lost;
//! - backpressure: a full job queue answers 503 + Retry-After over HTTP and A700 over DIMSE.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::root;

/// The sample every upload is a copy of (its patient id must never reach the log).
const SAMPLE: &str = "dicom-samples/derived_DX_normal_nih-cxr14.dcm";
const SAMPLE_PATIENT_ID: &str = "nih-00001638";

// ---------------------------------------------------------------- processes and HTTP

fn free_port(ip: &str) -> u16 {
    TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A pseudo-random number in `0..n` (time-seeded; the tests must pass for any value).
fn random(n: u64) -> u64 {
    let x = u64::from(uuid::Uuid::new_v4().as_fields().1);
    x % n.max(1)
}

struct Server {
    child: Child,
    http: SocketAddr,
    dimse: SocketAddr,
}

impl Server {
    fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Opts<'a> {
    data: &'a Path,
    log: &'a Path,
    db: Option<&'a str>,
    ip: &'a str,
    http_port: Option<u16>,
    env: Vec<(&'a str, String)>,
}

fn start(o: &Opts) -> Server {
    let http = SocketAddr::new(
        o.ip.parse().unwrap(),
        o.http_port.unwrap_or_else(|| free_port(o.ip)),
    );
    let dimse = SocketAddr::new(o.ip.parse().unwrap(), free_port(o.ip));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(o.log)
        .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_carina"));
    cmd.current_dir(root())
        .arg("serve")
        .args(["--http", &http.to_string(), "--dimse", &dimse.to_string()])
        .arg("--data-dir")
        .arg(o.data)
        .arg("--models")
        .arg(root().join("tests/fixtures/models"))
        .env("CARINA_MIN_FREE_MB", "0")
        .env("CARINA_JOB_LEASE_SECS", "3")
        .env("CARINA_WORKERS", "2")
        .env("CARINA_LOG_FORMAT", "json")
        .env("RUST_LOG", "info,ort=warn")
        .stdout(Stdio::null())
        .stderr(log);
    if let Some(db) = o.db {
        cmd.args(["--database-url", db]);
    }
    for (k, v) in &o.env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().unwrap();
    let mut s = Server { child, http, dimse };
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some((200, _, _)) = request(http, "GET", "/readyz", &[], &[]) {
            return s;
        }
        if let Ok(Some(st)) = s.child.try_wait() {
            panic!(
                "carina exited ({st}) before it was ready; log:\n{}",
                std::fs::read_to_string(o.log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "carina not ready in 90 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

type Answer = (u16, HashMap<String, String>, Vec<u8>);

/// One HTTP/1.1 request (`Connection: close`); `None` when no answer came (refused, reset).
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<Answer> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).ok()?;
    s.write_all(body).ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some((status, headers, raw[split + 4..].to_vec()))
}

fn get_json(addr: SocketAddr, path: &str) -> (u16, Value) {
    let (s, _, b) = request(addr, "GET", path, &[], &[]).expect("an answer");
    (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

/// STOW-RS of one file; the HTTP status, `None` without an answer.
fn stow(addr: SocketAddr, file: &[u8]) -> Option<(u16, HashMap<String, String>)> {
    let boundary = "carina-durability-boundary";
    let mut body = format!("--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").into_bytes();
    body.extend_from_slice(file);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let ct = format!("multipart/related; type=\"application/dicom\"; boundary={boundary}");
    request(
        addr,
        "POST",
        "/dicomweb/studies",
        &[("Content-Type", &ct), ("Accept", "application/dicom+json")],
        &body,
    )
    .map(|(s, h, _)| (s, h))
}

/// C-STORE of `files` in one association with pynetdicom; the status per SOP Instance UID
/// (`None`: no response).
fn c_store(addr: SocketAddr, files: &[PathBuf]) -> Vec<(String, Option<u64>)> {
    let out = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("tests/dicom/dimse_client.py"))
        .args([
            "store",
            "--host",
            &addr.ip().to_string(),
            "--port",
            &addr.port().to_string(),
            "--aet",
            "DURABILITY",
            // a kill can leave pynetdicom waiting out its timeout for an answer that will not
            // come (30 s by default): 10 s is plenty for a local server and keeps the trials
            // moving (a timed-out store is simply not counted as acknowledged)
            "--timeout",
            "10",
        ])
        .args(files)
        .output()
        .expect("pynetdicom client (scripts/setup.sh --test)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| {
            let sop = v["sop_instance_uid"].as_str()?.to_string();
            Some((sop, v["status"].as_u64()))
        })
        .collect()
}

/// Uploads made for a test: file, SOP Instance UID, Study Instance UID.
struct Upload {
    path: PathBuf,
    sop: String,
    study: String,
}

fn make_uploads(dir: &Path, n: usize, per_study: usize) -> Vec<Upload> {
    let out = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("tests/durability/make_instances.py"))
        .arg(root().join(SAMPLE))
        .arg(dir)
        .arg(n.to_string())
        .args(["--per-study", &per_study.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let p: Vec<&str> = l.split_whitespace().collect();
            Upload {
                path: dir.join(p[0]),
                sop: p[1].to_string(),
                study: p[2].to_string(),
            }
        })
        .collect()
}

/// Waits until no job is queued or running (every acknowledged upload analysed).
fn wait_idle(addr: SocketAddr, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let busy: usize = ["queued", "running"]
            .iter()
            .map(|s| {
                let (_, v) = get_json(addr, &format!("/v1/jobs?state={s}&_count=1000"));
                v["jobs"].as_array().map_or(0, Vec::len)
            })
            .sum();
        if busy == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{busy} jobs still unfinished");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Every acknowledged instance: stored, analysed, by exactly one job, with exactly one
/// Secondary Capture result; no job dead.
fn check_exactly_once(addr: SocketAddr, acked: &[&Upload]) {
    let mut studies: HashMap<&str, Value> = HashMap::new();
    for u in acked {
        let (s, st) = get_json(addr, &format!("/v1/instances/{}", u.sop));
        assert_eq!(s, 200, "acknowledged instance {} is stored", u.sop);
        let (_, jobs) = get_json(addr, &format!("/v1/jobs?kind=analyse&subject={}", u.sop));
        // the jobs go into the message: a wrong state is explained by its job's history
        assert_eq!(st["analysis_state"], "done", "{st}\njobs: {jobs}");
        let jobs = jobs["jobs"].as_array().unwrap();
        assert_eq!(jobs.len(), 1, "one analysis job for {}", u.sop);
        assert_eq!(jobs[0]["state"], "done");
        let all = studies
            .entry(&u.study)
            .or_insert_with(|| get_json(addr, &format!("/v1/studies/{}/instances", u.study)).1);
        let results = all
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["result_of"] == u.sop.as_str())
            .count();
        assert_eq!(results, 1, "one Secondary Capture for {}", u.sop);
    }
    let (_, dead) = get_json(addr, "/v1/jobs?state=dead");
    assert_eq!(dead["jobs"].as_array().map(Vec::len), Some(0), "{dead}");
}

/// Every visible file under the blob folders is whole (DICOM parses, PNG decodes, JSON parses);
/// returns (visible files, leftover hidden temp files).
fn check_blobs(data: &Path) -> (usize, usize) {
    let (mut visible, mut temp) = (0, 0);
    let mut stack = vec![data.join("dicom"), data.join("results")];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().to_string();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if name.starts_with('.') {
                temp += 1;
                continue;
            }
            visible += 1;
            let bytes = std::fs::read(&p).unwrap();
            let whole = if name.ends_with(".dcm") {
                carina::dicom::parse_instance(&bytes).is_ok()
            } else if name.ends_with(".png") {
                image::load_from_memory(&bytes).is_ok()
            } else if name.ends_with(".json") {
                serde_json::from_slice::<Value>(&bytes).is_ok()
            } else {
                true
            };
            assert!(whole, "half-written blob visible: {}", p.display());
        }
    }
    (visible, temp)
}

// ---------------------------------------------------------------- kill -9

#[test]
fn kill_9_during_uploads_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("carina.log");
    let uploads = Arc::new(make_uploads(&dir.path().join("in"), 1200, 10));
    let next = Arc::new(AtomicUsize::new(0));
    let acked: Arc<Mutex<HashSet<usize>>> = Arc::default();
    let opts = Opts {
        data: &data,
        log: &log,
        db: None,
        ip: "127.0.0.1",
        http_port: None,
        // Every kill here is a crash of the infrastructure, not of a poison job: a job killed
        // mid-run in five trials in a row (likely when one restart after another re-claims it
        // first and the kill lands within its slow first analysis) would be dead-lettered by
        // the default max_attempts of 5 and leave its instance pending. This test is about
        // exactly-once after crashes; dead-lettering has its own test in tests/jobs.rs.
        env: vec![("CARINA_JOB_MAX_ATTEMPTS", "1000".to_string())],
    };
    let trials = 20;
    let (mut http_acks, mut dimse_acks) = (0, 0);
    for trial in 0..trials {
        let mut server = start(&opts);
        let dead = Arc::new(AtomicBool::new(false));
        let http_thread = {
            let (u, n, a, dead, addr) = (
                uploads.clone(),
                next.clone(),
                acked.clone(),
                dead.clone(),
                server.http,
            );
            std::thread::spawn(move || {
                let mut count = 0;
                while !dead.load(Ordering::SeqCst) {
                    let i = n.fetch_add(1, Ordering::SeqCst);
                    let Some(up) = u.get(i) else { break };
                    match stow(addr, &std::fs::read(&up.path).unwrap()) {
                        Some((200, _)) => {
                            a.lock().unwrap().insert(i);
                            count += 1;
                        }
                        Some((s, _)) => panic!("STOW answered {s}"),
                        None => break,
                    }
                    // a steady stream, so that most kills land in the middle of it
                    std::thread::sleep(Duration::from_millis(15));
                }
                count
            })
        };
        let dimse_thread = {
            let (u, n, a, dead, addr) = (
                uploads.clone(),
                next.clone(),
                acked.clone(),
                dead.clone(),
                server.dimse,
            );
            std::thread::spawn(move || {
                let mut count = 0;
                while !dead.load(Ordering::SeqCst) {
                    let first = n.fetch_add(20, Ordering::SeqCst);
                    let batch: Vec<usize> = (first..first + 20).filter(|i| *i < u.len()).collect();
                    if batch.is_empty() {
                        break;
                    }
                    let files: Vec<PathBuf> = batch.iter().map(|i| u[*i].path.clone()).collect();
                    let statuses = c_store(addr, &files);
                    let mut all_ok = statuses.len() == batch.len();
                    for (sop, status) in statuses {
                        let i = batch.iter().find(|i| u[**i].sop == sop).copied().unwrap();
                        match status {
                            Some(0) => {
                                a.lock().unwrap().insert(i);
                                count += 1;
                            }
                            Some(s) => panic!("C-STORE answered {s:#06x}"),
                            None => all_ok = false,
                        }
                    }
                    if !all_ok {
                        break;
                    }
                }
                count
            })
        };
        // a random moment: early (during start-up work), mid-stream, or late
        std::thread::sleep(Duration::from_millis(150 + random(1500)));
        server.kill9();
        dead.store(true, Ordering::SeqCst);
        http_acks += http_thread.join().unwrap();
        dimse_acks += dimse_thread.join().unwrap();
        eprintln!(
            "trial {trial}: killed; {} uploads acknowledged so far",
            acked.lock().unwrap().len()
        );
    }
    assert!(
        http_acks > 0 && dimse_acks > 0,
        "both paths acknowledged uploads"
    );
    // restart: the jobs of acknowledged uploads resume (expired leases are taken over)
    let server = start(&opts);
    wait_idle(server.http, Duration::from_secs(300));
    let acked = acked.lock().unwrap();
    let acked_uploads: Vec<&Upload> = acked.iter().map(|i| &uploads[*i]).collect();
    check_exactly_once(server.http, &acked_uploads);
    let (visible, temp) = check_blobs(&data);
    eprintln!(
        "{trials} kill -9 trials: {} acknowledged ({http_acks} STOW-RS, {dimse_acks} C-STORE), all stored and analysed once; {visible} visible blobs whole, {temp} hidden temp files",
        acked.len()
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        !logged.contains(SAMPLE_PATIENT_ID),
        "no patient id in the log"
    );
    // JSON logs carry job ids
    assert!(
        logged.lines().any(|l| l.contains("\"job_id\"")),
        "job ids logged"
    );
    assert!(
        logged.lines().any(|l| l.contains("\"request_id\"")),
        "request ids logged"
    );
}

// ---------------------------------------------------------------- HAProxy + 2 replicas

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn admin_pg() -> String {
    common::pg_url().unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The DNS stub answering every name with `addrs`; its port.
fn dns_stub(addrs: &[&str]) -> (Proc, u16) {
    let mut cmd = Command::new("python3");
    cmd.arg(root().join("tests/haproxy/dns_stub.py"))
        .args(["--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for a in addrs {
        cmd.args(["--answer", a]);
    }
    let mut child = cmd.spawn().unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    let port = line.trim().strip_prefix("PORT ").unwrap().parse().unwrap();
    (Proc(child), port)
}

fn node_of(addr: SocketAddr) -> Option<String> {
    let (s, _, b) = request(addr, "GET", "/readyz", &[], &[])?;
    let v: Value = serde_json::from_slice(&b).ok()?;
    (s == 200).then(|| v["node"].as_str().map(str::to_string))?
}

#[test]
fn replicas_behind_haproxy_balance_share_and_survive_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("shared-data");
    let db = rt().block_on(common::fresh_pg_database(&admin_pg()));
    let uploads = make_uploads(&dir.path().join("in"), 140, 20);
    let port = free_port("127.0.0.2");
    let (log_a, log_b) = (dir.path().join("a.log"), dir.path().join("b.log"));
    let opts = |ip, log| Opts {
        data: &data,
        log,
        db: Some(&db),
        ip,
        http_port: Some(port),
        env: Vec::new(),
    };
    let mut a = start(&opts("127.0.0.2", &log_a));
    let mut b = start(&opts("127.0.0.3", &log_b));
    let (node_a, node_b) = (node_of(a.http).unwrap(), node_of(b.http).unwrap());
    let (_dns, dns_port) = dns_stub(&["127.0.0.2", "127.0.0.3"]);
    let lb = SocketAddr::from(([127, 0, 0, 1], free_port("127.0.0.1")));
    let _haproxy = Proc(
        Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(root().join("docker/haproxy.cfg"))
            .env("CARINA_LB_BIND", lb.to_string())
            .env("CARINA_DNS", format!("127.0.0.1:{dns_port}"))
            .env("CARINA_UPSTREAM", format!("carina.test:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy (scripts/setup.sh --test installs it)"),
    );
    // both replicas in rotation (DNS resolved, health checks on /readyz passed)
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen: HashSet<String> = (0..4).filter_map(|_| node_of(lb)).collect();
        if seen.len() == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "both replicas in rotation: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // 1. balanced
    let mut per_node: HashMap<String, usize> = HashMap::new();
    for _ in 0..40 {
        *per_node.entry(node_of(lb).unwrap()).or_default() += 1;
    }
    eprintln!("40 requests through HAProxy: {per_node:?}");
    assert!(per_node.values().all(|n| *n >= 15), "{per_node:?}");

    // 2. uploads through the balancer; results readable through either replica
    let (first, rest) = uploads.split_at(60);
    for u in first {
        let (s, _) = stow(lb, &std::fs::read(&u.path).unwrap()).unwrap();
        assert_eq!(s, 200);
    }
    wait_idle(lb, Duration::from_secs(180));
    for u in first {
        for replica in [a.http, b.http] {
            let (s, st) = get_json(replica, &format!("/v1/instances/{}", u.sop));
            assert_eq!((s, st["analysis_state"].as_str()), (200, Some("done")));
        }
        let wado = format!(
            "/dicomweb/studies/{}/series/{}/instances/{}",
            u.study,
            get_json(b.http, &format!("/v1/instances/{}", u.sop)).1["series_uid"]
                .as_str()
                .unwrap(),
            u.sop
        );
        let (s, _, body) = request(a.http, "GET", &wado, &[], &[]).unwrap();
        assert_eq!(s, 200);
        assert!(body.len() > 20_000, "the instance file is served by both");
    }
    // 3. one replica per job: every job ran once, and both replicas ran some
    let (_, jobs) = get_json(lb, "/v1/jobs?kind=analyse&_count=1000");
    let jobs = jobs["jobs"].as_array().unwrap().clone();
    assert_eq!(jobs.len(), first.len());
    let mut by_owner: HashMap<String, usize> = HashMap::new();
    for j in &jobs {
        assert_eq!(j["attempts"], 1, "{j}");
        *by_owner
            .entry(j["lease_owner"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    eprintln!("analysis jobs by replica: {by_owner:?}");
    assert!(by_owner.keys().all(|o| *o == node_a || *o == node_b));
    assert_eq!(by_owner.len(), 2, "both replicas processed jobs");

    // 4. kill -9 one replica mid-load: nothing acknowledged is lost, the other finishes
    let mut acked: Vec<&Upload> = first.iter().collect();
    let mut refused = 0;
    for (i, u) in rest.iter().enumerate() {
        if i == rest.len() / 3 {
            a.kill9();
        }
        match stow(lb, &std::fs::read(&u.path).unwrap()) {
            Some((200, _)) => acked.push(u),
            Some((s, _)) => {
                assert!(s == 502 || s == 503, "only a lost connection fails: {s}");
                refused += 1;
            }
            None => refused += 1,
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "after the kill: {} of {} acknowledged through HAProxy ({refused} failed in flight)",
        acked.len() - first.len(),
        rest.len()
    );
    assert!(acked.len() > first.len() + rest.len() / 2);
    wait_idle(b.http, Duration::from_secs(180));
    check_exactly_once(b.http, &acked);

    // 5. graceful stop: the last replica exits cleanly and leaves no job leased
    let status = b.terminate();
    assert!(status.success(), "{status}");
    let store_check = rt().block_on(async {
        let store = carina::store::Store::connect(Some(&db), &data)
            .await
            .unwrap();
        store
            .jobs(Some(carina::store::JobState::Running), None, None, 10, 0)
            .await
            .unwrap()
    });
    assert!(
        store_check.is_empty(),
        "no job left running: {store_check:?}"
    );
    let logs = std::fs::read_to_string(&log_a).unwrap() + &std::fs::read_to_string(&log_b).unwrap();
    assert!(!logs.contains(SAMPLE_PATIENT_ID));
}

// ---------------------------------------------------------------- PostgreSQL restart

struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Postgres {
    fn pg_ctl(&self, args: &[&str]) {
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "pg_ctl {args:?}: {out:?}");
    }

    /// A private cluster on a free port (initdb as the `postgres` user).
    fn new() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .unwrap()
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|p| p.join("initdb").exists())
            .max()
            .expect("PostgreSQL server binaries");
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("pg");
        std::fs::create_dir(&data).unwrap();
        for (p, mode) in [(dir.path(), "755"), (data.as_path(), "700")] {
            assert!(Command::new("chmod")
                .arg(mode)
                .arg(p)
                .status()
                .unwrap()
                .success());
        }
        assert!(Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&data)
            .status()
            .unwrap()
            .success());
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(bin.join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(out.status.success(), "initdb: {out:?}");
        let pg = Self {
            bin,
            data,
            port: free_port("127.0.0.1"),
            _dir: dir,
        };
        pg.start();
        pg
    }

    fn start(&self) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {}",
            self.port,
            self.data.display()
        );
        let log = self.data.join("server.log");
        self.pg_ctl(&["-w", "-o", &opts, "-l", log.to_str().unwrap(), "start"]);
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

/// Upload index, HTTP status, Retry-After.
type Answered = (usize, u16, Option<String>);

#[test]
fn postgres_restart_under_load_answers_503_then_recovers() {
    let pg = Postgres::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("carina.log");
    let uploads = Arc::new(make_uploads(&dir.path().join("in"), 400, 20));
    let url = pg.url();
    let server = start(&Opts {
        data: &data,
        log: &log,
        db: Some(&url),
        ip: "127.0.0.1",
        http_port: None,
        env: Vec::new(),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let answers: Arc<Mutex<Vec<Answered>>> = Arc::default();
    let load = {
        let (u, stop, answers, addr) =
            (uploads.clone(), stop.clone(), answers.clone(), server.http);
        std::thread::spawn(move || {
            for (i, up) in u.iter().enumerate() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let (s, h) = stow(addr, &std::fs::read(&up.path).unwrap()).expect("Carina answers");
                answers
                    .lock()
                    .unwrap()
                    .push((i, s, h.get("retry-after").cloned()));
                std::thread::sleep(Duration::from_millis(25));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    pg.pg_ctl(&["-m", "fast", "stop"]);
    let down_at = answers.lock().unwrap().len();
    std::thread::sleep(Duration::from_millis(1500));
    let (ready, _) = get_json(server.http, "/readyz");
    assert_eq!(ready, 503, "not ready while the database is down");
    std::thread::sleep(Duration::from_millis(1500));
    pg.start();
    let up_at = answers.lock().unwrap().len();
    std::thread::sleep(Duration::from_millis(4000));
    stop.store(true, Ordering::SeqCst);
    load.join().unwrap();
    let answers = answers.lock().unwrap().clone();
    let count = |f: &dyn Fn(&Answered) -> bool| answers.iter().filter(|a| f(a)).count();
    let unavailable = count(&|a| a.1 == 503);
    eprintln!(
        "{} uploads: {} stored, {unavailable} answered 503 while PostgreSQL was down (answers {down_at}..{up_at})",
        answers.len(),
        count(&|a| a.1 == 200)
    );
    assert!(
        answers.iter().all(|a| a.1 == 200 || a.1 == 503),
        "only 200 or 503: {answers:?}"
    );
    assert!(unavailable > 0, "a clear 503 while the database is down");
    assert!(
        answers.iter().filter(|a| a.1 == 503).all(|a| a.2.is_some()),
        "every 503 has Retry-After"
    );
    assert!(
        answers[answers.len().saturating_sub(5)..]
            .iter()
            .all(|a| a.1 == 200),
        "recovered without a restart"
    );
    wait_idle(server.http, Duration::from_secs(180));
    let acked: Vec<&Upload> = answers
        .iter()
        .filter(|a| a.1 == 200)
        .map(|a| &uploads[a.0])
        .collect();
    check_exactly_once(server.http, &acked);
}

// ---------------------------------------------------------------- backpressure

#[test]
fn a_full_queue_or_disk_refuses_with_503_and_a700() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("carina.log");
    let uploads = make_uploads(&dir.path().join("in"), 6, 10);
    // an ingest-only replica (no workers) with room for 3 unfinished jobs
    let mut server = start(&Opts {
        data: &data,
        log: &log,
        db: None,
        ip: "127.0.0.1",
        http_port: None,
        env: vec![
            ("CARINA_WORKERS", "0".into()),
            ("CARINA_MAX_BACKLOG", "3".into()),
        ],
    });
    for u in &uploads[..3] {
        assert_eq!(
            stow(server.http, &std::fs::read(&u.path).unwrap())
                .unwrap()
                .0,
            200
        );
    }
    let (s, h) = stow(server.http, &std::fs::read(&uploads[3].path).unwrap()).unwrap();
    assert_eq!(s, 503);
    assert!(h.contains_key("retry-after"), "{h:?}");
    let statuses = c_store(server.dimse, &[uploads[4].path.clone()]);
    assert_eq!(statuses, vec![(uploads[4].sop.clone(), Some(0xA700))]);
    for u in &uploads[3..5] {
        let (s, _) = get_json(server.http, &format!("/v1/instances/{}", u.sop));
        assert_eq!(s, 404, "a refused instance is not kept");
    }
    let (_, _, metrics) = request(server.http, "GET", "/metrics", &[], &[]).unwrap();
    let metrics = String::from_utf8(metrics).unwrap();
    for line in [
        "carina_dimse_stores_total{status=\"0xa700\"} 1",
        "carina_dimse_associations_total{outcome=\"accepted\"} 1",
        "carina_jobs{kind=\"analyse\",state=\"queued\"} 3",
        "carina_http_requests_total{method=\"POST\",route=\"/dicomweb/studies\",status=\"503\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    server.kill9();
    // a disk below the watermark: 503 over HTTP, association refused over DIMSE
    let server = start(&Opts {
        data: &data,
        log: &log,
        db: None,
        ip: "127.0.0.1",
        http_port: None,
        env: vec![("CARINA_MIN_FREE_MB", (u64::MAX / (1 << 21)).to_string())],
    });
    let (s, h) = stow(server.http, &std::fs::read(&uploads[5].path).unwrap()).unwrap();
    assert_eq!(s, 503);
    assert!(h.contains_key("retry-after"));
    let statuses = c_store(server.dimse, &[uploads[5].path.clone()]);
    assert!(
        statuses.iter().all(|(_, s)| s.is_none()),
        "association refused: {statuses:?}"
    );
    let (s, _) = get_json(server.http, &format!("/v1/instances/{}", uploads[5].sop));
    assert_eq!(s, 404);
}

/// A small tmpfs mounted for one test (root only), unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount a tmpfs (the tests run as root)");
        Self(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_really_full_disk_refuses_and_keeps_what_it_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    // the blobs on a 1 MiB file system with no watermark, the database elsewhere
    let data = dir.path().join("blobs");
    let disk = Tmpfs::mount(&data, "1m");
    // (a user's sqlite:// URL: the file is created when missing)
    let db = format!("sqlite://{}", dir.path().join("carina.db").display());
    let log = dir.path().join("carina.log");
    let uploads = make_uploads(&dir.path().join("in"), 60, 60);
    let server = start(&Opts {
        data: &data,
        log: &log,
        db: Some(&db),
        ip: "127.0.0.1",
        http_port: None,
        env: vec![("CARINA_WORKERS", "0".into())],
    });
    let mut acked = Vec::new();
    let mut refused = None;
    for (i, u) in uploads.iter().enumerate() {
        let (s, h) = stow(server.http, &std::fs::read(&u.path).unwrap()).unwrap();
        match s {
            200 => acked.push(u),
            503 => {
                assert!(h.contains_key("retry-after"));
                refused = Some(i);
                break;
            }
            other => panic!("STOW on a full disk answered {other}"),
        }
    }
    let first_refused = refused.expect("the 1 MiB disk fills up");
    assert!(!acked.is_empty());
    // C-STORE of the next one: A700, and the association goes on
    let next = &uploads[first_refused + 1];
    let statuses = c_store(server.dimse, std::slice::from_ref(&next.path));
    assert_eq!(statuses, vec![(next.sop.clone(), Some(0xA700))]);
    let (ready, body) = get_json(server.http, "/readyz");
    eprintln!(
        "full disk after {} uploads: 503 + Retry-After, C-STORE A700; /readyz {ready} {}",
        acked.len(),
        body["checks"]
    );
    for u in &acked {
        let (s, st) = get_json(server.http, &format!("/v1/instances/{}", u.sop));
        assert_eq!(s, 200);
        let (_, jobs) = get_json(server.http, &format!("/v1/jobs?subject={}", u.sop));
        assert_eq!(jobs["jobs"].as_array().unwrap().len(), 1, "{st}");
    }
    for u in &uploads[first_refused..=first_refused + 1] {
        let (s, _) = get_json(server.http, &format!("/v1/instances/{}", u.sop));
        assert_eq!(s, 404, "a refused instance is not kept");
    }
    let (visible, temp) = check_blobs(&data);
    assert_eq!(
        (visible, temp),
        (acked.len(), 0),
        "whole files only, no leftovers"
    );
    drop(server);
    drop(disk);
}
