#!/usr/bin/env python3
"""Generate a corpus of malformed DICOM inputs into tests/fixtures/dicom-bad/.

Everything is derived deterministically (no clocks, fixed RNG seed) from
dicom-samples/CT_small.dcm (Explicit VR Little Endian) and
dicom-samples/MR_small_implicit.dcm (Implicit VR Little Endian) by plain byte
manipulation, since pydicom refuses to write most of these.  Writes:

  tests/fixtures/dicom-bad/*.dcm        the bad inputs (all named .dcm)
  tests/fixtures/dicom-bad/README.md    one line per file: what is wrong
  tests/fixtures/dicom-bad/index.json   {name: {"what": ..., "size": n,
                                          "base": ..., "kind": ...}}

Every file is < 64 KiB except deep_sq_10000_open.dcm (~160 KiB: 10000 levels
cannot be encoded in less; 16 bytes per level).  Pass --max-kib to skip files
above a size.

A robust reader should reject every one of these with an error (not panic,
hang, allocate gigabytes or overflow its stack).  A few are *structurally*
parseable but semantically invalid (missing Pixel Data, short Pixel Data,
missing SOP Instance UID, unknown transfer syntax): a store may accept or
reject them, but decoding the image must fail cleanly.

Run:  .venv/bin/python tests/dicom/bad_corpus.py [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "dicom-samples"

LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC",
            b"UN", b"UR", b"UT", b"UV"}
UNDEF = 0xFFFFFFFF
ITEM, ITEM_DELIM, SEQ_DELIM = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


# --------------------------------------------------------------- tiny parser
class Elem:
    def __init__(self, tag, vr, start, hdr, length, end):
        self.tag, self.vr, self.start, self.hdr = tag, vr, start, hdr
        self.length, self.end = length, end  # end = offset after the element

    @property
    def value_start(self):
        return self.start + self.hdr

    def __repr__(self):
        return f"({self.tag >> 16:04X},{self.tag & 0xFFFF:04X}) {self.vr} @{self.start} len={self.length:#x}"


def read_tag(b, off):
    g, e = struct.unpack_from("<HH", b, off)
    return (g << 16) | e


def read_elem_header(b, off, explicit):
    tag = read_tag(b, off)
    if tag >> 16 == 0xFFFE:  # item / delimiters: never VR
        (ln,) = struct.unpack_from("<I", b, off + 4)
        return tag, None, 8, ln
    if explicit:
        vr = bytes(b[off + 4: off + 6])
        if vr in LONG_VRS:
            (ln,) = struct.unpack_from("<I", b, off + 8)
            return tag, vr, 12, ln
        (ln,) = struct.unpack_from("<H", b, off + 6)
        return tag, vr, 8, ln
    (ln,) = struct.unpack_from("<I", b, off + 4)
    return tag, None, 8, ln


def skip_undefined(b, off, explicit):
    """off = first byte of an undefined-length value; returns offset after its
    sequence delimitation item (for SQ) or after the last fragment."""
    while True:
        tag, _, hl, ln = read_elem_header(b, off, explicit)
        off += hl
        if tag == SEQ_DELIM:
            return off
        if tag == ITEM:
            if ln == UNDEF:
                off = skip_item(b, off, explicit)
            else:
                off += ln
        else:
            raise ValueError(f"unexpected tag {tag:08X} in sequence at {off}")


def skip_item(b, off, explicit):
    while True:
        tag, vr, hl, ln = read_elem_header(b, off, explicit)
        if tag == ITEM_DELIM:
            return off + hl
        off += hl
        off = skip_undefined(b, off, explicit) if ln == UNDEF else off + ln


def walk(b, off, end, explicit):
    out = []
    while off < end:
        tag, vr, hl, ln = read_elem_header(b, off, explicit)
        vs = off + hl
        ve = skip_undefined(b, vs, explicit) if ln == UNDEF else vs + ln
        out.append(Elem(tag, vr, off, hl, ln, ve))
        off = ve
    return out


class Dicom:
    """A Part 10 file split into preamble, meta elements and dataset elements."""

    def __init__(self, path):
        self.b = path.read_bytes()
        assert self.b[128:132] == b"DICM"
        (gl,) = struct.unpack_from("<I", self.b, 132 + 8)
        self.meta_end = 132 + 12 + gl
        self.meta = walk(self.b, 132, self.meta_end, True)
        ts_el = self.find(0x00020010, self.meta)
        ts = self.b[ts_el.value_start:ts_el.end].rstrip(b"\0 ").decode()
        self.explicit = ts != "1.2.840.10008.1.2"
        self.ds = walk(self.b, self.meta_end, len(self.b), self.explicit)

    @staticmethod
    def find(tag, elems):
        for e in elems:
            if e.tag == tag:
                return e
        raise KeyError(hex(tag))

    def el(self, tag):
        return self.find(tag, self.ds)

    def raw(self, e):
        return self.b[e.start:e.end]

    def meta_bytes(self, drop=()):
        """File meta group re-encoded with (0002,0000) recomputed."""
        body = b"".join(self.raw(e) for e in self.meta[1:] if e.tag not in drop)
        return struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(body)) + body

    def build(self, drop=(), meta_drop=(), replace=None, tail=b""):
        replace = replace or {}
        out = [self.b[:132], self.meta_bytes(meta_drop)]
        for e in self.ds:
            if e.tag in drop:
                continue
            out.append(replace.get(e.tag, self.raw(e)))
        out.append(tail)
        return b"".join(out)


# --------------------------------------------------------------- encoders
def ex_elem(tag, vr, value):
    g, e = tag >> 16, tag & 0xFFFF
    if vr in LONG_VRS:
        return struct.pack("<HH2sHI", g, e, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", g, e, vr, len(value)) + value


def im_elem(tag, value_len, value=b""):
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, value_len) + value


def tiny_png():
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    w = h = 8
    raw = b"".join(b"\0" + bytes((x * 32 + y * 4) & 0xFF for x in range(w)) for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def pydicom_verdict(path: Path) -> str:
    """How lenient pydicom 3.0.1 treats the file (informational only)."""
    import warnings
    try:
        import pydicom
    except ImportError:
        return "n/a"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path)
        except Exception:  # noqa: BLE001
            return "read-error"
        try:
            ds.pixel_array
        except Exception:  # noqa: BLE001
            return "no-pixels"
    return "decodes"


# --------------------------------------------------------------- corpus
def make(out_dir: Path, max_kib: float | None):
    ct = Dicom(SAMPLES / "CT_small.dcm")
    mr = Dicom(SAMPLES / "MR_small_implicit.dcm")
    assert ct.explicit and not mr.explicit
    rng = random.Random(20240101)
    files: dict[str, tuple[bytes, str, str, str]] = {}

    def add(name, data, what, base, kind):
        files[name] = (data, what, base, kind)

    CT, MR = "CT_small.dcm", "MR_small_implicit.dcm"
    ctb, mrb = ct.b, mr.b
    ct_pix, mr_pix = ct.el(0x7FE00010), mr.el(0x7FE00010)
    ct_name = ct.el(0x00100010)
    ct_mid = ct.ds[len(ct.ds) // 2]

    # --- truncations
    add("trunc_in_preamble.dcm", ctb[:64], "CT_small cut at byte 64, inside the 128-byte preamble (no DICM, no data)", CT, "truncated")
    add("trunc_in_magic.dcm", ctb[:130], "CT_small cut at byte 130, in the middle of the 'DICM' magic", CT, "truncated")
    add("trunc_after_magic.dcm", ctb[:132], "preamble + 'DICM' and nothing else (no file meta)", CT, "truncated")
    add("trunc_in_file_meta.dcm", ctb[:132 + 12 + 40], "CT_small cut 40 bytes into the file meta group (group length says 192)", CT, "truncated")
    add("trunc_meta_elem_header.dcm", ctb[:ct.meta[2].start + 5], "CT_small cut 5 bytes into a file meta element header (0002,0002)", CT, "truncated")
    add("trunc_after_meta.dcm", ctb[:ct.meta_end], "CT_small cut right after the file meta: empty data set", CT, "truncated")
    add("trunc_mid_elem_header.dcm", ctb[:ct_mid.start + 6], f"CT_small cut 6 bytes into the header of {ct_mid!r} (explicit VR)", CT, "truncated")
    add("trunc_mid_elem_value.dcm", ctb[:ct_name.value_start + 3], "CT_small cut 3 bytes into the value of PatientName (0010,0010)", CT, "truncated")
    add("trunc_pixel_header.dcm", ctb[:ct_pix.start + 8], "CT_small cut inside the Pixel Data (7FE0,0010) OW header (before its 4-byte length)", CT, "truncated")
    add("trunc_mid_pixel.dcm", ctb[:ct_pix.value_start + ct_pix.length // 2 + 1],
        f"CT_small cut in the middle of Pixel Data: declares {ct_pix.length} bytes, {ct_pix.length // 2 + 1} present (odd)", CT, "truncated")
    add("trunc_mid_pixel_implicit.dcm", mrb[:mr_pix.value_start + 1000],
        f"MR_small_implicit cut 1000 bytes into Pixel Data (declares {mr_pix.length})", MR, "truncated")
    add("trunc_last_byte.dcm", ctb[:-1], "CT_small without its last byte (Pixel Data one byte short of its declared length)", CT, "truncated")

    # --- magic / garbage
    add("wrong_magic.dcm", ctb[:128] + b"DICN" + ctb[132:], "CT_small with the magic 'DICM' replaced by 'DICN'", CT, "magic")
    add("magic_lowercase.dcm", ctb[:128] + b"dicm" + ctb[132:], "CT_small with the magic lower-case 'dicm'", CT, "magic")
    add("no_preamble_no_magic_garbage.dcm", bytes(rng.randrange(256) for _ in range(4096)),
        "4096 random bytes (seeded): no preamble, no magic", "-", "magic")
    add("garbage_after_magic.dcm", ctb[:132] + bytes(rng.randrange(256) for _ in range(4096)),
        "CT_small's preamble + 'DICM' followed by 4096 random bytes (seeded)", CT, "garbage")
    add("garbage_after_meta.dcm", ctb[:ct.meta_end] + bytes(rng.randrange(256) for _ in range(4096)),
        "valid CT_small file meta followed by 4096 random bytes instead of the data set", CT, "garbage")
    add("ff_after_magic.dcm", ctb[:132] + b"\xff" * 1024,
        "preamble + 'DICM' + 1024 x 0xFF (tag FFFF,FFFF, length 0xFFFFFFFF)", CT, "garbage")

    # --- huge lengths
    huge = struct.pack("<I", 0xFFFFFFF0)
    e = mr.el(0x00100010)
    add("huge_len_implicit_patientname.dcm", mrb[:e.start + 4] + huge + mrb[e.start + 8:],
        "MR_small_implicit with PatientName (0010,0010) length set to 0xFFFFFFF0 (implicit VR)", MR, "huge_length")
    add("huge_len_explicit_pixeldata.dcm", ctb[:ct_pix.start + 8] + huge + ctb[ct_pix.start + 12:],
        "CT_small with Pixel Data (OW) length set to 0xFFFFFFF0 (only 32768 bytes follow)", CT, "huge_length")
    e = ct.el(0x00080070) if any(x.tag == 0x00080070 for x in ct.ds) else ct_name
    un = struct.pack("<HH2sHI", e.tag >> 16, e.tag & 0xFFFF, b"UN", 0, 0xFFFFFFF0)
    add("huge_len_explicit_un.dcm", ctb[:e.start] + un + ctb[e.value_start:],
        f"CT_small with {e!r} re-headed as VR UN, length 0xFFFFFFF0", CT, "huge_length")
    add("huge_meta_group_length.dcm", ctb[:140] + huge + ctb[144:],
        "CT_small with File Meta Information Group Length (0002,0000) value 0xFFFFFFF0", CT, "huge_length")
    add("ul_len_past_eof.dcm", ctb[:ct.meta_end] + struct.pack("<HH2sH", 0x0008, 0x0001, b"UL", 0xFFFF) + b"\0" * 16,
        "CT_small meta + an UL element (0008,0001) with 2-byte length 0xFFFF but 16 bytes following", CT, "huge_length")

    # --- deep nesting
    head = ct.build(drop={0x7FE00010})
    # (0040,0275) Request Attributes Sequence sorts after everything in CT_small's header
    # except private/overlay groups; tag order is not the point here.
    level_ex = struct.pack("<HH2sHI", 0x0040, 0x0275, b"SQ", 0, UNDEF) + struct.pack("<HHI", 0xFFFE, 0xE000, UNDEF)
    close_ex = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    n = 1500
    add(f"deep_sq_{n}_closed.dcm", head + level_ex * n + close_ex * n,
        f"CT_small header (no Pixel Data) + {n} nested undefined-length SQ/items, all properly closed (explicit VR)", CT, "deep_nesting")
    add("deep_sq_2800_open.dcm", head + level_ex * 2800,
        "CT_small header + 2800 nested undefined-length SQ/items never closed (EOF at depth 2800)", CT, "deep_nesting")
    mhead = mr.build(drop={0x7FE00010})
    level_im = im_elem(0x00400275, UNDEF) + im_elem(ITEM, UNDEF)
    add("deep_sq_10000_open.dcm", mhead + level_im * 10000,
        "MR_small_implicit header + 10000 nested undefined-length SQ/items never closed (implicit VR); ~160 KiB", MR, "deep_nesting")

    # --- semantically broken but parseable
    add("missing_pixel_data.dcm", ct.build(drop={0x7FE00010}),
        "CT_small without Pixel Data (7FE0,0010); everything else intact (Rows/Columns/Bits present)", CT, "semantic")
    half = ct_pix.length // 2
    short_pix = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, half) + ctb[ct_pix.value_start:ct_pix.value_start + half]
    add("short_pixel_data.dcm", ct.build(replace={0x7FE00010: short_pix}),
        f"CT_small with a well-formed Pixel Data element of {half} bytes; Rows*Columns*16 bits needs {ct_pix.length}", CT, "semantic")
    short_mr = im_elem(0x7FE00010, 100, mrb[mr_pix.value_start:mr_pix.value_start + 100])
    add("short_pixel_data_implicit.dcm", mr.build(replace={0x7FE00010: short_mr}),
        f"MR_small_implicit with Pixel Data of 100 bytes; 64*64*16 bits needs {mr_pix.length}", MR, "semantic")
    add("empty_pixel_data.dcm", ct.build(replace={0x7FE00010: struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, 0)}),
        "CT_small with a zero-length Pixel Data element", CT, "semantic")
    add("missing_sop_instance_uid.dcm", ct.build(drop={0x00080018}, meta_drop={0x00020003}),
        "CT_small without SOP Instance UID (0008,0018) and without Media Storage SOP Instance UID (0002,0003); group length fixed", CT, "semantic")
    add("missing_sop_instance_uid_ds_only.dcm", ct.build(drop={0x00080018}),
        "CT_small without SOP Instance UID (0008,0018); (0002,0003) still present in the file meta", CT, "semantic")
    add("missing_sop_class_uid.dcm", ct.build(drop={0x00080016}, meta_drop={0x00020002}),
        "CT_small without SOP Class UID (0008,0016) and (0002,0002)", CT, "semantic")
    for_ts = ex_elem(0x00020010, b"UI", b"1.2.3.4.5.6.7.8\0")
    meta_body = b"".join(for_ts if m.tag == 0x00020010 else ct.raw(m) for m in ct.meta[1:])
    unk_ts = ctb[:132] + struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(meta_body)) + meta_body + ctb[ct.meta_end:]
    add("unknown_transfer_syntax.dcm", unk_ts,
        "CT_small with Transfer Syntax UID 1.2.3.4.5.6.7.8 (unknown) in the file meta; data set unchanged", CT, "semantic")
    zero_rows = struct.pack("<HH2sHH", 0x0028, 0x0010, b"US", 2, 0)
    add("zero_rows.dcm", ct.build(replace={0x00280010: zero_rows}),
        "CT_small with Rows (0028,0010) = 0", CT, "semantic")

    # --- not DICOM at all
    add("zero_length.dcm", b"", "empty file (0 bytes)", "-", "not_dicom")
    add("png_body.dcm", tiny_png(), "a valid 8x8 greyscale PNG named .dcm", "-", "not_dicom")
    add("text_body.dcm", b"This is not a DICOM file.\nJust some plain text, line two.\n" * 4,
        "plain ASCII text", "-", "not_dicom")
    add("json_body.dcm", json.dumps({"00080018": {"vr": "UI", "Value": ["1.2.3.4"]},
                                     "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^John"}]}},
                                    indent=1).encode() + b"\n",
        "a DICOM JSON model object (PS3.18 F) instead of Part 10 binary", "-", "not_dicom")
    add("preamble_only_zeros.dcm", b"\0" * 128, "128 zero bytes (a preamble and nothing else)", "-", "not_dicom")

    # --- write
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.dcm"):
        old.unlink()
    index = {}
    for name, (data, what, base, kind) in files.items():
        if max_kib is not None and len(data) > max_kib * 1024:
            print(f"skip {name}: {len(data)} bytes", file=sys.stderr)
            continue
        (out_dir / name).write_bytes(data)
        index[name] = {"what": what, "size": len(data), "base": base, "kind": kind,
                       "pydicom": pydicom_verdict(out_dir / name)}
    (out_dir / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    lines = ["# Bad DICOM corpus",
             "",
             "Generated by `tests/dicom/bad_corpus.py` (deterministic; re-run to regenerate) from",
             "`dicom-samples/CT_small.dcm` (Explicit VR LE) and `dicom-samples/MR_small_implicit.dcm`",
             "(Implicit VR LE). Carina must answer each with an error (HTTP 4xx / DIMSE failure status /",
             "decode error), never panic, hang, allocate gigabytes or overflow its stack. Files of kind",
             "`semantic` parse but are invalid; storing them may succeed or fail, rendering/analysing must fail",
             "cleanly. All files are < 64 KiB except `deep_sq_10000_open.dcm`. `index.json` has the same",
             "list in machine-readable form.",
             "",
             "Column *pydicom*: what pydicom 3.0.1 does with it (`dcmread(path)` then `pixel_array`):",
             "`read-error`, `no-pixels` (read, decoding fails) or `decodes`. pydicom is lenient (it ignores",
             "the group length, reads a too-long value to EOF), so `decodes` there does not make the file valid.",
             "",
             "| file | kind | bytes | pydicom | what is wrong |",
             "|---|---|---|---|---|"]
    for name, m in index.items():
        lines.append(f"| `{name}` | {m['kind']} | {m['size']} | {m['pydicom']} | {m['what'].replace('|', '/')} |")
    (out_dir / "README.md").write_text("\n".join(lines) + "\n")
    return index


def main():
    ap = argparse.ArgumentParser(description="Generate malformed DICOM test inputs.")
    ap.add_argument("--out", default=str(ROOT / "tests/fixtures/dicom-bad"))
    ap.add_argument("--max-kib", type=float, default=None,
                    help="skip files larger than this (default: write all)")
    a = ap.parse_args()
    idx = make(Path(a.out), a.max_kib)
    for k, v in idx.items():
        print(f"{v['size']:8d}  {k}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
