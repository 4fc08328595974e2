"""The sharded feature pass: encoded samples → Ray Data actor pool (one extractor per actor) → exact moments.

The set is cut into K contiguous shards (Ray Data blocks). An actor runs its shard through the
extractor in chunks and returns only float64 (n, μ, M) and the features of the rows chosen for
precision/recall; the driver merges the moments exactly, so the statistics are the same for any K up
to float64 rounding. Samples travel encoded (PNG bytes for images), never as float tensors.
"""

from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from ..fid.stats import Moments, Statistics
from .checkpoints import run_here
from .cluster import actor_gpus
from .samplesets import SampleSet

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
    """Loads the extractor once (through torch-fidelity's factory); each call reduces one shard to its moments."""

    def __init__(self, extractor: str, weights: str | None, feature: str, column: str, kind: str, chunk: int,
                 threads: int, use_gpu: bool):
        from ..data.codec import CODECS
        from ..fid.extractors import create_extractor, get_extractor

        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(max(1, threads))
        info = get_extractor(extractor)
        self.name, self.column, self.codec, self.chunk = extractor, column, CODECS[kind], min(chunk, info.max_batch)
        self.with_logits = info.predicts_labels  # logits over the dataset's classes
        self.extractor = create_extractor(extractor, weights, [feature] + (["logits"] if self.with_logits else []), self.device)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ..fid.extractors import prepare

        moments, kept, consistent = None, [], 0
        labels = batch.get("label")
        for s in range(0, len(batch["row"]), self.chunk):
            part = slice(s, s + self.chunk)
            x = torch.from_numpy(self.codec.decode_batch(list(batch[self.column][part])))  # uint8 (B, C, H, W) for images
            out = self.extractor(prepare(x, self.name).to(self.device))
            features = out[0].float().cpu().numpy()  # (B, D)
            m = Moments.of(features)
            moments = m if moments is None else moments.merge(m)
            kept.append(features[np.asarray(batch["keep"][part], bool)])
            if self.with_logits and labels is not None:
                consistent += int((out[1].argmax(1).cpu().numpy() == np.asarray(labels[part])).sum())
        rows = np.asarray(batch["row"])[np.asarray(batch["keep"], bool)]
        return {"n": np.array([moments.n], np.int64), "mean": moments.mean[None], "m2": moments.m2[None],
                "consistent": np.array([consistent if self.with_logits and labels is not None else -1], np.int64),
                "kept_rows": np.array([_npy(rows)], dtype=object), "kept": np.array([_npy(np.concatenate(kept))], dtype=object)}


def shards_of(table: pa.Table, num_shards: int):
    """A Ray Dataset of `num_shards` contiguous blocks made on the caller: no Ray Data read tasks (each would
    ask for a whole CPU, which a busy small cluster such as a running Tune trial cannot give)."""
    import ray

    sizes = [len(a) for a in np.array_split(np.arange(table.num_rows), max(1, min(num_shards, table.num_rows)))]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return ray.data.from_arrow([table.slice(int(a), int(n)) for a, n in zip(starts, sizes)])


def extract(samples: SampleSet, extractor: str, weights: str | None, feature_space: str, fingerprint: str, resources,
            chunk: int, num_shards: int | None = None, keep: np.ndarray | None = None) -> FeaturePass:
    """Statistics (and the features of the `keep` rows) of a sample set, over an actor pool.

    `resources`: the `evaluate` config section (feature actors, CPUs/GPUs/threads per actor).
    """
    from ray.data import ActorPoolStrategy

    from ..fid.extractors import get_extractor

    t0 = time.time()
    info = get_extractor(extractor)
    n = samples.n
    keep = np.zeros(n, bool) if keep is None else keep
    # Default: a few shards per actor (load balance) without a (D, D) moment matrix per small chunk.
    shards = num_shards or min(math.ceil(n / chunk), SHARDS_PER_ACTOR * resources.actors)
    table = samples.table.append_column("row", pa.array(np.arange(n, dtype=np.int64))).append_column("keep", pa.array(keep))
    gpus = actor_gpus(resources.gpus_per_actor)
    actor_args = dict(extractor=extractor, weights=weights, feature=info.feature, column=samples.column,
                      kind=info.kind, chunk=chunk, threads=resources.threads_per_actor, use_gpu=gpus > 0)
    if shards == 1 and not gpus:
        # One shard is one call of one actor: run it here (the same class and math), since a pool would add only
        # its start-up (a process, torch, the extractor: seconds each time, most of a small pass on a busy CPU).
        batches = [run_here(FeatureActor, actor_args, {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names})]
    else:
        batches = shards_of(table, shards).map_batches(
            FeatureActor,
            fn_constructor_kwargs=actor_args,
            batch_size=None,  # one call per shard; the actor chunks it
            compute=ActorPoolStrategy(size=max(1, min(shards, resources.actors))),
            num_cpus=resources.cpus_per_actor,
            num_gpus=gpus,
        ).iter_batches(batch_size=None, batch_format="numpy")
    moments, consistent, rows, feats = None, [], [], []
    for out in batches:  # streamed: one (D, D) at a time per shard
        for i in range(len(out["n"])):
            m = Moments(int(out["n"][i]), np.asarray(out["mean"][i], np.float64), np.asarray(out["m2"][i], np.float64))
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
