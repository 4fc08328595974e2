"""Neon's merge, θ_neon = θ_base − w·(θ_ft − θ_base) (paper §3, Eq. 3), streamed tensor by tensor.

Pure torch + safetensors: at most one tensor of each model is in memory at a time (read with plain reads,
not through safetensors' file mapping, which would keep every tensor read resident).
- arithmetic in fp32 (fp64 for fp64 tensors): the (1+w)·θ_base − w·θ_ft form overflows in half precision;
- integer/bool tensors (step counters, index buffers) and tensors of θ_base holding ±inf/NaN
  (attention masks) are copied from θ_base unchanged;
- any key, shape or dtype mismatch between the two files is an error that lists them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile

import torch

from . import storage
from .errors import NeonError
from .models.checkpoint import DTYPE_NAMES, SafetensorsReader, StreamingSafetensorsWriter


def check_w(w: float, allow_negative: bool = False) -> None:
    """Neon's rule for w, the one check of it (config fields and `merge_files` both call this): ValueError if broken."""
    if not math.isfinite(w):
        raise ValueError(f"w must be finite, got {w}")
    if w <= 0 and not allow_negative:
        raise ValueError(f"w must be > 0 (Neon extrapolates away from the fine-tune), got {w}; "
                         "allow_negative_w permits w ≤ 0 for diagnostics")


def neon_tensor(base: torch.Tensor, finetuned: torch.Tensor, w: float) -> torch.Tensor:
    """One tensor of θ_neon. Copies θ_base for non-float tensors and tensors holding non-finite values."""
    if not (base.is_floating_point() or base.is_complex()):
        return base.clone()
    compute = torch.promote_types(base.dtype, torch.float32)
    b = base.to(compute)
    if not torch.isfinite(b).all():
        return base.clone()
    return (b - w * (finetuned.to(compute) - b)).to(base.dtype)


def _mismatches(base: SafetensorsReader, ft: SafetensorsReader) -> list[str]:
    problems = []
    kb, kf = set(base.keys()), set(ft.keys())
    if kb - kf:
        problems.append(f"missing in fine-tuned: {sorted(kb - kf)[:10]}")
    if kf - kb:
        problems.append(f"missing in base: {sorted(kf - kb)[:10]}")
    for key in sorted(kb & kf):
        if base.shape(key) != ft.shape(key):
            problems.append(f"{key}: shape {list(base.shape(key))} vs {list(ft.shape(key))}")
        elif base.dtype(key) != ft.dtype(key):
            problems.append(f"{key}: dtype {DTYPE_NAMES[base.dtype(key)]} vs {DTYPE_NAMES[ft.dtype(key)]}")
    return problems


def merge_files(base_path: str, finetuned_path: str, out_path: str, w: float, allow_negative: bool = False) -> dict:
    """Stream θ_neon into `out_path` (a local file). Returns counts of merged and copied tensors."""
    try:
        check_w(w, allow_negative)
    except ValueError as exc:
        raise NeonError(f"merge.w: {exc}") from None
    with contextlib.ExitStack() as open_files:
        try:
            base, ft = (open_files.enter_context(SafetensorsReader(path)) for path in (base_path, finetuned_path))
        except (OSError, ValueError) as exc:
            raise NeonError(f"unreadable checkpoint for merge ({base_path} / {finetuned_path}): {exc}") from None
        problems = _mismatches(base, ft)
        if problems:
            raise NeonError(f"checkpoints {base_path} and {finetuned_path} do not match: " + "; ".join(problems[:12]))
        keys = base.keys()
        meta = base.metadata() | {"neon_w": json.dumps(w)}
        writer = StreamingSafetensorsWriter(out_path, [(key, base.dtype(key), base.shape(key)) for key in keys], metadata=meta)
        merged = copied = 0
        try:
            for key in keys:
                b = base.get_tensor(key)
                if b.is_floating_point() and torch.isfinite(b).all():
                    merged += 1
                else:
                    copied += 1
                writer.write(key, neon_tensor(b, ft.get_tensor(key), w))
        finally:
            writer.close()
    return {"merged_tensors": merged, "copied_tensors": copied}


def merge_uris(base_uri: str, finetuned_uri: str, out_uri: str, w: float, allow_negative: bool = False) -> dict:
    """`merge_files` over fsspec URIs; the output appears atomically."""
    with storage.local_copy(base_uri, "base checkpoint") as b, storage.local_copy(finetuned_uri, "fine-tuned checkpoint") as f:
        with tempfile.TemporaryDirectory(prefix="neon-merge-") as tmp:
            local = os.path.join(tmp, "model.safetensors")
            info = merge_files(b, f, local, w, allow_negative)
            storage.upload_file_atomic(local, out_uri)
    return info
