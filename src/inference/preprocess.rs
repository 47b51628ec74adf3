//! Image → model input tensor, following the manifest: colour conversion, letterbox or stretch
//! resize, `(v * scale - mean) / std`. Also returns the geometry that maps input coordinates
//! back to the original image, so a heatmap lands on the pixels it explains.

use image::{imageops, DynamicImage, GrayImage, ImageBuffer, Luma, Rgb, RgbImage};

use super::manifest::{Colour, ImageInput, Layout, Resize};

/// Where the resized image sits inside the model input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Geometry {
    /// Model input width.
    pub input_w: u32,
    /// Model input height.
    pub input_h: u32,
    /// Left padding.
    pub left: u32,
    /// Top padding.
    pub top: u32,
    /// Width of the image content inside the input.
    pub content_w: u32,
    /// Height of the image content inside the input.
    pub content_h: u32,
}

/// A model input of shape `[1, C, H, W]` or `[1, H, W, C]`.
#[derive(Debug, Clone)]
pub struct InputTensor {
    /// Shape including the batch of 1.
    pub shape: [usize; 4],
    /// Values in the layout's order.
    pub data: Vec<f32>,
    /// Placement of the content.
    pub geometry: Geometry,
}

/// Converts to 8-bit gray with ITU-R 601-2 luma (what PIL's `convert("L")`, used in training,
/// does).
pub fn to_gray(img: &DynamicImage) -> GrayImage {
    match img {
        DynamicImage::ImageLuma8(g) => g.clone(),
        other => {
            let rgb = other.to_rgb8();
            ImageBuffer::from_fn(rgb.width(), rgb.height(), |x, y| {
                let [r, g, b] = rgb.get_pixel(x, y).0;
                let l = (u32::from(r) * 299 + u32::from(g) * 587 + u32::from(b) * 114 + 500) / 1000;
                Luma([l as u8])
            })
        }
    }
}

/// Builds the model input for `img`.
pub fn preprocess(img: &DynamicImage, spec: &ImageInput) -> InputTensor {
    let (h, w) = spec.size();
    let channels = spec.channels();
    let (geometry, planes): (Geometry, Vec<Vec<u8>>) = match spec.colour {
        Colour::Grayscale => {
            let (g, geo) = fit(&to_gray(img), w, h, spec.resize, Luma([spec.pad_value]));
            (geo, vec![g.into_raw()])
        }
        Colour::Rgb => {
            let rgb: RgbImage = img.to_rgb8();
            let (fitted, geo) = fit(&rgb, w, h, spec.resize, Rgb([spec.pad_value; 3]));
            let raw = fitted.into_raw();
            let planes = (0..3)
                .map(|c| raw.iter().skip(c).step_by(3).copied().collect())
                .collect();
            (geo, planes)
        }
    };
    let n = &spec.normalise;
    let per = |v: &[f32], c: usize| if v.len() == 1 { v[0] } else { v[c] };
    let plane_len = (w * h) as usize;
    let mut data = vec![0f32; plane_len * channels];
    for (c, plane) in planes.iter().enumerate() {
        let (mean, std) = (per(&n.mean, c), per(&n.std, c));
        for (i, &v) in plane.iter().enumerate() {
            let x = (f32::from(v) * n.scale - mean) / std;
            match spec.layout {
                Layout::NCHW => data[c * plane_len + i] = x,
                Layout::NHWC => data[i * channels + c] = x,
            }
        }
    }
    let shape = match spec.layout {
        Layout::NCHW => [1, channels, h as usize, w as usize],
        Layout::NHWC => [1, h as usize, w as usize, channels],
    };
    InputTensor {
        shape,
        data,
        geometry,
    }
}

fn fit<P>(
    img: &ImageBuffer<P, Vec<u8>>,
    w: u32,
    h: u32,
    resize: Resize,
    pad: P,
) -> (ImageBuffer<P, Vec<u8>>, Geometry)
where
    P: image::Pixel<Subpixel = u8> + 'static,
{
    let (iw, ih) = img.dimensions();
    match resize {
        Resize::Stretch => {
            let out = imageops::resize(img, w, h, imageops::FilterType::Triangle);
            let geo = Geometry {
                input_w: w,
                input_h: h,
                left: 0,
                top: 0,
                content_w: w,
                content_h: h,
            };
            (out, geo)
        }
        Resize::Letterbox => {
            let s = (w as f64 / iw as f64).min(h as f64 / ih as f64);
            let nw = ((iw as f64 * s).round() as u32).clamp(1, w);
            let nh = ((ih as f64 * s).round() as u32).clamp(1, h);
            let resized = imageops::resize(img, nw, nh, imageops::FilterType::Triangle);
            let (left, top) = ((w - nw) / 2, (h - nh) / 2);
            let mut canvas = ImageBuffer::from_pixel(w, h, pad);
            imageops::replace(&mut canvas, &resized, i64::from(left), i64::from(top));
            let geo = Geometry {
                input_w: w,
                input_h: h,
                left,
                top,
                content_w: nw,
                content_h: nh,
            };
            (canvas, geo)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::manifest::Normalise;

    fn spec(resize: Resize, colour: Colour) -> ImageInput {
        let c = if colour == Colour::Grayscale { 1 } else { 3 };
        ImageInput {
            name: "input".into(),
            shape: vec![1, c, 8, 8],
            layout: Layout::NCHW,
            colour,
            resize,
            pad_value: 0,
            normalise: Normalise {
                scale: 1.0 / 255.0,
                mean: vec![0.5],
                std: vec![0.25],
            },
        }
    }

    #[test]
    fn letterbox_keeps_aspect_and_centres() {
        let img = DynamicImage::ImageLuma8(GrayImage::from_pixel(16, 8, Luma([255])));
        let t = preprocess(&img, &spec(Resize::Letterbox, Colour::Grayscale));
        assert_eq!(
            t.geometry,
            Geometry {
                input_w: 8,
                input_h: 8,
                left: 0,
                top: 2,
                content_w: 8,
                content_h: 4
            }
        );
        // padding rows are (0 - 0.5) / 0.25 = -2, content rows (1 - 0.5) / 0.25 = 2
        assert!((t.data[0] + 2.0).abs() < 1e-6);
        assert!((t.data[2 * 8] - 2.0).abs() < 1e-6);
        assert!((t.data[6 * 8] + 2.0).abs() < 1e-6);
    }

    #[test]
    fn stretch_fills_and_rgb_is_planar() {
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(3, 5, Rgb([255, 0, 51])));
        let t = preprocess(&img, &spec(Resize::Stretch, Colour::Rgb));
        assert_eq!(t.shape, [1, 3, 8, 8]);
        assert!((t.data[0] - 2.0).abs() < 1e-5);
        assert!((t.data[64] + 2.0).abs() < 1e-5);
        assert!((t.data[128] - (0.2 - 0.5) / 0.25).abs() < 1e-5);
    }

    #[test]
    fn gray_uses_601_luma() {
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(1, 1, Rgb([255, 0, 0])));
        assert_eq!(to_gray(&img).get_pixel(0, 0).0[0], 76);
    }
}
