//! Heatmap → overlay: the map (over the model input grid) is sampled bilinearly at every pixel of
//! the original image through the letterbox geometry, colour-mapped (jet) and alpha-blended over
//! the image, then encoded as PNG.

use image::{DynamicImage, ImageEncoder, RgbImage};

use crate::inference::gradcam::Cam;
use crate::inference::preprocess::{to_gray, Geometry};

/// Upsamples `cam` to the original image size (`width` x `height`), following `geo`.
pub fn upsample(cam: &Cam, geo: &Geometry, width: u32, height: u32) -> Vec<f32> {
    let (ch, cw) = (cam.h as f32, cam.w as f32);
    let sx = geo.content_w as f32 / width as f32;
    let sy = geo.content_h as f32 / height as f32;
    let mut out = Vec::with_capacity((width * height) as usize);
    for y in 0..height {
        // pixel centre → model input coordinates → map coordinates (pixel-centre convention)
        let v = (geo.top as f32 + (y as f32 + 0.5) * sy) * ch / geo.input_h as f32 - 0.5;
        let (y0, fy) = split(v, cam.h);
        for x in 0..width {
            let u = (geo.left as f32 + (x as f32 + 0.5) * sx) * cw / geo.input_w as f32 - 0.5;
            let (x0, fx) = split(u, cam.w);
            let x1 = (x0 + 1).min(cam.w - 1);
            let y1 = (y0 + 1).min(cam.h - 1);
            let p = |yy: usize, xx: usize| cam.data[yy * cam.w + xx];
            let top = p(y0, x0) * (1.0 - fx) + p(y0, x1) * fx;
            let bottom = p(y1, x0) * (1.0 - fx) + p(y1, x1) * fx;
            out.push(top * (1.0 - fy) + bottom * fy);
        }
    }
    out
}

fn split(v: f32, n: usize) -> (usize, f32) {
    let c = v.clamp(0.0, (n - 1) as f32);
    let i = c.floor() as usize;
    (i.min(n - 1), c - i as f32)
}

/// The jet colour map (value in [0, 1] → RGB).
pub fn jet(v: f32) -> [u8; 3] {
    let v = v.clamp(0.0, 1.0);
    let c = |x: f32| (255.0 * (1.5 - (4.0 * v - x).abs()).clamp(0.0, 1.0)).round() as u8;
    [c(3.0), c(2.0), c(1.0)]
}

/// Blends the coloured heat over a gray rendering of `img` (`alpha` = heat weight).
pub fn blend(img: &DynamicImage, heat: &[f32], alpha: f32) -> RgbImage {
    let gray = to_gray(img);
    RgbImage::from_fn(gray.width(), gray.height(), |x, y| {
        let g = f32::from(gray.get_pixel(x, y).0[0]);
        let h = heat[(y * gray.width() + x) as usize];
        let col = jet(h);
        image::Rgb(col.map(|c| (f32::from(c) * alpha + g * (1.0 - alpha)).round() as u8))
    })
}

/// Encodes an image as PNG (fast compression: these are served right away).
///
/// # Errors
/// Only on encoder failure, which is not expected for in-memory buffers.
pub fn encode_png(img: &DynamicImage) -> Result<Vec<u8>, image::ImageError> {
    let mut out = Vec::new();
    let enc = image::codecs::png::PngEncoder::new_with_quality(
        &mut out,
        image::codecs::png::CompressionType::Fast,
        image::codecs::png::FilterType::Adaptive,
    );
    enc.write_image(
        img.as_bytes(),
        img.width(),
        img.height(),
        img.color().into(),
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::gradcam::CamMethod;

    #[test]
    fn upsample_follows_letterbox_geometry() {
        // 2x2 map, hot only in the top-left cell; image content fills the top half of the input
        let cam = Cam {
            h: 2,
            w: 2,
            data: vec![1.0, 0.0, 0.0, 0.0],
            method: CamMethod::GradCam,
            class: 0,
        };
        let geo = Geometry {
            input_w: 4,
            input_h: 4,
            left: 0,
            top: 0,
            content_w: 4,
            content_h: 2,
        };
        let up = upsample(&cam, &geo, 4, 2);
        assert_eq!(up.len(), 8);
        assert!(up[0] > 0.99, "corner pixel maps to the hot cell");
        assert!(up[3] < 0.01, "right end maps to a cold cell");
        assert!(up[4] > up[7]);
    }

    #[test]
    fn jet_runs_blue_to_red() {
        assert_eq!(jet(0.0), [0, 0, 128]);
        assert_eq!(jet(1.0), [128, 0, 0]);
        assert_eq!(jet(0.5)[1], 255);
    }
}
