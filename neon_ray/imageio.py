"""PNG encoding/decoding of uint8 images (C, H, W): the form images take in Parquet and the object store."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .errors import NeonError


def encode_png(image_chw: np.ndarray) -> bytes:
    c = image_chw.shape[0]
    arr = image_chw[0] if c == 1 else np.transpose(image_chw, (1, 2, 0))
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    try:
        arr = np.asarray(Image.open(io.BytesIO(data)))
    except Exception as exc:  # noqa: BLE001 - PIL raises many types on corrupt input
        raise NeonError(f"undecodable image in sample set: {type(exc).__name__}") from None
    return arr[None] if arr.ndim == 2 else np.transpose(arr, (2, 0, 1))


def decode_batch(pngs) -> np.ndarray:
    """(B, C, H, W) uint8; mixed sizes or channel counts are refused."""
    images = [decode_png(p) for p in pngs]
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise NeonError(f"sample set mixes image shapes {sorted(shapes)}; all images must share one size and channel count")
    return np.stack(images) if images else np.zeros((0, 1, 1, 1), np.uint8)
