//! Image → model input tensor, following the manifest: colour conversion, letterbox or stretch
//! resize (SIMD, `fast_image_resize`), `(v * scale - mean) / std` through lookup tables. Also
//! returns the geometry that maps input coordinates back to the original image, so a heatmap
//! lands on the pixels it explains. A gray X-ray is resized once even for an RGB model.

use std::borrow::Cow;
use std::cell::RefCell;

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, GrayImage, RgbImage};

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
    gray_of(img).into_owned()
}

/// The 8-bit gray rendering of `img`, borrowed when it already is 8-bit gray (X-rays mostly
/// are: no full-size copy then).
pub fn gray_of(img: &DynamicImage) -> Cow<'_, GrayImage> {
    match img {
        DynamicImage::ImageLuma8(g) => Cow::Borrowed(g),
        DynamicImage::ImageRgb8(rgb) => Cow::Owned(luma_of_rgb(rgb)),
        other => Cow::Owned(luma_of_rgb(&other.to_rgb8())),
    }
}

fn luma_of_rgb(rgb: &RgbImage) -> GrayImage {
    let luma = rgb
        .as_raw()
        .chunks_exact(3)
        .map(|p| {
            let [r, g, b] = [p[0], p[1], p[2]].map(u32::from);
            ((r * 299 + g * 587 + b * 114 + 500) / 1000) as u8
        })
        .collect();
    GrayImage::from_raw(rgb.width(), rgb.height(), luma).unwrap_or_default()
}

/// 8-bit pixels the resizer reads: 1 (gray) or 3 (RGB) interleaved channels.
struct Pixels<'a> {
    data: Cow<'a, [u8]>,
    width: u32,
    height: u32,
    channels: usize,
}

/// The pixels the model input is made from: gray stays one channel even for an RGB model
/// (it is resized once and copied to the three planes), colour stays RGB.
fn source_pixels(img: &DynamicImage, colour: Colour) -> Pixels<'_> {
    let (width, height) = (img.width(), img.height());
    let gray_source = matches!(
        img,
        DynamicImage::ImageLuma8(_) | DynamicImage::ImageLuma16(_) | DynamicImage::ImageLumaA8(_)
    );
    if colour == Colour::Grayscale || gray_source {
        let data = match gray_of(img) {
            Cow::Borrowed(g) => Cow::Borrowed(g.as_raw().as_slice()),
            Cow::Owned(g) => Cow::Owned(g.into_raw()),
        };
        return Pixels {
            data,
            width,
            height,
            channels: 1,
        };
    }
    let data = match img {
        DynamicImage::ImageRgb8(rgb) => Cow::Borrowed(rgb.as_raw().as_slice()),
        other => Cow::Owned(other.to_rgb8().into_raw()),
    };
    Pixels {
        data,
        width,
        height,
        channels: 3,
    }
}

thread_local! {
    /// One resizer per thread: it keeps its scratch buffers between calls.
    static RESIZER: RefCell<Resizer> = RefCell::new(Resizer::new());
}

/// Resizes `src` to `w` x `h` with the SIMD convolution resizer, bilinear filter (antialiased
/// when shrinking, like PIL's `BILINEAR` and `image`'s `Triangle`).
fn resize(src: &Pixels<'_>, w: u32, h: u32) -> Result<Vec<u8>, PreprocessError> {
    let pixel_type = if src.channels == 3 {
        PixelType::U8x3
    } else {
        PixelType::U8
    };
    let fail = |message: String| PreprocessError {
        from: (src.width, src.height),
        to: (w, h),
        message,
    };
    let from = ImageRef::new(src.width, src.height, &src.data, pixel_type)
        .map_err(|e| fail(e.to_string()))?;
    let mut to = Image::new(w, h, pixel_type);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    RESIZER
        .with(|r| r.borrow_mut().resize(&from, &mut to, &options))
        .map_err(|e| fail(e.to_string()))?;
    Ok(to.into_vec())
}

/// The resizer refused the image (it never is given a zero-sized one by the decoders).
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot resize {}x{} to {}x{}: {message}", from.0, from.1, to.0, to.1)]
pub struct PreprocessError {
    /// Source width and height.
    pub from: (u32, u32),
    /// Target width and height.
    pub to: (u32, u32),
    /// The resizer's message.
    pub message: String,
}

/// Where the content goes in the input: all of it (stretch) or centred at the aspect ratio
/// (letterbox).
fn placement(iw: u32, ih: u32, w: u32, h: u32, resize: Resize) -> Geometry {
    let (content_w, content_h) = match resize {
        Resize::Stretch => (w, h),
        Resize::Letterbox => {
            let s = (f64::from(w) / f64::from(iw)).min(f64::from(h) / f64::from(ih));
            let nw = ((f64::from(iw) * s).round() as u32).clamp(1, w);
            let nh = ((f64::from(ih) * s).round() as u32).clamp(1, h);
            (nw, nh)
        }
    };
    Geometry {
        input_w: w,
        input_h: h,
        left: (w - content_w) / 2,
        top: (h - content_h) / 2,
        content_w,
        content_h,
    }
}

/// Builds the model input for `img`: one resize of the 8-bit pixels, then every value through
/// a 256-entry table per channel (`(v * scale - mean) / std`), padding included.
pub fn preprocess(img: &DynamicImage, spec: &ImageInput) -> Result<InputTensor, PreprocessError> {
    let (h, w) = spec.size();
    let channels = spec.channels();
    let src = source_pixels(img, spec.colour);
    let geometry = placement(src.width.max(1), src.height.max(1), w, h, spec.resize);
    let content = resize(&src, geometry.content_w, geometry.content_h)?;
    let n = &spec.normalise;
    let per = |v: &[f32], c: usize| v.get(c).or(v.first()).copied().unwrap_or(0.0);
    let tables: Vec<[f32; 256]> = (0..channels)
        .map(|c| {
            let (mean, std) = (per(&n.mean, c), per(&n.std, c));
            std::array::from_fn(|v| (v as f32 * n.scale - mean) / std)
        })
        .collect();
    let plane_len = (w * h) as usize;
    let mut data = vec![0f32; plane_len * channels];
    let pad = usize::from(spec.pad_value);
    for (c, table) in tables.iter().enumerate() {
        let value_at = |y: u32, x: u32| -> f32 {
            let (cx, cy) = (x.wrapping_sub(geometry.left), y.wrapping_sub(geometry.top));
            if cx >= geometry.content_w || cy >= geometry.content_h {
                return table[pad];
            }
            let i = (cy * geometry.content_w + cx) as usize * src.channels;
            table[usize::from(content[i + c.min(src.channels - 1)])]
        };
        match spec.layout {
            Layout::NCHW => {
                let plane = &mut data[c * plane_len..(c + 1) * plane_len];
                for (i, v) in plane.iter_mut().enumerate() {
                    *v = value_at(i as u32 / w, i as u32 % w);
                }
            }
            Layout::NHWC => {
                for i in 0..plane_len {
                    data[i * channels + c] = value_at(i as u32 / w, i as u32 % w);
                }
            }
        }
    }
    let shape = match spec.layout {
        Layout::NCHW => [1, channels, h as usize, w as usize],
        Layout::NHWC => [1, h as usize, w as usize, channels],
    };
    Ok(InputTensor {
        shape,
        data,
        geometry,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::manifest::Normalise;
    use image::{Luma, Rgb};

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
        let t = preprocess(&img, &spec(Resize::Letterbox, Colour::Grayscale)).unwrap();
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
        let t = preprocess(&img, &spec(Resize::Stretch, Colour::Rgb)).unwrap();
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
