"""Sampling N images of a checkpoint with a Ray Data actor pool → Parquet (index, label, seed, png).

(Non-image datasets store their samples in their codec's column instead of `png`, e.g. `vec`.)

Work items are fixed index ranges [start, start + batch_size): the noise of image i comes only from
(seed, stream, i) and its label is i mod K, so the output is identical for any number of actors.
Each work item is one Parquet file, `part-<start>.parquet`, written by the actor that sampled it
(temporary name, then rename): a killed actor is restarted by Ray and its item retried, an item is
written once under its own name (no duplicate, no gap: checked at the end), and the files of finished
items survive a stopped driver. A rerun samples only the missing items; `_sampling.json` in the folder
says what the parts are samples of, so parts of another checkpoint or sampler are never reused.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .. import storage
from ..data.codec import CODECS
from ..errors import NeonError
from ..models import ModelSpec
from ..models.base import SamplerSettings
from .cluster import actor_gpus
from .run_model import load_model
from .seeds import balanced_labels, sample_seeds
from .threads import run_here, set_torch_threads

log = logging.getLogger("neon_ray")
MARKER = "_sampling.json"  # pyarrow and Ray Data skip names starting with "_" when reading the folder


class SamplerActor:
    """Loads the model once; each call samples the work items of one Ray Data batch and writes each as its own part."""

    def __init__(self, spec: ModelSpec, checkpoint: str, settings: SamplerSettings, codec: str, seed: int, stream: str,
                 dest: str, threads: int, use_gpu: bool, bf16: bool):
        self.codec = CODECS[codec]
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            set_torch_threads(threads)
        self.family, self.net = load_model(spec, checkpoint, self.device)
        self.settings = self.family.validate_sampler(settings)
        self.seed, self.stream, self.bf16, self.dest = seed, stream, bf16, dest

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for start, count in zip(batch["start"], batch["count"]):
            uri = part_uri(self.dest, int(start))
            if storage.exists(uri):  # a retried item that was written before its actor died
                continue
            idx = np.arange(int(start), int(start) + int(count))
            labels = balanced_labels(idx, self.family.spec.num_classes)
            seeds = sample_seeds(self.seed, self.stream, idx)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                images = self.family.sample(self.net, torch.from_numpy(labels).to(self.device), seeds, self.settings)
            write_part(uri, self.codec, idx, labels, seeds, self.codec.from_model(images).cpu().numpy())
        return {"start": np.asarray(batch["start"], np.int64), "count": np.asarray(batch["count"], np.int64)}


def write_part(uri: str, codec, index: np.ndarray, labels: np.ndarray, seeds: np.ndarray, stored: np.ndarray) -> None:
    """One part of a sample set (index, label, seed, the codec's column), written atomically."""
    table = pa.table({"index": pa.array(index, pa.int64()), "label": pa.array(labels, pa.int64()),
                      "seed": pa.array(seeds, pa.int64()),
                      codec.column: pa.array([codec.encode(s) for s in stored], pa.binary())})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes_atomic(uri, sink.getvalue().to_pybytes())


def work_items(n: int, batch_size: int, first: int = 0) -> list[dict[str, int]]:
    """Index ranges covering [first, n)."""
    return [{"start": s, "count": min(batch_size, n - s)} for s in range(first, n, batch_size)]


def part_uri(dest: str, start: int) -> str:
    return storage.join(dest, f"part-{start:010d}.parquet")


def _missing_items(dest: str, identity: dict, items: list[dict[str, int]], fresh: bool) -> list[dict[str, int]]:
    """The work items still to sample into `dest`: all of them unless its parts are samples of `identity`."""
    marker = storage.join(dest, MARKER)
    if fresh or not storage.exists(marker) or storage.read_json(marker) != identity:
        storage.remove(dest)
        storage.write_json_atomic(marker, identity)
        return items
    names = _finished_parts(dest)
    return [it for it in items if part_uri(dest, it["start"]).rsplit("/", 1)[-1] not in names]


def _copy_from_donors(dest: str, identity: dict, todo: list[dict[str, int]], donors: tuple[str, ...]) -> list[dict[str, int]]:
    """Copy into `dest` the parts of `todo` that a donor folder holds, and return the items left to sample. A donor
    qualifies when its identity equals ours but for how many samples it holds (`n`, `first`): sample i depends
    only on (seed, stream, i), so its part of the same start and count holds the same rows."""
    def same_samples(other: dict) -> bool:
        return {k: v for k, v in other.items() if k not in ("n", "first")} == {k: v for k, v in identity.items() if k not in ("n", "first")}

    for donor in donors:
        marker = storage.join(donor, MARKER)
        if not todo or not storage.exists(marker) or not same_samples(theirs := storage.read_json(marker)):
            continue
        held = {it["start"]: it["count"] for it in work_items(theirs["n"], theirs["batch_size"], theirs.get("first", 0))}
        fs, path = storage.filesystem(donor)
        present = {key.rsplit("/", 1)[-1] for key in fs.find(path)}
        left = []
        for it in todo:
            name = part_uri(donor, it["start"]).rsplit("/", 1)[-1]
            if held.get(it["start"]) == it["count"] and name in present:
                storage.write_bytes_atomic(part_uri(dest, it["start"]), storage.read_bytes(part_uri(donor, it["start"])))
            else:
                left.append(it)
        if len(left) < len(todo):
            log.info("%d of %d work items copied from %s (the same samples)", len(todo) - len(left), len(todo), storage.redact_uri(donor))
        todo = left
    return todo


def _finished_parts(dest: str) -> set[str]:
    """Names of the parts written under `dest`; temporary files of actors killed mid-write are removed."""
    fs, path = storage.filesystem(dest)
    names = {key.rsplit("/", 1)[-1] for key in fs.find(path)}
    for name in [n for n in names if ".tmp-" in n]:
        fs.rm(f"{path.rstrip('/')}/{name}")
    return {n for n in names if ".tmp-" not in n}


def sample_to_parquet(spec: ModelSpec, checkpoint: str, settings: SamplerSettings, codec: str, n: int, seed: int, stream: str,
                      dest: str, resources, actors: int | None = None, fresh: bool = False, first: int = 0,
                      donors: tuple[str, ...] = ()) -> dict:
    """Sample images `first`..`n`-1 of `checkpoint` into Parquet parts under `dest`, resuming a folder left by an
    earlier, interrupted call with the same arguments (`fresh`: start over). Sample i is the same whatever
    `first` is, so a set grown in increments (the rungs of a search) equals one sampled at once.

    `donors`: finished sample folders (another stage's) whose parts are copied rather than sampled again where
    they hold exactly these samples: the same checkpoint file, settings, seed stream, batch size and precision.

    `resources`: an actor-pool config section with the sampling batch size and precision (`generate`, or `evaluate`
    for scored models): batch size, actors, CPUs/GPUs/threads per actor, bf16.
    """
    import ray
    from ray.data import ActorPoolStrategy

    if n - first < 1:
        raise NeonError(f"number of samples must be ≥ 1 (asked for indices {first}..{n - 1})")
    g = resources
    gpus = actor_gpus(g.gpus_per_actor)
    items = work_items(n, g.batch_size, first)
    identity = {"checkpoint": storage.file_identity(checkpoint, "model.checkpoint"), "spec": [spec.family, spec.preset, list(spec.image_shape),
                spec.num_classes, spec.options], "settings": settings.model_dump(mode="json"), "codec": codec, "n": n,
                "seed": seed, "stream": stream, "batch_size": g.batch_size, "bf16": g.bf16, **({"first": first} if first else {})}
    todo = _missing_items(dest, identity, items, fresh)
    todo = _copy_from_donors(dest, identity, todo, donors)
    t0 = time.time()
    actor_args = dict(spec=spec, checkpoint=checkpoint, settings=settings, codec=codec, seed=seed, stream=stream, dest=dest,
                      threads=g.threads_per_actor, use_gpu=gpus > 0, bf16=g.bf16)
    if len(todo) == 1 and not gpus:
        # One work item is one call of one actor: sampled here (the same class, the same part file), since a pool
        # would add only its start-up (a process, torch, the checkpoint). It gets the threads the pool's actors
        # would have had (the samples do not depend on the thread count: tests/test_stages_ray.py).
        threads = min(os.cpu_count() or 1, g.threads_per_actor * (actors or g.actors))
        run_here(SamplerActor, actor_args | {"threads": threads}, {"start": np.array([todo[0]["start"]]), "count": np.array([todo[0]["count"]])})
    elif todo:
        ds = ray.data.from_items(todo, override_num_blocks=len(todo))
        ds = ds.map_batches(
            SamplerActor,
            fn_constructor_kwargs=actor_args,
            batch_size=1,
            compute=ActorPoolStrategy(size=min(actors or g.actors, len(todo))),
            num_cpus=g.cpus_per_actor,
            num_gpus=gpus,
            # Ray Data's actor pools restart a killed or lost actor and retry its item by default (max_restarts and
            # max_task_retries -1); passing them here only went through the deprecated **ray_remote_args.
        )
        done = sum(len(b["start"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy"))
        assert done == len(todo), f"{done} of {len(todo)} work items reported"
    _check_complete(dest, items)
    seconds = time.time() - t0
    reused = len(items) - len(todo)
    count = n - first
    log.info("sampled %d images (%s) in %.1f s (%.1f img/s)%s → %s", count, stream, seconds, count / max(seconds, 1e-9),
             f", {reused} of {len(items)} work items reused" if reused else "", storage.redact_uri(dest))
    return {"n": count, "seconds": round(seconds, 2), "images_per_second": round(count / max(seconds, 1e-9), 2), "uri": dest,
            "reused_items": reused}


def _check_complete(dest: str, items: list[dict[str, int]]) -> None:
    """Every work item has its part with exactly its rows: no gap, no duplicate."""
    import pyarrow.dataset as pads

    names = _finished_parts(dest)
    missing = [it["start"] for it in items if part_uri(dest, it["start"]).rsplit("/", 1)[-1] not in names]
    if missing:
        raise NeonError(f"sampling left {len(missing)} work item(s) unwritten under {storage.redact_uri(dest)} (first at index {missing[0]})")
    fs, path = storage.filesystem(dest)
    index = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["index"]).column("index").to_numpy()
    expected = sum(it["count"] for it in items)
    if len(index) != expected or len(np.unique(index)) != expected:
        raise NeonError(f"sample set {storage.redact_uri(dest)} holds {len(index)} rows ({len(np.unique(index))} distinct), expected {expected}")
