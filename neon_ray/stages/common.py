"""What several stages share: the model spec of a run, the base checkpoint, torch threads."""

from __future__ import annotations

import io
import json
import os
import tempfile

import torch

from .. import storage
from ..config import RunConfig
from ..data import get_dataset
from ..errors import NeonError
from ..manifest import read_manifest, stage_uri
from ..models import ModelSpec, get_family
from ..models.base import ModelFamily
from ..models.checkpoint import load_checkpoint, spec_from_metadata

BASE_MODEL = "model.safetensors"


def dataset_of(cfg: RunConfig):
    return get_dataset(cfg.data.name, cfg.data.path, cfg.data.download, options=cfg.data.options)


def spec_of(cfg: RunConfig) -> ModelSpec:
    ds = dataset_of(cfg)
    return ModelSpec(cfg.model.family, cfg.model.preset, tuple(ds.sample_shape), ds.num_classes, dict(cfg.model.options))


def family_of(cfg: RunConfig) -> ModelFamily:
    return get_family(cfg.model.family)(spec_of(cfg))


def base_checkpoint_uri(cfg: RunConfig) -> str:
    """The θ_base file: `model.checkpoint` if set, else the pretrain stage's output."""
    if cfg.model.checkpoint:
        return cfg.model.checkpoint
    uri = storage.join(stage_uri(cfg.output, "pretrain"), BASE_MODEL)
    if read_manifest(stage_uri(cfg.output, "pretrain")) is None:
        raise NeonError(f"model.checkpoint: not set and no finished pretrain stage under {cfg.output}; run `neon-ray pretrain` or set model.checkpoint")
    return uri


def checkpoint_identity(uri: str) -> str:
    """A cheap identity of a checkpoint for config hashes: its size and mtime (or an etag remotely)."""
    fs, path = storage.filesystem(uri)
    if not fs.exists(path):
        raise NeonError(f"model.checkpoint: file not found: {uri}")
    info = fs.info(path)
    return json.dumps({"uri": uri, "size": info.get("size"), "mtime": str(info.get("mtime", info.get("LastModified", info.get("ETag", ""))))})


def load_model(cfg: RunConfig, uri: str, device: str | torch.device = "cpu"):
    """(family, network) for a checkpoint, checking it fits the configured model."""
    state, meta = load_checkpoint(uri)
    family = family_of(cfg)
    if meta.get("family"):
        spec = spec_from_metadata(meta, uri)
        if spec.image_shape != family.spec.image_shape:
            raise NeonError(f"model.checkpoint: {uri} is for samples of shape {spec.image_shape}, the dataset ({cfg.data.name}) has {family.spec.image_shape}")
        if spec.num_classes != family.spec.num_classes:
            raise NeonError(f"model.checkpoint: {uri} has {spec.num_classes} classes, the dataset has {family.spec.num_classes}")
    net = family.build()
    family.load_state_dict(net, state, uri)
    return family, net.to(device).eval()


def train_images_of(uri: str, cfg: RunConfig) -> int | None:
    from ..models.checkpoint import read_metadata

    meta = read_metadata(uri)
    if "train_images" in meta:
        return int(json.loads(meta["train_images"]))
    return cfg.model.base_train_images


def set_torch_threads(n: int) -> None:
    torch.set_num_threads(max(1, int(n)))
    os.environ["OMP_NUM_THREADS"] = str(max(1, int(n)))


def save_progress(uri: str, state: dict) -> None:
    """Resumable training state: tensors and plain containers only (loaded with weights_only=True)."""
    with tempfile.TemporaryDirectory(prefix="neon-progress-") as tmp:
        local = os.path.join(tmp, "progress.pt")
        torch.save(state, local)
        storage.upload_file_atomic(local, uri)


def load_progress(uri: str) -> dict | None:
    if not storage.exists(uri):
        return None
    try:
        return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a torn/corrupt progress file means "start over"
        return None


def base_identity(cfg: RunConfig) -> str:
    """What θ_base is, for downstream config hashes (stable across reruns of the same pretrain)."""
    if cfg.model.checkpoint:
        return checkpoint_identity(cfg.model.checkpoint)
    from .pretrain import config_hash as pretrain_hash

    return f"pretrain:{pretrain_hash(cfg)}"


def require_stage(cfg: RunConfig, stage: str, config_hash: str | None = None) -> dict:
    """The manifest of an upstream stage, or a clear error saying which command to run first."""
    man = read_manifest(stage_uri(cfg.output, stage))
    if man is None or (config_hash is not None and man.get("config_hash") != config_hash):
        state = "has not run" if man is None else "is out of date for this config"
        raise NeonError(f"stage {stage} {state} under {cfg.output}; run `neon-ray {stage}` (or `neon-ray run`) first")
    return man
