//! A sequential DCT JPEG decoder (ITU-T T.81 processes 1, 2 and 4: Huffman coding, 8- or
//! 12-bit samples), for DICOM's JPEG Extended transfer syntax (1.2.840.10008.1.2.4.51).
//!
//! dicom-pixeldata decodes JPEG through jpeg-decoder, which has no 12-bit DCT support; 12-bit
//! CT, NM and XA images compressed by older modalities use exactly that. This decoder returns
//! the stored sample values, one `u16` per sample, interleaved by component, with no colour
//! conversion (the DICOM Photometric Interpretation says what the components are).
//!
//! Untrusted input: every length and index is checked, the image size is bounded by the
//! caller's expectation, and a malformed stream is an error, never a panic.

/// Why a JPEG stream could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("JPEG: {0}")]
pub struct JpegError(String);

fn bad<T>(why: impl Into<String>) -> Result<T, JpegError> {
    Err(JpegError(why.into()))
}

/// A decoded frame.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Samples per line.
    pub width: usize,
    /// Lines.
    pub height: usize,
    /// Sample precision in bits (8 or 12).
    pub precision: u8,
    /// Components per pixel.
    pub components: usize,
    /// `height * width * components` samples, component-interleaved.
    pub samples: Vec<u16>,
}

/// Sample precision of the first frame header (SOF0/SOF1/SOF2…) in `data`, without decoding.
pub fn precision(data: &[u8]) -> Option<u8> {
    let mut i = 2;
    while i + 4 < data.len() {
        if data[i] != 0xFF {
            return None;
        }
        let marker = data[i + 1];
        if marker == 0xFF {
            i += 1;
            continue;
        }
        let len = usize::from(u16::from_be_bytes([data[i + 2], data[i + 3]]));
        if matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC) {
            return data.get(i + 4).copied();
        }
        i += 2 + len;
    }
    None
}

/// Zig-zag order: the `k`-th coefficient of a scan goes to natural position `ZIGZAG[k]`.
const ZIGZAG: [usize; 64] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20,
    13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59,
    52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
];

/// A Huffman table in the form of T.81 F.2.2.3 (MAXCODE, VALPTR, MINCODE per code length).
#[derive(Clone)]
struct Huffman {
    maxcode: [i32; 17],
    mincode: [i32; 17],
    valptr: [usize; 17],
    values: Vec<u8>,
}

impl Huffman {
    fn new(counts: &[u8; 16], values: Vec<u8>) -> Result<Self, JpegError> {
        let total: usize = counts.iter().map(|&c| usize::from(c)).sum();
        if total != values.len() || total > 256 {
            return bad("Huffman table value count mismatch");
        }
        let mut h = Self {
            maxcode: [-1; 17],
            mincode: [0; 17],
            valptr: [0; 17],
            values,
        };
        let (mut code, mut k) = (0i32, 0usize);
        for len in 1..=16 {
            let n = usize::from(counts[len - 1]);
            if n > 0 {
                h.valptr[len] = k;
                h.mincode[len] = code;
                code += n as i32;
                k += n;
                h.maxcode[len] = code - 1;
                if code > (1 << len) {
                    return bad("Huffman table has more codes than fit their lengths");
                }
            }
            code <<= 1;
        }
        Ok(h)
    }
}

/// Reads entropy-coded bits, removing stuffed zero bytes; at a marker it supplies zeros.
struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
    acc: u32,
    count: u32,
    at_marker: bool,
}

impl<'a> Bits<'a> {
    fn new(data: &'a [u8], pos: usize) -> Self {
        Self {
            data,
            pos,
            acc: 0,
            count: 0,
            at_marker: false,
        }
    }

    fn fill(&mut self) {
        while self.count <= 24 {
            let mut byte = 0u8;
            if !self.at_marker {
                match self.data.get(self.pos) {
                    Some(0xFF) => match self.data.get(self.pos + 1) {
                        Some(0x00) => {
                            byte = 0xFF;
                            self.pos += 2;
                        }
                        _ => self.at_marker = true,
                    },
                    Some(&b) => {
                        byte = b;
                        self.pos += 1;
                    }
                    None => self.at_marker = true,
                }
            }
            self.acc |= u32::from(byte) << (24 - self.count);
            self.count += 8;
        }
    }

    fn bits(&mut self, n: u32) -> u32 {
        if n == 0 {
            return 0;
        }
        self.fill();
        let v = self.acc >> (32 - n);
        self.acc <<= n;
        self.count -= n;
        v
    }

    fn decode(&mut self, h: &Huffman) -> Result<u8, JpegError> {
        let mut code = 0i32;
        for len in 1..=16 {
            code = (code << 1) | self.bits(1) as i32;
            if code <= h.maxcode[len] {
                let idx = h.valptr[len] + (code - h.mincode[len]) as usize;
                return h
                    .values
                    .get(idx)
                    .copied()
                    .ok_or_else(|| JpegError("Huffman value out of range".into()));
            }
        }
        bad("invalid Huffman code")
    }

    /// RECEIVE + EXTEND (T.81 F.2.2.1): `s` bits as a signed difference.
    fn receive_extend(&mut self, s: u8) -> Result<i32, JpegError> {
        if s == 0 {
            return Ok(0);
        }
        if s > 16 {
            return bad("coefficient magnitude category above 16");
        }
        let s = u32::from(s);
        let v = self.bits(s) as i32;
        Ok(if v < (1 << (s - 1)) {
            v - (1 << s) + 1
        } else {
            v
        })
    }

    /// Skips to the next marker, which must be RSTn, and resets the bit buffer.
    fn restart(&mut self) -> Result<(), JpegError> {
        self.acc = 0;
        self.count = 0;
        self.at_marker = false;
        while self.pos + 1 < self.data.len()
            && !(self.data[self.pos] == 0xFF && matches!(self.data[self.pos + 1], 0xD0..=0xD7))
        {
            self.pos += 1;
        }
        if self.pos + 1 >= self.data.len() {
            return bad("missing restart marker");
        }
        self.pos += 2;
        Ok(())
    }

    /// Position of the marker that ends the entropy-coded segment.
    fn end(&self) -> usize {
        let mut p = self.pos;
        while p + 1 < self.data.len() && !(self.data[p] == 0xFF && self.data[p + 1] != 0) {
            p += 1;
        }
        p
    }
}

#[derive(Clone, Copy)]
struct Component {
    id: u8,
    h: usize,
    v: usize,
    tq: usize,
}

/// Float inverse DCT (T.81 A.3.3) of one dequantised block, in place, natural order.
fn idct(block: &mut [f64; 64], cos: &[[f64; 8]; 8]) {
    let mut tmp = [0f64; 64];
    for y in 0..8 {
        for x in 0..8 {
            tmp[y * 8 + x] = (0..8).map(|u| cos[x][u] * block[y * 8 + u]).sum();
        }
    }
    for x in 0..8 {
        for y in 0..8 {
            block[y * 8 + x] = (0..8).map(|v| cos[y][v] * tmp[v * 8 + x]).sum::<f64>() / 4.0;
        }
    }
}

/// `cos[x][u] = C(u) cos((2x+1)uπ/16)`, with C(0) = 1/√2.
fn cos_table() -> [[f64; 8]; 8] {
    let mut t = [[0f64; 8]; 8];
    for (x, row) in t.iter_mut().enumerate() {
        for (u, c) in row.iter_mut().enumerate() {
            let cu = if u == 0 {
                std::f64::consts::FRAC_1_SQRT_2
            } else {
                1.0
            };
            *c = cu * (((2 * x + 1) as f64 * u as f64 * std::f64::consts::PI) / 16.0).cos();
        }
    }
    t
}

fn be16(data: &[u8], at: usize) -> Result<usize, JpegError> {
    match data.get(at..at + 2) {
        Some(b) => Ok(usize::from(u16::from_be_bytes([b[0], b[1]]))),
        None => bad("truncated stream"),
    }
}

/// Decodes a sequential DCT Huffman JPEG (SOF0 or SOF1, 8- or 12-bit). `max_samples` bounds
/// `width * height * components` before anything is allocated.
///
/// # Errors
/// [`JpegError`] for progressive, lossless, hierarchical or arithmetic-coded streams, and for
/// any malformed or truncated data.
pub fn decode(data: &[u8], max_samples: usize) -> Result<Frame, JpegError> {
    if !data.starts_with(&[0xFF, 0xD8]) {
        return bad("no SOI marker");
    }
    let cos = cos_table();
    let mut qt = [[0u16; 64]; 4];
    let mut dc: [Option<Huffman>; 4] = [None, None, None, None];
    let mut ac: [Option<Huffman>; 4] = [None, None, None, None];
    let mut comps: Vec<Component> = Vec::new();
    let (mut width, mut height, mut precision) = (0usize, 0usize, 0u8);
    let mut planes: Vec<Vec<u16>> = Vec::new();
    let (mut hmax, mut vmax) = (1usize, 1usize);
    let mut restart = 0usize;
    let mut scans = 0usize;
    let mut pos = 2;
    loop {
        // find the next marker (fill bytes 0xFF allowed)
        while data.get(pos) == Some(&0xFF) && data.get(pos + 1) == Some(&0xFF) {
            pos += 1;
        }
        if data.get(pos) != Some(&0xFF) {
            return bad(format!("expected a marker at byte {pos}"));
        }
        let marker = match data.get(pos + 1) {
            Some(&m) => m,
            None => return bad("truncated stream"),
        };
        pos += 2;
        if marker == 0xD9 {
            break;
        }
        if matches!(marker, 0x01 | 0xD0..=0xD7) {
            continue;
        }
        let len = be16(data, pos)?;
        let seg = match data.get(pos + 2..pos + len) {
            Some(s) if len >= 2 => s,
            _ => return bad("segment length past the end"),
        };
        match marker {
            0xC0 | 0xC1 => {
                if !comps.is_empty() {
                    return bad("several frame headers");
                }
                if seg.len() < 6 {
                    return bad("short frame header");
                }
                precision = seg[0];
                if precision != 8 && precision != 12 {
                    return bad(format!("sample precision {precision}"));
                }
                height = usize::from(u16::from_be_bytes([seg[1], seg[2]]));
                width = usize::from(u16::from_be_bytes([seg[3], seg[4]]));
                let n = usize::from(seg[5]);
                if height == 0 || width == 0 || n == 0 || n > 4 || seg.len() != 6 + 3 * n {
                    return bad("frame header fields out of range (or DNL, unsupported)");
                }
                if width * height * n > max_samples {
                    return bad(format!("{width}x{height}x{n} is larger than expected"));
                }
                for c in seg[6..].chunks_exact(3) {
                    let (h, v, tq) = (usize::from(c[1] >> 4), usize::from(c[1] & 15), c[2]);
                    if !(1..=4).contains(&h) || !(1..=4).contains(&v) || tq > 3 {
                        return bad("component sampling factors or table out of range");
                    }
                    comps.push(Component {
                        id: c[0],
                        h,
                        v,
                        tq: usize::from(tq),
                    });
                }
                hmax = comps.iter().map(|c| c.h).max().unwrap_or(1);
                vmax = comps.iter().map(|c| c.v).max().unwrap_or(1);
                let (mx, my) = (width.div_ceil(8 * hmax), height.div_ceil(8 * vmax));
                planes = comps
                    .iter()
                    .map(|c| vec![0u16; mx * c.h * 8 * my * c.v * 8])
                    .collect();
            }
            0xC2 | 0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => {
                return bad(format!(
                    "frame type SOF{} (only sequential Huffman DCT is decoded here)",
                    marker - 0xC0
                ));
            }
            0xC4 => {
                let mut i = 0;
                while i < seg.len() {
                    let tc_th = seg[i];
                    let counts: [u8; 16] = match seg.get(i + 1..i + 17) {
                        Some(c) => c.try_into().map_err(|_| JpegError("DHT".into()))?,
                        None => return bad("short Huffman table"),
                    };
                    let n: usize = counts.iter().map(|&c| usize::from(c)).sum();
                    let values = match seg.get(i + 17..i + 17 + n) {
                        Some(v) => v.to_vec(),
                        None => return bad("short Huffman table"),
                    };
                    let (class, id) = (tc_th >> 4, usize::from(tc_th & 15));
                    if id > 3 || class > 1 {
                        return bad("Huffman table class or id out of range");
                    }
                    let table = Some(Huffman::new(&counts, values)?);
                    if class == 0 {
                        dc[id] = table;
                    } else {
                        ac[id] = table;
                    }
                    i += 17 + n;
                }
            }
            0xDB => {
                let mut i = 0;
                while i < seg.len() {
                    let (pq, id) = (seg[i] >> 4, usize::from(seg[i] & 15));
                    if id > 3 || pq > 1 {
                        return bad("quantisation table precision or id out of range");
                    }
                    let size = if pq == 0 { 64 } else { 128 };
                    let body = match seg.get(i + 1..i + 1 + size) {
                        Some(b) => b,
                        None => return bad("short quantisation table"),
                    };
                    for k in 0..64 {
                        qt[id][k] = if pq == 0 {
                            u16::from(body[k])
                        } else {
                            u16::from_be_bytes([body[2 * k], body[2 * k + 1]])
                        };
                    }
                    i += 1 + size;
                }
            }
            0xDD => restart = be16(seg, 0)?,
            0xDA => {
                if comps.is_empty() {
                    return bad("scan before the frame header");
                }
                let ns = usize::from(*seg.first().unwrap_or(&0));
                if ns == 0 || ns > 4 || seg.len() != 1 + 2 * ns + 3 {
                    return bad("scan header fields out of range");
                }
                let mut members = Vec::with_capacity(ns);
                for c in seg[1..1 + 2 * ns].chunks_exact(2) {
                    let Some(ci) = comps.iter().position(|x| x.id == c[0]) else {
                        return bad("scan names an unknown component");
                    };
                    let (td, ta) = (usize::from(c[1] >> 4), usize::from(c[1] & 15));
                    let (Some(Some(d)), Some(Some(a))) = (dc.get(td), ac.get(ta)) else {
                        return bad("scan uses an undefined Huffman table");
                    };
                    members.push((ci, d.clone(), a.clone()));
                }
                let tail = &seg[1 + 2 * ns..];
                if tail[0] != 0 || tail[1] != 63 || tail[2] != 0 {
                    return bad(
                        "spectral selection or successive approximation in a sequential scan",
                    );
                }
                let start = pos + len;
                let mut bits = Bits::new(data, start);
                let ctx = Scan {
                    comps: &comps,
                    qt: &qt,
                    cos: &cos,
                    width,
                    height,
                    hmax,
                    vmax,
                    precision,
                    restart,
                };
                ctx.run(&members, &mut bits, &mut planes)?;
                scans += 1;
                pos = bits.end();
                continue;
            }
            _ => {} // APPn, COM, DNL-less extras: skipped
        }
        pos += len;
    }
    if scans == 0 {
        return bad("no scan");
    }
    // upsample each component to full size (replication) and interleave
    let n = comps.len();
    let mut samples = vec![0u16; width * height * n];
    let mx = width.div_ceil(8 * hmax);
    for (ci, c) in comps.iter().enumerate() {
        let stride = mx * c.h * 8;
        for y in 0..height {
            let sy = y * c.v / vmax;
            for x in 0..width {
                let sx = x * c.h / hmax;
                samples[(y * width + x) * n + ci] = planes[ci][sy * stride + sx];
            }
        }
    }
    Ok(Frame {
        width,
        height,
        precision,
        components: n,
        samples,
    })
}

/// What decoding one scan needs from the frame.
struct Scan<'a> {
    comps: &'a [Component],
    qt: &'a [[u16; 64]; 4],
    cos: &'a [[f64; 8]; 8],
    width: usize,
    height: usize,
    hmax: usize,
    vmax: usize,
    precision: u8,
    restart: usize,
}

impl Scan<'_> {
    fn run(
        &self,
        members: &[(usize, Huffman, Huffman)],
        bits: &mut Bits<'_>,
        planes: &mut [Vec<u16>],
    ) -> Result<(), JpegError> {
        let mx = self.width.div_ceil(8 * self.hmax);
        let my = self.height.div_ceil(8 * self.vmax);
        let mut pred = vec![0i32; members.len()];
        // a single-component scan is non-interleaved: one block per MCU, over that component's
        // own block grid (T.81 A.2.2)
        let (units_x, units_y) = if members.len() == 1 {
            let c = self.comps[members[0].0];
            (
                (self.width * c.h).div_ceil(self.hmax).div_ceil(8),
                (self.height * c.v).div_ceil(self.vmax).div_ceil(8),
            )
        } else {
            (mx, my)
        };
        let mut block = [0f64; 64];
        let mut mcu = 0usize;
        for uy in 0..units_y {
            for ux in 0..units_x {
                if self.restart > 0 && mcu > 0 && mcu % self.restart == 0 {
                    bits.restart()?;
                    pred.iter_mut().for_each(|p| *p = 0);
                }
                mcu += 1;
                for (m, (ci, dct, act)) in members.iter().enumerate() {
                    let c = self.comps[*ci];
                    let (bh, bv) = if members.len() == 1 {
                        (1, 1)
                    } else {
                        (c.h, c.v)
                    };
                    for by in 0..bv {
                        for bx in 0..bh {
                            self.block(bits, dct, act, &mut pred[m], c.tq, &mut block)?;
                            let (x0, y0) = if members.len() == 1 {
                                (ux * 8, uy * 8)
                            } else {
                                ((ux * c.h + bx) * 8, (uy * c.v + by) * 8)
                            };
                            self.store(&block, &mut planes[*ci], mx * c.h * 8, x0, y0);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Decodes, dequantises and inverse-transforms one 8x8 block.
    fn block(
        &self,
        bits: &mut Bits<'_>,
        dct: &Huffman,
        act: &Huffman,
        pred: &mut i32,
        tq: usize,
        out: &mut [f64; 64],
    ) -> Result<(), JpegError> {
        let q = &self.qt[tq];
        *out = [0.0; 64];
        let t = bits.decode(dct)?;
        *pred = pred.wrapping_add(bits.receive_extend(t)?);
        out[0] = f64::from(*pred) * f64::from(q[0]);
        let mut k = 1;
        while k < 64 {
            let rs = bits.decode(act)?;
            let (r, s) = (usize::from(rs >> 4), rs & 15);
            if s == 0 {
                if r != 15 {
                    break;
                }
                k += 16;
                continue;
            }
            k += r;
            if k > 63 {
                return bad("coefficient index past 63");
            }
            out[ZIGZAG[k]] = f64::from(bits.receive_extend(s)?) * f64::from(q[k]);
            k += 1;
        }
        idct(out, self.cos);
        Ok(())
    }

    /// Level-shifts, rounds, clamps and writes a block into a component plane.
    fn store(&self, block: &[f64; 64], plane: &mut [u16], stride: usize, x0: usize, y0: usize) {
        let shift = f64::from(1u32 << (self.precision - 1));
        let max = f64::from((1u32 << self.precision) - 1);
        for y in 0..8 {
            for x in 0..8 {
                let v = (block[y * 8 + x] + shift).round().clamp(0.0, max);
                if let Some(p) = plane.get_mut((y0 + y) * stride + x0 + x) {
                    *p = v as u16;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An 8-bit baseline JPEG made by the `image` crate's encoder: this decoder must agree
    /// with the `image` crate's own decoder to within IDCT rounding.
    #[test]
    fn agrees_with_an_independent_decoder_on_baseline_gray_and_colour() {
        let gray =
            image::GrayImage::from_fn(37, 21, |x, y| image::Luma([((x * 7 + y * 11) % 256) as u8]));
        let rgb = image::RgbImage::from_fn(40, 24, |x, y| {
            image::Rgb([(x * 6) as u8, (y * 10) as u8, ((x + y) * 4) as u8])
        });
        for img in [
            image::DynamicImage::ImageLuma8(gray),
            image::DynamicImage::ImageRgb8(rgb),
        ] {
            let mut jpg = Vec::new();
            img.write_to(
                &mut std::io::Cursor::new(&mut jpg),
                image::ImageFormat::Jpeg,
            )
            .unwrap();
            let ours = decode(&jpg, 1 << 20).unwrap();
            assert_eq!(
                (ours.width, ours.height),
                (img.width() as usize, img.height() as usize)
            );
            assert_eq!(ours.precision, 8);
            let theirs = image::load_from_memory(&jpg).unwrap();
            if ours.components == 1 {
                let t = theirs.to_luma8();
                let worst = ours
                    .samples
                    .iter()
                    .zip(t.as_raw())
                    .map(|(a, b)| (i32::from(*a) - i32::from(*b)).abs())
                    .max()
                    .unwrap();
                assert!(worst <= 1, "gray differs by {worst}");
            } else {
                // the image crate converts YCbCr to RGB; compare after the same conversion
                let t = theirs.to_rgb8();
                let mut worst = 0f64;
                for (px, want) in ours.samples.chunks_exact(3).zip(t.pixels()) {
                    let (y, cb, cr) = (
                        f64::from(px[0]),
                        f64::from(px[1]) - 128.0,
                        f64::from(px[2]) - 128.0,
                    );
                    let rgb = [
                        y + 1.402 * cr,
                        y - 0.344136 * cb - 0.714136 * cr,
                        y + 1.772 * cb,
                    ];
                    for (a, b) in rgb.iter().zip(want.0) {
                        worst = worst.max((a.clamp(0.0, 255.0) - f64::from(b)).abs());
                    }
                }
                assert!(worst <= 3.0, "colour differs by {worst}");
            }
        }
    }

    #[test]
    fn malformed_streams_are_errors() {
        let gray = image::GrayImage::from_fn(16, 16, |x, _| image::Luma([x as u8 * 16]));
        let mut jpg = Vec::new();
        image::DynamicImage::ImageLuma8(gray)
            .write_to(
                &mut std::io::Cursor::new(&mut jpg),
                image::ImageFormat::Jpeg,
            )
            .unwrap();
        assert!(decode(&jpg, 255).is_err(), "larger than the caller allows");
        for cut in [1, 3, 10, 100, jpg.len() / 2] {
            let _ = decode(&jpg[..cut], 1 << 20); // any result but a panic
        }
        assert!(decode(b"not a jpeg", 1 << 20).is_err());
        assert_eq!(precision(&jpg), Some(8));
    }
}
