//! `[backend] kind = "kserve-v2"` against a real Open Inference Protocol server: MLServer 1.7
//! (`.deps/mlserver-venv`, made by `scripts/setup.sh --test`) serving the ONNX file that
//! `carina export-serving` writes, with onnxruntime (`tests/kserve/ort_runtime.py`). Exact
//! Grad-CAM from the remote feature map, over REST and over gRPC, equals the local backend's; a late answer times out;
//! a pool that is down gives 503 and opens the breaker; the pool coming back closes it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use carina::inference::engine::EngineError;
use carina::inference::gradcam::CamMethod;
use carina::inference::Registry;
use common::server::{free_port, request, start_models};
use common::{fixtures, max_abs_diff, root};

/// An MLServer process, killed on drop.
struct MlServer(Child);

impl Drop for MlServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts MLServer on the model repository `repo` (HTTP on `port`, gRPC on `grpc`) and waits
/// until both models are ready.
fn mlserver(repo: &Path, port: u16, grpc: u16) -> MlServer {
    let bin = root().join(".deps/mlserver-venv/bin/mlserver");
    assert!(
        bin.is_file(),
        "{} is missing: run scripts/setup.sh --test",
        bin.display()
    );
    let settings = serde_json::json!({
        "host": "127.0.0.1", "http_port": port, "grpc_port": grpc,
        "metrics_port": free_port(), "parallel_workers": 0,
    });
    std::fs::write(repo.join("settings.json"), settings.to_string()).unwrap();
    let log = std::fs::File::create(repo.join("mlserver.log")).unwrap();
    let child = Command::new(bin)
        .arg("start")
        .arg(repo)
        .current_dir(repo)
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    let mut server = MlServer(child);
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    for model in ["tiny-gap", "tiny-gap-slow"] {
        let ready = format!("/v2/models/{model}/ready");
        while request(addr, "GET", &ready, &[], &[]).map(|a| a.0) != Some(200) {
            assert!(
                server.0.try_wait().unwrap().is_none(),
                "mlserver exited: {}",
                std::fs::read_to_string(repo.join("mlserver.log")).unwrap_or_default()
            );
            assert!(Instant::now() < deadline, "mlserver not ready in 90 s");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    server
}

/// MLServer's model repository: the serving graph of the tiny-gap fixture, twice (one answers
/// 3 s late).
fn repository(dir: &Path) -> PathBuf {
    let repo = dir.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::copy(
        root().join("tests/kserve/ort_runtime.py"),
        repo.join("ort_runtime.py"),
    )
    .unwrap();
    for (name, delay) in [("tiny-gap", 0), ("tiny-gap-slow", 3000)] {
        let m = repo.join(name);
        std::fs::create_dir_all(&m).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_carina"))
            .arg("export-serving")
            .arg(fixtures().join("models/tiny-gap"))
            .arg("--out")
            .arg(m.join("model.onnx"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let told: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let outputs = told["outputs"].as_array().unwrap();
        for t in ["probs", "logits", "features"] {
            assert!(outputs.contains(&t.into()), "{t} not exported: {told}");
        }
        let settings = serde_json::json!({
            "name": name, "implementation": "ort_runtime.OnnxRuntimeModel",
            "parameters": {"uri": "./model.onnx", "extra": {"delay_ms": delay}},
        });
        std::fs::write(m.join("model-settings.json"), settings.to_string()).unwrap();
    }
    repo
}

/// Carina's packages: the tiny-gap fixture as `remote-gap` (REST, served by `tiny-gap`),
/// `remote-grpc` (gRPC, the same) and `remote-slow` (REST, served by `tiny-gap-slow`, 500 ms
/// deadline, no retry).
fn packages(dir: &Path, port: u16, grpc: u16) -> PathBuf {
    let models = dir.join("models");
    let src = fixtures().join("models/tiny-gap");
    let manifest = std::fs::read_to_string(src.join("model.toml")).unwrap();
    let rest = format!("url = \"http://127.0.0.1:{port}\"\n");
    let grpc = format!("url = \"http://127.0.0.1:{grpc}\"\nprotocol = \"grpc\"\n");
    for (name, served, extra) in [
        (
            "remote-gap",
            "tiny-gap",
            format!("{rest}retries = 1\nbreaker_failures = 2\nbreaker_open_secs = 1\n"),
        ),
        ("remote-grpc", "tiny-gap", grpc),
        (
            "remote-slow",
            "tiny-gap-slow",
            format!("{rest}timeout_ms = 500\nretries = 0\n"),
        ),
    ] {
        let pkg = models.join(name);
        std::fs::create_dir_all(&pkg).unwrap();
        std::fs::copy(src.join("model.onnx"), pkg.join("model.onnx")).unwrap();
        let text = manifest.replacen("name = \"tiny-gap\"", &format!("name = \"{name}\""), 1)
            + &format!("\n[backend]\nkind = \"kserve-v2\"\nmodel = \"{served}\"\n{extra}");
        std::fs::write(pkg.join("model.toml"), text).unwrap();
    }
    models
}

#[test]
fn kserve_v2_backend_gives_the_local_maps_times_out_and_fails_clearly_while_the_pool_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repository(dir.path());
    let (port, grpc_port) = (free_port(), free_port());
    let pool = mlserver(&repo, port, grpc_port);
    let models = packages(dir.path(), port, grpc_port);

    // Same input, local ONNX Runtime and the pool over REST and over gRPC: same probabilities,
    // same exact Grad-CAM.
    let reg = Registry::load(&models, &common::load_options()).unwrap();
    let local_reg = common::registry();
    let local = local_reg.image_model(Some("tiny-gap")).unwrap();
    for name in ["remote-gap", "remote-grpc"] {
        let remote = reg.image_model(Some(name)).unwrap();
        assert_eq!(remote.provider, "kserve-v2");
        assert_eq!(remote.cam_method(), CamMethod::GradCam);
        for img in [
            "hannover_4d98e1de.jpg",
            "kermany_person1699_bacteria_4498.jpg",
        ] {
            let image = image::open(fixtures().join("images").join(img)).unwrap();
            let input = local.prepare(&image).unwrap();
            let (here, there) = (
                local.infer_blocking(&input).unwrap(),
                remote.infer_blocking(&input).unwrap(),
            );
            let (p_here, class) = local.classify(&here).unwrap();
            let (p_there, class_there) = remote.classify(&there).unwrap();
            assert_eq!(class, class_there, "{name} {img}");
            assert!(
                max_abs_diff(&p_here, &p_there) < 1e-5,
                "{name} {img}: probabilities"
            );
            for c in 0..3 {
                let a = local.heatmap(&here, c).unwrap().expect("local map");
                let b = remote.heatmap(&there, c).unwrap().expect("remote map");
                assert_eq!(b.method, CamMethod::GradCam);
                assert_eq!((a.h, a.w), (b.h, b.w));
                let d = max_abs_diff(&a.data, &b.data);
                assert!(d < 1e-4, "{name} {img} class {c}: maps differ by {d}");
            }
        }
        assert_eq!(
            remote.batch_stats().samples,
            2,
            "{name}: one call per image"
        );
    }
    let remote = reg.image_model(Some("remote-gap")).unwrap();

    // A late answer: the 500 ms deadline, no retry, a clear error.
    let slow = reg.image_model(Some("remote-slow")).unwrap();
    let image = image::open(fixtures().join("images/hannover_4d98e1de.jpg")).unwrap();
    let input = slow.prepare(&image).unwrap();
    let started = Instant::now();
    match slow.infer_blocking(&input) {
        Err(EngineError::Unavailable(why)) => assert!(why.contains("within 500 ms"), "{why}"),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "it waited for the late answer"
    );

    // The whole service: an analysis through the pool, then 503 while the pool is down.
    let data = dir.path().join("data");
    let server = start_models(&data, &models, &[], None);
    let jpeg = std::fs::read(fixtures().join("images/hannover_4d98e1de.jpg")).unwrap();
    let post = || {
        let a = request(
            server.http,
            "POST",
            "/v1/analyze?model=remote-gap",
            &[("Content-Type", "image/jpeg")],
            &jpeg,
        )
        .expect("an answer");
        (
            a.0,
            serde_json::from_slice::<serde_json::Value>(&a.2).unwrap(),
        )
    };
    let analyze = |expect: u16| {
        let (status, body) = post();
        assert_eq!(status, expect, "{body}");
        body
    };
    let bundle = analyze(200);
    assert!(bundle.to_string().contains("\"DiagnosticReport\""));
    drop(pool);
    let outcome = analyze(503);
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert_eq!(outcome["issue"][0]["code"], "transient");
    assert!(
        !outcome.to_string().contains(&port.to_string()),
        "the pool's address stays in the log"
    );
    analyze(503);
    // In this process too: two failed calls in a row (each retried once) open the breaker,
    // and the next call fails fast without trying.
    for _ in 0..2 {
        match remote.infer_blocking(&input) {
            Err(EngineError::Unavailable(why)) => {
                assert!(why.contains("after 2 attempts"), "{why}")
            }
            other => panic!("expected the pool to be unavailable, got {other:?}"),
        }
    }
    match remote.infer_blocking(&input) {
        Err(EngineError::Unavailable(why)) => assert!(why.contains("failing fast"), "{why}"),
        other => panic!("expected the breaker to be open, got {other:?}"),
    }
    let over_grpc = reg.image_model(Some("remote-grpc")).unwrap();
    match over_grpc.infer_blocking(&input) {
        Err(EngineError::Unavailable(why)) => assert!(why.contains("gRPC"), "{why}"),
        other => panic!("expected the gRPC pool to be unavailable, got {other:?}"),
    }

    // The pool comes back: after the breaker's open second, a trial call closes it.
    let _pool = mlserver(&repo, port, grpc_port);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = post();
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            Instant::now() < deadline,
            "still unavailable 30 s after the pool came back"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}
