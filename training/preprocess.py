"""Shared image preprocessing for Carina models (the contract the Rust service implements).

Used by every training / fixture script so that training, export and golden fixtures all see
exactly the same tensors.

Contract ("letterbox", grayscale):
  1. decode to 8-bit gray (PIL mode "L"; RGB is converted by PIL's ITU-R 601-2 luma
     L = R*299/1000 + G*587/1000 + B*114/1000);
  2. target H_t x W_t from the manifest; s = min(W_t / W, H_t / H) (float64);
  3. nw = max(1, round(W * s)), nh = max(1, round(H * s)), where round is round-half-UP
     (floor(v + 0.5), same as Rust's f64::round for positive values; NOT Python's banker's
     rounding);
  4. resize with PIL Image.resize((nw, nh), Image.BILINEAR) (PIL's bilinear is antialiased:
     when downscaling, its filter support is widened by the scale factor);
  5. paste on a canvas of pad_value at left = (W_t - nw) // 2, top = (H_t - nh) // 2;
  6. x = (v * scale - mean) / std in float32, layout NCHW [1, 1, H_t, W_t].
"stretch" = resize straight to (W_t, H_t) with BILINEAR, then step 6.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image

SCALE_1_255 = 1.0 / 255.0  # 0.00392156862745098


@dataclass(frozen=True)
class Preprocess:
    height: int
    width: int
    resize: str = "letterbox"  # or "stretch"
    pad_value: int = 0
    scale: float = SCALE_1_255
    mean: Sequence[float] = field(default_factory=lambda: (0.5,))
    std: Sequence[float] = field(default_factory=lambda: (0.25,))


def round_half_up(v: float) -> int:
    return int(math.floor(v + 0.5))


def load_gray(path) -> Image.Image:
    """Decode an image file to 8-bit grayscale (PIL mode L)."""
    with Image.open(path) as im:
        im.load()
        if im.mode == "L":
            return im.copy()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            a = np.asarray(im, dtype=np.float64)
            lo, hi = a.min(), a.max()
            a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
            return Image.fromarray(np.round(a).astype(np.uint8), mode="L")
        return im.convert("L")


def letterbox_size(w: int, h: int, wt: int, ht: int) -> tuple[int, int, int, int]:
    """Returns (nw, nh, left, top)."""
    s = min(wt / w, ht / h)
    nw = max(1, round_half_up(w * s))
    nh = max(1, round_half_up(h * s))
    return nw, nh, (wt - nw) // 2, (ht - nh) // 2


def geometry(img: Image.Image, p: Preprocess) -> Image.Image:
    """Resize (letterbox or stretch) an L image to the model's H x W; returns an L image."""
    if img.mode != "L":
        img = img.convert("L")
    wt, ht = p.width, p.height
    if p.resize == "stretch":
        return img.resize((wt, ht), Image.BILINEAR)
    if p.resize != "letterbox":
        raise ValueError(f"unknown resize {p.resize!r}")
    w, h = img.size
    nw, nh, left, top = letterbox_size(w, h, wt, ht)
    small = img.resize((nw, nh), Image.BILINEAR)
    canvas = Image.new("L", (wt, ht), color=int(p.pad_value))
    canvas.paste(small, (left, top))
    return canvas


def normalise(arr_u8: np.ndarray, p: Preprocess) -> np.ndarray:
    """uint8 [H, W] -> float32 [1, 1, H, W] = (v * scale - mean) / std, computed in float32."""
    v = arr_u8.astype(np.float32)
    x = (v * np.float32(p.scale) - np.float32(p.mean[0])) / np.float32(p.std[0])
    return x[None, None, :, :].astype(np.float32)


def preprocess_image(img: Image.Image, p: Preprocess) -> np.ndarray:
    return normalise(np.asarray(geometry(img, p), dtype=np.uint8), p)


def preprocess_path(path, p: Preprocess) -> np.ndarray:
    """File -> float32 [1, 1, H, W] tensor (the exact model input)."""
    return preprocess_image(load_gray(path), p)
