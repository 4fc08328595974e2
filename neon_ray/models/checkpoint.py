"""Checkpoint I/O over safetensors (never pickle), with a streaming writer for tensor-by-tensor merges."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pickle
import struct
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from safetensors import safe_open

from .. import storage
from ..errors import NeonError
from .base import ModelSpec

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}


@contextlib.contextmanager
def weights_only_loads(allowed: Iterable[type] = ()) -> Iterator[None]:
    """Make every torch.load inside (also a library's own that asks for the full unpickler) use the weights-only
    unpickler, which builds tensors and plain containers plus the `allowed` classes and refuses anything else."""
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(list(allowed)):
            yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def save_checkpoint(uri: str, state_dict: dict[str, torch.Tensor], spec: ModelSpec, **extra: Any) -> None:
    """Write `state_dict` as safetensors with the model spec (and e.g. train_images) in its metadata."""
    layout = [(name, t.dtype, tuple(t.shape)) for name, t in state_dict.items()]
    save_checkpoint_streaming(uri, layout, state_dict.items(), spec, **extra)


def save_checkpoint_streaming(uri: str, layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
                              tensors: Iterable[tuple[str, torch.Tensor]], spec: ModelSpec, **extra: Any) -> None:
    """Write tensors that arrive one at a time, in `layout` order (name, dtype, shape), as one safetensors file with the
    model spec (and e.g. train_images) in its metadata: each is written and dropped, so the whole state dict need
    never be in memory (a ZeRO-3 gather, a merge). The file appears at `uri` whole or not at all."""
    meta = spec.to_metadata() | {k: json.dumps(v) for k, v in extra.items()}
    with tempfile.TemporaryDirectory(prefix="neon-ckpt-") as tmp:
        local = os.path.join(tmp, "model.safetensors")
        writer = StreamingSafetensorsWriter(local, layout, metadata=meta)
        for name, tensor in tensors:
            writer.write(name, tensor)
        writer.close()
        storage.upload_file_atomic(local, uri)


def read_metadata(uri: str) -> dict[str, str]:
    with storage.local_copy(uri, what="checkpoint") as path:
        try:
            with safe_open(path, framework="pt") as fh:
                return dict(fh.metadata() or {})
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for corrupt files
            raise NeonError(f"unreadable checkpoint {uri}: {exc}") from None


def spec_from_metadata(meta: dict[str, str], source: str) -> ModelSpec:
    try:
        return ModelSpec(
            family=meta["family"],
            preset=meta["preset"],
            image_shape=tuple(json.loads(meta["image_shape"])),
            num_classes=int(meta["num_classes"]),
            options=json.loads(meta.get("options", "{}")),
        )
    except (KeyError, ValueError) as exc:
        raise NeonError(f"checkpoint {source} lacks neon-ray model metadata ({exc}); pass model.family/preset explicitly") from None


def load_checkpoint(uri: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state_dict, metadata) from a safetensors file, or a `.pt` loaded with weights_only=True."""
    with storage.local_copy(uri, what="checkpoint") as path:
        if path.endswith(".pkl"):
            raise NeonError(f"checkpoint {uri} is a Python pickle, and neon-ray never unpickles checkpoints; an EDM/IMM network pickle "
                            f"converts once, without running it, with `neon-ray convert {uri} OUT.safetensors`; then point "
                            "model.checkpoint at OUT.safetensors")
        try:
            if path.endswith((".pt", ".pth", ".bin")):
                # Official DiT/SiT training checkpoints also hold their argparse options: allow that one class.
                with torch.serialization.safe_globals([argparse.Namespace]):
                    obj = torch.load(path, map_location="cpu", weights_only=True)
                state = obj.get("ema", obj.get("model", obj)) if isinstance(obj, dict) else obj
                if not isinstance(state, dict):
                    raise NeonError(f"checkpoint {uri}: expected a state dict")
                return dict(state), {}
            tensors: dict[str, torch.Tensor] = {}
            with safe_open(path, framework="pt") as fh:
                meta = dict(fh.metadata() or {})
                for key in fh.keys():
                    tensors[key] = fh.get_tensor(key)
            return tensors, meta
        except NeonError:
            raise
        except pickle.UnpicklingError:
            raise NeonError(f"checkpoint {uri} holds pickled Python objects, and neon-ray never unpickles files; convert it once, "
                            "where you trust it, to a state dict of tensors saved with safetensors.torch.save_file (or with "
                            "torch.save of plain tensors), and point model.checkpoint at that file") from None
        except Exception as exc:  # noqa: BLE001
            raise NeonError(f"unreadable checkpoint {uri}: {type(exc).__name__}: {str(exc)[:200]}") from None


class StreamingSafetensorsWriter:
    """Writes a safetensors file one tensor at a time: the header (offsets) is known from shapes alone.

    Layout: u64 little-endian header length, JSON header, then the tensors' bytes in header order.
    """

    def __init__(self, path: str, layout: Iterable[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None):
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = metadata
        self._order: list[str] = []
        self._expected: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        offset = 0
        for name, dtype, shape in layout:
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._order.append(name)
            self._expected[name] = (dtype, tuple(shape))
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # 8-byte alignment of the data section
        self._fh = open(path, "wb")
        self._fh.write(struct.pack("<Q", len(blob)))
        self._fh.write(blob)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        assert name == self._order[self._next], f"tensors must be written in layout order ({name})"
        dtype, shape = self._expected[name]
        assert tensor.dtype == dtype and tuple(tensor.shape) == shape, name
        t = tensor.detach().to("cpu").contiguous()
        raw = t.reshape(-1).to(torch.uint8) if t.dtype == torch.bool else t.reshape(-1).view(torch.uint8)
        self._fh.write(raw.numpy().tobytes())
        self._next += 1

    def close(self) -> None:
        self._fh.close()
        assert self._next == len(self._order), "not every tensor was written"


class SafetensorsReader:
    """Reads one tensor at a time from a safetensors file with plain reads into its own buffer.

    safe_open maps the whole file: every tensor read stays counted in the process's resident memory until the
    file is closed, so streaming two 675M-parameter files through it peaks at gigabytes (benchmarks/
    finetune_memory.py). Here a tensor's memory is freed with the tensor. The header is checked when the file
    is opened (ValueError names what is wrong), so a reader that opened can read every tensor it lists.
    """

    def __init__(self, path: str):
        self._fh = open(path, "rb")
        try:
            self._start, self._header, self._metadata = self._read_header(path)
        except BaseException:
            self._fh.close()
            raise

    def _read_header(self, path: str) -> tuple[int, dict, dict]:
        size = os.fstat(self._fh.fileno()).st_size
        prefix = self._fh.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: {size} bytes, too short for a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > size - 8:
            raise ValueError(f"{path}: header length {length} exceeds the file ({size} bytes): not a safetensors file")
        try:
            header = json.loads(self._fh.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: header is not JSON ({exc}): not a safetensors file") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: header is not a JSON object: not a safetensors file")
        metadata = header.pop("__metadata__", None) or {}
        data_bytes = size - 8 - length
        for key, info in header.items():
            if not isinstance(info, dict) or info.get("dtype") not in DTYPES_BY_NAME:
                raise ValueError(f"{path}: tensor {key!r} has no supported dtype ({info.get('dtype') if isinstance(info, dict) else info!r})")
            shape = info.get("shape")
            if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
                raise ValueError(f"{path}: tensor {key!r} has shape {shape!r}, not a list of non-negative integers")
            begin, end = info.get("data_offsets", (None, None))
            expected = math.prod(info["shape"]) * DTYPES_BY_NAME[info["dtype"]].itemsize
            if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_bytes and end - begin == expected):
                raise ValueError(f"{path}: tensor {key!r} has data offsets {info.get('data_offsets')} that do not fit its "
                                 f"shape {info['shape']} or the file")
        return 8 + length, header, dict(metadata)

    def keys(self) -> list[str]:
        """Tensor names in the file's order."""
        return list(self._header)

    def dtype(self, key: str) -> torch.dtype:
        return DTYPES_BY_NAME[self._header[key]["dtype"]]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._header[key]["shape"])

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def get_tensor(self, key: str) -> torch.Tensor:
        info = self._header[key]
        begin, end = info["data_offsets"]
        buf = bytearray(end - begin)
        self._fh.seek(self._start + begin)
        self._fh.readinto(buf)
        dtype = DTYPES_BY_NAME[info["dtype"]]
        if end == begin:
            return torch.empty(info["shape"], dtype=dtype)
        flat = torch.frombuffer(buf, dtype=torch.uint8)
        return (flat.view(dtype) if dtype != torch.bool else flat.bool()).reshape(info["shape"])

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
