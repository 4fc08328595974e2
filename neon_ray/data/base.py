"""Dataset interface and registry (built-ins, `module:attr` plugins)."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import ClassVar, Literal

import numpy as np

from ..errors import ConfigError

Split = Literal["train", "test"]


class ImageDataset(ABC):
    """A labelled image dataset. Images are uint8 (N, C, H, W); labels int64 in [0, num_classes)."""

    name: ClassVar[str]
    image_shape: ClassVar[tuple[int, int, int]]
    num_classes: ClassVar[int]

    def __init__(self, path: str | None = None, download: bool = True):
        self.path = path
        self.download = download

    @abstractmethod
    def load(self, split: Split) -> tuple[np.ndarray, np.ndarray]:
        """(images uint8 (N, C, H, W), labels int64 (N,)) of one split."""


_DATASETS: dict[str, type[ImageDataset]] = {}


def register_dataset(cls: type[ImageDataset]) -> type[ImageDataset]:
    _DATASETS[cls.name] = cls
    return cls


def get_dataset(name: str, path: str | None = None, download: bool = True, field: str = "data.name") -> ImageDataset:
    from . import digits, fashion_mnist  # noqa: F401  (register built-ins)

    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"{field}: cannot import dataset plugin {name!r} ({exc})") from None
    elif name in _DATASETS:
        cls = _DATASETS[name]
    else:
        raise ConfigError(f"{field}: unknown dataset {name!r}; known: {sorted(_DATASETS)} or a module:attr plugin")
    return cls(path=path, download=download)
