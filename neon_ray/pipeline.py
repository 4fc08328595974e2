"""`neon-ray run`: pretrain (built-in models without a checkpoint) → generate → finetune → evaluate → tune.

Finished stages (manifest with the current config hash) are skipped; MLflow gets a parent run with
one child per stage and per tune trial, the resolved config, a base-vs-Neon sample grid and an
FID-vs-w plot; `<output>/summary.json` holds the headline numbers.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

from . import storage
from .config import RunConfig, to_yaml
from .tracking import Tracker

log = logging.getLogger("neon_ray")


def _stage_plan(cfg: RunConfig):
    from .stages.evaluate import evaluate
    from .stages.finetune import finetune
    from .stages.generate import generate
    from .stages.pretrain import pretrain
    from .stages.tune import tune

    plan = [] if cfg.model.checkpoint else [("pretrain", pretrain)]
    return plan + [("generate", generate), ("finetune", finetune), ("evaluate", evaluate), ("tune", tune)]


def run(cfg: RunConfig, force: bool = False) -> dict:
    storage.write_bytes_atomic(storage.join(cfg.output, "config.yaml"), to_yaml(cfg).encode())
    tracker = Tracker(cfg)
    tracker.start_parent()
    manifests: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    try:
        plan = _stage_plan(cfg)
        for i, (name, fn) in enumerate(plan, 1):
            log.info("[%d/%d] %s ...", i, len(plan), name)
            t0 = time.time()
            manifest = fn(cfg, force=force)
            seconds[name] = round(time.time() - t0, 2)
            skipped = manifest.get("finished_at", "") and (time.time() - t0) < 0.5 * manifest["wall_seconds"]
            log.info("[%d/%d] %s %s in %.1f s", i, len(plan), name, "up to date" if skipped else "done", seconds[name])
            manifests[name] = manifest
            tracker.log_stage(manifest, skipped=bool(skipped))
        summary = _summary(cfg, manifests, seconds, tracker)
        with tempfile.TemporaryDirectory(prefix="neon-report-") as tmp:
            images = _images(cfg, manifests, summary, tmp)
            storage.write_json_atomic(storage.join(cfg.output, "summary.json"), summary)
            tracker.finish(summary, images)
        return summary
    except BaseException:
        tracker.fail()
        raise


def _summary(cfg: RunConfig, m: dict[str, dict], seconds: dict[str, float], tracker: Tracker) -> dict:
    ev, tu, ft, gen = m["evaluate"]["metrics"], m["tune"]["metrics"], m["finetune"]["metrics"], m["generate"]["metrics"]
    best = next((t for t in tu["trials"] if t["w"] == tu["best_w"]), {})
    return {
        "dataset": cfg.data.name,
        "model": f"{cfg.model.family}/{cfg.model.preset}",
        "sampler": dict(cfg.sampler),
        "guidance": cfg.sampler.get("guidance"),
        "scoring_sampler": cfg.scoring_sampler(),
        "fid_base": ev["fid"],
        "fid_neon": tu["best_fid"],
        "best_w": tu["best_w"],
        "base_class_consistency": ev["class_consistency"],
        "neon_class_consistency": tu["best_class_consistency"],
        "base_precision": ev.get("precision"),
        "base_recall": ev.get("recall"),
        "neon_precision": best.get("precision"),
        "neon_recall": best.get("recall"),
        "fid_floor": ev.get("fid_floor"),
        "n_eval": ev["n"],
        "n_synthetic": gen["n_synthetic"],
        "finetune_images": ft["finetune_images"],
        "extra_compute_fraction": ft["extra_compute_fraction"],
        "trials": tu["trials"],
        "stage_seconds": seconds,
        "stage_wall_seconds": {k: v["wall_seconds"] for k, v in m.items()},
        "best_model": m["tune"]["outputs"]["best_model"],
        "summary_uri": storage.join(cfg.output, "summary.json"),
        "mlflow_ui": tracker.ui_hint(),
    }


def _images(cfg: RunConfig, m: dict[str, dict], summary: dict, tmp: str) -> dict[str, str]:
    """Render the comparison grid and the FID-vs-w plot into `tmp`; upload both next to summary.json."""
    from .report import save_comparison_grid, save_fid_plot
    from .stages.common import dataset_of

    out = {}
    title = f"{summary['model']}, {cfg.sampler}"
    grid = save_comparison_grid(m["evaluate"]["outputs"]["samples"], m["tune"]["outputs"]["best_samples"],
                                os.path.join(tmp, "samples_base_vs_neon.png"),
                                f"base FID {summary['fid_base']:.3f}  vs  Neon w={summary['best_w']:.3g} FID {summary['fid_neon']:.3f}",
                                kind=dataset_of(cfg).kind)
    plot = save_fid_plot(summary["trials"], summary["fid_base"], os.path.join(tmp, "fid_vs_w.png"), title)
    for name, path in (("samples_base_vs_neon.png", grid), ("fid_vs_w.png", plot)):
        storage.upload_file_atomic(path, storage.join(cfg.output, name))
        out[name] = path
    return out
