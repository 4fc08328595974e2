"""The model protocol every family implements: build, training loss, sample, checkpoint I/O.

A family is a stateless recipe. Stages call it; it never touches Ray, DeepSpeed or MLflow, so a
user's own model plugs in with `model.family: my_pkg.module:MyFamily`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from ..errors import ConfigError, NeonError


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a network: recorded in every checkpoint's metadata."""

    family: str
    preset: str
    image_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    options: dict[str, Any] = field(default_factory=dict)

    def to_metadata(self) -> dict[str, str]:
        import json

        return {
            "family": self.family,
            "preset": self.preset,
            "image_shape": json.dumps(list(self.image_shape)),
            "num_classes": str(self.num_classes),
            "options": json.dumps(self.options, sort_keys=True),
        }


class SamplerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelFamily(ABC):
    """One kind of generator (diffusion, flow matching, ...). Subclasses fill the five methods."""

    name: ClassVar[str]
    presets: ClassVar[dict[str, dict[str, Any]]]
    sampler_schema: ClassVar[type[SamplerSettings]]
    # finetune fields this family's authors set otherwise than the config's defaults (a config that sets one wins)
    finetune_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, spec: ModelSpec):
        self.check_preset(spec.preset, field="model.preset")
        self.check_options(spec.preset, spec.options)
        self.spec = spec
        self.hparams = {**self.presets[spec.preset], **spec.options}

    # -- configuration -------------------------------------------------------------------------
    @classmethod
    def check_preset(cls, preset: str, field: str = "model.preset") -> None:
        if preset not in cls.presets:
            raise ConfigError(f"{field}: unknown preset {preset!r} for family {cls.name!r}; choose one of {sorted(cls.presets)}")

    @classmethod
    def option_fields(cls, preset: str) -> set[str]:
        """The `model.options` keys this family reads for `preset` (default: the preset's own fields)."""
        return set(cls.presets[preset])

    @classmethod
    def check_options(cls, preset: str, options: dict[str, Any], field: str = "model.options") -> None:
        """Every option must be one the family reads: a misspelt option is an error, never silently dropped."""
        known = cls.option_fields(preset)
        for key in options:
            if key not in known:
                raise ConfigError(f"{field}.{key}: unknown option for {cls.name} preset {preset!r}; known: {sorted(known)}")

    @classmethod
    def validate_sampler(cls, settings: dict[str, Any] | SamplerSettings, field: str = "sampler") -> SamplerSettings:
        """`settings` parsed into this family's typed sampler schema; a bad field is a one-line error naming it."""
        if isinstance(settings, cls.sampler_schema):
            return settings
        try:
            return cls.sampler_schema.model_validate(settings or {})
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
            got = "" if err["type"] == "extra_forbidden" else f" (got {err.get('input')!r})"
            raise ConfigError(f"{field}.{loc}: {msg}{got}") from None

    @staticmethod
    def sample_generators(seeds: list[int]) -> list[torch.Generator]:
        """One CPU generator per sample, seeded by its seed: all randomness of sample i comes from seeds[i]."""
        return [torch.Generator().manual_seed(int(seed)) for seed in seeds]

    # -- the protocol --------------------------------------------------------------------------
    @abstractmethod
    def build(self) -> nn.Module:
        """A freshly initialised network for `self.spec`."""

    @abstractmethod
    def training_loss(self, net: nn.Module, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The family's original objective on a batch. images: (B, C, H, W) in [-1, 1]; labels: (B,) int64."""

    @abstractmethod
    def sample(self, net: nn.Module, labels: torch.Tensor, seeds: list[int], settings: SamplerSettings) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1]. All randomness of sample i comes from seeds[i]."""

    def enable_activation_checkpointing(self, net: nn.Module) -> None:
        """Recompute block activations in the backward pass (networks with an `activation_checkpointing` switch)."""
        if not hasattr(net, "activation_checkpointing"):
            raise ConfigError(f"finetune.activation_checkpointing: the {self.name} network {type(net).__name__} ({self.spec.preset}) "
                              "has no block stack to checkpoint (DiT and xAR presets do)")
        net.activation_checkpointing = True

    def load_state_dict(self, net: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
        """Load weights strictly; a missing or unexpected key lists the keys and names the file."""
        check_state_dict(net, state_dict, source)
        net.load_state_dict(state_dict, strict=True)


def check_state_dict(net: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state_dict) if tuple(expected[k].shape) != tuple(state_dict[k].shape))
    problems = []
    if missing:
        problems.append(f"missing keys {_abbrev(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_abbrev(unexpected)}")
    if wrong:
        problems.append("wrong shapes " + _abbrev([f"{k} {tuple(state_dict[k].shape)}≠{tuple(expected[k].shape)}" for k in wrong]))
    if problems:
        raise NeonError(f"checkpoint {source} does not fit the model: " + "; ".join(problems))


def _abbrev(items: list[str], limit: int = 8) -> str:
    head = ", ".join(items[:limit])
    return f"[{head}{', ...+%d' % (len(items) - limit) if len(items) > limit else ''}]"
