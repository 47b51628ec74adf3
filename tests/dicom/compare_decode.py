#!/usr/bin/env python3
"""Compares Carina's DICOM decodes with the pydicom reference in tests/fixtures/dicom-ref.

Carina's side is a folder of `<stem>.raw.npy` (stored sample values of frame 1, float32) and
`<stem>.rendered.npy` (the 8-bit picture Carina's models and WADO-RS rendered see), or
`<stem>.error.txt` when Carina refused the file. The reference (make_reference.py) holds pydicom
pixel_array and a standard-rendered 8-bit picture.

Rules:
  raw, lossless transfer syntax: equal, sample for sample;
  raw, lossy (JPEG baseline/extended, JPEG 2000 irreversible): max |diff| <= 2 % of the stored
      range and mean |diff| <= 0.5 % of it (codec tolerance: libjpeg vs jpeg-decoder rounding);
  rendered: max |diff| <= 2 grey levels (window/rescale rounding) and mean <= 0.5.
Files Carina refuses must be exactly those named with --expect-refused; anything else failing,
or a refused file that starts to decode, fails the run (exit 1). Prints one JSON line per file.
"""
import argparse
import json
import os
import sys

import numpy as np


def load(path):
    if path.endswith(".npz"):
        with np.load(path) as z:
            return z[z.files[0]]
    return np.load(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--carina", required=True)
    ap.add_argument("--ref", required=True)
    ap.add_argument("--expect-refused", nargs="*", default=[])
    a = ap.parse_args()
    index = json.load(open(os.path.join(a.ref, "index.json")))
    bad = 0
    for stem, meta in sorted(index.items()):
        row = {"file": stem, "transfer_syntax": meta.get("transfer_syntax_name")}
        err = os.path.join(a.carina, stem + ".error.txt")
        if os.path.exists(err):
            row["carina"] = "refused: " + open(err).read().strip()
            ok = stem in a.expect_refused
            row["ok"] = ok
            bad += not ok
            print(json.dumps(row))
            continue
        if stem in a.expect_refused:
            row.update(ok=False, carina="decodes now: take it off the expected-refused list")
            bad += 1
            print(json.dumps(row))
            continue
        if not meta.get("decodes"):
            row.update(ok=True, carina="decoded", reference="none")
            print(json.dumps(row))
            continue
        ok = True
        raw = np.load(os.path.join(a.carina, stem + ".raw.npy")).astype(np.float64)
        ref = load(os.path.join(a.ref, meta["file"])).astype(np.float64)
        if raw.shape != ref.shape:
            row["raw"] = f"shape {raw.shape} != reference {ref.shape}"
            ok = False
        else:
            d = np.abs(raw - ref)
            rng = float(2 ** int(meta.get("bits_stored") or 8))
            row["raw_max_abs_diff"] = float(d.max())
            row["raw_mean_abs_diff"] = round(float(d.mean()), 4)
            if meta.get("lossless"):
                ok &= bool(d.max() == 0)
            else:
                ok &= bool(d.max() <= 0.02 * rng and d.mean() <= 0.005 * rng)
        rend_ref_name = meta.get("rendered8")
        if rend_ref_name:
            rend = np.load(os.path.join(a.carina, stem + ".rendered.npy")).astype(np.float64)
            rref = load(os.path.join(a.ref, rend_ref_name)).astype(np.float64)
            if rend.shape != rref.shape:
                row["rendered"] = f"shape {rend.shape} != reference {rref.shape}"
                ok = False
            else:
                d = np.abs(rend - rref)
                row["rendered_max_abs_diff"] = float(d.max())
                row["rendered_mean_abs_diff"] = round(float(d.mean()), 4)
                ok &= bool(d.max() <= 2 and d.mean() <= 0.5)
        row["ok"] = ok
        bad += not ok
        print(json.dumps(row))
    print(json.dumps({"failed": bad}))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
