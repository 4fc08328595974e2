"""Sample sets as pyarrow tables of encoded samples: a Parquet set (from `generate` or a scoring pass), or an image folder.

A Parquet set has one row per sample: `index`, `label`, `seed` and the codec's column (`png` for
images, `vec` for vectors). Images stay encoded (PNG/JPEG bytes) all the way to the feature actors. Every image's header is read
on the driver first, so an empty set, a mixed resolution or channel count, or an unsupported image
mode fails at once with one line naming the first offending file.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image

from .. import storage
from ..errors import NeonError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
CHANNELS = {"L": 1, "RGB": 3}  # 8-bit grey and RGB; other modes would decode to other value ranges
SAMPLE_COLUMNS = ("png", "vec")  # the codec columns of neon_ray.data.codec


@dataclass
class SampleSet:
    table: pa.Table  # `column` (encoded samples), `label` (int64) when known
    column: str
    shape: tuple[int, ...]  # of every sample: (C, H, W) for images
    source: str

    @property
    def kind(self) -> str:
        """The codec kind of the samples (`image`, `vector`), from their column."""
        from ..data.codec import CODECS

        return next(k for k, codec in CODECS.items() if codec.column == self.column)

    @property
    def n(self) -> int:
        return self.table.num_rows

    @property
    def labels(self) -> np.ndarray | None:
        return self.table.column("label").to_numpy() if "label" in self.table.column_names else None


def image_shape(blobs, names, source: str) -> tuple[int, int, int]:
    """(C, H, W) shared by all encoded images, read from their headers; one-line errors otherwise."""
    if len(blobs) == 0:
        raise NeonError(f"empty sample set: {source} holds no images")
    first = None
    for i, blob in enumerate(blobs):
        try:
            with Image.open(io.BytesIO(blob)) as im:
                mode, (w, h) = im.mode, im.size
        except Exception as exc:  # noqa: BLE001 - PIL raises many types on corrupt input
            raise NeonError(f"undecodable image {names(i)} ({type(exc).__name__})") from None
        if mode not in CHANNELS:
            raise NeonError(f"image {names(i)} has mode {mode}; neon-ray scores 8-bit grey (L) or RGB images")
        shape = (CHANNELS[mode], h, w)
        if first is None:
            first = shape
        elif shape != first:
            raise NeonError(f"mixed image shapes in {source}: {names(i)} is {_fmt(shape)} but {names(0)} is {_fmt(first)}; "
                            "all images must share one size and channel count")
    return first


def vector_shape(blobs, source: str) -> tuple[int]:
    if len(blobs) == 0:
        raise NeonError(f"empty sample set: {source} holds no samples")
    sizes = {len(b) for b in blobs}
    if len(sizes) > 1:
        raise NeonError(f"sample set {source} mixes vector sizes {sorted(s // 4 for s in sizes)}")
    return (sizes.pop() // 4,)


def _fmt(shape) -> str:
    return "×".join(map(str, shape))


def open_samples(uri: str) -> SampleSet:
    """A Parquet sample set (file or folder of parts) or an image folder (png/jpg at any depth, sorted paths)."""
    fs, path = storage.filesystem(uri)
    if not fs.exists(path):
        raise NeonError(f"--samples: not found: {uri}")
    files = [path] if fs.isfile(path) else sorted(fs.find(path))
    parquet = [f for f in files if f.endswith(".parquet")]
    images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    if parquet and images:
        raise NeonError(f"--samples: {uri} holds both Parquet files and images; point it at one of them")
    if parquet:
        return _parquet_samples(uri)
    if images:
        return _folder_samples(uri, fs, path, images)
    raise NeonError(f"empty sample set: {uri} holds no Parquet files and no {'/'.join(IMAGE_EXTENSIONS)} images")


def concat_sets(sets: list[SampleSet], source: str) -> SampleSet:
    """One sample set of several with the same column and shape (the increments of a set grown rung by rung)."""
    first = sets[0]
    for s in sets[1:]:
        if (s.column, s.shape) != (first.column, first.shape):
            raise NeonError(f"sample sets {first.source} and {s.source} differ in {first.column}{first.shape} vs {s.column}{s.shape}")
    return SampleSet(pa.concat_tables([s.table for s in sets]), first.column, first.shape, source)


def read_samples(uri: str, columns: list[str] | None = None) -> pa.Table:
    """A Parquet sample set as one pyarrow table sorted by index (driver-side: grids, scoring, tests)."""
    import pyarrow.dataset as pads

    fs, path = storage.filesystem(uri)
    if not fs.exists(path):
        raise NeonError(f"sample set not found: {storage.redact_uri(uri)}")
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=columns)
    if "index" in table.column_names:
        table = table.sort_by("index")
    return table


def _parquet_samples(uri: str) -> SampleSet:
    try:
        table = read_samples(uri)
    except NeonError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types on foreign files
        raise NeonError(f"--samples: unreadable Parquet sample set {uri} ({type(exc).__name__})") from None
    column = next((c for c in SAMPLE_COLUMNS if c in table.column_names), None)
    if column is None:
        raise NeonError(f"--samples: Parquet set {uri} has none of the sample columns {list(SAMPLE_COLUMNS)} (columns: {table.column_names})")
    index = table.column("index").to_pylist() if "index" in table.column_names else None
    table = table.select([column] + (["label"] if "label" in table.column_names else []))
    blobs = table.column(column).to_pylist()
    if column == "png":
        shape = image_shape(blobs, lambda i: f"{uri} row {index[i] if index else i}", uri)
    else:
        shape = vector_shape(blobs, uri)
    if "label" in table.column_names:
        table = table.set_column(1, "label", table.column("label").cast(pa.int64()))
    return SampleSet(table, column, shape, uri)


def _folder_samples(uri: str, fs, root: str, files: list[str]) -> SampleSet:
    blobs = [fs.cat_file(f) for f in files]
    shape = image_shape(blobs, lambda i: files[i], uri)
    return SampleSet(pa.table({"png": pa.array(blobs, pa.binary())}), "png", shape, uri)


def encoded_set(samples: np.ndarray, labels: np.ndarray | None, codec, source: str) -> SampleSet:
    """A SampleSet of in-memory samples (a dataset split), encoded with the dataset's codec."""
    if len(samples) == 0:
        raise NeonError(f"empty sample set: {source} holds no samples")
    columns = {codec.column: pa.array([codec.encode(s) for s in samples], pa.binary())}
    if labels is not None:
        columns["label"] = pa.array(np.asarray(labels, np.int64))
    return SampleSet(pa.table(columns), codec.column, tuple(samples.shape[1:]), source)
