//! Authorization with a real OAuth2 authorization server: `oidc-provider` (tests/auth/issuer.mjs)
//! issues SMART Backend Services tokens (client_credentials, `private_key_jwt` RS384
//! assertions), a real Python client (tests/auth/backend_client.py, PyJWT) runs the flow and
//! reads and writes through Carina, and hand-made tokens (tests/auth/mint.mjs, jose) cover
//! every way a token can be wrong. Carina runs on a loopback port with the real router.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::{json, Value};

use common::root;

/// A running issuer; killed on drop.
struct Issuer {
    child: Child,
    url: String,
    port: u16,
}

impl Drop for Issuer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn node(script: &str) -> Command {
    let mut c = Command::new("node");
    c.arg(root().join("tests/auth").join(script));
    c
}

fn start_issuer(keys: &Path, files: &[&str], port: u16, audience: &str) -> Issuer {
    let list: Vec<String> = files
        .iter()
        .map(|f| keys.join(f).display().to_string())
        .collect();
    let mut child = node("issuer.mjs")
        .args(["--port", &port.to_string(), "--keys", &list.join(",")])
        .arg("--client-jwks")
        .arg(keys.join("client-public.json"))
        .args([
            "--audience",
            audience,
            "--patient-client-patient",
            "p1",
            "--die-with-stdin",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("node runs tests/auth/issuer.mjs (scripts/setup.sh --test)");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let v: Value = serde_json::from_str(&line).expect("issuer prints its URLs");
    let url = v["issuer"].as_str().unwrap().to_string();
    let port = url.rsplit(':').next().unwrap().parse().unwrap();
    Issuer { child, url, port }
}

/// A token from the issuer through the real SMART Backend Services client.
fn client_token(keys: &Path, issuer: &Issuer, client: &str, scope: &str) -> String {
    let out = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("tests/auth/backend_client.py"))
        .args([
            "--fhir",
            "http://unused.invalid/fhir",
            "--client-id",
            client,
        ])
        .arg("--key")
        .arg(keys.join("client.json"))
        .args(["--scope", scope, "--print-token"])
        .args(["--token-endpoint", &format!("{}/token", issuer.url)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A hand-made token signed with a key of `keys_file`.
fn mint(keys: &Path, keys_file: &str, claims: &Value, extra: &[&str]) -> String {
    let out = node("mint.mjs")
        .arg("--keys")
        .arg(keys.join(keys_file))
        .args(["--claims", &claims.to_string()])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

struct Carina {
    addr: SocketAddr,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Carina {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Carina {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// Carina with authorization on, its audience `{public_url}/fhir`.
async fn carina(listener: tokio::net::TcpListener, issuer: &str) -> Carina {
    let addr = listener.local_addr().unwrap();
    let public = format!("http://{addr}");
    let t = common::TestApp::builder()
        .configure(|s| {
            s.public_url = Some(public);
            s.auth.issuer = Some(issuer.to_string());
            s.allowed_hosts = Vec::new();
        })
        .build()
        .await;
    let (router, dir) = (t.router, t.dir);
    let task = tokio::spawn(async move {
        axum::serve(listener, router).await.unwrap();
    });
    Carina {
        addr,
        _dir: dir,
        task,
    }
}

struct Answer {
    status: u16,
    challenge: String,
    body: Value,
}

async fn call(method: &str, url: &str, token: Option<&str>, body: Option<&Value>) -> Answer {
    let client = reqwest::Client::new();
    let mut r = client.request(method.parse().unwrap(), url);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    if let Some(b) = body {
        r = r
            .header("content-type", "application/fhir+json")
            .body(b.to_string());
    }
    let res = r.send().await.unwrap();
    let status = res.status().as_u16();
    let challenge = res
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let bytes = res.bytes().await.unwrap();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    Answer {
        status,
        challenge,
        body,
    }
}

fn keys_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let status = node("keys.mjs").arg(dir.path()).status().unwrap();
    assert!(status.success());
    let p = dir.path().to_path_buf();
    (dir, p)
}

fn patient(id: &str) -> Value {
    json!({"resourceType": "Patient", "id": id, "gender": "female", "birthDate": "1950-01-01"})
}

fn observation(patient: &str, value: f64) -> Value {
    json!({
        "resourceType": "Observation", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2532-0"}]},
        "subject": {"reference": format!("Patient/{patient}")},
        "effectiveDateTime": "2020-03-01T10:00:00Z",
        "valueQuantity": {"value": value, "unit": "U/L", "system": "http://unitsofmeasure.org", "code": "U/L"}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_scopes_compartments_and_key_rotation_against_a_real_issuer() {
    let (_keep, keys) = keys_dir();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let audience = format!("http://{}/fhir", listener.local_addr().unwrap());
    let issuer = start_issuer(&keys, &["issuer-a.json"], 0, &audience);
    let c = carina(listener, &issuer.url).await;
    let fhir = |p: &str| c.url(&format!("/fhir{p}"));

    // --- open routes, discovery, capability -----------------------------------------------
    assert_eq!(
        call("GET", &c.url("/healthz"), None, None).await.status,
        200
    );
    assert_eq!(call("GET", &c.url("/readyz"), None, None).await.status, 200);
    let smart = call(
        "GET",
        &c.url("/.well-known/smart-configuration"),
        None,
        None,
    )
    .await;
    assert_eq!(smart.status, 200);
    assert_eq!(
        smart.body["token_endpoint"],
        format!("{}/token", issuer.url)
    );
    let meta = call("GET", &fhir("/metadata"), None, None).await;
    assert_eq!(
        meta.body["rest"][0]["security"]["service"][0]["coding"][0]["code"],
        "SMART-on-FHIR"
    );
    assert_eq!(
        meta.body["rest"][0]["security"]["extension"][0]["extension"][0]["valueUri"],
        format!("{}/token", issuer.url)
    );

    // --- no token: everything with data is 401 --------------------------------------------
    for (m, p) in [
        ("GET", "/fhir/Patient"),
        ("GET", "/dicomweb/studies?PatientID=*"),
        ("GET", "/v1/jobs"),
        ("GET", "/v1/exports"),
        ("GET", "/metrics"),
        ("GET", "/v1/models"),
        ("GET", "/fhir/Patient/x"),
    ] {
        let a = call(m, &c.url(p), None, None).await;
        assert_eq!(a.status, 401, "{m} {p}");
        assert!(
            a.challenge.starts_with("Bearer"),
            "{m} {p}: {}",
            a.challenge
        );
        assert_eq!(a.body["resourceType"], "OperationOutcome");
    }
    let put = call("PUT", &fhir("/Patient/p1"), None, Some(&patient("p1"))).await;
    assert_eq!(put.status, 401);
    // the 2020 API is off while authorization is on
    let legacy = call("POST", &c.url("/covid19/api/v1/predict/"), None, None).await;
    assert_eq!(legacy.status, 403, "{}", legacy.body);

    // --- a SMART Backend Services client, end to end (python, PyJWT) ----------------------
    let out = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("tests/auth/backend_client.py"))
        .args(["--fhir", &fhir(""), "--client-id", "carina-backend"])
        .arg("--key")
        .arg(keys.join("client.json"))
        .args(["--scope", "system/Observation.rs system/Observation.c"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let flow: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(flow["token_ok"], true, "{flow}");
    assert_eq!(flow["create_status"], 201, "{flow}");
    assert_eq!(flow["read_status"], 200, "{flow}");
    assert_eq!(flow["search_status"], 200, "{flow}");
    assert!(flow["search_total"].as_i64().unwrap() >= 1, "{flow}");

    // --- scopes per interaction --------------------------------------------------------------
    let admin = client_token(&keys, &issuer, "carina-backend", "system/*.cruds");
    for p in ["p1", "p2"] {
        let a = call(
            "PUT",
            &fhir(&format!("/Patient/{p}")),
            Some(&admin),
            Some(&patient(p)),
        )
        .await;
        assert_eq!(a.status, 201, "{}", a.body);
    }
    for (p, v) in [("p1", 250.0), ("p2", 900.0)] {
        let a = call(
            "POST",
            &fhir("/Observation"),
            Some(&admin),
            Some(&observation(p, v)),
        )
        .await;
        assert_eq!(a.status, 201, "{}", a.body);
    }
    let read_only = client_token(&keys, &issuer, "carina-backend", "system/Observation.rs");
    let a = call("GET", &fhir("/Observation"), Some(&read_only), None).await;
    assert_eq!(a.status, 200);
    let a = call(
        "POST",
        &fhir("/Observation"),
        Some(&read_only),
        Some(&observation("p1", 1.0)),
    )
    .await;
    assert_eq!(a.status, 403, "create needs c");
    assert!(
        a.challenge.contains("insufficient_scope"),
        "{}",
        a.challenge
    );
    assert!(a.challenge.contains("Observation.c"), "{}", a.challenge);
    let a = call("GET", &fhir("/Patient/p1"), Some(&read_only), None).await;
    assert_eq!(a.status, 403, "Patient needs its own scope");
    let a = call(
        "PUT",
        &fhir("/Patient/p1"),
        Some(&read_only),
        Some(&patient("p1")),
    )
    .await;
    assert_eq!(a.status, 403);
    // a transaction is checked entry by entry
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": observation("p1", 3.0), "request": {"method": "POST", "url": "Observation"}},
        {"resource": patient("p3"), "request": {"method": "PUT", "url": "Patient/p3"}}
    ]});
    let writer = client_token(&keys, &issuer, "carina-backend", "system/Observation.cruds");
    let a = call("POST", &fhir(""), Some(&writer), Some(&tx)).await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(a.body.to_string().contains("entry[1]"), "{}", a.body);
    let a = call("GET", &fhir("/Patient/p3"), Some(&admin), None).await;
    assert_eq!(
        a.status, 404,
        "nothing of the refused transaction was stored"
    );
    // operator routes
    let a = call("GET", &c.url("/metrics"), Some(&writer), None).await;
    assert_eq!(a.status, 403);
    let operator = client_token(&keys, &issuer, "carina-backend", "system/*.rs");
    assert_eq!(
        call("GET", &c.url("/metrics"), Some(&operator), None)
            .await
            .status,
        200
    );
    assert_eq!(
        call("GET", &c.url("/v1/jobs"), Some(&operator), None)
            .await
            .status,
        200
    );
    // DICOMweb as ImagingStudy
    let a = call("GET", &c.url("/dicomweb/studies"), Some(&writer), None).await;
    assert_eq!(a.status, 403);
    let a = call("GET", &c.url("/dicomweb/studies"), Some(&operator), None).await;
    assert_eq!(a.status, 200);
    // SMART v1 scopes
    let v1 = client_token(&keys, &issuer, "carina-backend", "system/Observation.read");
    assert_eq!(
        call("GET", &fhir("/Observation"), Some(&v1), None)
            .await
            .status,
        200
    );

    // --- the patient compartment ---------------------------------------------------------------
    let pt = client_token(
        &keys,
        &issuer,
        "carina-patient-app",
        "patient/*.rs patient/Observation.rs patient/*.cruds",
    );
    assert_eq!(
        call("GET", &fhir("/Patient/p1"), Some(&pt), None)
            .await
            .status,
        200
    );
    assert_eq!(
        call("GET", &fhir("/Patient/p2"), Some(&pt), None)
            .await
            .status,
        404
    );
    let mine = call("GET", &fhir("/Observation"), Some(&pt), None).await;
    assert_eq!(mine.status, 200);
    let subjects: Vec<&str> = mine.body["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["resource"]["subject"]["reference"].as_str())
        .collect();
    assert!(!subjects.is_empty());
    assert!(subjects.iter().all(|s| *s == "Patient/p1"), "{subjects:?}");
    // asking for the other patient explicitly, or with _include, finds nothing of theirs
    for q in [
        "?patient=Patient/p2",
        "?subject=Patient/p2",
        "?_include=Observation:subject",
        "?_id=x&patient=p2",
    ] {
        let a = call("GET", &fhir(&format!("/Observation{q}")), Some(&pt), None).await;
        assert_eq!(a.status, 200, "{q}");
        assert!(
            !a.body.to_string().contains("Patient/p2"),
            "{q}: {}",
            a.body
        );
        assert!(!a.body.to_string().contains("900"), "{q}: {}", a.body);
    }
    let a = call("GET", &fhir("/Patient"), Some(&pt), None).await;
    assert_eq!(a.body["total"], 1, "{}", a.body);
    let a = call("GET", &fhir("/Organization"), Some(&pt), None).await;
    assert_eq!(
        a.status, 403,
        "types without a patient link cannot be searched"
    );
    // writes stay in the compartment
    let a = call(
        "POST",
        &fhir("/Observation"),
        Some(&pt),
        Some(&observation("p2", 5.0)),
    )
    .await;
    assert_eq!(a.status, 403);
    let a = call(
        "POST",
        &fhir("/Observation"),
        Some(&pt),
        Some(&observation("p1", 5.0)),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": observation("p2", 3.0), "request": {"method": "POST", "url": "Observation"}}
    ]});
    assert_eq!(
        call("POST", &fhir(""), Some(&pt), Some(&tx)).await.status,
        403
    );
    let predict = json!({"resourceType": "Parameters", "parameter": [
        {"name": "subject", "valueReference": {"reference": "Patient/p2"}}]});
    let a = call(
        "POST",
        &fhir("/RiskAssessment/$predict"),
        Some(&pt),
        Some(&predict),
    )
    .await;
    assert_eq!(a.status, 403, "{}", a.body);
    // no DICOMweb or /v1 for patient tokens (they cannot be limited to a compartment)
    assert_eq!(
        call("GET", &c.url("/dicomweb/studies"), Some(&pt), None)
            .await
            .status,
        403
    );

    // --- the audit trail: who did what, with which outcome ----------------------------------
    assert_eq!(
        call("GET", &fhir("/AuditEvent"), Some(&pt), None)
            .await
            .status,
        403
    );
    assert_eq!(
        call("GET", &fhir("/AuditEvent"), Some(&writer), None)
            .await
            .status,
        403,
        "operator scope only"
    );
    let trail = call(
        "GET",
        &fhir("/AuditEvent?_count=1000"),
        Some(&operator),
        None,
    )
    .await;
    assert_eq!(trail.status, 200);
    let events: Vec<&Value> = trail.body["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["resource"])
        .collect();
    let by = |who: &str, f: &dyn Fn(&Value) -> bool| {
        events
            .iter()
            .any(|e| e["agent"][0]["who"]["identifier"]["value"] == who && f(e))
    };
    assert!(
        by("carina-patient-app", &|e| e["action"] == "R"
            && e["entity"].to_string().contains("Patient/p1")),
        "a patient-app read"
    );
    assert!(
        by("carina-patient-app", &|e| e["type"]["code"] == "110113"
            && e["outcome"] == "4"),
        "its refused requests"
    );
    assert!(
        by("carina-backend", &|e| e["action"] == "C"
            && e["entity"].to_string().contains("Observation/")),
        "a create, in its transaction"
    );
    assert!(
        by("anonymous", &|e| e["type"]["code"] == "110113"
            && e["outcomeDesc"] == "HTTP 401"),
        "requests without a token"
    );
    assert!(events
        .iter()
        .all(|e| e["agent"][0]["who"]["identifier"]["value"].is_string()));

    // --- every way a token can be wrong --------------------------------------------------------
    let now = chrono::Utc::now().timestamp();
    let good = json!({"iss": issuer.url, "aud": audience, "exp": now + 300, "iat": now,
                      "sub": "t", "scope": "system/*.rs"});
    let with = |k: &str, v: Value| {
        let mut c = good.clone();
        c[k] = v;
        c
    };
    let ok = mint(&keys, "issuer-a.json", &good, &[]);
    assert_eq!(
        call("GET", &fhir("/Patient"), Some(&ok), None).await.status,
        200
    );
    let cases: Vec<(&str, String)> = vec![
        (
            "expired",
            mint(&keys, "issuer-a.json", &with("exp", json!(now - 600)), &[]),
        ),
        (
            "not yet valid",
            mint(&keys, "issuer-a.json", &with("nbf", json!(now + 600)), &[]),
        ),
        (
            "wrong audience",
            mint(
                &keys,
                "issuer-a.json",
                &with("aud", json!("http://elsewhere/fhir")),
                &[],
            ),
        ),
        (
            "wrong issuer",
            mint(
                &keys,
                "issuer-a.json",
                &with("iss", json!("http://127.0.0.1:1")),
                &[],
            ),
        ),
        ("bad signature", mint(&keys, "rogue.json", &good, &[])),
        (
            "alg none",
            mint(&keys, "issuer-a.json", &good, &["--alg", "none"]),
        ),
        (
            "HS256 with the public key",
            mint(&keys, "issuer-a.json", &good, &["--alg", "HS256"]),
        ),
        ("unknown key", mint(&keys, "issuer-b.json", &good, &[])),
        ("garbage", "not.a.jwt".to_string()),
    ];
    for (what, t) in &cases {
        let a = call("GET", &fhir("/Patient"), Some(t), None).await;
        assert_eq!(a.status, 401, "{what}: {}", a.body);
        assert!(
            a.challenge.contains("error=\"invalid_token\""),
            "{what}: {}",
            a.challenge
        );
        assert_eq!(a.body["resourceType"], "OperationOutcome", "{what}");
    }

    // --- key rotation: the issuer restarts with key B; Carina fetches the JWKS again -------
    let port = issuer.port;
    drop(issuer);
    let rotated = start_issuer(&keys, &["issuer-b.json", "issuer-a.json"], port, &audience);
    let b = mint(&keys, "issuer-b.json", &good, &[]);
    // unknown kids trigger a refetch at most every few seconds
    let mut status = 0;
    for _ in 0..40 {
        status = call("GET", &fhir("/Patient"), Some(&b), None).await.status;
        if status == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    assert_eq!(status, 200, "a token signed with the new key is accepted");
    let fresh = client_token(&keys, &rotated, "carina-backend", "system/Patient.rs");
    assert_eq!(
        call("GET", &fhir("/Patient"), Some(&fresh), None)
            .await
            .status,
        200
    );
}
