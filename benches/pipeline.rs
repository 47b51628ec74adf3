//! Criterion benches of the CPU stages around inference, on a real X-ray from the fixtures
//! (512x438 JPEG) and a synthetic 1024x1024 PNG: decode, preprocessing (resize + normalise),
//! Grad-CAM (head forward + backward + map), the overlay (upsample + colour + blend) and its
//! PNG encoding with each row filter (time and size). Models come from `CARINA_BENCH_MODELS`
//! (default `models`, the shipped ones). Run: `cargo bench --bench pipeline`.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion};
use image::DynamicImage;

use carina::inference::{Batching, ExecutionProvider, LoadOptions, Registry, SessionOptions};
use carina::render::overlay;
use image::codecs::png::FilterType;

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
        batching: Batching::immediate(1),
        onnxruntime: None,
        outbound: Default::default(),
    };
    let reg = Registry::load(&models, &opts).expect("models load");
    let model = reg.image_model(None).expect("an image model").clone();
    let jpeg = std::fs::read(root.join("tests/fixtures/images/hannover_4d98e1de.jpg")).unwrap();
    let img = image::load_from_memory(&jpeg).unwrap();
    let big = DynamicImage::ImageLuma8(synthetic_xray(1024));
    let big_png = overlay::encode_png(&big).unwrap();
    let spec = model.manifest.input.clone().unwrap();
    let name = &model.manifest.name;

    c.bench_function("decode JPEG 512x438", |b| {
        b.iter(|| image::load_from_memory(&jpeg).unwrap())
    });
    c.bench_function("decode PNG 1024x1024", |b| {
        b.iter(|| image::load_from_memory(&big_png).unwrap())
    });
    for (label, image) in [("512x438", &img), ("1024x1024", &big)] {
        c.bench_function(&format!("preprocess {label} -> {name}"), |b| {
            b.iter(|| carina::inference::preprocess::preprocess(image, &spec).unwrap())
        });
    }
    let input = model.prepare(&img).unwrap();
    let out = model.infer_blocking(&input).unwrap();
    c.bench_function(&format!("{} {name}", model.cam_method().as_str()), |b| {
        b.iter(|| model.heatmap(&out, 0).unwrap())
    });
    let cam = model.heatmap(&out, 0).unwrap().unwrap();
    for (label, image) in [("512x438", &img), ("1024x1024", &big)] {
        let geo = model.prepare(image).unwrap().geometry;
        c.bench_function(
            &format!("overlay render {label} (upsample, jet, blend)"),
            |b| b.iter(|| overlay::render(&cam, &geo, image, 0.45)),
        );
        let rgb = DynamicImage::ImageRgb8(overlay::render(&cam, &geo, image, 0.45));
        for filter in [
            FilterType::Up,
            FilterType::Sub,
            FilterType::Adaptive,
            FilterType::NoFilter,
        ] {
            let size = overlay::encode_png_with(&rgb, filter).unwrap().len();
            c.bench_function(
                &format!("overlay PNG {label} {filter:?} ({size} bytes)"),
                |b| b.iter(|| overlay::encode_png_with(&rgb, filter).unwrap()),
            );
        }
    }
    c.bench_function(&format!("inference batch 1 {name}"), |b| {
        b.iter(|| model.infer_blocking(&input).unwrap())
    });
}

/// A 1024x1024 gray image with X-ray-like content (smooth anatomy plus noise), like
/// `../shared/bench/make_images.py` makes.
fn synthetic_xray(n: u32) -> image::GrayImage {
    let mut seed = 0x2545_f491_u32;
    image::GrayImage::from_fn(n, n, |x, y| {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        let (u, v) = (x as f32 / n as f32 - 0.5, y as f32 / n as f32 - 0.5);
        let lungs = (1.0 - ((u.abs() - 0.2).powi(2) * 18.0 + v.powi(2) * 6.0)).clamp(0.0, 1.0);
        let ribs = ((v * 40.0).sin() * 0.5 + 0.5) * 0.15;
        let noise = (seed % 17) as f32 / 17.0 * 0.06;
        image::Luma([((0.25 + 0.5 * (1.0 - lungs) + ribs + noise).min(1.0) * 255.0) as u8])
    })
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
