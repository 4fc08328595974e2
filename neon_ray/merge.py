"""Neon's merge, θ_neon = θ_base − w·(θ_ft − θ_base) (paper §3, Eq. 3), streamed tensor by tensor.

Pure torch + safetensors: at most one tensor of each model is in memory at a time (read with plain reads,
not through safetensors' file mapping, which would keep every tensor read resident).
- arithmetic in fp32 (fp64 for fp64 tensors): the (1+w)·θ_base − w·θ_ft form overflows in half precision;
- integer/bool tensors (step counters, index buffers) and tensors of θ_base holding ±inf/NaN
  (attention masks) are copied from θ_base unchanged;
- any key, shape or dtype mismatch between the two files is an error that lists them.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

import torch
from safetensors import safe_open

from . import storage
from .errors import NeonError
from .models.checkpoint import SafetensorsReader, StreamingSafetensorsWriter


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


def _mismatches(base, ft) -> list[str]:
    problems = []
    kb, kf = set(base.keys()), set(ft.keys())
    if kb - kf:
        problems.append(f"missing in fine-tuned: {sorted(kb - kf)[:10]}")
    if kf - kb:
        problems.append(f"missing in base: {sorted(kf - kb)[:10]}")
    for key in sorted(kb & kf):
        sb, sf = base.get_slice(key), ft.get_slice(key)
        if sb.get_shape() != sf.get_shape():
            problems.append(f"{key}: shape {sb.get_shape()} vs {sf.get_shape()}")
        elif sb.get_dtype() != sf.get_dtype():
            problems.append(f"{key}: dtype {sb.get_dtype()} vs {sf.get_dtype()}")
    return problems


def merge_files(base_path: str, finetuned_path: str, out_path: str, w: float, allow_negative: bool = False) -> dict:
    """Stream θ_neon into `out_path` (a local file). Returns counts of merged and copied tensors."""
    try:
        check_w(w, allow_negative)
    except ValueError as exc:
        raise NeonError(f"merge.w: {exc}") from None
    try:
        base = safe_open(base_path, framework="pt")
        ft = safe_open(finetuned_path, framework="pt")
    except Exception as exc:  # noqa: BLE001
        raise NeonError(f"unreadable checkpoint for merge ({base_path} / {finetuned_path}): {exc}") from None
    with base, ft:
        problems = _mismatches(base, ft)
        if problems:
            raise NeonError(f"checkpoints {base_path} and {finetuned_path} do not match: " + "; ".join(problems[:12]))
        keys = list(base.keys())
        layout = []
        for key in keys:
            t = base.get_slice(key)
            dtype = getattr(torch, {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                                    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}[t.get_dtype()])
            layout.append((key, dtype, tuple(t.get_shape())))
        meta = dict(base.metadata() or {})
        meta["neon_w"] = json.dumps(w)
        writer = StreamingSafetensorsWriter(out_path, layout, metadata=meta)
        merged = copied = 0
        # The tensors themselves through plain reads (safe_open's mapping would keep each read one resident).
        try:
            with SafetensorsReader(base_path) as base_data, SafetensorsReader(finetuned_path) as ft_data:
                for key in keys:
                    b = base_data.get_tensor(key)
                    if b.is_floating_point() and torch.isfinite(b).all():
                        merged += 1
                    else:
                        copied += 1
                    writer.write(key, neon_tensor(b, ft_data.get_tensor(key), w))
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
