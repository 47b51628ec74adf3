#!/usr/bin/env python3
"""Reference pixel data for Carina's DICOM decoder tests.

For every ``dicom-samples/*.dcm`` this decodes frame 0 with pydicom 3.0.1
(``dcmread(force=True)``; the plugins from tests/requirements.txt) and writes,
into ``tests/fixtures/dicom-ref/``:

``<stem>.npy`` (or ``<stem>.npz``)
    The RAW stored pixel values of frame 0, exactly as pydicom's decoder
    returns them: no Modality LUT (rescale), no VOI LUT / window, no
    MONOCHROME1 inversion.  dtype as pydicom returns it (uint8 / int16 /
    uint16 / uint32), except that big-endian arrays (Explicit VR Big Endian)
    are converted to the native little-endian dtype of the same kind, so every
    ``.npy`` is little-endian.  Monochrome/palette: shape (rows, cols).
    Colour: (rows, cols, 3) RGB.  pydicom's default ``as_rgb=True`` is used, so
    YCbCr JPEG data (YBR_FULL, YBR_FULL_422) comes back converted to RGB
    (either by the JPEG codec itself or by pydicom); ``index.json`` records
    this per file as ``ybr_converted_to_rgb``.  PALETTE COLOR raw data are the
    palette indices (rows, cols).

``<stem>.rendered.npy`` (or ``.rendered.npz``)
    The 8-bit display image of frame 0, uint8:

    Monochrome (MONOCHROME1/2), shape (rows, cols):
      1. Modality LUT: ``pydicom.pixels.apply_modality_lut`` (Rescale
         Slope/Intercept or Modality LUT Sequence).  For multi-frame
         "enhanced" objects the attributes are taken from frame 0's
         functional groups (per-frame first, then shared):
         PixelValueTransformationSequence / FrameVOILUTSequence.
      2. VOI, first entry only:
         * Window Center/Width present -> the PS3.3 C.11.2.1.2 formula,
           evaluated directly into the output range [0, 255]:
             VOILUTFunction LINEAR (default), PS3.3 C.11.2.1.2.1:
               c' = c - 0.5, w' = w - 1
               x <= c' - w'/2       -> 0
               x >  c' + w'/2       -> 255
               else                 -> ((x - c') / w' + 0.5) * 255
             LINEAR_EXACT (C.11.2.1.3.2): same with c' = c, w' = w.
             SIGMOID (C.11.2.1.3.1): 255 / (1 + exp(-4 (x - c) / w)).
           This is exactly pydicom's ``apply_voi_lut``/``apply_windowing``
           (which uses the same formula but outputs in the range
           [y_min, y_max] derived from BitsStored and rescale) followed by a
           linear map of [y_min, y_max] onto [0, 255]; the script asserts the
           two agree to within 1e-6 before rounding.
         * else VOI LUT Sequence present -> ``pydicom.pixels.apply_voi_lut``
           (prefer_lut=True, first LUT), then output * 255 / (2**n - 1)
           where n = the LUT's bits (LUTDescriptor[2]).
         * else (no VOI at all) -> min-max of the modality-LUT output:
               (x - min) / (max - min) * 255   (all 0 if max == min).
      3. MONOCHROME1 -> y = 255 - y (on the float value, before rounding).
      4. Round half up: uint8(floor(y + 0.5)), after clipping to [0, 255]
         (same as Rust's ``f64::round`` for non-negative values).

    RGB / YBR (converted to RGB by the decoder): the decoded RGB uint8 array
    itself (rows, cols, 3); if BitsAllocated > 8 it would be >> (BitsStored-8)
    (no sample has that).
    PALETTE COLOR: ``pydicom.pixels.apply_color_lut`` (rows, cols, 3); if the
    LUT entries are 16 bit (LUT Descriptor[2] == 16) they are reduced to
    8 bit by ``>> 8``; 8-bit entries are kept.

Arrays larger than ``COMPRESS_OVER`` bytes are stored with
``np.savez_compressed``-compatible ``<stem>.npz`` / ``<stem>.rendered.npz``: a
zip (deflate) holding one member ``arr_0.npy`` (``np.load(f)["arr_0"]``), with a
fixed timestamp so reruns are byte-identical (the directory stays < 3 MB).

``index.json`` -- one entry per sample stem::

    {"file": "CT_small.npy" | null,      # raw reference (npy or npz)
     "stored_as": "npy" | "npz" | null,
     "transfer_syntax": "1.2.840.10008.1.2.1",
     "transfer_syntax_name": "...",
     "lossless": bool,        # False for lossy transfer syntaxes (JPEG
                              # baseline/extended, JPEG-LS near-lossless,
                              # JPEG 2000 (.91), HTJ2K (.201/.203)):
                              # decoders may legitimately differ by a few LSB
     "lossy_image_compression": "00" | "01" | null,   # (0028,2110)
     "photometric": str,      # as in the file
     "photometric_decoded": str,  # after pydicom's decode (RGB for YBR JPEG)
     "ybr_converted_to_rgb": bool,
     "bits_allocated": n, "bits_stored": n, "pixel_representation": n,
     "samples_per_pixel": n, "number_of_frames": n,
     "shape": [...], "dtype": "int16",
     "decodes": bool, "error": str | null,
     "plugin": "pylibjpeg" | "pillow" | "pyjpegls" | "pydicom" | null,
     "plugin_max_abs_diff": int | null,  # largest |difference| between the
                              # available plugins' results (lossy JPEG etc)
     "rendered8": "<stem>.rendered.npy" | "<stem>.rendered.npz" | null,
     "render": "window" | "voi_lut" | "minmax" | "rgb" | "palette" | null,
     "window": [center, width, "LINEAR"] | null}

Run:  .venv/bin/python tests/dicom/make_reference.py
      [--samples dicom-samples] [--out tests/fixtures/dicom-ref]
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.uid import UID

ROOT = Path(__file__).resolve().parents[2]
COMPRESS_OVER = 64 * 1024  # bytes

LOSSY_TS = {
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Lossy (Near-Lossless)
    "1.2.840.10008.1.2.4.91",  # JPEG 2000 (lossy or lossless)
    "1.2.840.10008.1.2.4.93",  # JPEG 2000 Part 2 (lossy or lossless)
    "1.2.840.10008.1.2.4.203",  # HTJ2K (lossy or lossless)
}  # .4.201 / .4.202 (HTJ2K lossless) and all others are lossless


def frame0_attrs(ds: Dataset) -> Dataset:
    """A flat dataset with the attributes the LUT functions need for frame 0.

    Top-level attributes, overridden by frame 0's functional groups for
    enhanced multi-frame objects (shared first, then per-frame wins).
    """
    out = Dataset()
    for kw in ("PhotometricInterpretation", "BitsStored", "BitsAllocated",
               "PixelRepresentation", "RescaleSlope", "RescaleIntercept",
               "RescaleType", "ModalityLUTSequence", "WindowCenter",
               "WindowWidth", "VOILUTFunction", "VOILUTSequence"):
        if kw in ds:
            setattr(out, kw, ds[kw].value)
    groups = []
    if "SharedFunctionalGroupsSequence" in ds and len(ds.SharedFunctionalGroupsSequence):
        groups.append(ds.SharedFunctionalGroupsSequence[0])
    if "PerFrameFunctionalGroupsSequence" in ds and len(ds.PerFrameFunctionalGroupsSequence):
        groups.append(ds.PerFrameFunctionalGroupsSequence[0])
    for g in groups:
        for seq_kw in ("PixelValueTransformationSequence", "FrameVOILUTSequence"):
            if seq_kw in g and len(g[seq_kw].value):
                item = g[seq_kw].value[0]
                for elem in item:
                    if elem.keyword:
                        setattr(out, elem.keyword, elem.value)
    return out


def first(v):
    """First value of a possibly multi-valued element (WindowCenter etc)."""
    if isinstance(v, (str, bytes)) or not hasattr(v, "__len__"):
        return v
    return v[0]


def window_to_8bit(x: np.ndarray, c: float, w: float, func: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2 windowing straight into [0, 255] (float64)."""
    x = x.astype(np.float64)
    func = (func or "LINEAR").upper()
    if func == "SIGMOID":
        return 255.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    if func == "LINEAR":
        c, w = c - 0.5, w - 1.0
    y = np.empty_like(x)
    below = x <= c - w / 2
    above = x > c + w / 2
    mid = ~(below | above)
    y[below] = 0.0
    y[above] = 255.0
    y[mid] = ((x[mid] - c) / w + 0.5) * 255.0
    return y


def round8(y: np.ndarray) -> np.ndarray:
    return np.floor(np.clip(y, 0.0, 255.0) + 0.5).astype(np.uint8)


def render_mono(raw: np.ndarray, attrs: Dataset):
    """Returns (uint8 image, how, window)."""
    mod = apply_modality_lut(raw, attrs).astype(np.float64)
    how, window = None, None
    if "WindowCenter" in attrs and "WindowWidth" in attrs:
        c = float(first(attrs.WindowCenter))
        w = float(first(attrs.WindowWidth))
        func = str(attrs.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        y = window_to_8bit(mod, c, w, func)
        # Cross-check against pydicom's apply_windowing (output [y_min, y_max]).
        pyd = _pydicom_window_8bit(mod, attrs)
        if pyd is not None and not np.allclose(pyd, y, atol=1e-6):
            raise AssertionError("own window formula disagrees with pydicom apply_windowing")
        how, window = "window", [c, w, func]
    elif "VOILUTSequence" in attrs and len(attrs.VOILUTSequence):
        out = apply_voi_lut(raw if "ModalityLUTSequence" not in attrs else mod.astype(np.int64),
                            attrs, index=0, prefer_lut=True)
        nbits = int(attrs.VOILUTSequence[0].LUTDescriptor[2])
        y = out.astype(np.float64) * 255.0 / (2 ** nbits - 1)
        how = "voi_lut"
    else:
        lo, hi = float(mod.min()), float(mod.max())
        y = np.zeros_like(mod) if hi == lo else (mod - lo) / (hi - lo) * 255.0
        how = "minmax"
    if str(attrs.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        y = 255.0 - y
    return round8(y), how, window


def _pydicom_window_8bit(mod: np.ndarray, attrs: Dataset):
    """pydicom's apply_windowing on the modality output, remapped to [0, 255]."""
    from pydicom.pixels.processing import apply_windowing
    ds = Dataset()
    for kw in ("PhotometricInterpretation", "BitsStored", "PixelRepresentation",
               "RescaleSlope", "RescaleIntercept", "ModalityLUTSequence",
               "WindowCenter", "WindowWidth", "VOILUTFunction"):
        if kw in attrs:
            setattr(ds, kw, attrs[kw].value)
    if str(ds.get("PhotometricInterpretation")) not in ("MONOCHROME1", "MONOCHROME2"):
        ds.PhotometricInterpretation = "MONOCHROME2"
    # the range pydicom windows into
    if ds.get("ModalityLUTSequence"):
        y_min, y_max = 0.0, 2.0 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1
    elif int(ds.PixelRepresentation) == 0:
        y_min, y_max = 0.0, 2.0 ** int(ds.BitsStored) - 1
    else:
        y_min, y_max = -(2.0 ** (int(ds.BitsStored) - 1)), 2.0 ** (int(ds.BitsStored) - 1) - 1
    if ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None:
        s, i = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        y_min, y_max = y_min * s + i, y_max * s + i
    out = apply_windowing(mod.copy(), ds, index=0)
    return (out - y_min) / (y_max - y_min) * 255.0


def save(arr: np.ndarray, out_dir: Path, name: str):
    if arr.nbytes > COMPRESS_OVER:
        fn = name + ".npz"
        # = np.savez_compressed(path, arr_0=arr), but with a fixed zip timestamp so
        # regenerating gives identical bytes
        buf = io.BytesIO()
        np.lib.format.write_array(buf, arr, allow_pickle=False)
        info = zipfile.ZipInfo("arr_0.npy", date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        with zipfile.ZipFile(out_dir / fn, "w") as z:
            z.writestr(info, buf.getvalue(), compresslevel=9)
        return fn, "npz"
    fn = name + ".npy"
    np.save(out_dir / fn, arr, allow_pickle=False)
    return fn, "npy"


def decode_frame0(ds: Dataset, ts: str):
    """Decode frame 0 with each available plugin in pydicom's order.

    Returns (arr, meta, plugin, max_abs_diff_between_plugins).
    """
    dec = get_decoder(UID(ts))
    plugins = list(dec.available_plugins) if not dec.is_native else []
    if not plugins:
        arr, meta = dec.as_array(ds, index=0)
        return arr, meta, ("pydicom" if dec.is_native else None), None
    results, errors = [], []
    for p in plugins:
        try:
            arr, meta = dec.as_array(ds, index=0, decoding_plugin=p)
            results.append((p, arr, meta))
        except Exception as e:  # noqa: BLE001
            errors.append(f"{p}: {e}")
    if not results:
        raise RuntimeError("; ".join(errors))
    p0, a0, m0 = results[0]
    diff = None
    if len(results) > 1:
        diff = 0
        for _, a, _ in results[1:]:
            if a.shape == a0.shape:
                diff = max(diff, int(np.abs(a.astype(np.int64) - a0.astype(np.int64)).max()))
    return a0, m0, p0, diff


def process(path: Path, out_dir: Path) -> dict:
    stem = path.stem
    e: dict = {"file": None, "stored_as": None, "transfer_syntax": None,
               "transfer_syntax_name": None, "lossless": None,
               "lossy_image_compression": None, "photometric": None,
               "photometric_decoded": None, "ybr_converted_to_rgb": False,
               "bits_allocated": None, "bits_stored": None,
               "pixel_representation": None, "samples_per_pixel": None,
               "number_of_frames": None, "shape": None, "dtype": None,
               "decodes": False, "error": None, "plugin": None,
               "plugin_max_abs_diff": None, "rendered8": None, "render": None,
               "window": None}
    try:
        ds = pydicom.dcmread(path, force=True)
        fm = getattr(ds, "file_meta", Dataset())
        ts = str(fm.get("TransferSyntaxUID", "1.2.840.10008.1.2"))
        e["transfer_syntax"] = ts
        e["transfer_syntax_name"] = UID(ts).name
        e["lossless"] = ts not in LOSSY_TS
        e["lossy_image_compression"] = ds.get("LossyImageCompression")
        pi = str(ds.get("PhotometricInterpretation", ""))
        e["photometric"] = pi
        for k, kw in (("bits_allocated", "BitsAllocated"), ("bits_stored", "BitsStored"),
                      ("pixel_representation", "PixelRepresentation"),
                      ("samples_per_pixel", "SamplesPerPixel")):
            e[k] = int(ds[kw].value) if kw in ds else None
        e["number_of_frames"] = int(ds.get("NumberOfFrames", 1) or 1)

        raw, meta, plugin, diff = decode_frame0(ds, ts)
        e["plugin"], e["plugin_max_abs_diff"] = plugin, diff
        pi_out = str(meta.get("photometric_interpretation", pi))
        e["photometric_decoded"] = pi_out
        e["ybr_converted_to_rgb"] = pi.startswith("YBR") and pi_out == "RGB"
        if raw.dtype.byteorder == ">":
            raw = raw.astype(raw.dtype.newbyteorder("<"))
        raw = np.ascontiguousarray(raw)
        e["shape"], e["dtype"] = list(raw.shape), str(raw.dtype)
        e["file"], e["stored_as"] = save(raw, out_dir, stem)
        e["decodes"] = True

        # 8-bit rendering
        if pi_out in ("MONOCHROME1", "MONOCHROME2"):
            attrs = frame0_attrs(ds)
            img, how, window = render_mono(raw, attrs)
        elif pi_out == "PALETTE COLOR":
            rgb = apply_color_lut(raw, ds)
            nbits = int(ds.RedPaletteColorLookupTableDescriptor[2])
            img = (rgb >> 8).astype(np.uint8) if nbits > 8 else rgb.astype(np.uint8)
            how, window = "palette", None
        elif pi_out == "RGB":
            img = raw
            if raw.dtype.itemsize > 1:
                img = (raw.astype(np.uint32) >> (int(ds.BitsStored) - 8)).astype(np.uint8)
            how, window = "rgb", None
        else:
            img, how, window = None, None, None
            e["error"] = f"no 8-bit rendering for photometric {pi_out}"
        if img is not None:
            e["rendered8"], _ = save(np.ascontiguousarray(img.astype(np.uint8)), out_dir,
                                     stem + ".rendered")
            e["render"], e["window"] = how, window
    except Exception as ex:  # noqa: BLE001
        e["error"] = f"{type(ex).__name__}: {ex}"
    return e


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", default=str(ROOT / "dicom-samples"))
    ap.add_argument("--out", default=str(ROOT / "tests/fixtures/dicom-ref"))
    a = ap.parse_args()
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in list(out_dir.glob("*.npy")) + list(out_dir.glob("*.npz")):
        old.unlink()
    index = {}
    for p in sorted(Path(a.samples).glob("*.dcm")):
        index[p.stem] = process(p, out_dir)
        e = index[p.stem]
        print(f"{p.name:36s} {'ok ' if e['decodes'] else 'ERR'} {e['shape']} {e['dtype']} "
              f"{e['plugin']} render={e['render']} {e['error'] or ''}", file=sys.stderr)
    (out_dir / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
