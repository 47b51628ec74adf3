//! Criterion benches of the CPU stages around inference, on a real X-ray from the fixtures:
//! preprocessing (letterbox + normalise), Grad-CAM (head forward + backward + map), and the
//! overlay (upsample + colour + blend + PNG encode). Models come from `CARINA_BENCH_MODELS`
//! (default `models`, the shipped ones). Run: `cargo bench --bench pipeline`.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion};
use image::DynamicImage;

use carina::inference::{ExecutionProvider, LoadOptions, Registry, SessionOptions};
use carina::render::overlay;

fn bench(c: &mut Criterion) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let models =
        std::env::var("CARINA_BENCH_MODELS").map_or_else(|_| root.join("models"), PathBuf::from);
    let opts = LoadOptions {
        session: SessionOptions {
            provider: ExecutionProvider::Cpu,
            intra_threads: 1,
            sessions: 1,
        },
        max_batch: 1,
        onnxruntime: None,
    };
    let reg = Registry::load(&models, &opts).expect("models load");
    let model = reg.image_model(None).expect("an image model").clone();
    let img = image::open(root.join("tests/fixtures/images/hannover_4d98e1de.jpg")).unwrap();
    let spec = model.manifest.input.clone().unwrap();
    let name = &model.manifest.name;

    c.bench_function(&format!("preprocess 512x438 -> {name}"), |b| {
        b.iter(|| carina::inference::preprocess::preprocess(&img, &spec))
    });
    let input = model.prepare(&img).unwrap();
    let out = model.infer_blocking(&input).unwrap();
    c.bench_function(&format!("{} {name}", model.cam_method().as_str()), |b| {
        b.iter(|| model.heatmap(&out, 0).unwrap())
    });
    let cam = model.heatmap(&out, 0).unwrap().unwrap();
    c.bench_function("overlay 512x438 (upsample, jet, blend, PNG)", |b| {
        b.iter(|| {
            let heat = overlay::upsample(&cam, &input.geometry, img.width(), img.height());
            let rgb = DynamicImage::ImageRgb8(overlay::blend(&img, &heat, 0.45));
            overlay::encode_png(&rgb).unwrap()
        })
    });
    c.bench_function(&format!("inference batch 1 {name}"), |b| {
        b.iter(|| model.infer_blocking(&input).unwrap())
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
