//! The `carina` binary end to end: `predict` on real X-rays and DICOM writes the four files per
//! input, its FHIR output passes both external R4 validators, `models` lists models, and a
//! broken model package stops start-up with a message naming the file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use common::{fixtures, npy, root, validate_fhir as validate};

fn carina() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_carina"));
    c.current_dir(root()).env("RUST_LOG", "warn");
    c
}

#[test]
fn predict_writes_bundle_overlay_cam_and_input_for_each_file() {
    let out = tempfile::tempdir().unwrap();
    let bad = out.path().join("broken.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let output = carina()
        .args([
            "predict",
            "--models",
            "tests/fixtures/models",
            "--model",
            "tiny-mlp-head",
            "--out",
        ])
        .arg(out.path())
        .arg(fixtures().join("images/hannover_4d98e1de.jpg"))
        .arg(&bad)
        .arg(root().join("dicom-samples/derived_DX_normal_nih-cxr14.dcm"))
        .output()
        .unwrap();
    assert!(
        !output.status.success(),
        "a failed file makes the exit status non-zero"
    );
    let lines: Vec<Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "one JSON line per file, in order");
    assert!(lines[1]["error"].as_str().unwrap().contains("PNG"));
    for (line, stem) in [
        (&lines[0], "hannover_4d98e1de"),
        (&lines[2], "derived_DX_normal_nih-cxr14"),
    ] {
        assert_eq!(line["model"], "tiny-mlp-head 1.0.0");
        assert_eq!(line["cam_method"], "grad-cam");
        let probs = line["probabilities"].as_object().unwrap();
        assert_eq!(probs.len(), 3);
        let best = probs
            .iter()
            .max_by(|a, b| a.1.as_f64().partial_cmp(&b.1.as_f64()).unwrap())
            .unwrap()
            .0;
        assert_eq!(line["label"], best.as_str());
        let (shape, cam) = npy(out.path().join(format!("{stem}.cam.npy")));
        assert_eq!(shape, vec![8, 8]);
        assert!(cam.iter().all(|v| (0.0..=1.0).contains(v)) && cam.iter().any(|v| *v > 0.99));
        let (shape, _) = npy(out.path().join(format!("{stem}.input.npy")));
        assert_eq!(shape, vec![1, 1, 64, 64]);
        assert!(image::open(out.path().join(format!("{stem}.overlay.png"))).is_ok());
        validate(&[&out.path().join(format!("{stem}.bundle.json"))]);
    }
    // the exact input tensor matches the golden one made by the training-side preprocessing
    let (_, ours) = npy(out.path().join("hannover_4d98e1de.input.npy"));
    let (_, want) = npy(fixtures().join("models/tiny-mlp-head/golden/input_hannover_4d98e1de.npy"));
    let mean = ours
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .sum::<f32>()
        / want.len() as f32;
    assert!(mean < 0.02, "mean preprocessing difference {mean}");
}

#[test]
fn validators_reject_broken_resources() {
    for f in [
        "tests/fhir/bad/Observation-bad-status.json",
        "tests/fhir/bad/Bundle-missing-required.json",
    ] {
        let node = Command::new("node")
            .args(["tests/fhir/validate.mjs", f])
            .current_dir(root())
            .output()
            .unwrap();
        assert_eq!(
            node.status.code(),
            Some(1),
            "{f} must fail the schema validator"
        );
        let py = Command::new(root().join(".venv/bin/python"))
            .args(["tests/fhir/validate_fhir_resources.py", f])
            .current_dir(root())
            .output()
            .unwrap();
        assert_eq!(py.status.code(), Some(1), "{f} must fail fhir.resources");
    }
    let examples: Vec<_> = std::fs::read_dir(root().join("fhir-profiles/examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let refs: Vec<&Path> = examples.iter().map(|p| p.as_path()).collect();
    validate(&refs);
}

#[test]
fn models_lists_and_broken_packages_stop_start_up() {
    let out = carina()
        .args(["models", "--models", "tests/fixtures/models"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = v["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["tiny-gap", "tiny-maxpool", "tiny-mlp-head"]);
    assert_eq!(v["models"][0]["labels"][0]["code"], "840539006");

    let dir = tempfile::tempdir().unwrap();
    let pkg = dir.path().join("bad");
    std::fs::create_dir(&pkg).unwrap();
    let manifest = std::fs::read_to_string(fixtures().join("models/tiny-gap/model.toml")).unwrap();
    std::fs::write(
        pkg.join("model.toml"),
        manifest.replace("colour = \"grayscale\"", "colour = \"rgb\""),
    )
    .unwrap();
    let out = carina()
        .args(["models", "--models"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad/model.toml") && err.contains("channel"),
        "{err}"
    );

    std::fs::write(pkg.join("model.toml"), &manifest).unwrap();
    std::fs::write(pkg.join("model.onnx"), b"garbage").unwrap();
    let out = carina()
        .args(["models", "--models"])
        .arg(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("bad/model.onnx"),
        "{err}"
    );
}
