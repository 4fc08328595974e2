"""How samples of a dataset travel through Parquet and the object store, and how models see them.

Images travel as PNG bytes (uint8, never float tensors in the object store) and enter models in
[-1, 1]; low-dimensional vectors (the paper's 2-D toy) travel as raw float32 bytes and enter models
unscaled. A dataset names its codec; every stage goes through it, so a stage never assumes images.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from ..errors import NeonError
from ..imageio import decode_batch as decode_png_batch
from ..imageio import encode_png


class SampleCodec:
    """Base: `column` holds `encode(sample)` bytes; `stored` arrays ↔ model tensors."""

    column: ClassVar[str]
    kind: ClassVar[str]

    def encode(self, sample: np.ndarray) -> bytes:
        raise NotImplementedError

    def decode_batch(self, blobs) -> np.ndarray:
        raise NotImplementedError

    def to_model(self, stored: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def from_model(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ImageCodec(SampleCodec):
    """uint8 (C, H, W) ↔ PNG; models see [-1, 1]."""

    column = "png"
    kind = "image"

    def encode(self, sample: np.ndarray) -> bytes:
        return encode_png(sample)

    def decode_batch(self, blobs) -> np.ndarray:
        return decode_png_batch(blobs)

    def to_model(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.float().div(127.5).sub(1.0)

    def from_model(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


class VectorCodec(SampleCodec):
    """float32 (D,) ↔ D·4 little-endian bytes; models see the raw coordinates."""

    column = "vec"
    kind = "vector"

    def encode(self, sample: np.ndarray) -> bytes:
        return np.ascontiguousarray(sample, dtype="<f4").tobytes()

    def decode_batch(self, blobs) -> np.ndarray:
        sizes = {len(b) for b in blobs}
        if len(sizes) > 1:
            raise NeonError(f"sample set mixes vector sizes {sorted(s // 4 for s in sizes)}")
        if not sizes:
            return np.zeros((0, 0), np.float32)
        return np.stack([np.frombuffer(b, dtype="<f4") for b in blobs]).astype(np.float32)

    def to_model(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.float()

    def from_model(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()


CODECS: dict[str, SampleCodec] = {"image": ImageCodec(), "vector": VectorCodec()}
