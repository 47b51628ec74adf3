//! Heatmap → overlay: the map (over the model input grid) is sampled bilinearly at every pixel of
//! the original image through the letterbox geometry, colour-mapped (jet) and alpha-blended over
//! the image, then encoded as PNG. The upsample is separable (each map row is interpolated
//! across the image width once; an image row is then one lerp of two such rows), and colour and
//! blend are integer lookup tables, in one pass over the image with no full-size float buffer.

use image::{DynamicImage, ImageEncoder, RgbImage};

use crate::inference::gradcam::Cam;
use crate::inference::preprocess::{gray_of, Geometry};

/// Steps of the colour table (heat in [0, 1] is quantised to this many levels: finer than the
/// 8-bit colours it picks from).
const LEVELS: usize = 1024;

/// The map's rows interpolated across the image width, and where each image row samples them.
struct Upsampler {
    width: usize,
    /// `cam.h` rows of `width` values.
    rows: Vec<f32>,
    /// Per image row: the two map rows and the weight of the second.
    ys: Vec<(usize, usize, f32)>,
}

impl Upsampler {
    fn new(cam: &Cam, geo: &Geometry, width: u32, height: u32) -> Self {
        let (ch, cw) = (cam.h as f32, cam.w as f32);
        let sx = geo.content_w as f32 / width as f32;
        let sy = geo.content_h as f32 / height as f32;
        // pixel centre → model input coordinates → map coordinates (pixel-centre convention)
        let xs: Vec<(usize, usize, f32)> = (0..width)
            .map(|x| {
                let u = (geo.left as f32 + (x as f32 + 0.5) * sx) * cw / geo.input_w as f32 - 0.5;
                let (x0, fx) = split(u, cam.w);
                (x0, (x0 + 1).min(cam.w - 1), fx)
            })
            .collect();
        let mut rows = Vec::with_capacity(cam.h * width as usize);
        for r in cam.data.chunks_exact(cam.w) {
            rows.extend(
                xs.iter()
                    .map(|&(x0, x1, fx)| r[x0] * (1.0 - fx) + r[x1] * fx),
            );
        }
        let ys = (0..height)
            .map(|y| {
                let v = (geo.top as f32 + (y as f32 + 0.5) * sy) * ch / geo.input_h as f32 - 0.5;
                let (y0, fy) = split(v, cam.h);
                (y0, (y0 + 1).min(cam.h - 1), fy)
            })
            .collect();
        Self {
            width: width as usize,
            rows,
            ys,
        }
    }

    /// Heat of image row `y` into `out` (`width` values).
    fn row(&self, y: usize, out: &mut [f32]) {
        let (y0, y1, fy) = self.ys[y];
        let top = &self.rows[y0 * self.width..(y0 + 1) * self.width];
        let bottom = &self.rows[y1 * self.width..(y1 + 1) * self.width];
        for ((o, t), b) in out.iter_mut().zip(top).zip(bottom) {
            *o = t * (1.0 - fy) + b * fy;
        }
    }
}

/// Upsamples `cam` to the original image size (`width` x `height`), following `geo`.
pub fn upsample(cam: &Cam, geo: &Geometry, width: u32, height: u32) -> Vec<f32> {
    let up = Upsampler::new(cam, geo, width, height);
    let mut out = vec![0f32; width as usize * height as usize];
    for (y, row) in out.chunks_exact_mut(width.max(1) as usize).enumerate() {
        up.row(y, row);
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

/// Blend tables in 1/256 units: `heat[level]` is the jet colour times `alpha`, `gray[g]` the
/// gray value times `1 - alpha`; a pixel is `(heat + gray + 128) >> 8`.
struct BlendTables {
    heat: Vec<[u16; 3]>,
    gray: [u16; 256],
}

impl BlendTables {
    fn new(alpha: f32) -> Self {
        let a = alpha.clamp(0.0, 1.0);
        let heat = (0..LEVELS)
            .map(|i| {
                jet(i as f32 / (LEVELS - 1) as f32)
                    .map(|c| (f32::from(c) * a * 256.0).round() as u16)
            })
            .collect();
        let gray = std::array::from_fn(|g| (g as f32 * (1.0 - a) * 256.0).round() as u16);
        Self { heat, gray }
    }

    /// The table level of a heat value (clamped to [0, 1]).
    fn level(heat: f32) -> u16 {
        (heat.clamp(0.0, 1.0) * (LEVELS - 1) as f32 + 0.5) as u16
    }

    #[cfg(test)]
    fn pixel(&self, heat: f32, gray: u8) -> [u8; 3] {
        self.blend(Self::level(heat), gray)
    }

    fn blend(&self, level: u16, gray: u8) -> [u8; 3] {
        let g = self.gray[usize::from(gray)];
        let h = self.heat[usize::from(level).min(LEVELS - 1)];
        [
            ((h[0] + g + 128) >> 8) as u8,
            ((h[1] + g + 128) >> 8) as u8,
            ((h[2] + g + 128) >> 8) as u8,
        ]
    }
}

/// Blends the coloured heat over a gray rendering of `img` (`alpha` = heat weight): the
/// two-step reference that [`render`] must equal.
#[cfg(test)]
fn blend(img: &DynamicImage, heat: &[f32], alpha: f32) -> RgbImage {
    let gray = gray_of(img);
    let tables = BlendTables::new(alpha);
    let mut out = vec![0u8; gray.as_raw().len() * 3];
    for ((o, &g), &h) in out.chunks_exact_mut(3).zip(gray.as_raw()).zip(heat) {
        o.copy_from_slice(&tables.pixel(h, g));
    }
    RgbImage::from_raw(gray.width(), gray.height(), out).unwrap_or_default()
}

/// The overlay of `cam` on `img` in one pass: [`upsample`] and the colour-map blend (`alpha` =
/// heat weight) row by row, without a full-size heat buffer.
pub fn render(cam: &Cam, geo: &Geometry, img: &DynamicImage, alpha: f32) -> RgbImage {
    let gray = gray_of(img);
    let (w, h) = gray.dimensions();
    let up = Upsampler::new(cam, geo, w, h);
    let tables = BlendTables::new(alpha);
    let mut heat = vec![0f32; w as usize];
    let mut levels = vec![0u16; w as usize];
    let mut out = vec![0u8; gray.as_raw().len() * 3];
    let rows = out.chunks_exact_mut(w.max(1) as usize * 3);
    for ((y, o), g) in rows
        .enumerate()
        .zip(gray.as_raw().chunks_exact(w.max(1) as usize))
    {
        // two simple loops the compiler vectorises, then one of table lookups
        up.row(y, &mut heat);
        for (l, &h) in levels.iter_mut().zip(&heat) {
            *l = BlendTables::level(h);
        }
        for ((px, &g), &l) in o.chunks_exact_mut(3).zip(g).zip(&levels) {
            px.copy_from_slice(&tables.blend(l, g));
        }
    }
    RgbImage::from_raw(w, h, out).unwrap_or_default()
}

/// Encodes an image as PNG with fdeflate's fast mode and the `Up` filter (the best time for
/// size on overlays and X-rays, see BENCHMARKS.md): these are served right away.
///
/// # Errors
/// Only on encoder failure, which is not expected for in-memory buffers.
pub fn encode_png(img: &DynamicImage) -> Result<Vec<u8>, image::ImageError> {
    encode_png_with(img, image::codecs::png::FilterType::Up)
}

/// [`encode_png`] with another row filter (for the benchmarks that chose it).
///
/// # Errors
/// As [`encode_png`].
pub fn encode_png_with(
    img: &DynamicImage,
    filter: image::codecs::png::FilterType,
) -> Result<Vec<u8>, image::ImageError> {
    let mut out = Vec::with_capacity(img.as_bytes().len() / 2);
    let enc = image::codecs::png::PngEncoder::new_with_quality(
        &mut out,
        image::codecs::png::CompressionType::Fast,
        filter,
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

    fn cam_3x3() -> Cam {
        Cam {
            h: 3,
            w: 3,
            data: vec![0.0, 0.2, 0.9, 0.4, 1.0, 0.1, 0.3, 0.0, 0.6],
            method: CamMethod::GradCam,
            class: 0,
        }
    }

    #[test]
    fn blend_tables_match_the_float_formula() {
        // every heat level and gray value: within one 8-bit step of jet * a + g * (1 - a)
        let tables = BlendTables::new(0.45);
        for h in (0..=1000).map(|i| i as f32 / 1000.0) {
            for g in [0u8, 1, 77, 128, 200, 255] {
                let want = jet(h).map(|c| f32::from(c) * 0.45 + f32::from(g) * 0.55);
                let got = tables.pixel(h, g);
                for (w, o) in want.iter().zip(got) {
                    assert!(
                        (w - f32::from(o)).abs() <= 1.5,
                        "h {h} g {g}: {want:?} vs {got:?}"
                    );
                }
            }
        }
        assert_eq!(
            tables.pixel(-3.0, 0),
            tables.pixel(0.0, 0),
            "heat is clamped"
        );
    }

    #[test]
    fn render_is_upsample_then_blend_in_one_pass() {
        let geo = Geometry {
            input_w: 12,
            input_h: 12,
            left: 0,
            top: 2,
            content_w: 12,
            content_h: 8,
        };
        let img = DynamicImage::ImageLuma8(image::GrayImage::from_fn(30, 20, |x, y| {
            image::Luma([(x * 8 + y) as u8])
        }));
        let cam = cam_3x3();
        let heat = upsample(&cam, &geo, 30, 20);
        assert_eq!(render(&cam, &geo, &img, 0.45), blend(&img, &heat, 0.45));
        let png = encode_png(&DynamicImage::ImageRgb8(render(&cam, &geo, &img, 0.45))).unwrap();
        let back = image::load_from_memory(&png).unwrap().into_rgb8();
        assert_eq!(back, render(&cam, &geo, &img, 0.45), "PNG is lossless");
    }

    #[test]
    fn jet_runs_blue_to_red() {
        assert_eq!(jet(0.0), [0, 0, 128]);
        assert_eq!(jet(1.0), [128, 0, 0]);
        assert_eq!(jet(0.5)[1], 255);
    }
}
