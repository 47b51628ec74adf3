//! Received bytes → a checked DICOM Part 10 instance and the attributes Carina indexes.
//! Checks are those a PACS would make before accepting: a file meta group, the identifying UIDs,
//! Pixel Data for image storage classes and enough of it for uncompressed images.

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, OpenFileOptions};

use super::status;

/// Attributes of an instance kept in the database for QIDO-RS, routing and the job status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceIndex {
    /// SOP Instance UID (0008,0018).
    pub sop_instance_uid: String,
    /// SOP Class UID (0008,0016).
    pub sop_class_uid: String,
    /// Study Instance UID (0020,000D).
    pub study_uid: String,
    /// Series Instance UID (0020,000E).
    pub series_uid: String,
    /// Transfer syntax of the stored file.
    pub transfer_syntax: String,
    /// Patient ID (never logged).
    pub patient_id: Option<String>,
    /// Patient's Name (never logged).
    pub patient_name: Option<String>,
    /// Patient's Birth Date (never logged).
    pub patient_birth_date: Option<String>,
    /// Patient's Sex.
    pub patient_sex: Option<String>,
    /// Study Date, YYYYMMDD.
    pub study_date: Option<String>,
    /// Study Time.
    pub study_time: Option<String>,
    /// Accession Number.
    pub accession_number: Option<String>,
    /// Study ID.
    pub study_id: Option<String>,
    /// Study Description.
    pub study_description: Option<String>,
    /// Referring Physician's Name.
    pub referring_physician: Option<String>,
    /// Modality.
    pub modality: Option<String>,
    /// Series Number.
    pub series_number: Option<i64>,
    /// Series Description.
    pub series_description: Option<String>,
    /// Body Part Examined.
    pub body_part: Option<String>,
    /// View Position.
    pub view_position: Option<String>,
    /// Instance Number.
    pub instance_number: Option<i64>,
    /// Rows.
    pub rows: Option<i64>,
    /// Columns.
    pub columns: Option<i64>,
    /// Number of Frames (1 when absent on an image).
    pub frames: Option<i64>,
}

/// A parsed, checked instance.
#[derive(Debug)]
pub struct ParsedInstance {
    /// What gets indexed.
    pub index: InstanceIndex,
    /// The whole object.
    pub object: DefaultDicomObject,
    /// Part 10 bytes to store (with a 128-byte preamble).
    pub part10: bytes::Bytes,
    /// Whether the object has Pixel Data.
    pub has_pixels: bool,
}

/// Why an instance was not accepted, with the DICOM status it maps to.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ParseError {
    /// Not DICOM Part 10, or the data cannot be parsed.
    #[error("cannot understand the data: {0}")]
    Unreadable(String),
    /// A Type 1 attribute is missing or invalid.
    #[error("the data set does not match its SOP class: {0}")]
    Mismatch(String),
}

impl ParseError {
    /// The DICOM status (C-STORE-RSP Status, STOW-RS FailureReason).
    pub fn status(&self) -> u16 {
        match self {
            Self::Unreadable(_) => status::CANNOT_UNDERSTAND,
            Self::Mismatch(_) => status::DATASET_MISMATCH,
        }
    }
}

/// Largest sequence nesting accepted. Real objects nest a handful of levels; a crafted file
/// with thousands would exhaust the parser's stack.
pub const MAX_SEQUENCE_DEPTH: usize = 32;

/// Whether `uid` is a syntactically valid UID (PS3.5 9.1): 1..=64 chars, digits and dots,
/// no empty components, no leading zeros in a component.
pub fn valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 64
        && uid.split('.').all(|c| {
            !c.is_empty()
                && c.bytes().all(|b| b.is_ascii_digit())
                && (c == "0" || !c.starts_with('0'))
        })
}

/// Structural checks on Part 10 bytes starting at `DICM` (no preamble), run before any parser
/// sees them: sequence nesting depth, and every declared length against the bytes left.
///
/// # Errors
/// [`ParseError::Unreadable`] naming the first problem.
pub fn check_structure(from_magic: &[u8]) -> Result<(), ParseError> {
    check_nesting(from_magic)?;
    check_lengths(from_magic.get(4..).unwrap_or_default())
}

/// The data set of a Part 10 file as Carina stores it (preamble, `DICM`, the file meta group
/// whose group length is its first element), without the file meta group.
pub fn data_set_of(part10: &[u8]) -> Option<&[u8]> {
    let gl = part10.get(140..144)?;
    let gl = u32::from_le_bytes([gl[0], gl[1], gl[2], gl[3]]) as usize;
    part10.get(144usize.checked_add(gl)?..)
}

/// Parses Part 10 bytes (with or without the 128-byte preamble).
///
/// # Errors
/// [`ParseError`] with the status to report.
pub fn parse_instance(bytes: &[u8]) -> Result<ParsedInstance, ParseError> {
    let (offset, part10) = if bytes.get(128..132) == Some(b"DICM") {
        (128, bytes::Bytes::copy_from_slice(bytes))
    } else if bytes.starts_with(b"DICM") {
        let mut v = vec![0u8; 128];
        v.extend_from_slice(bytes);
        (0, bytes::Bytes::from(v))
    } else {
        return Err(ParseError::Unreadable(
            "no 'DICM' prefix: not a DICOM Part 10 file (PS3.10 7.1)".into(),
        ));
    };
    let body = &bytes[offset..];
    check_structure(body)?;
    // dicom-rs may panic on crafted input; that must be a refusal, not a dead task.
    let object = std::panic::catch_unwind(|| {
        OpenFileOptions::new()
            .read_preamble(ReadPreamble::Never)
            .from_reader(body)
    })
    .map_err(|_| ParseError::Unreadable("the parser failed on this data".into()))?
    .map_err(|e| ParseError::Unreadable(e.to_string()))?;
    let index = index_of(&object)?;
    let has_pixels = object
        .element_opt(tags::PIXEL_DATA)
        .ok()
        .flatten()
        .is_some();
    if !has_pixels && is_image_storage(&index.sop_class_uid) {
        return Err(ParseError::Mismatch(
            "Pixel Data (7FE0,0010) is missing from an image storage SOP instance".into(),
        ));
    }
    if has_pixels {
        check_native_length(&object)?;
        check_frame_headers(&object)?;
    }
    Ok(ParsedInstance {
        index,
        object,
        part10,
        has_pixels,
    })
}

fn text(obj: &DefaultDicomObject, tag: Tag) -> Option<String> {
    obj.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_matches(['\0', ' ']).to_string())
        .filter(|s| !s.is_empty())
}

fn int(obj: &DefaultDicomObject, tag: Tag) -> Option<i64> {
    obj.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.to_int::<i64>().ok())
}

fn required_uid(obj: &DefaultDicomObject, tag: Tag, name: &str) -> Result<String, ParseError> {
    let v = text(obj, tag).ok_or_else(|| {
        ParseError::Mismatch(format!(
            "{name} ({:04X},{:04X}) is missing",
            tag.group(),
            tag.element()
        ))
    })?;
    if valid_uid(&v) {
        Ok(v)
    } else {
        Err(ParseError::Mismatch(format!("{name} is not a valid UID")))
    }
}

pub fn index_of(obj: &DefaultDicomObject) -> Result<InstanceIndex, ParseError> {
    let sop_instance_uid = required_uid(obj, tags::SOP_INSTANCE_UID, "SOP Instance UID")?;
    let sop_class_uid = required_uid(obj, tags::SOP_CLASS_UID, "SOP Class UID")?;
    let study_uid = required_uid(obj, tags::STUDY_INSTANCE_UID, "Study Instance UID")?;
    let series_uid = required_uid(obj, tags::SERIES_INSTANCE_UID, "Series Instance UID")?;
    let transfer_syntax = obj
        .meta()
        .transfer_syntax()
        .trim_end_matches(['\0', ' '])
        .to_string();
    let frames = int(obj, tags::NUMBER_OF_FRAMES)
        .or_else(|| obj.element_opt(tags::PIXEL_DATA).ok().flatten().map(|_| 1));
    Ok(InstanceIndex {
        sop_instance_uid,
        sop_class_uid,
        study_uid,
        series_uid,
        transfer_syntax,
        patient_id: text(obj, tags::PATIENT_ID),
        patient_name: text(obj, tags::PATIENT_NAME),
        patient_birth_date: text(obj, tags::PATIENT_BIRTH_DATE),
        patient_sex: text(obj, tags::PATIENT_SEX),
        study_date: text(obj, tags::STUDY_DATE),
        study_time: text(obj, tags::STUDY_TIME),
        accession_number: text(obj, tags::ACCESSION_NUMBER),
        study_id: text(obj, tags::STUDY_ID),
        study_description: text(obj, tags::STUDY_DESCRIPTION),
        referring_physician: text(obj, tags::REFERRING_PHYSICIAN_NAME),
        modality: text(obj, tags::MODALITY),
        series_number: int(obj, tags::SERIES_NUMBER),
        series_description: text(obj, tags::SERIES_DESCRIPTION),
        body_part: text(obj, tags::BODY_PART_EXAMINED),
        view_position: text(obj, tags::VIEW_POSITION),
        instance_number: int(obj, tags::INSTANCE_NUMBER),
        rows: int(obj, tags::ROWS),
        columns: int(obj, tags::COLUMNS),
        frames,
    })
}

/// Image storage SOP classes (PS3.4 B.5) whose Pixel Data is Type 1: everything under
/// `1.2.840.10008.5.1.4.1.1.` except the non-image families Carina knows of.
pub fn is_image_storage(sop_class: &str) -> bool {
    let Some(rest) = sop_class.strip_prefix("1.2.840.10008.5.1.4.1.1.") else {
        return false;
    };
    let non_image = [
        "88.",  // structured reports
        "104.", // encapsulated documents
        "481.", // radiotherapy (RT dose has pixels but is not a picture)
        "66",   // raw data, spatial registration, segmentation (1-bit), surface
        "11.",  // presentation states
        "9.",   // waveforms
        "67",   // real world value mapping
        "68.",  // surface scan
        "78.",  // measurements
        "79.",  // ophthalmic
        "90.",  // content assessment results
        "200.", // CT protocols
        "201.", // general audio / video documents
    ];
    !non_image.iter().any(|p| rest.starts_with(p))
}

fn check_native_length(obj: &DefaultDicomObject) -> Result<(), ParseError> {
    let Ok(Some(px)) = obj.element_opt(tags::PIXEL_DATA) else {
        return Ok(());
    };
    if px.fragments().is_some() {
        return Ok(()); // encapsulated: the codec checks it when decoding
    }
    let get = |t| int(obj, t).unwrap_or(0).max(0) as u64;
    let (rows, cols, bits) = (
        get(tags::ROWS),
        get(tags::COLUMNS),
        get(tags::BITS_ALLOCATED),
    );
    let spp = get(tags::SAMPLES_PER_PIXEL).max(1);
    let frames = get(tags::NUMBER_OF_FRAMES).max(1);
    let needed = (rows * cols * spp * frames * bits).div_ceil(8);
    let have = px.to_bytes().map(|b| b.len() as u64).unwrap_or(0);
    if needed == 0 {
        return Err(ParseError::Mismatch(
            "Rows, Columns or Bits Allocated is missing or zero".into(),
        ));
    }
    if have < needed {
        return Err(ParseError::Unreadable(format!(
            "Pixel Data holds {have} bytes but Rows x Columns x Samples x Frames x Bits needs {needed}"
        )));
    }
    Ok(())
}

/// Encapsulated pixel data: every fragment that starts with a codec header (JPEG, JPEG-LS,
/// JPEG 2000, PNG) must declare no more than the data set's Rows × Columns, so no decoder is
/// ever asked to allocate for a frame larger than the object says (a 700-byte JPEG declaring
/// 32768 × 32768). Checked at ingest and again before every decode.
///
/// # Errors
/// [`ParseError::Unreadable`] naming both sizes.
pub fn check_frame_headers(obj: &DefaultDicomObject) -> Result<(), ParseError> {
    let Ok(Some(px)) = obj.element_opt(tags::PIXEL_DATA) else {
        return Ok(());
    };
    let Some(fragments) = px.fragments() else {
        return Ok(());
    };
    let rows = int(obj, tags::ROWS).unwrap_or(0).max(0);
    let cols = int(obj, tags::COLUMNS).unwrap_or(0).max(0);
    for f in fragments {
        if let Some(d) = super::frame_header::any(f) {
            if d.width == 0
                || d.height == 0
                || i64::from(d.width) > cols
                || i64::from(d.height) > rows
            {
                return Err(ParseError::Unreadable(format!(
                    "a compressed frame declares {} x {} pixels but the data set has Columns {cols} and Rows {rows}",
                    d.width, d.height
                )));
            }
        }
    }
    Ok(())
}

/// Rejects encodings whose sequence nesting exceeds [`MAX_SEQUENCE_DEPTH`], by a linear scan of
/// item start / item delimiter tags (FFFE,E000 and FFFE,E00D). The scan over-counts only when
/// those byte patterns appear inside values, which in practice keeps depth far below the limit.
fn check_nesting(body: &[u8]) -> Result<(), ParseError> {
    let mut depth: usize = 0;
    let mut max: usize = 0;
    let mut i = 0;
    while i + 4 <= body.len() {
        // every pattern starts with 0xFE or 0xFF: jump to the next such byte
        match memchr::memchr2(0xFE, 0xFF, &body[i..body.len() - 3]) {
            Some(skip) => i += skip,
            None => break,
        }
        match &body[i..i + 4] {
            // item start, little or (retired) big endian
            [0xFE, 0xFF, 0x00, 0xE0] | [0xFF, 0xFE, 0xE0, 0x00] => {
                // an item with an explicit length is skipped by the parser as a unit of its
                // own; its delimiter never comes, so only undefined-length items nest here
                let undefined = body.get(i + 4..i + 8) == Some(&[0xFF; 4][..]);
                if undefined {
                    depth += 1;
                    max = max.max(depth);
                }
                i += 8;
            }
            [0xFE, 0xFF, 0x0D, 0xE0] | [0xFF, 0xFE, 0xE0, 0x0D] => {
                depth = depth.saturating_sub(1);
                i += 8;
            }
            _ => i += 1,
        }
        if max > MAX_SEQUENCE_DEPTH {
            return Err(ParseError::Unreadable(format!(
                "sequences nest deeper than {MAX_SEQUENCE_DEPTH} levels"
            )));
        }
    }
    Ok(())
}

const UNDEFINED: u32 = u32::MAX;

fn overrun(g: u16, e: u16, len: u32, rem: usize) -> ParseError {
    ParseError::Unreadable(format!(
        "element ({g:04X},{e:04X}) declares {len} bytes but only {rem} remain"
    ))
}

const LONG: [&[u8; 2]; 13] = [
    b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV",
];
const SHORT: [&[u8; 2]; 22] = [
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN",
    b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US", b"UN",
];

/// The 16-bit value at `i` (callers check `i + 2 <= body.len()`).
fn read_u16(body: &[u8], i: usize, big: bool) -> u16 {
    let b = [body[i], body[i + 1]];
    if big {
        u16::from_be_bytes(b)
    } else {
        u16::from_le_bytes(b)
    }
}

/// The 32-bit value at `i` (callers check `i + 4 <= body.len()`).
fn read_u32(body: &[u8], i: usize, big: bool) -> u32 {
    let b = [body[i], body[i + 1], body[i + 2], body[i + 3]];
    if big {
        u32::from_be_bytes(b)
    } else {
        u32::from_le_bytes(b)
    }
}

/// Largest inflated size of a deflated data set (a decompression bomb stops here).
pub const MAX_INFLATED: u64 = 64 << 20;

/// Walks the element structure (file meta, then the data set in its transfer syntax) and
/// refuses any value length that runs past the end of the data, or an invalid VR, before the
/// parser sees it: a crafted 4 GiB length must be a quick refusal, not a long read. Sequences
/// and items are entered; encapsulated fragments are skipped. A deflated data set is inflated
/// (up to [`MAX_INFLATED`]) and checked the same way (cargo fuzz found an out-of-memory
/// through one); undefined-length UN values (implicit VR inside) are left to the parser.
fn check_lengths(body: &[u8]) -> Result<(), ParseError> {
    let n = body.len();
    // file meta: explicit VR little endian, group 0002
    let mut i = 0;
    let mut ts = String::new();
    while i + 8 <= n && read_u16(body, i, false) == 0x0002 {
        let e = read_u16(body, i + 2, false);
        let vr = [body[i + 4], body[i + 5]];
        let (hdr, len) = if LONG.iter().any(|v| **v == vr) {
            if i + 12 > n {
                return Err(ParseError::Unreadable("truncated file meta group".into()));
            }
            (12, read_u32(body, i + 8, false))
        } else {
            (8, u32::from(read_u16(body, i + 6, false)))
        };
        let rem = n - i - hdr;
        if len as usize > rem {
            return Err(overrun(2, e, len, rem));
        }
        if e == 0x0010 {
            ts = String::from_utf8_lossy(&body[i + hdr..i + hdr + len as usize])
                .trim_end_matches(['\0', ' '])
                .to_string();
        }
        i += hdr + len as usize;
    }
    let (implicit, big) = match ts.as_str() {
        "1.2.840.10008.1.2" => (true, false),
        "1.2.840.10008.1.2.2" => (false, true),
        "1.2.840.10008.1.2.1.99" | "1.2.840.10008.1.2.8.1" => {
            let inflated = inflate(&body[i..])?;
            check_nesting(&inflated)?;
            return walk_data_set(&inflated, 0, false, false);
        }
        _ => (false, false),
    };
    walk_data_set(body, i, implicit, big)
}

/// Inflates a deflated data set (PS3.5 A.5: raw deflate), refusing more than [`MAX_INFLATED`].
fn inflate(data: &[u8]) -> Result<Vec<u8>, ParseError> {
    use std::io::Read;
    // first the size, into a sink: a bomb is refused without holding what it inflates to
    let size = std::io::copy(
        &mut flate2::read::DeflateDecoder::new(data).take(MAX_INFLATED + 1),
        &mut std::io::sink(),
    )
    .map_err(|e| ParseError::Unreadable(format!("the deflated data set does not inflate: {e}")))?;
    if size > MAX_INFLATED {
        return Err(ParseError::Unreadable(format!(
            "the deflated data set inflates to more than {} MiB",
            MAX_INFLATED >> 20
        )));
    }
    let mut out = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    flate2::read::DeflateDecoder::new(data)
        .take(MAX_INFLATED + 1)
        .read_to_end(&mut out)
        .map_err(|e| {
            ParseError::Unreadable(format!("the deflated data set does not inflate: {e}"))
        })?;
    if out.len() as u64 > MAX_INFLATED {
        return Err(ParseError::Unreadable(format!(
            "the deflated data set inflates to more than {} MiB",
            MAX_INFLATED >> 20
        )));
    }
    Ok(out)
}

/// The element walk of [`check_lengths`] over a data set starting at `start`.
fn walk_data_set(body: &[u8], start: usize, implicit: bool, big: bool) -> Result<(), ParseError> {
    let n = body.len();
    let mut i = start;
    let mut in_fragments = false;
    while i + 8 <= n {
        let (g, e) = (read_u16(body, i, big), read_u16(body, i + 2, big));
        let rem = n - i - 8;
        if g == 0xFFFE {
            let len = read_u32(body, i + 4, big);
            match e {
                0xE000 if in_fragments => {
                    if len as usize > rem {
                        return Err(overrun(g, e, len, rem));
                    }
                    i += 8 + len as usize;
                }
                0xE000 => {
                    if len != UNDEFINED && len as usize > rem {
                        return Err(overrun(g, e, len, rem));
                    }
                    i += 8; // enter the item
                }
                0xE0DD => {
                    in_fragments = false;
                    i += 8;
                }
                _ => i += 8,
            }
            continue;
        }
        let (hdr, len, vr) = if implicit {
            (8, read_u32(body, i + 4, big), None)
        } else {
            let vr = [body[i + 4], body[i + 5]];
            if LONG.iter().any(|v| **v == vr) {
                if i + 12 > n {
                    return Err(ParseError::Unreadable("truncated element header".into()));
                }
                (12, read_u32(body, i + 8, big), Some(vr))
            } else if SHORT.iter().any(|v| **v == vr) {
                (8, u32::from(read_u16(body, i + 6, big)), Some(vr))
            } else {
                return Err(ParseError::Unreadable(format!(
                    "element ({g:04X},{e:04X}) has an invalid VR"
                )));
            }
        };
        if len == UNDEFINED {
            match vr {
                Some(v) if &v == b"UN" => return Ok(()),
                _ if (g, e) == (0x7FE0, 0x0010) => in_fragments = true,
                _ => {}
            }
            i += hdr;
            continue;
        }
        let rem = n - i - hdr;
        if len as usize > rem {
            return Err(overrun(g, e, len, rem));
        }
        if vr.is_some_and(|v| &v == b"SQ") {
            i += hdr; // enter a defined-length sequence
        } else {
            i += hdr + len as usize;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(name: &str) -> Vec<u8> {
        std::fs::read(format!(
            "{}/dicom-samples/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    #[test]
    fn uids_are_checked() {
        assert!(valid_uid("1.2.840.10008.1.2.1"));
        assert!(valid_uid("2.25.0"));
        assert!(!valid_uid(""));
        assert!(!valid_uid("1..2"));
        assert!(!valid_uid("1.02"));
        assert!(!valid_uid("1.2a"));
        assert!(!valid_uid(&"1.".repeat(40)));
    }

    #[test]
    fn indexes_a_real_file_and_refuses_non_dicom() {
        let p = parse_instance(&sample("CT_small.dcm")).unwrap();
        assert_eq!(p.index.modality.as_deref(), Some("CT"));
        assert_eq!(p.index.sop_class_uid, "1.2.840.10008.5.1.4.1.1.2");
        assert_eq!(p.index.rows, Some(128));
        assert_eq!(p.index.frames, Some(1));
        assert!(p.has_pixels);
        assert_eq!(&p.part10[128..132], b"DICM");
        let e = parse_instance(b"hello").unwrap_err();
        assert_eq!(e.status(), status::CANNOT_UNDERSTAND);
    }

    #[test]
    fn image_classes_are_recognised() {
        assert!(is_image_storage("1.2.840.10008.5.1.4.1.1.1.1")); // DX
        assert!(is_image_storage("1.2.840.10008.5.1.4.1.1.7")); // SC
        assert!(!is_image_storage("1.2.840.10008.5.1.4.1.1.88.22")); // SR
        assert!(!is_image_storage("1.2.840.10008.5.1.4.1.1.481.2")); // RT dose
        assert!(!is_image_storage("1.2.840.10008.5.1.4.1.1.66.4")); // SEG
    }

    #[test]
    fn every_sample_passes_the_length_walk_and_overruns_are_refused() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/dicom-samples");
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "dcm") {
                let b = std::fs::read(&p).unwrap();
                check_lengths(&b[132..]).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            }
        }
        let mut b = sample("CT_small.dcm");
        let n = b.len();
        b.truncate(n - 2000);
        let e = check_lengths(&b[132..]).unwrap_err();
        assert!(e.to_string().contains("(7FE0,0010)"), "{e}");
    }

    #[test]
    fn deep_nesting_is_refused_before_parsing() {
        let mut body = Vec::new();
        for _ in 0..1000 {
            body.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        }
        assert!(check_nesting(&body).is_err());
        let flat: Vec<u8> = (0..100)
            .flat_map(|_| {
                [
                    0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF, 0xFE, 0xFF, 0x0D, 0xE0, 0, 0,
                    0, 0,
                ]
            })
            .collect();
        assert!(check_nesting(&flat).is_ok());
    }
}
