"""Fashion-MNIST (Xiao et al. 2017): 60k train + 10k test, 28×28 grey, 10 classes.

Looked up in order: `data.path`, Debian's dataset-fashion-mnist files, a download cache; downloaded
from the canonical URL only when none of these has the files and `data.download` is true.
"""

from __future__ import annotations

import gzip
import os
import urllib.request
from pathlib import Path

import numpy as np

from ..errors import NeonError
from .base import ImageDataset, Split, register_dataset

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
CANONICAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _cache_dir() -> Path:
    return Path(os.environ.get("NEON_RAY_DATA_CACHE", Path.home() / ".cache" / "neon-ray" / "data")) / "fashion-mnist"


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise NeonError(f"unreadable dataset file {path}: {exc}") from None
    if len(raw) < 8 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise NeonError(f"dataset file {path} is not an IDX uint8 file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise NeonError(f"dataset file {path} is truncated ({body.size} of {int(np.prod(dims))} values)")
    return body.reshape(dims).copy()  # own, writable memory (torch.from_numpy warns on read-only buffers)


@register_dataset
class FashionMNIST(ImageDataset):
    name = "fashion_mnist"
    image_shape = (1, 28, 28)
    num_classes = 10
    class_names = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

    def _locate(self, split: Split) -> tuple[Path, Path]:
        names = FILES[split]
        if self.path is not None:
            root = Path(self.path)
            found = [root / n if (root / n).exists() else root / n.removesuffix(".gz") for n in names]
            missing = [str(p) for p in found if not p.exists()]
            if missing:
                raise NeonError(f"data.path: Fashion-MNIST file not found: {missing[0]}")
            return found[0], found[1]
        for root in (Path(DEBIAN_DIR), _cache_dir()):
            if all((root / n).exists() for n in names):
                return root / names[0], root / names[1]
        if not self.download:
            raise NeonError(f"data.path: Fashion-MNIST not found in {DEBIAN_DIR} or {_cache_dir()} and data.download is false")
        return self._download(names)

    def _download(self, names: tuple[str, str]) -> tuple[Path, Path]:
        root = _cache_dir()
        root.mkdir(parents=True, exist_ok=True)
        for name in names:
            target = root / name
            if target.exists():
                continue
            tmp = target.with_suffix(".part")
            try:
                urllib.request.urlretrieve(CANONICAL_URL + name, tmp)  # noqa: S310 - fixed https/http URL
            except OSError as exc:
                raise NeonError(f"data.path: Fashion-MNIST not found locally and download of {name} failed ({exc}); set data.path") from None
            tmp.rename(target)
        return root / names[0], root / names[1]

    def load(self, split: Split) -> tuple[np.ndarray, np.ndarray]:
        img_path, lbl_path = self._locate(split)
        images = _read_idx(img_path)
        labels = _read_idx(lbl_path).astype(np.int64)
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise NeonError(f"dataset file {img_path}: expected N×28×28 images, got {images.shape}")
        if len(images) != len(labels):
            raise NeonError(f"dataset files {img_path} and {lbl_path} disagree on the number of images")
        return np.ascontiguousarray(images[:, None]), labels
