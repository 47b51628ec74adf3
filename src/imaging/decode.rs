//! Bytes + media type → [`DecodedImage`]. DICOM pixel data goes through dicom-pixeldata with the
//! Modality LUT / rescale, the first VOI LUT or window, and MONOCHROME1 inversion applied, then
//! is narrowed to 8 bits: the same 8-bit picture a viewer shows is what the model sees.

use std::io::Cursor;

use dicom_dictionary_std::tags;
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, OpenFileOptions};
use dicom_pixeldata::{ConvertOptions, PixelDecoder};
use image::{DynamicImage, GrayImage, ImageFormat, RgbImage};

/// Media types Carina decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaType {
    /// `image/png`
    Png,
    /// `image/jpeg`
    Jpeg,
    /// `application/dicom` (Part 10 file)
    Dicom,
}

impl MediaType {
    /// Parses a `Content-Type` value (parameters ignored).
    pub fn from_content_type(value: &str) -> Option<Self> {
        let essence = value
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match essence.as_str() {
            "image/png" => Some(Self::Png),
            "image/jpeg" | "image/jpg" => Some(Self::Jpeg),
            "application/dicom" => Some(Self::Dicom),
            _ => None,
        }
    }

    /// The media type's name, e.g. `image/png`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg => "image/jpeg",
            Self::Dicom => "application/dicom",
        }
    }

    /// Guesses from the first bytes (for the legacy API and the CLI, which get no media type).
    pub fn sniff(bytes: &[u8]) -> Option<Self> {
        if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            Some(Self::Png)
        } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            Some(Self::Jpeg)
        } else if bytes.get(128..132) == Some(b"DICM") || bytes.starts_with(b"DICM") {
            Some(Self::Dicom)
        } else {
            None
        }
    }
}

/// Identifiers and routing attributes read from a DICOM instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DicomMeta {
    /// Study Instance UID.
    pub study_uid: Option<String>,
    /// Series Instance UID.
    pub series_uid: Option<String>,
    /// SOP Instance UID.
    pub sop_instance_uid: Option<String>,
    /// SOP Class UID.
    pub sop_class_uid: Option<String>,
    /// Modality (CR, DX, ...).
    pub modality: Option<String>,
    /// Patient ID (never logged).
    pub patient_id: Option<String>,
    /// Accession number.
    pub accession_number: Option<String>,
}

/// An 8-bit image ready for preprocessing, with what is known of its origin.
#[derive(Debug, Clone)]
pub struct DecodedImage {
    /// Pixels: gray when the source is monochrome, RGB otherwise.
    pub image: DynamicImage,
    /// DICOM attributes, when the source was DICOM.
    pub dicom: Option<DicomMeta>,
}

/// Why bytes could not be turned into an image (a client problem: 422).
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// PNG/JPEG decoder failure.
    #[error("the {0} image cannot be decoded: {1}")]
    Image(&'static str, String),
    /// Not a DICOM Part 10 stream or not parseable.
    #[error("the DICOM file cannot be read: {0}")]
    Dicom(String),
    /// DICOM without usable pixel data.
    #[error("the DICOM pixel data cannot be decoded: {0}")]
    Pixels(String),
    /// The requested frame does not exist (1-based number, frame count).
    #[error("frame {0} does not exist: the image has {1} frame(s)")]
    Frame(u32, u32),
    /// Image of size zero or absurdly large.
    #[error("image dimensions {0}x{1} are outside the accepted range (1..={2} per side)")]
    Dimensions(u32, u32, u32),
}

/// Largest accepted side, in pixels (a 16-bit 8k x 8k radiograph is 128 MiB decoded).
pub const MAX_SIDE: u32 = 8192;

/// Decodes `bytes` as `media`.
///
/// # Errors
/// [`DecodeError`] when the bytes are not a decodable image of that type.
pub fn decode(bytes: &[u8], media: MediaType) -> Result<DecodedImage, DecodeError> {
    decode_frame(bytes, media, 0)
}

/// Decodes frame `frame` (0-based; ignored for PNG/JPEG) of `bytes` as `media`.
///
/// # Errors
/// [`DecodeError`] when the bytes are not a decodable image of that type, or the frame does
/// not exist.
pub fn decode_frame(
    bytes: &[u8],
    media: MediaType,
    frame: u32,
) -> Result<DecodedImage, DecodeError> {
    // Codec crates can panic on unusual input (dicom-rs 0.10.1's RLE decoder does on
    // multi-fragment frames): a client's file must get a decode error, never take a worker down.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        decode_checked(bytes, media, frame)
    }))
    .unwrap_or_else(|p| {
        let why = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("unknown failure");
        Err(DecodeError::Pixels(format!(
            "the decoder failed on this data ({why})"
        )))
    })
}

fn decode_checked(bytes: &[u8], media: MediaType, frame: u32) -> Result<DecodedImage, DecodeError> {
    let decoded = match media {
        MediaType::Png => decode_raster(bytes, ImageFormat::Png, "PNG")?,
        MediaType::Jpeg => decode_raster(bytes, ImageFormat::Jpeg, "JPEG")?,
        MediaType::Dicom => decode_dicom(bytes, frame)?,
    };
    let (w, h) = (decoded.image.width(), decoded.image.height());
    if w == 0 || h == 0 || w > MAX_SIDE || h > MAX_SIDE {
        return Err(DecodeError::Dimensions(w, h, MAX_SIDE));
    }
    Ok(decoded)
}

fn decode_raster(
    bytes: &[u8],
    format: ImageFormat,
    name: &'static str,
) -> Result<DecodedImage, DecodeError> {
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    reader.limits(limits);
    let img = reader
        .decode()
        .map_err(|e| DecodeError::Image(name, e.to_string()))?;
    Ok(DecodedImage {
        image: to_8bit(img),
        dicom: None,
    })
}

/// Narrows to 8-bit gray or RGB: 16-bit gray is min-max stretched (as the 2020 demo's OpenCV
/// path did), alpha is dropped.
fn to_8bit(img: DynamicImage) -> DynamicImage {
    match img {
        DynamicImage::ImageLuma8(_) | DynamicImage::ImageRgb8(_) => img,
        DynamicImage::ImageLumaA8(_) => DynamicImage::ImageLuma8(img.to_luma8()),
        DynamicImage::ImageLuma16(g) => {
            let (lo, hi) = g.pixels().fold((u16::MAX, 0u16), |(lo, hi), p| {
                (lo.min(p.0[0]), hi.max(p.0[0]))
            });
            let range = f32::from(hi.saturating_sub(lo)).max(1.0);
            let out = GrayImage::from_fn(g.width(), g.height(), |x, y| {
                let v = f32::from(g.get_pixel(x, y).0[0] - lo) * 255.0 / range;
                image::Luma([v.round().clamp(0.0, 255.0) as u8])
            });
            DynamicImage::ImageLuma8(out)
        }
        DynamicImage::ImageLumaA16(_) => to_8bit(DynamicImage::ImageLuma16(img.to_luma16())),
        other => DynamicImage::ImageRgb8(RgbImage::from(other.to_rgb8())),
    }
}

/// Part 10 bytes (with or without preamble) → a parsed object whose pixel data dicom-pixeldata
/// can decode. The same structural checks as ingest run first: crafted lengths or nesting never
/// reach the parser.
fn open_dicom(bytes: &[u8]) -> Result<DefaultDicomObject, DecodeError> {
    let offset = if bytes.get(128..132) == Some(b"DICM") {
        128
    } else if bytes.starts_with(b"DICM") {
        0
    } else {
        return Err(DecodeError::Dicom(
            "no DICM prefix: not a DICOM Part 10 file".into(),
        ));
    };
    crate::dicom::parse::check_structure(&bytes[offset..])
        .map_err(|e| DecodeError::Dicom(e.to_string()))?;
    let obj = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Never)
        .from_reader(&bytes[offset..])
        .map_err(|e| DecodeError::Dicom(e.to_string()))?;
    check_decodable_size(&obj)?;
    let obj = rle::native_if_fragmented(obj)?;
    native_if_jpeg12(obj)
}

/// Before any decoder runs: Rows and Columns within [`MAX_SIDE`], and every compressed frame
/// declaring no more than that (its own header, checked against the data set).
fn check_decodable_size(obj: &DefaultDicomObject) -> Result<(), DecodeError> {
    let side = |t| int_attr(obj, t).unwrap_or(0);
    let (rows, cols) = (side(tags::ROWS), side(tags::COLUMNS));
    if rows > MAX_SIDE as usize || cols > MAX_SIDE as usize {
        return Err(DecodeError::Dimensions(
            u32::try_from(cols).unwrap_or(u32::MAX),
            u32::try_from(rows).unwrap_or(u32::MAX),
            MAX_SIDE,
        ));
    }
    crate::dicom::parse::check_frame_headers(obj).map_err(|e| DecodeError::Dicom(e.to_string()))
}

/// Replaces the pixel data of `obj` with `native` little-endian samples (`bytes` per sample,
/// `spp` interleaved samples per pixel) and marks it Explicit VR Little Endian, so that the
/// normal decode path takes it from there.
fn into_native(
    mut obj: DefaultDicomObject,
    mut native: Vec<u8>,
    bytes: usize,
    spp: usize,
) -> DefaultDicomObject {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    if native.len() % 2 == 1 {
        native.push(0);
    }
    // the value type a file read gives: bytes for OB, 16-bit words for OW
    let (vr, value) = if bytes == 2 {
        let words: Vec<u16> = native
            .chunks_exact(2)
            .map(|w| u16::from_le_bytes([w[0], w[1]]))
            .collect();
        (VR::OW, PrimitiveValue::U16(words.into()))
    } else {
        (VR::OB, PrimitiveValue::from(native))
    };
    obj.put(DataElement::new(tags::PIXEL_DATA, vr, value));
    if spp > 1 {
        obj.put(DataElement::new(
            tags::PLANAR_CONFIGURATION,
            VR::US,
            PrimitiveValue::from(0u16),
        ));
    }
    obj.meta_mut().transfer_syntax = EXPLICIT_LE.to_string();
    obj
}

const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";

/// An integer attribute of `obj`, when present and numeric.
fn int_attr(obj: &DefaultDicomObject, tag: dicom_core::Tag) -> Option<usize> {
    obj.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.to_int::<usize>().ok())
}

/// The compressed stream of each frame of encapsulated pixel data: one fragment per frame, or
/// all fragments joined for a single-frame image. `None` when the pixel data is native.
fn frame_streams(obj: &DefaultDicomObject) -> Result<Option<Vec<Vec<u8>>>, String> {
    let frames = int_attr(obj, tags::NUMBER_OF_FRAMES).unwrap_or(1).max(1);
    let Some(fragments) = obj
        .element_opt(tags::PIXEL_DATA)
        .ok()
        .flatten()
        .and_then(|px| px.fragments())
    else {
        return Ok(None);
    };
    if fragments.len() == frames {
        Ok(Some(fragments.iter().map(|f| f.to_vec()).collect()))
    } else if frames == 1 {
        Ok(Some(vec![fragments.iter().flatten().copied().collect()]))
    } else {
        Err("several fragments per frame in a multi-frame image".into())
    }
}
const JPEG_EXTENDED: &str = "1.2.840.10008.1.2.4.51";

/// JPEG Extended (process 2 and 4) with 12-bit samples, which jpeg-decoder cannot decode, is
/// decoded by Carina's own sequential DCT decoder ([`super::jpeg`]) into native pixel data.
/// 8-bit JPEG Extended streams are left to the normal path.
fn native_if_jpeg12(obj: DefaultDicomObject) -> Result<DefaultDicomObject, DecodeError> {
    if obj.meta().transfer_syntax().trim_end_matches('\0') != JPEG_EXTENDED {
        return Ok(obj);
    }
    let int = |t| int_attr(&obj, t);
    let (rows, cols) = (
        int(tags::ROWS).unwrap_or(0),
        int(tags::COLUMNS).unwrap_or(0),
    );
    let spp = int(tags::SAMPLES_PER_PIXEL).unwrap_or(1).max(1);
    let Some(streams) =
        frame_streams(&obj).map_err(|why| DecodeError::Pixels(format!("JPEG: {why}")))?
    else {
        return Ok(obj);
    };
    if streams
        .first()
        .and_then(|s| super::jpeg::precision(s))
        .is_none_or(|p| p <= 8)
    {
        return Ok(obj);
    }
    if int(tags::BITS_ALLOCATED) != Some(16) {
        return Err(DecodeError::Pixels(
            "JPEG: 12-bit samples need Bits Allocated 16".into(),
        ));
    }
    let mut native = Vec::new();
    for s in &streams {
        // an all-zero 8x8 block codes in a few bits: more than 512 samples per byte of data
        // cannot be real, and is refused before anything is allocated
        let max = (rows * cols * spp).min(s.len().saturating_mul(512));
        let f = super::jpeg::decode(s, max).map_err(|e| DecodeError::Pixels(e.to_string()))?;
        if (f.width, f.height, f.components) != (cols, rows, spp) {
            return Err(DecodeError::Pixels(format!(
                "JPEG frame is {}x{}x{}, the data set says {cols}x{rows}x{spp}",
                f.width, f.height, f.components
            )));
        }
        native.extend(f.samples.iter().flat_map(|v| v.to_le_bytes()));
    }
    Ok(into_native(obj, native, 2, spp))
}

fn decode_dicom(bytes: &[u8], frame: u32) -> Result<DecodedImage, DecodeError> {
    let obj = open_dicom(bytes)?;
    let meta = dicom_meta(&obj);
    let frames = obj
        .element_opt(tags::NUMBER_OF_FRAMES)
        .ok()
        .flatten()
        .and_then(|e| e.to_int::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    if frame >= frames {
        return Err(DecodeError::Frame(frame + 1, frames));
    }
    let pixels = obj
        .decode_pixel_data_frame(frame)
        .map_err(|e| DecodeError::Pixels(e.to_string()))?;
    let photometric = pixels.photometric_interpretation().clone();
    let has_voi = [tags::WINDOW_CENTER, tags::VOILUT_SEQUENCE]
        .iter()
        .any(|t| obj.element_opt(*t).ok().flatten().is_some());
    let img = if photometric == dicom_pixeldata::PhotometricInterpretation::PaletteColor {
        apply_palette(&obj, &pixels)?
    } else if photometric.is_monochrome() && pixels.samples_per_pixel() == 1 && !has_voi {
        min_max_8bit(
            &pixels,
            photometric == dicom_pixeldata::PhotometricInterpretation::Monochrome1,
        )?
    } else {
        let options = ConvertOptions::new().force_8bit();
        to_8bit(
            pixels
                .to_dynamic_image_with_options(0, &options)
                .map_err(|e| DecodeError::Pixels(e.to_string()))?,
        )
    };
    Ok(DecodedImage {
        image: img,
        dicom: Some(meta),
    })
}

/// Stored sample values of frame `frame` (0-based) of a DICOM file, before any Modality LUT,
/// VOI or photometric handling except decompression (YCbCr JPEG comes back as RGB): shape
/// `[rows, cols]` or `[rows, cols, samples]`. For checking the decoders against a reference.
///
/// # Errors
/// [`DecodeError`] when the file or its pixel data cannot be decoded.
pub fn raw_frame(bytes: &[u8], frame: u32) -> Result<(Vec<usize>, Vec<f32>), DecodeError> {
    std::panic::catch_unwind(|| {
        let obj = open_dicom(bytes)?;
        let px = obj
            .decode_pixel_data_frame(frame)
            .map_err(|e| DecodeError::Pixels(e.to_string()))?;
        let opts =
            ConvertOptions::new().with_modality_lut(dicom_pixeldata::ModalityLutOption::None);
        let v: Vec<f32> = px
            .to_vec_with_options(&opts)
            .map_err(|e| DecodeError::Pixels(e.to_string()))?;
        let (r, c, s) = (
            px.rows() as usize,
            px.columns() as usize,
            usize::from(px.samples_per_pixel()),
        );
        let shape = if s == 1 { vec![r, c] } else { vec![r, c, s] };
        Ok((shape, v))
    })
    .unwrap_or_else(|_| {
        Err(DecodeError::Pixels(
            "the decoder failed on this data".into(),
        ))
    })
}

/// Monochrome without any VOI transform in the object: Modality LUT / rescale, then the
/// frame's own min..max mapped linearly to 0..255 (inverted for MONOCHROME1). Done here because
/// dicom-pixeldata 0.10.1's normalisation goes wrong for negative stored values.
fn min_max_8bit(
    pixels: &dicom_pixeldata::DecodedPixelData<'_>,
    monochrome1: bool,
) -> Result<DynamicImage, DecodeError> {
    let v: Vec<f32> = pixels
        .to_vec_frame(0)
        .map_err(|e| DecodeError::Pixels(e.to_string()))?;
    let (lo, hi) = v
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(*x), hi.max(*x))
        });
    let range = hi - lo;
    let scale = if range > 0.0 { 255.0 / range } else { 0.0 };
    let (w, h) = (pixels.columns(), pixels.rows());
    let n = w as usize * h as usize;
    // g + 0.5 is never negative after the clamp, so the cast's truncation is the floor
    // (without a libm call per pixel)
    let gray: Vec<u8> = (0..n)
        .map(|i| {
            let p = v.get(i).copied().unwrap_or(lo);
            let g = (p - lo) * scale;
            let g = if monochrome1 { 255.0 - g } else { g };
            (g + 0.5).clamp(0.0, 255.0) as u8
        })
        .collect();
    GrayImage::from_raw(w, h, gray)
        .map(DynamicImage::ImageLuma8)
        .ok_or_else(|| DecodeError::Pixels("frame size overflow".into()))
}

/// PALETTE COLOR (PS3.3 C.7.6.3.1.5): each stored index looks up the red, green and blue
/// Palette Color Lookup Tables; 16-bit entries are narrowed to their high byte.
fn apply_palette(
    obj: &DefaultDicomObject,
    pixels: &dicom_pixeldata::DecodedPixelData<'_>,
) -> Result<DynamicImage, DecodeError> {
    let bad = |what: &str| DecodeError::Pixels(format!("palette colour image: {what}"));
    let lut = |desc_tag, data_tag| -> Result<(Vec<u8>, i64), DecodeError> {
        let desc: Vec<i64> = obj
            .element(desc_tag)
            .map_err(|_| bad("a Palette Color Lookup Table Descriptor is missing"))?
            .to_multi_int::<i64>()
            .map_err(|_| bad("unreadable LUT descriptor"))?;
        let [entries, first, bits] = desc[..] else {
            return Err(bad("LUT descriptor must have 3 values"));
        };
        let entries = if entries <= 0 { 65536 } else { entries };
        let raw = obj
            .element(data_tag)
            .map_err(|_| bad("Palette Color Lookup Table Data is missing"))?
            .to_bytes()
            .map_err(|_| bad("unreadable LUT data"))?;
        let table: Vec<u8> = match bits {
            8 if raw.len() as i64 == entries => raw.to_vec(),
            // 8-bit entries stored one per 16-bit word: the low byte
            8 => raw.chunks_exact(2).map(|c| c[0]).collect(),
            _ => raw.chunks_exact(2).map(|c| c[1]).collect(),
        };
        if (table.len() as i64) < entries {
            return Err(bad("LUT data shorter than its descriptor"));
        }
        Ok((table, first))
    };
    let (r, r0) = lut(
        tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
        tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DATA,
    )?;
    let (g, g0) = lut(
        tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
        tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DATA,
    )?;
    let (b, b0) = lut(
        tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
        tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DATA,
    )?;
    let (w, h) = (pixels.columns(), pixels.rows());
    let idx: Vec<i64> = pixels
        .to_vec_frame::<i64>(0)
        .map_err(|e| DecodeError::Pixels(e.to_string()))?;
    let look = |t: &[u8], first: i64, v: i64| {
        let i = (v - first).clamp(0, t.len() as i64 - 1);
        t[i as usize]
    };
    let img = RgbImage::from_fn(w, h, |x, y| {
        let v = idx.get((y * w + x) as usize).copied().unwrap_or(0);
        image::Rgb([look(&r, r0, v), look(&g, g0, v), look(&b, b0, v)])
    });
    Ok(DynamicImage::ImageRgb8(img))
}

/// Reads the identifying attributes of a DICOM object.
pub fn dicom_meta(obj: &DefaultDicomObject) -> DicomMeta {
    let text = |tag| {
        obj.element_opt(tag)
            .ok()
            .flatten()
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
            .filter(|s| !s.is_empty())
    };
    DicomMeta {
        study_uid: text(tags::STUDY_INSTANCE_UID),
        series_uid: text(tags::SERIES_INSTANCE_UID),
        sop_instance_uid: text(tags::SOP_INSTANCE_UID),
        sop_class_uid: text(tags::SOP_CLASS_UID),
        modality: text(tags::MODALITY),
        patient_id: text(tags::PATIENT_ID),
        accession_number: text(tags::ACCESSION_NUMBER),
    }
}

/// RLE Lossless frames split over several fragments (allowed by PS3.5 A.4 for other syntaxes
/// and found in real files) make dicom-rs 0.10.1's RLE decoder panic. Such objects are decoded
/// here (PS3.5 Annex G) into native pixel data, then take the normal path.
mod rle {
    use dicom_dictionary_std::tags;
    use dicom_object::DefaultDicomObject;

    use super::DecodeError;

    const RLE: &str = "1.2.840.10008.1.2.5";

    fn bad(why: &str) -> DecodeError {
        DecodeError::Pixels(format!("RLE data: {why}"))
    }

    /// PackBits-decodes one segment into exactly `n` bytes.
    fn segment(data: &[u8], n: usize) -> Result<Vec<u8>, DecodeError> {
        let mut out = Vec::with_capacity(n);
        let mut i = 0;
        while out.len() < n && i < data.len() {
            let h = data[i] as i8;
            i += 1;
            if h >= 0 {
                let len = h as usize + 1;
                let lit = data
                    .get(i..i + len)
                    .ok_or_else(|| bad("literal run past the end"))?;
                out.extend_from_slice(lit);
                i += len;
            } else if h != -128 {
                let b = *data.get(i).ok_or_else(|| bad("repeat run past the end"))?;
                out.extend(std::iter::repeat_n(b, (1 - i16::from(h)) as usize));
                i += 1;
            }
        }
        if out.len() < n {
            return Err(bad("segment shorter than the image"));
        }
        out.truncate(n);
        Ok(out)
    }

    /// Decodes one frame (all its fragments joined) into native little-endian samples,
    /// interleaved (Planar Configuration 0).
    pub(super) fn frame(
        data: &[u8],
        pixels: usize,
        spp: usize,
        bytes: usize,
    ) -> Result<Vec<u8>, DecodeError> {
        let header = data.get(..64).ok_or_else(|| bad("no RLE header"))?;
        let word = |k: usize| {
            u32::from_le_bytes([
                header[4 * k],
                header[4 * k + 1],
                header[4 * k + 2],
                header[4 * k + 3],
            ]) as usize
        };
        let count = word(0);
        // a PackBits repeat run turns 2 bytes into at most 128: anything declaring more than
        // 64x the data is refused before allocating it
        if pixels.saturating_mul(spp * bytes) > data.len().saturating_mul(64) {
            return Err(bad("the image is larger than the RLE data can hold"));
        }
        if count != spp * bytes || count > 15 {
            return Err(bad("segment count does not match the image"));
        }
        let mut out = vec![0u8; pixels * spp * bytes];
        for seg in 0..count {
            let start = word(seg + 1);
            let end = if seg + 1 < count {
                word(seg + 2)
            } else {
                data.len()
            };
            let raw = data
                .get(start..end.max(start))
                .ok_or_else(|| bad("segment offset past the end"))?;
            let plane = segment(raw, pixels)?;
            let (sample, msb_index) = (seg / bytes, seg % bytes);
            let byte = bytes - 1 - msb_index; // segments go most significant byte first
            for (i, v) in plane.into_iter().enumerate() {
                out[(i * spp + sample) * bytes + byte] = v;
            }
        }
        Ok(out)
    }

    /// Decodes RLE Lossless pixel data (every frame; a frame may span several fragments when
    /// the image has one frame) into a native Explicit VR Little Endian object. dicom-rs
    /// 0.10.1's RLE decoder panics on fragmented frames and on some malformed segments (found
    /// by cargo fuzz), so Carina's own bounds-checked decoder does all RLE.
    pub(super) fn native_if_fragmented(
        obj: DefaultDicomObject,
    ) -> Result<DefaultDicomObject, DecodeError> {
        if obj.meta().transfer_syntax().trim_end_matches('\0') != RLE {
            return Ok(obj);
        }
        let int = |t| super::int_attr(&obj, t);
        let Some(streams) = super::frame_streams(&obj).map_err(|why| bad(&why))? else {
            return Ok(obj);
        };
        let (rows, cols) = (
            int(tags::ROWS).unwrap_or(0),
            int(tags::COLUMNS).unwrap_or(0),
        );
        let spp = int(tags::SAMPLES_PER_PIXEL).unwrap_or(1).max(1);
        let bytes = int(tags::BITS_ALLOCATED).unwrap_or(8).div_ceil(8).max(1);
        let mut native = Vec::new();
        for f in &streams {
            native.extend(frame(f, rows * cols, spp, bytes)?);
        }
        Ok(super::into_native(obj, native, bytes, spp))
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn packbits_literal_and_repeat_runs() {
            // literal 3 bytes, repeat 0x07 four times, no-op, literal 1
            let data = [2, 1, 2, 3, (-3i8) as u8, 7, 0x80, 0, 9];
            assert_eq!(
                super::segment(&data, 8).unwrap(),
                vec![1, 2, 3, 7, 7, 7, 7, 9]
            );
            assert!(super::segment(&data, 20).is_err());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_media_types() {
        assert_eq!(
            MediaType::sniff(b"\x89PNG\r\n\x1a\nrest"),
            Some(MediaType::Png)
        );
        assert_eq!(
            MediaType::sniff(&[0xFF, 0xD8, 0xFF, 0xE0]),
            Some(MediaType::Jpeg)
        );
        let mut dcm = vec![0u8; 128];
        dcm.extend_from_slice(b"DICM");
        assert_eq!(MediaType::sniff(&dcm), Some(MediaType::Dicom));
        assert_eq!(MediaType::sniff(b"GIF89a"), None);
        assert_eq!(
            MediaType::from_content_type("image/PNG; q=1"),
            Some(MediaType::Png)
        );
        assert_eq!(MediaType::from_content_type("text/plain"), None);
    }

    #[test]
    fn garbage_is_a_decode_error_not_a_panic() {
        assert!(matches!(
            decode(b"\x89PNG\r\n\x1a\nnope", MediaType::Png),
            Err(DecodeError::Image(..))
        ));
        assert!(matches!(
            decode(b"nope", MediaType::Dicom),
            Err(DecodeError::Dicom(..))
        ));
        let mut dcm = vec![0u8; 128];
        dcm.extend_from_slice(b"DICM\x02\x00");
        assert!(decode(&dcm, MediaType::Dicom).is_err());
    }

    #[test]
    fn rle_frames_split_over_fragments_are_decoded() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/dicom-samples/D_CLUNIE_CT1_RLE_FRAGS.dcm"
        );
        let bytes = std::fs::read(path).unwrap();
        let img = decode(&bytes, MediaType::Dicom).unwrap();
        assert_eq!(img.image.width(), 512, "decoded by Carina's RLE fallback");
    }

    #[test]
    fn crafted_lengths_are_refused_before_parsing_on_every_decode_path() {
        // found by cargo fuzz: this file made the parser allocate ~4 GB when decoded directly
        // (the legacy API and `carina predict` decode without going through ingest)
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/dicom-bad/huge_len_implicit_patientname.dcm"
        );
        let bytes = std::fs::read(path).unwrap();
        assert!(matches!(
            decode(&bytes, MediaType::Dicom),
            Err(DecodeError::Dicom(_))
        ));
        assert!(raw_frame(&bytes, 0).is_err());
    }

    #[test]
    fn fuzz_findings_are_clear_errors() {
        // cargo fuzz: a mutated RLE sample made dicom-rs's RLE decoder index past a segment
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/fuzz/rle_segment_past_end.dcm"
        );
        let bytes = std::fs::read(path).unwrap();
        // cargo fuzz: a mutated deflated data set declared a length that made the parser
        // allocate gigabytes; the inflated data set now gets the structural checks too
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/fuzz/deflate_huge_length.dcm"
        );
        let deflated = std::fs::read(path).unwrap();
        match decode(&deflated, MediaType::Dicom) {
            Err(DecodeError::Dicom(m)) => assert!(m.contains("element ("), "{m}"),
            other => panic!("expected a structural refusal, got {:?}", other.map(|_| ())),
        }
        // the message is Carina's own RLE decoder's, not the caught panic's
        match decode(&bytes, MediaType::Dicom) {
            Err(DecodeError::Pixels(m)) => assert!(m.contains("RLE data"), "{m}"),
            other => panic!("expected an RLE error, got {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn sixteen_bit_gray_is_stretched() {
        let g = image::ImageBuffer::<image::Luma<u16>, _>::from_fn(4, 1, |x, _| {
            image::Luma([1000 + x as u16 * 100])
        });
        let out = to_8bit(DynamicImage::ImageLuma16(g)).to_luma8();
        assert_eq!(out.get_pixel(0, 0).0[0], 0);
        assert_eq!(out.get_pixel(3, 0).0[0], 255);
    }
}
