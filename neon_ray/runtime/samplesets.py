"""Sample sets as lazy handles: which parts hold the samples, never the samples themselves.

A Parquet set has one row per sample: `index`, `label`, `seed` and the codec's column (`png` for
images, `vec` for vectors). Opening a set (a Parquet file or folder of parts, or an image folder) only
lists its parts and reads their footers (row counts, columns) and one sample's header (the shape): a
50,000-image set or an ImageNet folder never passes whole through the driver or a Tune trial. The
feature actors read the parts themselves, a block at a time (`read_blocks`), and check every sample's
header there (`decode_checked`), so a mixed resolution, channel count or image mode fails with one
line naming the part and row (or the file). In-memory sets (dataset splits) are one in-memory part, and
go through the same code.

Rows are numbered part after part: Parquet parts in the order of their first `index` (the order of
`part-<start>` names for sets neon-ray writes), rows within a part as stored; image files by sorted path.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
from PIL import Image

from .. import storage
from ..errors import NeonError

log = logging.getLogger("neon_ray")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
CHANNELS = {"L": 1, "RGB": 3}  # 8-bit grey and RGB; other modes would decode to other value ranges
SAMPLE_COLUMNS = ("png", "vec")  # the codec columns of neon_ray.data.codec
FILES_PER_PART = 256  # image files per part of a folder set: the unit a work item slices
READ_ROWS = 256  # rows per record batch read from a Parquet part (bounds a reader's memory in large row groups)


@dataclass(frozen=True)
class Part:
    """One readable piece of a set: a Parquet file, a run of image files, or an in-memory table (IPC bytes)."""

    name: str  # for messages: the file's URI, or the set's name for in-memory parts
    rows: int
    parquet: str | None = None
    files: tuple[str, ...] = ()
    ipc: bytes | None = None  # an Arrow IPC stream of `column` (+ `label`): compact, ships only its own rows


@dataclass(frozen=True)
class Piece:
    """Rows start..start+count-1 of a part."""

    part: Part
    start: int
    count: int


@dataclass
class SampleSet:
    pieces: list[Piece]
    column: str  # the codec column of the samples
    shape: tuple[int, ...]  # of every sample: (C, H, W) for images
    source: str
    has_labels: bool  # every part has a `label` column
    shape_of: str = ""  # the sample `shape` was read from (named in mixed-shape errors)

    @property
    def kind(self) -> str:
        """The codec kind of the samples (`image`, `vector`), from their column."""
        from ..data.codec import CODECS

        return next(k for k, codec in CODECS.items() if codec.column == self.column)

    @property
    def n(self) -> int:
        return sum(p.count for p in self.pieces)

    def slice(self, lo: int, hi: int) -> list[Piece]:
        """The pieces holding rows lo..hi-1 of the set, each cut to its share."""
        out, offset = [], 0
        for p in self.pieces:
            a, b = max(lo, offset), min(hi, offset + p.count)
            if a < b:
                out.append(Piece(p.part, p.start + a - offset, b - a))
            offset += p.count
        return out

    def head(self, n: int) -> SampleSet:
        """The first n rows (lazy)."""
        return replace(self, pieces=self.slice(0, n), source=f"{self.source}[:{n}]")

    def read_table(self) -> pa.Table:
        """The whole set as one table of `column` (+ `label`): for small sets, tests and the in-memory comparison."""
        tables = [pa.table({self.column: pa.array(blobs, pa.binary()),
                            **({"label": pa.array(labels, pa.int64())} if self.has_labels else {})})
                  for blobs, labels, _ in read_blocks(self.pieces, self.column, self.has_labels)]
        return pa.concat_tables(tables)


def in_memory(samples: SampleSet) -> SampleSet:
    """The same set read whole into one in-memory part (the path every set took before sets were streamed)."""
    table = samples.read_table()
    part = Part(samples.source, table.num_rows, ipc=_ipc(table))
    return replace(samples, pieces=[Piece(part, 0, table.num_rows)])


# ----------------------------------------------------------------------------------------------
# Opening (driver): list parts, read footers and one header


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
        return _parquet_samples(uri, fs, parquet)
    if images:
        return _folder_samples(uri, fs, files, images)
    raise NeonError(f"empty sample set: {uri} holds no Parquet files and no {'/'.join(IMAGE_EXTENSIONS)} images")


def _uri(fs, path: str, local: bool) -> str:
    """A URI the actors can open: the plain path for local files, else with its scheme."""
    return path if local else fs.unstrip_protocol(path)


def _footer(fs, path: str, uri: str):
    import pyarrow.parquet as pq

    try:
        with fs.open(path, "rb") as fh:
            return pq.ParquetFile(fh).metadata
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types on foreign files
        raise NeonError(f"--samples: unreadable Parquet part {uri} ({type(exc).__name__})") from None


def _first_index(meta) -> int | None:
    """The smallest `index` of a part from its row-group statistics (None when not recorded)."""
    names = meta.schema.names
    if "index" not in names or meta.num_row_groups == 0:
        return None
    col = names.index("index")
    stats = [meta.row_group(i).column(col).statistics for i in range(meta.num_row_groups)]
    if any(s is None or not s.has_min_max for s in stats):
        return None
    return min(int(s.min) for s in stats)


def _parquet_samples(uri: str, fs, paths: list[str]) -> SampleSet:
    parts, column, labels, first_of, local = [], None, None, {}, storage.is_local(uri)
    for path in paths:
        part_uri = _uri(fs, path, local)
        meta = _footer(fs, path, part_uri)
        names = meta.schema.names
        col = next((c for c in SAMPLE_COLUMNS if c in names), None)
        if col is None:
            raise NeonError(f"--samples: Parquet part {part_uri} has none of the sample columns {list(SAMPLE_COLUMNS)} (columns: {names})")
        if column is None:
            column, labels = col, "label" in names
        elif (col, "label" in names) != (column, labels):
            raise NeonError(f"--samples: Parquet part {part_uri} holds {col}{' + label' if 'label' in names else ''} but "
                            f"{parts[0].name} holds {column}{' + label' if labels else ''}; all parts of a set must agree")
        if meta.num_rows:
            parts.append(Part(part_uri, meta.num_rows, parquet=part_uri))
            first_of[part_uri] = _first_index(meta)
    if not parts:
        raise NeonError(f"empty sample set: {uri} holds no samples")
    if all(v is not None for v in first_of.values()):
        parts.sort(key=lambda p: first_of[p.name])  # index order, whatever the file names
    pieces = [Piece(p, 0, p.rows) for p in parts]
    blobs, _, names = next(read_blocks(pieces[:1], column, False, rows=1))
    shape = image_shape(blobs[0], names[0]) if column == "png" else (len(blobs[0]) // 4,)
    return SampleSet(pieces, column, shape, uri, labels, names[0])


def _folder_samples(uri: str, fs, files: list[str], images: list[str]) -> SampleSet:
    skipped = len(files) - len(images)
    if skipped:  # documented: other files (a README, a labels.csv) are skipped, with a count
        log.warning("image folder %s: skipped %d file(s) without a %s extension", uri, skipped, "/".join(IMAGE_EXTENSIONS))
    local = storage.is_local(uri)
    uris = [_uri(fs, f, local) for f in images]
    parts = [Part(uris[i], len(chunk), files=tuple(chunk)) for i in range(0, len(uris), FILES_PER_PART)
             for chunk in [uris[i:i + FILES_PER_PART]]]
    shape = image_shape(storage.read_bytes(uris[0]), uris[0])
    return SampleSet([Piece(p, 0, p.rows) for p in parts], "png", shape, uri, False, uris[0])


def concat_sets(sets: list[SampleSet], source: str) -> SampleSet:
    """One sample set of several with the same column and shape (the increments of a set grown rung by rung); lazy."""
    first = sets[0]
    for s in sets[1:]:
        if (s.column, s.shape) != (first.column, first.shape):
            raise NeonError(f"sample sets {first.source} and {s.source} differ in {first.column}{first.shape} vs {s.column}{s.shape}")
    return SampleSet([p for s in sets for p in s.pieces], first.column, first.shape, source, all(s.has_labels for s in sets),
                     first.shape_of)


def encoded_set(samples: np.ndarray, labels: np.ndarray | None, codec, source: str) -> SampleSet:
    """A SampleSet of in-memory samples (a dataset split), encoded with the dataset's codec: one in-memory part."""
    if len(samples) == 0:
        raise NeonError(f"empty sample set: {source} holds no samples")
    columns = {codec.column: pa.array([codec.encode(s) for s in samples], pa.binary())}
    if labels is not None:
        columns["label"] = pa.array(np.asarray(labels, np.int64))
    part = Part(source, len(samples), ipc=_ipc(pa.table(columns)))
    return SampleSet([Piece(part, 0, len(samples))], codec.column, tuple(samples.shape[1:]), source, labels is not None)


def read_samples(uri: str, columns: list[str] | None = None) -> pa.Table:
    """A Parquet sample set as one pyarrow table sorted by index (driver-side: grids, small sets, tests)."""
    import pyarrow.dataset as pads

    fs, path = storage.filesystem(uri)
    if not fs.exists(path):
        raise NeonError(f"sample set not found: {storage.redact_uri(uri)}")
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=columns)
    if "index" in table.column_names:
        table = table.sort_by("index")
    return table


# ----------------------------------------------------------------------------------------------
# Reading (feature actors): a block at a time


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def portable(pieces: list[Piece]) -> list[Piece]:
    """Pieces to send to an actor: an in-memory part cut to the piece's own rows (never the whole table per work item)."""
    out = []
    for p in pieces:
        if p.part.ipc is not None:
            table = pa.ipc.open_stream(p.part.ipc).read_all().slice(p.start, p.count)
            out.append(Piece(Part(p.part.name, p.count, ipc=_ipc(table)), 0, p.count))
        else:
            out.append(p)
    return out


def read_blocks(pieces: list[Piece], column: str, labels: bool, rows: int = READ_ROWS) -> Iterator[tuple[list, np.ndarray | None, list[str]]]:
    """(encoded samples, labels or None, a name per sample for messages), a block of ≤ `rows` at a time.

    A part that has disappeared since the set was opened gives one line naming it."""
    for p in pieces:
        try:
            yield from _read_piece(p, column, labels, rows)
        except (FileNotFoundError, OSError) as exc:
            if isinstance(exc, FileNotFoundError) or not _exists(p):
                raise NeonError(f"sample set part disappeared during the pass: {p.part.name}; nothing was written, rerun "
                                "(a set neon-ray samples resumes by resampling the missing part)") from None
            raise


def _exists(p: Piece) -> bool:
    return all(storage.exists(u) for u in ([p.part.parquet] if p.part.parquet else list(p.part.files)))


def _read_piece(p: Piece, column: str, labels: bool, rows: int):
    if p.part.parquet is not None:
        yield from _read_parquet(p, column, labels, rows)
    elif p.part.files:
        files = p.part.files[p.start:p.start + p.count]
        for i in range(0, len(files), rows):
            names = list(files[i:i + rows])
            yield [storage.read_bytes(f) for f in names], None, names
    else:
        table = pa.ipc.open_stream(p.part.ipc).read_all().slice(p.start, p.count)
        for i in range(0, table.num_rows, rows):
            block = table.slice(i, rows)
            yield (block.column(column).to_pylist(), block.column("label").to_numpy() if labels else None,
                   [f"{p.part.name} row {p.start + i + j}" for j in range(block.num_rows)])


def _read_parquet(p: Piece, column: str, labels: bool, rows: int):
    """Only the row groups that overlap the piece, in record batches of `rows`."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(p.part.parquet)
    with fs.open(path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        first_row, groups, offset = None, [], 0
        for g in range(pf.metadata.num_row_groups):
            size = pf.metadata.row_group(g).num_rows
            if offset < p.start + p.count and offset + size > p.start:
                groups.append(g)
                first_row = offset if first_row is None else first_row
            offset += size
        if offset != p.part.rows:
            raise NeonError(f"sample set part changed during the pass: {p.part.name} holds {offset} rows, not {p.part.rows}; "
                            "nothing was written, rerun")
        at = first_row or 0
        for batch in pf.iter_batches(batch_size=rows, row_groups=groups, columns=[column] + (["label"] if labels else [])):
            a, b = max(p.start, at), min(p.start + p.count, at + batch.num_rows)
            if a < b:
                block = batch.slice(a - at, b - a)
                yield (block.column(column).to_pylist(), block.column("label").to_numpy().astype(np.int64) if labels else None,
                       [f"{p.part.name} row {r}" for r in range(a, b)])
            at += batch.num_rows


# ----------------------------------------------------------------------------------------------
# Headers


def image_shape(blob: bytes, name: str) -> tuple[int, int, int]:
    """(C, H, W) of one encoded image from its header; one-line errors for undecodable images and other modes."""
    try:
        with Image.open(io.BytesIO(blob)) as im:
            mode, (w, h) = im.mode, im.size
    except Exception as exc:  # noqa: BLE001 - PIL raises many types on corrupt input
        raise NeonError(f"undecodable image {name} ({type(exc).__name__})") from None
    if mode not in CHANNELS:
        raise NeonError(f"image {name} has mode {mode}; neon-ray scores 8-bit grey (L) or RGB images")
    return (CHANNELS[mode], h, w)


def decode_checked(blobs: list, names: list[str], shape: tuple[int, ...], kind: str, source: str, shape_of: str = "") -> np.ndarray:
    """Decode a block, checking each sample against the set's shape: uint8 (B, C, H, W) images or float32 (B, D) vectors."""
    if kind == "vector":
        for blob, name in zip(blobs, names):
            if len(blob) != 4 * shape[0]:
                raise NeonError(f"mixed vector sizes in {source}: {name} has {len(blob) // 4} coordinates, the set {shape[0]}")
        return np.stack([np.frombuffer(b, dtype="<f4") for b in blobs]).astype(np.float32)
    out = np.empty((len(blobs), *shape), np.uint8)
    for i, (blob, name) in enumerate(zip(blobs, names)):
        got = image_shape(blob, name)
        if got != shape:
            raise NeonError(f"mixed image shapes in {source}: {name} is {_fmt(got)} but {shape_of or 'the first image'} is {_fmt(shape)}; "
                            "all images must share one size and channel count")
        with Image.open(io.BytesIO(blob)) as im:
            arr = np.asarray(im)
        out[i] = arr[None] if arr.ndim == 2 else np.transpose(arr, (2, 0, 1))
    return out


def _fmt(shape) -> str:
    return "×".join(map(str, shape))
