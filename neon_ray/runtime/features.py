"""The sharded feature pass: a sample set's parts → Ray Data actor pool (one extractor per actor) → exact moments.

The set is cut into K contiguous, balanced row ranges (work items: part names and row ranges, not
samples). An actor reads its item's parts itself, a block at a time, checks every sample's header,
runs them through the extractor in chunks and returns only float64 (n, μ, M) and the features of the
rows chosen for precision/recall; the driver lists parts, merges the moments exactly (the statistics are
the same for any K up to float64 rounding) and never holds the samples. In-memory sets (dataset splits)
are one in-memory part whose rows travel with the work items, encoded (PNG bytes for images).
"""

from __future__ import annotations

import io
import logging
import math
import pickle
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import NeonError
from ..fid.stats import Moments, Statistics
from .threads import run_here
from .cluster import actor_gpus
from .samplesets import SampleSet, decode_checked, portable, read_blocks

log = logging.getLogger("neon_ray")
SHARDS_PER_ACTOR = 4


@dataclass
class FeaturePass:
    stats: Statistics
    features: np.ndarray | None  # (n_kept, D) float32 of the kept rows, in row order
    consistency: float | None  # fraction of samples the extractor classifies as their label
    seconds: float


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _from_npy(blob: bytes) -> np.ndarray:
    return np.load(io.BytesIO(blob), allow_pickle=False)


class FeatureActor:
    """Loads the extractor once (through torch-fidelity's factory); each call reads one work item's pieces of the
    set itself, a block at a time, and reduces them to their moments."""

    def __init__(self, extractor: str, weights: str | None, feature: str, column: str, kind: str, shape: tuple[int, ...],
                 labels: bool, source: str, shape_of: str, chunk: int, threads: int, use_gpu: bool):
        from ..fid.extractors import create_extractor, get_extractor

        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(max(1, threads))
        info = get_extractor(extractor)
        self.name, self.column, self.kind, self.chunk = extractor, column, kind, min(chunk, info.max_batch)
        self.shape, self.labels, self.source, self.shape_of = tuple(shape), labels, source, shape_of
        self.with_logits = info.predicts_labels  # logits over the dataset's classes
        self.extractor = create_extractor(extractor, weights, [feature] + (["logits"] if self.with_logits else []), self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A batch of work items (`work`: pickled (first row, pieces, kept rows)) → one row of moments per item.
        A bad sample or a vanished part comes back as `error` (one line), not as an exception Ray would retry."""
        out = [self._item(*pickle.loads(w)) for w in batch["work"]]
        return {k: np.concatenate([o[k] for o in out]) for k in out[0]}

    def _item(self, first: int, pieces: list, kept_rows: np.ndarray) -> dict[str, np.ndarray]:
        try:
            moments, consistent, kept = self._reduce(first, pieces, set(kept_rows.tolist()))
        except NeonError as exc:
            return _row(first, Moments.empty(0), -1, kept_rows[:0], np.zeros((0, 0), np.float32), str(exc))
        return _row(first, moments, consistent if self.with_logits and self.labels else -1, kept_rows, kept, "")

    @torch.no_grad()
    def _reduce(self, first: int, pieces: list, keep: set[int]):
        # Chunks of `chunk` rows counted from the work item's first row, across part boundaries: the same chunks
        # (hence the same float64 moments, bit for bit) as when the item's rows were one in-memory table.
        moments, kept, consistent = None, [], 0
        row, pending = first, ([], [], [])
        for blobs, labels, names in read_blocks(pieces, self.column, self.labels):
            pending[0].extend(blobs), pending[1].extend(names)
            pending[2].extend(labels.tolist() if labels is not None else [])
            while len(pending[0]) >= self.chunk:
                row, moments, consistent = self._chunk(pending, self.chunk, row, moments, kept, consistent, keep)
        if pending[0]:
            row, moments, consistent = self._chunk(pending, len(pending[0]), row, moments, kept, consistent, keep)
        return moments, consistent, np.concatenate(kept)

    def _chunk(self, pending, size: int, row: int, moments, kept: list, consistent: int, keep: set[int]):
        from ..fid.extractors import prepare

        blobs, names, labels = (p[:size] for p in pending)
        for p in pending:
            del p[:size]
        x = torch.from_numpy(decode_checked(blobs, names, self.shape, self.kind, self.source, self.shape_of))  # uint8 (B, C, H, W) for images
        out = self.extractor(prepare(x, self.name).to(self.device))
        features = out[0].float().cpu().numpy()  # (B, D)
        m = Moments.of(features)
        moments = m if moments is None else moments.merge(m)
        mask = np.array([r in keep for r in range(row, row + size)], bool)
        kept.append(features[mask])
        if self.with_logits and self.labels:
            consistent += int((out[1].argmax(1).cpu().numpy() == np.asarray(labels)).sum())
        return row + size, moments, consistent


def _row(first: int, m: Moments, consistent: int, kept_rows: np.ndarray, kept: np.ndarray, error: str) -> dict[str, np.ndarray]:
    return {"first": np.array([first], np.int64), "n": np.array([m.n], np.int64), "mean": np.array([_npy(m.mean)], dtype=object), "m2": np.array([_npy(m.m2)], dtype=object),
            "consistent": np.array([consistent], np.int64), "kept_rows": np.array([_npy(kept_rows)], dtype=object),
            "kept": np.array([_npy(kept)], dtype=object), "error": np.array([error], dtype=object)}


def work_items(samples: SampleSet, num_shards: int, keep: np.ndarray) -> list[dict]:
    """`num_shards` contiguous, balanced row ranges of the set, each as (first row, its pieces, its kept rows).
    Only part names and row ranges travel, except for in-memory parts, whose own rows travel with the item."""
    n = samples.n
    sizes = [len(a) for a in np.array_split(np.arange(n), max(1, min(num_shards, n)))]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    return [{"first": int(a), "work": pickle.dumps((int(a), portable(samples.slice(int(a), int(a) + s)),
                                   (np.nonzero(keep[a:a + s])[0] + a).astype(np.int64)))}
            for a, s in zip(starts, sizes)]


def extract(samples: SampleSet, extractor: str, weights: str | None, feature_space: str, fingerprint: str, resources,
            chunk: int, num_shards: int | None = None, keep: np.ndarray | None = None) -> FeaturePass:
    """Statistics (and the features of the `keep` rows) of a sample set, over an actor pool that reads the set itself.

    `resources`: the `evaluate` config section (feature actors, CPUs/GPUs/threads per actor).
    """
    import ray
    from ray.data import ActorPoolStrategy

    from ..fid.extractors import get_extractor

    t0 = time.time()
    info = get_extractor(extractor)
    n = samples.n
    keep = np.zeros(n, bool) if keep is None else keep
    # Default: a few shards per actor (load balance) without a (D, D) moment matrix per small chunk.
    shards = num_shards or min(math.ceil(n / chunk), SHARDS_PER_ACTOR * resources.actors)
    items = work_items(samples, shards, keep)
    gpus = actor_gpus(resources.gpus_per_actor)
    actor_args = dict(extractor=extractor, weights=weights, feature=info.feature, column=samples.column, kind=info.kind,
                      shape=samples.shape, labels=samples.has_labels, source=samples.source, shape_of=samples.shape_of,
                      chunk=chunk, threads=resources.threads_per_actor, use_gpu=gpus > 0)
    if len(items) == 1 and not gpus:
        # One shard is one call of one actor: run it here (the same class and math), since a pool would add only
        # its start-up (a process, torch, the extractor: seconds each time, most of a small pass on a busy CPU).
        batches = [run_here(FeatureActor, actor_args, {"work": np.array([items[0]["work"]], dtype=object)})]
    else:
        # from_items makes the blocks on the caller: no Ray Data read tasks (each would ask for a whole CPU, which a
        # busy small cluster such as a running Tune trial cannot give). The actors read the samples themselves.
        batches = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            FeatureActor,
            fn_constructor_kwargs=actor_args,
            batch_size=1,  # one work item per call; the actor reads and chunks it
            compute=ActorPoolStrategy(size=max(1, min(len(items), resources.actors))),
            num_cpus=resources.cpus_per_actor,
            num_gpus=gpus,
        ).iter_batches(batch_size=None, batch_format="numpy")
    moments, consistent, rows, feats = None, [], [], []
    # Shards finish in any order; their moments are merged in row order (held back until their turn), so the
    # float64 rounding, hence the FID to the last digit, is the same in every run and for every part layout.
    turn, waiting = [it["first"] for it in items], {}
    for out in batches:
        for i in range(len(out["n"])):
            if out["error"][i]:
                raise NeonError(out["error"][i])
            waiting[int(out["first"][i])] = Moments(int(out["n"][i]), _from_npy(out["mean"][i]), _from_npy(out["m2"][i]))
            while turn and turn[0] in waiting:
                m = waiting.pop(turn.pop(0))
                moments = m if moments is None else moments.merge(m)
            consistent.append(int(out["consistent"][i]))
            rows.append(_from_npy(out["kept_rows"][i]))
            feats.append(_from_npy(out["kept"][i]))
    assert moments is not None and moments.n == n, f"feature pass lost samples: {None if moments is None else moments.n} of {n}"
    order = np.argsort(np.concatenate(rows), kind="stable")
    features = np.concatenate(feats)[order] if keep.any() else None
    consistency = sum(consistent) / n if all(c >= 0 for c in consistent) else None
    seconds = time.time() - t0
    log.info("features of %d samples (%s, %d shards) in %.1f s (%.1f samples/s)", n, extractor, shards, seconds, n / seconds)
    return FeaturePass(Statistics.from_moments(moments, feature_space, fingerprint, samples.source), features, consistency, seconds)
