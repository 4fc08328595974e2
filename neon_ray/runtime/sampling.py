"""Sampling N images of a checkpoint with a Ray Data actor pool → Parquet (index, label, seed, png).

(Non-image datasets store their samples in their codec's column instead of `png`, e.g. `vec`.)

Work items are fixed index ranges [start, start + batch_size): the noise of image i comes only from
(seed, stream, i) and its label is i mod K, so the output is identical for any number of actors.
"""

from __future__ import annotations

import logging
import time
import uuid

import numpy as np
import torch

from .. import storage
from ..data.codec import CODECS
from ..errors import NeonError
from ..models import ModelSpec
from ..models.base import SamplerSettings
from .checkpoints import load_model, set_torch_threads
from .cluster import actor_gpus
from .seeds import balanced_labels, sample_seeds

log = logging.getLogger("neon_ray")


class SamplerActor:
    """Loads the model once; each call samples the work items of one Ray Data batch."""

    def __init__(self, spec: ModelSpec, checkpoint: str, settings: SamplerSettings, codec: str, seed: int, stream: str,
                 threads: int, use_gpu: bool, bf16: bool):
        self.codec = CODECS[codec]
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            set_torch_threads(threads)
        self.family, self.net = load_model(spec, checkpoint, self.device)
        self.settings = self.family.sampler_settings(settings)
        self.seed, self.stream, self.bf16 = seed, stream, bf16

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {"index": [], "label": [], "seed": [], "samples": []}
        for start, count in zip(batch["start"], batch["count"]):
            idx = np.arange(int(start), int(start) + int(count))
            labels = balanced_labels(idx, self.family.spec.num_classes)
            seeds = sample_seeds(self.seed, self.stream, idx)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                images = self.family.sample(self.net, torch.from_numpy(labels).to(self.device), seeds, self.settings)
            stored = self.codec.from_model(images).cpu().numpy()
            out["index"].extend(idx.tolist())
            out["label"].extend(labels.tolist())
            out["seed"].extend(seeds)
            out["samples"].extend(self.codec.encode(s) for s in stored)
        return {"index": np.array(out["index"], np.int64), "label": np.array(out["label"], np.int64),
                "seed": np.array(out["seed"], np.int64), self.codec.column: np.array(out["samples"], dtype=object)}


def work_items(n: int, batch_size: int) -> list[dict[str, int]]:
    return [{"start": s, "count": min(batch_size, n - s)} for s in range(0, n, batch_size)]


def sample_to_parquet(spec: ModelSpec, checkpoint: str, settings: SamplerSettings, codec: str, n: int, seed: int, stream: str,
                      dest: str, resources, actors: int | None = None) -> dict:
    """Sample `n` images of `checkpoint` into Parquet files under `dest` (replaced atomically when done).

    `resources`: the `generate` config section (batch size, actors, CPUs/GPUs/threads per actor, bf16, I/O CPUs).
    """
    import ray
    from ray.data import ActorPoolStrategy

    if n < 1:
        raise NeonError("number of samples must be ≥ 1")
    g = resources
    gpus = actor_gpus(g.gpus_per_actor)
    items = work_items(n, g.batch_size)
    t0 = time.time()
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        SamplerActor,
        fn_constructor_kwargs=dict(spec=spec, checkpoint=checkpoint, settings=settings, codec=codec, seed=seed, stream=stream,
                                   threads=g.threads_per_actor, use_gpu=gpus > 0, bf16=g.bf16),
        batch_size=1,
        compute=ActorPoolStrategy(size=min(actors or g.actors, len(items))),
        num_cpus=g.cpus_per_actor,
        num_gpus=gpus,
    )
    tmp = f"{dest.rstrip('/')}.tmp-{uuid.uuid4().hex[:8]}"
    pafs, tmp_path = storage.pyarrow_filesystem(tmp)
    try:
        ds.write_parquet(tmp_path, filesystem=pafs, ray_remote_args={"num_cpus": g.io_cpus})
        storage.move_dir(tmp, dest)
    finally:
        storage.remove(tmp)  # an interrupted write leaves no half set behind
    seconds = time.time() - t0
    log.info("sampled %d images (%s) in %.1f s (%.1f img/s) → %s", n, stream, seconds, n / seconds, storage.redact_uri(dest))
    return {"n": n, "seconds": round(seconds, 2), "images_per_second": round(n / seconds, 2), "uri": dest}
