//! The heatmap overlay as a DICOM Secondary Capture instance in the analysed study: Patient and
//! Study modules copied from the source, a new Series, references to the analysed image, the
//! model as equipment, and a burned-in "AI RESULT - NOT FOR DIAGNOSIS" band above the picture.
//! UIDs are derived from the source instance and the model, so re-running an analysis makes
//! the same instance again (never a second one).

use chrono::{DateTime, Utc};
use dicom_core::value::DataSetSequence;
use dicom_core::{dicom_value, DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::{DefaultDicomObject, FileMetaTableBuilder, InMemDicomObject};
use image::{Rgb, RgbImage};

/// Implementation Class UID written in file meta (a UUID-derived UID, PS3.5 B.2).
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.207329476185362406815113385318298640185";

/// What goes into the Secondary Capture.
pub struct ScInput<'a> {
    /// The analysed instance.
    pub source: &'a DefaultDicomObject,
    /// The overlay picture (source geometry).
    pub overlay: &'a RgbImage,
    /// Model name and version.
    pub model: (&'a str, &'a str),
    /// One line of result text, e.g. `COVID-19 98.3%`.
    pub summary: &'a str,
    /// When the analysis finished.
    pub created: DateTime<Utc>,
}

/// Failure to build the object (a server-side problem).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the Secondary Capture: {0}")]
pub struct ScError(String);

impl ScError {
    /// From any displayable cause.
    pub fn from_display(e: &dyn std::fmt::Display) -> Self {
        Self(e.to_string())
    }
}

/// A UID under the `2.25` arc from a name (UUID v5), stable across runs.
pub fn derived_uid(name: &str) -> String {
    let u = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes());
    format!("2.25.{}", u.as_u128())
}

/// The SOP Instance UID of the result for `source_sop` made by `model`.
pub fn result_uid(source_sop: &str, model: (&str, &str)) -> String {
    derived_uid(&format!("carina/sc/{source_sop}/{}/{}", model.0, model.1))
}

/// Builds the instance and returns it as Part 10 bytes (Explicit VR Little Endian).
///
/// # Errors
/// [`ScError`] when encoding fails.
pub fn secondary_capture(inp: &ScInput<'_>) -> Result<ScResult, ScError> {
    let src = inp.source;
    let text = |tag: Tag| {
        src.element_opt(tag)
            .ok()
            .flatten()
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_matches(['\0', ' ']).to_string())
            .unwrap_or_default()
    };
    let study_uid = text(tags::STUDY_INSTANCE_UID);
    let source_sop = text(tags::SOP_INSTANCE_UID);
    let source_class = text(tags::SOP_CLASS_UID);
    let sop_uid = result_uid(&source_sop, inp.model);
    let series_uid = derived_uid(&format!(
        "carina/series/{study_uid}/{}/{}",
        inp.model.0, inp.model.1
    ));
    let picture = burn_in(
        inp.overlay,
        &[
            "AI RESULT - NOT FOR DIAGNOSIS",
            &format!("{} {}: {}", inp.model.0, inp.model.1, inp.summary),
        ],
    );

    let mut obj = InMemDicomObject::new_empty();
    // Patient, General Study, Patient Study: copied as sent (character set included).
    for tag in [
        tags::SPECIFIC_CHARACTER_SET,
        tags::PATIENT_NAME,
        tags::PATIENT_ID,
        tags::ISSUER_OF_PATIENT_ID,
        tags::PATIENT_BIRTH_DATE,
        tags::PATIENT_SEX,
        tags::STUDY_INSTANCE_UID,
        tags::STUDY_DATE,
        tags::STUDY_TIME,
        tags::REFERRING_PHYSICIAN_NAME,
        tags::STUDY_ID,
        tags::ACCESSION_NUMBER,
        tags::STUDY_DESCRIPTION,
        tags::PATIENT_AGE,
    ] {
        if let Ok(Some(e)) = src.element_opt(tag) {
            obj.put(e.clone());
        }
    }
    for (tag, vr) in [
        (tags::PATIENT_NAME, VR::PN),
        (tags::PATIENT_ID, VR::LO),
        (tags::PATIENT_BIRTH_DATE, VR::DA),
        (tags::PATIENT_SEX, VR::CS),
        (tags::STUDY_DATE, VR::DA),
        (tags::STUDY_TIME, VR::TM),
        (tags::REFERRING_PHYSICIAN_NAME, VR::PN),
        (tags::STUDY_ID, VR::SH),
        (tags::ACCESSION_NUMBER, VR::SH),
    ] {
        // Type 2 attributes: present, empty when the source had none
        if obj.element_opt(tag).ok().flatten().is_none() {
            obj.put(DataElement::new(tag, vr, PrimitiveValue::Empty));
        }
    }
    let date = inp.created.format("%Y%m%d").to_string();
    let time = inp.created.format("%H%M%S").to_string();
    let mut put_str = |tag: Tag, vr: VR, v: &str| {
        obj.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
    };
    // SOP Common
    put_str(
        tags::SOP_CLASS_UID,
        VR::UI,
        uids::SECONDARY_CAPTURE_IMAGE_STORAGE,
    );
    put_str(tags::SOP_INSTANCE_UID, VR::UI, &sop_uid);
    put_str(tags::INSTANCE_CREATION_DATE, VR::DA, &date);
    put_str(tags::INSTANCE_CREATION_TIME, VR::TM, &time);
    // General Series
    put_str(tags::MODALITY, VR::CS, "OT");
    put_str(tags::SERIES_INSTANCE_UID, VR::UI, &series_uid);
    put_str(
        tags::SERIES_DESCRIPTION,
        VR::LO,
        &truncate(&format!("AI heatmap {}", inp.model.0), 64),
    );
    // General Equipment + SC Equipment
    put_str(tags::MANUFACTURER, VR::LO, "Carina");
    put_str(
        tags::MANUFACTURER_MODEL_NAME,
        VR::LO,
        &truncate(inp.model.0, 64),
    );
    put_str(tags::CONVERSION_TYPE, VR::CS, "WSD");
    // General Image / SC Image
    put_str(tags::CONTENT_DATE, VR::DA, &date);
    put_str(tags::CONTENT_TIME, VR::TM, &time);
    put_str(tags::BURNED_IN_ANNOTATION, VR::CS, "YES");
    put_str(
        tags::DERIVATION_DESCRIPTION,
        VR::ST,
        "Grad-CAM heatmap over the analysed image; AI result, not for diagnosis",
    );
    put_str(tags::PATIENT_ORIENTATION, VR::CS, "");
    obj.put(DataElement::new(
        tags::SOFTWARE_VERSIONS,
        VR::LO,
        dicom_value!(
            Strs,
            [
                truncate(inp.model.1, 64),
                format!("carina {}", env!("CARGO_PKG_VERSION"))
            ]
        ),
    ));
    obj.put(DataElement::new(
        tags::IMAGE_TYPE,
        VR::CS,
        dicom_value!(Strs, ["DERIVED", "SECONDARY"]),
    ));
    obj.put(DataElement::new(
        tags::SERIES_NUMBER,
        VR::IS,
        PrimitiveValue::from("9001"),
    ));
    obj.put(DataElement::new(
        tags::INSTANCE_NUMBER,
        VR::IS,
        PrimitiveValue::from("1"),
    ));
    let reference = || {
        InMemDicomObject::from_element_iter([
            DataElement::new(
                tags::REFERENCED_SOP_CLASS_UID,
                VR::UI,
                PrimitiveValue::from(source_class.as_str()),
            ),
            DataElement::new(
                tags::REFERENCED_SOP_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from(source_sop.as_str()),
            ),
        ])
    };
    obj.put(DataElement::new(
        tags::SOURCE_IMAGE_SEQUENCE,
        VR::SQ,
        DataSetSequence::from(vec![reference()]),
    ));
    obj.put(DataElement::new(
        tags::REFERENCED_IMAGE_SEQUENCE,
        VR::SQ,
        DataSetSequence::from(vec![reference()]),
    ));
    // Image Pixel
    let (w, h) = picture.dimensions();
    let dims = |v: u32| u16::try_from(v).map_err(|_| ScError(format!("image side {v} too large")));
    obj.put(DataElement::new(
        tags::SAMPLES_PER_PIXEL,
        VR::US,
        dicom_value!(U16, [3]),
    ));
    obj.put(DataElement::new(
        tags::PHOTOMETRIC_INTERPRETATION,
        VR::CS,
        PrimitiveValue::from("RGB"),
    ));
    obj.put(DataElement::new(
        tags::PLANAR_CONFIGURATION,
        VR::US,
        dicom_value!(U16, [0]),
    ));
    obj.put(DataElement::new(
        tags::ROWS,
        VR::US,
        dicom_value!(U16, [dims(h)?]),
    ));
    obj.put(DataElement::new(
        tags::COLUMNS,
        VR::US,
        dicom_value!(U16, [dims(w)?]),
    ));
    obj.put(DataElement::new(
        tags::BITS_ALLOCATED,
        VR::US,
        dicom_value!(U16, [8]),
    ));
    obj.put(DataElement::new(
        tags::BITS_STORED,
        VR::US,
        dicom_value!(U16, [8]),
    ));
    obj.put(DataElement::new(
        tags::HIGH_BIT,
        VR::US,
        dicom_value!(U16, [7]),
    ));
    obj.put(DataElement::new(
        tags::PIXEL_REPRESENTATION,
        VR::US,
        dicom_value!(U16, [0]),
    ));
    let mut px = picture.into_raw();
    if px.len() % 2 == 1 {
        px.push(0); // even value length (PS3.5 7.1.1)
    }
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        PrimitiveValue::from(px),
    ));

    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(uids::SECONDARY_CAPTURE_IMAGE_STORAGE)
        .media_storage_sop_instance_uid(sop_uid.as_str())
        .transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN)
        .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
        .implementation_version_name("CARINA")
        .build()
        .map_err(|e| ScError(e.to_string()))?;
    let file = obj.with_exact_meta(meta);
    let index = super::parse::index_of(&file).map_err(|e| ScError(e.to_string()))?;
    let mut part10 = Vec::new();
    file.write_all(&mut part10)
        .map_err(|e| ScError(e.to_string()))?;
    Ok(ScResult { part10, index })
}

/// A Secondary Capture result: the Part 10 file and its index (read from the object built,
/// not from parsing the file again).
#[derive(Debug)]
pub struct ScResult {
    /// The Part 10 file.
    pub part10: Vec<u8>,
    /// Its attributes.
    pub index: super::InstanceIndex,
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// 5x7 bitmap glyphs (rows top to bottom, bit 4 = leftmost column) for the burned-in text.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1E],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        ' ' => [0; 7],
        '-' | '_' => [0, 0, 0, 0x1F, 0, 0, 0],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        ':' => [0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '/' => [0, 0x01, 0x02, 0x04, 0x08, 0x10, 0],
        _ => [0x0E, 0x11, 0x01, 0x02, 0x04, 0, 0x04],
    }
}

/// Adds a black band with `lines` in yellow above `img`, scaled to the image width.
pub fn burn_in(img: &RgbImage, lines: &[&str]) -> RgbImage {
    let (w, h) = img.dimensions();
    let longest = lines
        .iter()
        .map(|l| l.chars().count())
        .max()
        .unwrap_or(1)
        .max(1) as u32;
    let scale = (w / (longest * 6 + 2)).clamp(1, 6);
    let line_h = 9 * scale;
    let band = line_h * lines.len() as u32 + 2 * scale;
    let mut out = RgbImage::new(w, h + band);
    // same width: the image is one contiguous copy below the band
    let start = band as usize * w as usize * 3;
    out.as_mut()[start..start + img.as_raw().len()].copy_from_slice(img.as_raw());
    let ink = Rgb([255, 255, 0]);
    for (row, line) in lines.iter().enumerate() {
        let y0 = scale + row as u32 * line_h + scale;
        for (col, c) in line.chars().enumerate() {
            let x0 = scale + col as u32 * 6 * scale;
            if x0 + 5 * scale > w {
                break;
            }
            for (gy, bits) in glyph(c).iter().enumerate() {
                for gx in 0..5u32 {
                    if bits & (0x10 >> gx) != 0 {
                        for dy in 0..scale {
                            for dx in 0..scale {
                                out.put_pixel(
                                    x0 + gx * scale + dx,
                                    y0 + gy as u32 * scale + dy,
                                    ink,
                                );
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burned_in_band_sits_above_the_picture() {
        let img = RgbImage::from_fn(300, 100, |x, y| Rgb([x as u8, y as u8, (x ^ y) as u8]));
        let out = burn_in(&img, &["AI RESULT - NOT FOR DIAGNOSIS"]);
        assert!(out.height() > 100);
        let band = out.height() - 100;
        let below = image::imageops::crop_imm(&out, 0, band, 300, 100).to_image();
        assert!(below == img, "the picture is copied whole below the band");
        let yellow = (0..band)
            .flat_map(|y| (0..300).map(move |x| (x, y)))
            .filter(|&(x, y)| out.get_pixel(x, y) == &Rgb([255, 255, 0]))
            .count();
        assert!(yellow > 100, "text drawn: {yellow} px");
    }

    #[test]
    fn derived_uids_are_stable_valid_and_distinct() {
        let a = result_uid("1.2.3", ("m", "1"));
        assert_eq!(a, result_uid("1.2.3", ("m", "1")));
        assert_ne!(a, result_uid("1.2.3", ("m", "2")));
        assert!(crate::dicom::parse::valid_uid(&a), "{a}");
    }
}
