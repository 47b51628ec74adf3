//! Golden tests: Carina's Grad-CAM on the fixture models must equal pytorch-grad-cam's maps
//! (normalised, before upsampling) within 1e-3; its preprocessing must match training's.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use carina::inference::gradcam::CamMethod;
use carina::inference::preprocess::{preprocess, Geometry, InputTensor};
use common::{fixtures, max_abs_diff, npy, registry};

const IMAGES: [&str; 2] = ["hannover_4d98e1de", "kermany_person1699_bacteria_4498"];

fn golden_input(model: &str, img: &str) -> InputTensor {
    let (shape, data) = npy(fixtures().join(format!("models/{model}/golden/input_{img}.npy")));
    let geometry = Geometry {
        input_w: 64,
        input_h: 64,
        left: 0,
        top: 0,
        content_w: 64,
        content_h: 64,
    };
    InputTensor {
        shape: [shape[0], shape[1], shape[2], shape[3]],
        data,
        geometry,
    }
}

fn check_model(name: &str) {
    let reg = registry();
    let model = reg.image_model(Some(name)).expect("model loaded");
    assert_eq!(
        model.cam_method(),
        CamMethod::GradCam,
        "{name} should get exact Grad-CAM"
    );
    assert_eq!(model.cam_target(), Some("features"));
    for img in IMAGES {
        let input = golden_input(name, img);
        let out = model.infer_blocking(&input).unwrap();
        let (_, logits) = npy(fixtures().join(format!("models/{name}/golden/logits_{img}.npy")));
        assert!(
            max_abs_diff(&out["logits"].data, &logits) < 1e-4,
            "{name}/{img}: logits differ"
        );
        for class in 0..3 {
            let cam = model.heatmap(&out, class).unwrap().expect("a map");
            assert_eq!(cam.method, CamMethod::GradCam);
            let (shape, want) =
                npy(fixtures().join(format!("models/{name}/golden/cam_{img}_class{class}.npy")));
            assert_eq!(vec![cam.h, cam.w], shape);
            let diff = max_abs_diff(&cam.data, &want);
            assert!(
                diff < 1e-3,
                "{name}/{img}/class {class}: max |carina - pytorch-grad-cam| = {diff}"
            );
        }
    }
}

#[test]
fn gap_head_matches_pytorch_grad_cam() {
    check_model("tiny-gap");
}

#[test]
fn mlp_head_with_relu_and_batchnorm_matches_pytorch_grad_cam_and_target_is_auto_detected() {
    check_model("tiny-mlp-head");
}

#[test]
fn unsupported_head_falls_back_to_recipro_cam() {
    let reg = registry();
    let model = reg.image_model(Some("tiny-maxpool")).unwrap();
    assert_eq!(model.cam_method(), CamMethod::ReciproCam);
    let img = image::open(fixtures().join("images/hannover_4d98e1de.jpg")).unwrap();
    let input = model.prepare(&img).unwrap();
    let out = model.infer_blocking(&input).unwrap();
    let p = model.interpret(input, &out).unwrap();
    let cam = p.cam.expect("fallback map");
    assert_eq!(cam.method, CamMethod::ReciproCam);
    assert_eq!((cam.h, cam.w), (8, 8));
    let (lo, hi) = cam
        .data
        .iter()
        .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
    assert!(
        (0.0..1e-3).contains(&lo) && hi > 0.99,
        "normalised map, got [{lo}, {hi}]"
    );
}

#[test]
fn preprocessing_matches_the_training_pipeline() {
    let reg = registry();
    let model = reg.image_model(Some("tiny-gap")).unwrap();
    for img in IMAGES {
        let file = image::open(fixtures().join(format!("images/{img}.jpg"))).unwrap();
        let ours = preprocess(&file, model.manifest.input.as_ref().unwrap()).unwrap();
        let (shape, want) = npy(fixtures().join(format!("models/tiny-gap/golden/input_{img}.npy")));
        assert_eq!(ours.shape.to_vec(), shape);
        let diff = max_abs_diff(&ours.data, &want);
        let mean = ours
            .data
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .sum::<f32>()
            / want.len() as f32;
        // one grey level is 1/255/0.25 = 0.0157 after normalisation; resamplers may differ by a few
        eprintln!("{img}: max diff {diff}, mean diff {mean}");
        assert!(mean < 0.02, "{img}: mean diff {mean}");
        assert!(diff < 0.25, "{img}: max diff {diff}");
    }
}

#[test]
fn shipped_cxr_model_matches_pytorch_grad_cam() {
    let reg =
        carina::inference::Registry::load(&common::root().join("models"), &common::load_options())
            .expect("shipped models load");
    assert!(reg
        .tabular
        .iter()
        .any(|t| t.manifest.name == "icu-mortality-risk"));
    let model = reg
        .image_model(Some("cxr-resnet-small"))
        .expect("shipped X-ray model");
    assert_eq!(model.cam_method(), CamMethod::GradCam);
    let golden = fixtures().join("models/cxr-golden/golden");
    for img in IMAGES {
        let (shape, data) = npy(golden.join(format!("input_{img}.npy")));
        let geometry = Geometry {
            input_w: 224,
            input_h: 224,
            left: 0,
            top: 0,
            content_w: 224,
            content_h: 224,
        };
        let input = InputTensor {
            shape: [shape[0], shape[1], shape[2], shape[3]],
            data,
            geometry,
        };
        let out = model.infer_blocking(&input).unwrap();
        let (_, probs) = npy(golden.join(format!("probs_{img}.npy")));
        assert!(
            max_abs_diff(&out["probs"].data, &probs) < 1e-4,
            "{img}: the shipped model is the one the refs were made from"
        );
        for class in 0..3 {
            let cam = model.heatmap(&out, class).unwrap().unwrap();
            let (_, want) = npy(golden.join(format!("cam_{img}_class{class}.npy")));
            let diff = max_abs_diff(&cam.data, &want);
            assert!(
                diff < 1e-3,
                "cxr-resnet-small/{img}/class {class}: max diff {diff}"
            );
        }
    }
}

/// Loads the tiny-gap fixture model with its own engine and batching settings.
fn tiny_gap_with(batching: carina::inference::Batching) -> carina::inference::ImageModel {
    use carina::inference::{runtime, ImageModel, Manifest};
    let dir = fixtures().join("models/tiny-gap");
    let manifest = Manifest::load(&dir.join("model.toml")).unwrap();
    let env = runtime::environment(None).unwrap();
    let opts = carina::inference::LoadOptions {
        batching,
        ..common::load_options()
    };
    ImageModel::load(&dir, manifest, env, &opts).unwrap()
}

#[test]
fn dynamic_batching_closes_at_max_batch_and_answers_each_request_with_its_own_outputs() {
    use carina::inference::{BatchStats, Batching};
    use std::time::Duration;
    // A batch stays open long enough for four concurrent callers, then closes at max_batch
    // (the test would take 60 s if it waited for max_wait instead).
    let batched = tiny_gap_with(Batching {
        max_batch: 4,
        max_wait: Duration::from_secs(60),
    });
    let single = tiny_gap_with(Batching::immediate(4));
    let inputs: Vec<InputTensor> = (0..4)
        .map(|i| {
            let mut t = golden_input("tiny-gap", IMAGES[i % 2]);
            t.data.iter_mut().for_each(|v| *v *= 1.0 + i as f32 / 4.0);
            t
        })
        .collect();
    let before = batched.batch_stats();
    let outputs: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = inputs
            .iter()
            .map(|input| s.spawn(|| batched.infer_blocking(input).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let after = batched.batch_stats();
    assert_eq!(
        (
            after.batches - before.batches,
            after.samples - before.samples
        ),
        (1, 4),
        "four concurrent requests should run as one batch"
    );
    // Each caller gets its own slice: the same as running its input alone.
    let single_before = single.batch_stats();
    for (input, got) in inputs.iter().zip(&outputs) {
        let alone = single.infer_blocking(input).unwrap();
        assert_eq!(got["logits"].shape, alone["logits"].shape);
        assert!(max_abs_diff(&got["logits"].data, &alone["logits"].data) < 1e-5);
        assert!(max_abs_diff(&got["features"].data, &alone["features"].data) < 1e-5);
    }
    let single_after = single.batch_stats();
    assert_eq!(
        single_after,
        BatchStats {
            batches: single_before.batches + 4,
            samples: single_before.samples + 4,
        },
        "with max_wait 0, requests made one after another each run alone"
    );
}
