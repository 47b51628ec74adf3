"""labels.csv reader + image loading for the CXR scripts."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from preprocess import Preprocess, geometry, load_gray

DEFAULT_DATA = Path(os.environ.get("CARINA_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def read_labels(data_dir: Path = DEFAULT_DATA):
    with open(Path(data_dir) / "cxr" / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def load_u8(rows, data_dir: Path, p: Preprocess) -> np.ndarray:
    """Letterboxed uint8 images [N, H, W] (geometry only; normalisation happens later)."""
    out = np.zeros((len(rows), p.height, p.width), dtype=np.uint8)
    for i, r in enumerate(rows):
        out[i] = np.asarray(geometry(load_gray(Path(data_dir) / "cxr" / r["path"]), p), dtype=np.uint8)
    return out
