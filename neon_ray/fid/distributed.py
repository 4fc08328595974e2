"""Feature statistics over Ray Data: PNG batches → extractor actors → per-batch float64 moments → exact merge.

Images travel as PNG bytes; only (n, μ, M) per batch come back to the driver.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from ..errors import NeonError
from ..imageio import decode_batch
from .stats import Moments, Statistics, merge_all

log = logging.getLogger("neon_ray")


class FeatureActor:
    """Extractor loaded once per actor (created through torch-fidelity's factory)."""

    def __init__(self, extractor: str, weights: str | None, feature: str, threads: int, use_gpu: bool):
        from .extractors import create_extractor

        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(max(1, threads))
        provided = None
        self.extractor = create_extractor(extractor, weights, [feature] + (["logits"] if feature != "logits" else []), self.device)
        provided = self.extractor.get_requested_features_list()
        self.with_logits = "logits" in provided and feature != "logits"

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = decode_batch(batch["png"])
        out = self.extractor(torch.from_numpy(images).to(self.device))
        features = out[0].double().cpu().numpy()  # (B, D)
        m = Moments.of(features)
        row = {"n": np.array([m.n], np.int64), "mean": m.mean[None], "m2": m.m2[None]}
        if self.with_logits and "label" in batch:
            pred = out[1].argmax(1).cpu().numpy()
            row["consistent"] = np.array([int((pred == np.asarray(batch["label"])).sum())], np.int64)
        else:
            row["consistent"] = np.array([-1], np.int64)
        return row


def feature_statistics(dataset, extractor: str, weights: str | None, fingerprint: str, cfg_generate, batch_size: int,
                       feature: str = "feat128") -> tuple[Statistics, float | None]:
    """(Statistics, class consistency or None) of a Ray Dataset with a `png` (and optional `label`) column."""
    from ray.data import ActorPoolStrategy

    from ..cluster import resolve_use_gpu

    t0 = time.time()
    use_gpu = resolve_use_gpu(None if cfg_generate.gpus_per_actor is None else cfg_generate.gpus_per_actor > 0)
    rows = dataset.map_batches(
        FeatureActor,
        fn_constructor_kwargs=dict(extractor=extractor, weights=weights, feature=feature,
                                   threads=cfg_generate.threads_per_actor, use_gpu=use_gpu),
        batch_size=batch_size,
        compute=ActorPoolStrategy(size=cfg_generate.actors),
        num_cpus=cfg_generate.cpus_per_actor,
        num_gpus=(cfg_generate.gpus_per_actor or 1.0) if use_gpu else 0,
    ).take_all()
    if not rows:
        raise NeonError("empty sample set: no images to score")
    moments = merge_all(Moments(int(r["n"]), np.asarray(r["mean"], np.float64), np.asarray(r["m2"], np.float64)) for r in rows)
    consistent = [int(r["consistent"]) for r in rows]
    consistency = sum(consistent) / moments.n if all(c >= 0 for c in consistent) else None
    log.info("features of %d images in %.1f s", moments.n, time.time() - t0)
    return Statistics.from_moments(moments, fingerprint), consistency
