"""The run's model: its dataset and spec (family, preset, data shape), and a checkpoint loaded into it."""

from __future__ import annotations

import json

import torch

from ..data import get_dataset
from ..errors import NeonError
from ..models import ModelSpec, get_family
from ..models.base import ModelFamily
from ..models.checkpoint import load_checkpoint, read_metadata, spec_from_metadata


def dataset_of(cfg):
    """The configured dataset (cfg: the run config)."""
    return get_dataset(cfg.data.name, cfg.data.path, cfg.data.download, options=cfg.data.options)


def spec_of(cfg) -> ModelSpec:
    """Everything a worker needs to rebuild the run's network: family, preset, options, sample shape, classes."""
    ds = dataset_of(cfg)
    return ModelSpec(cfg.model.family, cfg.model.preset, tuple(ds.sample_shape), ds.num_classes, dict(cfg.model.options))


def family_for(spec: ModelSpec) -> ModelFamily:
    return get_family(spec.family)(spec)


def load_model(spec: ModelSpec, uri: str, device: str | torch.device = "cpu") -> tuple[ModelFamily, torch.nn.Module]:
    """(family, network in eval mode) for a checkpoint, checking it fits `spec` (one line naming what differs)."""
    state, meta = load_checkpoint(uri)
    family = family_for(spec)
    if meta.get("family"):
        stored = spec_from_metadata(meta, uri)
        if stored.image_shape != spec.image_shape:
            raise NeonError(f"model.checkpoint: {uri} is for samples of shape {stored.image_shape}, the dataset has {spec.image_shape}")
        if stored.num_classes != spec.num_classes:
            raise NeonError(f"model.checkpoint: {uri} has {stored.num_classes} classes, the dataset has {spec.num_classes}")
    net = family.build()
    family.load_state_dict(net, state, uri)
    return family, net.to(device).eval()


def train_images_of(uri: str, fallback: int | None) -> int | None:
    """Images the model saw in training: from the checkpoint's metadata, else `fallback` (model.base_train_images)."""
    meta = read_metadata(uri)
    if "train_images" in meta:
        return int(json.loads(meta["train_images"]))
    return fallback
