"""Dataset interface and registry (built-ins, `module:attr` plugins).

A dataset says what one sample is (`sample_shape`, `codec`: images as PNG, or float vectors) and
loads a split; every stage reads and writes samples through the codec, so any kind of data that a
model family accepts flows through the same Ray stages.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal

import numpy as np

from .. import storage
from ..errors import ConfigError
from ..plugins import load_plugin
from .codec import CODECS, SampleCodec

Split = Literal["train", "test"]


class Dataset(ABC):
    """A labelled dataset: `load(split)` → (samples (N, *sample_shape), labels int64 (N,) in [0, num_classes))."""

    name: ClassVar[str]
    sample_shape: ClassVar[tuple[int, ...]]
    num_classes: ClassVar[int]
    kind: ClassVar[str] = "image"  # a key of neon_ray.data.codec.CODECS
    splits: ClassVar[tuple[str, ...]] = ("train", "test")  # a dataset without a held-out split declares ("train",)

    def __init__(self, path: str | None = None, download: bool = True, options: dict[str, Any] | None = None):
        self.path = path
        self.download = download
        self.options = dict(options or {})

    @property
    def codec(self) -> SampleCodec:
        return CODECS[self.kind]

    def identity(self) -> dict[str, Any]:
        """What this dataset's content is, cheaply: its name, options, path and the files under the path (names,
        sizes, mtimes or etags; none is read). Outputs computed from the data are keyed by it."""
        return {"name": self.name, "options": self.options, "path": self.path,
                "content": storage.content_identity(self.path) if self.path else None}

    @abstractmethod
    def load(self, split: Split) -> tuple[np.ndarray, np.ndarray]:
        """(samples (N, *sample_shape): uint8 images or float32 vectors, labels int64 (N,)) of one split."""


class ImageDataset(Dataset):
    """A labelled image dataset. Images are uint8 (N, C, H, W); subclasses set `image_shape` (C, H, W)."""

    image_shape: ClassVar[tuple[int, int, int]]
    kind = "image"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "image_shape" in cls.__dict__:
            cls.sample_shape = tuple(cls.image_shape)


_DATASETS: dict[str, type[Dataset]] = {}


def register_dataset(cls: type[Dataset]) -> type[Dataset]:
    _DATASETS[cls.name] = cls
    return cls


def get_dataset(name: str, path: str | None = None, download: bool = True, field: str = "data.name",
                options: dict[str, Any] | None = None) -> Dataset:
    from . import digits, fashion_mnist, toy  # noqa: F401  (register built-ins)

    if ":" in name:
        cls = load_plugin(name, field, Dataset, "dataset")
    elif name in _DATASETS:
        cls = _DATASETS[name]
    else:
        raise ConfigError(f"{field}: unknown dataset {name!r}; known: {sorted(_DATASETS)} or a module:attr plugin")
    return cls(path=path, download=download, options=options)
