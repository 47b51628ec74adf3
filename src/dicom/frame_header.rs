//! The size a compressed frame declares in its own header (JPEG SOF, JPEG-LS SOF55, JPEG 2000
//! SIZ or JP2 `ihdr`, PNG IHDR), read without decoding, so it can be checked against the data
//! set's Rows and Columns and the pixel limits before any decoder allocates for it. A 700-byte
//! file whose JPEG says 32768 × 32768 is refused here, not by running out of memory.

/// What a frame header declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Declared {
    /// Columns.
    pub width: u32,
    /// Rows.
    pub height: u32,
}

fn be16(d: &[u8], at: usize) -> Option<u32> {
    Some(u32::from(u16::from_be_bytes([
        *d.get(at)?,
        *d.get(at + 1)?,
    ])))
}

fn be32(d: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes([
        *d.get(at)?,
        *d.get(at + 1)?,
        *d.get(at + 2)?,
        *d.get(at + 3)?,
    ]))
}

/// A JPEG (ITU-T T.81) or JPEG-LS (T.87) stream: the first SOFn / SOF55 marker segment.
pub fn jpeg(d: &[u8]) -> Option<Declared> {
    if d.get(0..2) != Some(&[0xFF, 0xD8]) {
        return None;
    }
    let mut i = 2;
    while i + 4 <= d.len() {
        if d[i] != 0xFF {
            return None;
        }
        let marker = d[i + 1];
        match marker {
            0xFF => {
                i += 1; // fill byte
                continue;
            }
            0x01 | 0xD0..=0xD7 => {
                i += 2;
                continue;
            }
            // SOF0..SOF15 except DHT (C4), JPG (C8), DAC (CC); SOF55 (F7) of JPEG-LS
            0xC0..=0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF | 0xF7 => {
                // length(2) precision(1) Y(2) X(2)
                let height = be16(d, i + 5)?;
                let width = be16(d, i + 7)?;
                return Some(Declared { width, height });
            }
            0xDA | 0xD9 => return None, // scan or end before any frame header
            _ => {
                let len = be16(d, i + 2)? as usize;
                if len < 2 {
                    return None;
                }
                i += 2 + len;
            }
        }
    }
    None
}

/// A JPEG 2000 codestream (SIZ right after SOC) or a JP2 file (its `ihdr` box).
pub fn j2k(d: &[u8]) -> Option<Declared> {
    if d.get(0..4) == Some(&[0xFF, 0x4F, 0xFF, 0x51]) {
        // SOC, SIZ: Lsiz(2) Rsiz(2) Xsiz(4) Ysiz(4) XOsiz(4) YOsiz(4)
        let (xs, ys) = (be32(d, 8)?, be32(d, 12)?);
        let (xo, yo) = (be32(d, 16)?, be32(d, 20)?);
        return Some(Declared {
            width: xs.checked_sub(xo)?,
            height: ys.checked_sub(yo)?,
        });
    }
    // JP2: boxes; `jp2h` holds `ihdr`: height(4) width(4) nc(2)…; a bare codestream box
    // `jp2c` holds SOC+SIZ
    let mut i = 0usize;
    let mut end = d.len();
    while i + 8 <= end {
        let len = be32(d, i)? as usize;
        let kind = d.get(i + 4..i + 8)?;
        let body = i + 8;
        let next = if len == 0 { end } else { i.checked_add(len)? };
        match kind {
            b"jp2h" => {
                // descend into the super-box
                end = next.min(d.len());
                i = body;
                continue;
            }
            b"ihdr" => {
                return Some(Declared {
                    height: be32(d, body)?,
                    width: be32(d, body + 4)?,
                })
            }
            b"jp2c" => return j2k(d.get(body..)?),
            _ => {}
        }
        if len < 8 && len != 0 {
            return None;
        }
        i = next;
    }
    None
}

/// A PNG stream: IHDR.
pub fn png(d: &[u8]) -> Option<Declared> {
    if d.get(0..8) != Some(b"\x89PNG\r\n\x1a\n") || d.get(12..16) != Some(b"IHDR") {
        return None;
    }
    Some(Declared {
        width: be32(d, 16)?,
        height: be32(d, 20)?,
    })
}

/// Whatever header `d` starts with.
pub fn any(d: &[u8]) -> Option<Declared> {
    jpeg(d).or_else(|| j2k(d)).or_else(|| png(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_declare_their_sizes() {
        // SOI, APP0 (len 4), SOF0: len 11, P 8, Y 0x8000, X 0x8000, 1 component
        let jpeg_bomb = [
            0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x04, 0x00, 0x00, 0xFF, 0xC0, 0x00, 0x0B, 0x08, 0x80,
            0x00, 0x80, 0x00, 0x01, 0x01, 0x11, 0x00,
        ];
        assert_eq!(
            jpeg(&jpeg_bomb),
            Some(Declared {
                width: 32768,
                height: 32768
            })
        );
        let ls = [
            0xFF, 0xD8, 0xFF, 0xF7, 0x00, 0x0B, 0x10, 0x00, 0x40, 0x00, 0x20, 0x01, 0x01, 0x11,
            0x00,
        ];
        assert_eq!(
            jpeg(&ls),
            Some(Declared {
                width: 32,
                height: 64
            })
        );
        let mut siz = vec![0xFF, 0x4F, 0xFF, 0x51, 0x00, 0x29, 0x00, 0x00];
        for v in [300u32, 200, 10, 0] {
            siz.extend_from_slice(&v.to_be_bytes());
        }
        assert_eq!(
            j2k(&siz),
            Some(Declared {
                width: 290,
                height: 200
            })
        );
        let mut jp2 = Vec::new();
        jp2.extend_from_slice(&12u32.to_be_bytes());
        jp2.extend_from_slice(b"jP  \r\n\x87\n");
        jp2.extend_from_slice(&30u32.to_be_bytes());
        jp2.extend_from_slice(b"jp2h");
        jp2.extend_from_slice(&22u32.to_be_bytes());
        jp2.extend_from_slice(b"ihdr");
        jp2.extend_from_slice(&100u32.to_be_bytes());
        jp2.extend_from_slice(&50u32.to_be_bytes());
        jp2.extend_from_slice(&[0, 1, 7, 7, 0, 0]);
        assert_eq!(
            j2k(&jp2),
            Some(Declared {
                width: 50,
                height: 100
            })
        );
        let mut p = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        p.extend_from_slice(&70000u32.to_be_bytes());
        p.extend_from_slice(&3u32.to_be_bytes());
        assert_eq!(
            any(&p),
            Some(Declared {
                width: 70000,
                height: 3
            })
        );
        assert_eq!(any(b"not an image"), None);
        assert_eq!(jpeg(&[0xFF, 0xD8, 0xFF, 0xE0, 0xFF, 0xFF]), None);
    }
}
