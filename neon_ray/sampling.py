"""Sampling N images from a checkpoint with Ray Data actors → Parquet (index, label, seed, png).

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

from . import storage
from .config import RunConfig
from .errors import NeonError
from .training import balanced_labels, sample_seeds

log = logging.getLogger("neon_ray")


class SamplerActor:
    """Loads the model once; each call samples the work items of one Ray Data batch."""

    def __init__(self, cfg_json: dict, checkpoint: str, settings: dict, seed: int, stream: str, threads: int, use_gpu: bool, bf16: bool):
        from .stages.common import dataset_of, load_model, set_torch_threads

        cfg = RunConfig.model_validate(cfg_json)
        self.codec = dataset_of(cfg).codec
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            set_torch_threads(threads)
        self.family, self.net = load_model(cfg, checkpoint, self.device)
        self.settings = self.family.sampler_schema.model_validate(settings)
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


def sample_to_parquet(cfg: RunConfig, checkpoint: str, n: int, seed: int, stream: str, dest: str,
                      actors: int | None = None, settings: dict | None = None) -> dict:
    """Sample `n` images of `checkpoint` into Parquet files under `dest` (replaced atomically)."""
    import ray
    from ray.data import ActorPoolStrategy

    from .cluster import resolve_use_gpu

    if n < 1:
        raise NeonError("number of samples must be ≥ 1")
    g = cfg.generate
    use_gpu = resolve_use_gpu(None if g.gpus_per_actor is None else g.gpus_per_actor > 0)
    gpus = (g.gpus_per_actor if g.gpus_per_actor is not None else 1.0) if use_gpu else 0
    actors = actors or g.actors
    items = work_items(n, g.batch_size)
    t0 = time.time()
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        SamplerActor,
        fn_constructor_kwargs=dict(cfg_json=cfg.model_dump(mode="json"), checkpoint=checkpoint,
                                   settings=settings if settings is not None else cfg.sampler, seed=seed, stream=stream,
                                   threads=g.threads_per_actor, use_gpu=use_gpu, bf16=g.bf16),
        batch_size=1,
        compute=ActorPoolStrategy(size=min(actors, len(items))),
        num_cpus=g.cpus_per_actor,
        num_gpus=gpus,
    )
    tmp = f"{dest.rstrip('/')}.tmp-{uuid.uuid4().hex[:8]}"
    ds.write_parquet(tmp, ray_remote_args={"num_cpus": g.io_cpus})
    storage.remove(dest)
    fs, path = storage.filesystem(dest)
    fs.mv(storage.filesystem(tmp)[1], path, recursive=True)
    seconds = time.time() - t0
    log.info("sampled %d images (%s) in %.1f s (%.1f img/s) → %s", n, stream, seconds, n / seconds, dest)
    return {"n": n, "seconds": round(seconds, 2), "images_per_second": round(n / seconds, 2), "uri": dest}


def read_samples(uri: str, columns: list[str] | None = None):
    """The Parquet sample set as a pyarrow Table sorted by index (driver-side, for grids and tests)."""
    import pyarrow.dataset as pads

    fs, path = storage.filesystem(uri)
    if not fs.exists(path):
        raise NeonError(f"sample set not found: {uri}")
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=columns)
    if "index" in table.column_names:
        table = table.sort_by("index")
    return table
