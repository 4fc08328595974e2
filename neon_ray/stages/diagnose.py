"""Stage `diagnose` (`neon-ray diagnose`): predict the sign of a helpful w and a bracket for the search before any
image is sampled from θ(w), from held-out real data (neon_ray.diagnosis holds the math).

On `diagnose.batches` × `diagnose.batch_size` held-out real samples (the dataset's test split, or
`diagnose.real_source`), with the same noise, timesteps and tokens for every θ: ⟨g, Δ⟩ between the real-data
gradient at θ_base and Δ = θ_ft − θ_base with its standard error over batches, the paper's cosine, the real-data
objective L(θ_base − w·Δ) at `diagnose.w_points`, its argmin, the predicted sign and the bracket `tune.prior:
diagnose` searches. The manifest and the stage's MLflow run record all of it.

By default it runs in the driver process: one backward and a forward per w point over a few batches costs less
than one search trial for the models here. With `diagnose.workers` ≥ 1, Ray tasks take contiguous shares of the
batches (each loads θ_base and θ_ft and runs `diagnosis.measure`), and the driver joins their per-batch numbers and
gradient sums (`diagnosis.conclude`): the same result for any count, each task holding one model's weights, its
gradient and Δ. A model whose gradient does not fit one worker: `diagnose.zero_stage` runs the same measurement on a
Ray Train group of DeepSpeed ZeRO engines (runtime/diagnose_zero.py), the parameters, gradients and Δ sharded over them.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from .. import storage
from ..config import DiagnoseConfig, RunConfig
from ..context import StageContext
from ..diagnosis import Share, conclude, describe, measure
from ..errors import NeonError
from ..inputs import BASE, StageInputs
from ..manifest import Manifest
from ..models.checkpoint import load_checkpoint
from ..runtime.run_model import dataset_of, load_model, spec_of
from ..runtime.seeds import derive_seed

log = logging.getLogger("neon_ray")

INPUTS = StageInputs(fields=("model.family", "model.preset", "model.options", "diagnose"),
                     derived=("dataset", "data_spec"), needs=(BASE, "finetune"))


def run(section: DiagnoseConfig, ctx: StageContext) -> Manifest:
    cfg = ctx.cfg
    cfg.check_diagnose_data()
    base, finetuned = ctx.input_uri("base"), ctx.input_uri("finetune")
    rec = ctx.start()
    t0 = time.time()
    x, y, source = held_out(cfg, section)
    n = section.batch_size
    batches = [(x[i * n:(i + 1) * n], y[i * n:(i + 1) * n]) for i in range(len(x) // n)]
    seeds = [derive_seed(section.seed, "diagnose", b) for b in range(len(batches))]
    if section.zero_stage is not None:
        from ..runtime.cluster import ensure_ray
        from ..runtime.diagnose_zero import measure_with_zero

        ensure_ray(cfg.ray)
        shares = [measure_with_zero(cfg, section, base, finetuned, batches, seeds, rec.dir, f"diagnose-{ctx.config_hash}", ctx.force)]
    elif section.workers:
        shares = _on_workers(cfg, section, base, finetuned, batches, seeds)
    else:
        shares = [measure_share(spec_of(cfg), base, finetuned, batches, seeds, section.w_points)]
    result = conclude(shares, section.w_points, time.time() - t0)
    log.info("diagnose: %s", describe(result.to_dict()))
    rec.inputs = {"base_checkpoint": base, "finetuned": finetuned, "real": source}
    rec.metrics = result.to_dict() | {"bracket_lo": result.bracket[0], "bracket_hi": result.bracket[1],
                                      # MLflow keeps numbers: the loss curve as loss_at.<w>
                                      "loss_at": {f"{r['w']:g}": r["loss"] for r in result.losses}}
    rec.params = {"batches": section.batches, "batch_size": section.batch_size, "w_points": list(section.w_points),
                  "seed": section.seed, "source": source, "zero_stage": section.zero_stage,
                  "workers": (section.workers or cfg.finetune.workers) if section.zero_stage is not None else section.workers}
    return rec.finish()


def measure_share(spec, base: str, finetuned: str, batches, seeds, w_points) -> Share:
    """One share of the batches, in this process (the driver, or a Ray task)."""
    family, net = load_model(spec, base)
    base_state, _ = load_checkpoint(base)
    ft_state, _ = load_checkpoint(finetuned)
    return measure(family.training_loss, net, base_state, ft_state, batches, seeds, w_points)


def _on_workers(cfg: RunConfig, section: DiagnoseConfig, base: str, finetuned: str, batches, seeds) -> list[Share]:
    """Contiguous shares of the batches, one Ray task each (Ray retries a task whose worker died)."""
    import ray

    from ..runtime.cluster import ensure_ray

    ensure_ray(cfg.ray)
    spec, k = spec_of(cfg), min(section.workers, len(batches))
    bounds = [round(i * len(batches) / k) for i in range(k + 1)]
    task = ray.remote(num_cpus=section.cpus_per_worker)(_share_task)
    refs = [task.remote(spec, base, finetuned, batches[a:b], seeds[a:b], list(section.w_points), max(1, int(section.cpus_per_worker)))
            for a, b in zip(bounds, bounds[1:])]
    return ray.get(refs)


def _share_task(spec, base: str, finetuned: str, batches, seeds, w_points, threads: int) -> Share:
    from ..runtime.threads import set_torch_threads

    set_torch_threads(threads)
    return measure_share(spec, base, finetuned, batches, seeds, w_points)


def held_out(cfg: RunConfig, section: DiagnoseConfig) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(samples as the model sees them, labels, where they came from): `batches × batch_size` seeded rows of the
    held-out real data, in a fixed order."""
    ds = dataset_of(cfg)
    want = section.batches * section.batch_size
    if section.real_source:
        samples, labels, source = _read_source(section.real_source, ds, want)
    else:
        samples, labels = ds.load("test")
        source = f"{cfg.data.name}/test"
    if len(samples) < want:
        raise NeonError(f"diagnose.batches: {section.batches} batches of {section.batch_size} need {want} held-out samples, "
                        f"{source} has {len(samples)}")
    rows = np.sort(np.random.default_rng(derive_seed(section.seed, "diagnose-rows")).choice(len(samples), size=want, replace=False))
    x = ds.codec.to_model(torch.from_numpy(np.ascontiguousarray(samples[rows])))
    return x, torch.from_numpy(np.asarray(labels[rows], np.int64)), source


def _read_source(uri: str, ds, want: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Up to ~2×`want` samples of a Parquet set or image folder (with labels, unless the model has one class)."""
    from ..runtime.samplesets import decode_checked, open_samples, read_blocks

    samples = open_samples(uri)
    name = storage.redact_uri(uri)
    if tuple(samples.shape) != tuple(ds.sample_shape):
        raise NeonError(f"diagnose.real_source: {name} holds samples of shape {tuple(samples.shape)}, the dataset's are {tuple(ds.sample_shape)}")
    if not samples.has_labels and ds.num_classes > 1:
        raise NeonError(f"diagnose.real_source: {name} has no labels and the model is class-conditional "
                        f"({ds.num_classes} classes); give a Parquet set with a `label` column")
    subset = samples.head(min(samples.n, 2 * want))
    xs, ys = [], []
    for blobs, labels, names in read_blocks(subset.pieces, subset.column, subset.has_labels):
        xs.append(decode_checked(blobs, names, subset.shape, subset.kind, subset.source, subset.shape_of))
        ys.append(labels if labels is not None else np.zeros(len(blobs), np.int64))
    return np.concatenate(xs), np.concatenate(ys), name

