"""The stage graph, and running it: `neon-ray run` and every single-stage command.

    pretrain ──► base ──► generate ──► finetune ──► tune
                   │                       ├──────► merge
                   │                       └──────► diagnose ··► tune (with tune.prior: diagnose)
                   └────► evaluate

`base` is θ_base: `model.checkpoint` when set (then pretrain is not part of the run), else the
pretrain stage's model. Each stage declares what it reads (`INPUTS`, a neon_ray.inputs.StageInputs:
config fields, derived inputs such as the dataset's identity, and the upstream artifacts it needs);
its config hash is the fingerprint of exactly that, so changing anything a stage reads reruns it and
everything downstream, and nothing else. A stage whose manifest records the current hash is skipped
(one written by an older hash scheme is redone once, saying so). Every stage receives its config
section and a `StageContext` holding its inputs; no stage imports another.

MLflow: the output's parent run is resumed by every command on that output; each stage that runs
gets a child run; `<output>/summary.json`, a base-vs-Neon sample grid and an FID-vs-w plot close a
full run.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from types import ModuleType

from . import storage
from .config import RunConfig, to_yaml
from .context import StageContext
from .errors import NeonError
from .inputs import BASE, StageInputs, fingerprint_inputs
from .manifest import Manifest, read_manifest
from .stages import diagnose, evaluate, finetune, generate, merge, pretrain, tune
from .tracking import Tracker, redact

log = logging.getLogger("neon_ray")


@dataclass(frozen=True)
class Stage:
    name: str
    module: ModuleType  # exposes INPUTS (what it reads) and run(section, ctx) -> Manifest

    @property
    def inputs(self) -> StageInputs:
        return self.module.INPUTS

    def inputs_for(self, cfg: RunConfig) -> StageInputs:
        """What the stage reads under this config: INPUTS, or the module's `inputs_for(cfg)` where what it reads
        depends on the config (tune reads the diagnosis only with tune.prior: diagnose)."""
        of = getattr(self.module, "inputs_for", None)
        return of(cfg) if of is not None else self.inputs


GRAPH: dict[str, Stage] = {s.name: s for s in (
    Stage("pretrain", pretrain), Stage("generate", generate), Stage("finetune", finetune),
    Stage("evaluate", evaluate), Stage("tune", tune), Stage("merge", merge), Stage("diagnose", diagnose),
)}
PIPELINE = ("pretrain", "generate", "finetune", "diagnose", "evaluate", "tune")


def plan(cfg: RunConfig) -> list[str]:
    """The stages of `neon-ray run`, in order (no pretrain when a base checkpoint is given; diagnose when
    diagnose.enabled or tune.prior: diagnose)."""
    return [name for name in PIPELINE if (name != "pretrain" or not cfg.model.checkpoint) and (name != "diagnose" or cfg.diagnoses())]


# ----------------------------------------------------------------------------------------------
# Hashes and inputs


def dependency_hash(cfg: RunConfig, dependency: str, files: dict[str, str] | None = None) -> str:
    files = files or {}
    if dependency in files:
        return storage.file_identity(files[dependency], field=f"--{dependency}")
    if dependency == BASE:
        return storage.file_identity(cfg.model.checkpoint, "model.checkpoint") if cfg.model.checkpoint else f"pretrain:{stage_hash(cfg, 'pretrain')}"
    return stage_hash(cfg, dependency)


def hashes(cfg: RunConfig, name: str, files: dict[str, str] | None = None, options: dict | None = None,
           inputs: StageInputs | None = None) -> tuple[dict[str, str], str]:
    """(its upstream's hashes, its own) for stage `name`: the fingerprint of what it reads (neon_ray.inputs)."""
    inputs = inputs or GRAPH[name].inputs_for(cfg)
    upstream = {dep: dependency_hash(cfg, dep, files) for dep in inputs.needs}
    return upstream, fingerprint_inputs(cfg, name, inputs, upstream, options)


def stage_hash(cfg: RunConfig, name: str, files: dict[str, str] | None = None, options: dict | None = None) -> str:
    return hashes(cfg, name, files, options)[1]


def require(cfg: RunConfig, name: str) -> Manifest:
    """The manifest of an upstream stage that is current for this config, or a one-line error saying what to run."""
    man = read_manifest(cfg.output, name)
    if man is None or man.config_hash != stage_hash(cfg, name):
        state = ("has not run" if man is None else "was finished by an older neon-ray whose config hashes missed some inputs"
                 if man.outdated_scheme else "is out of date for this config")
        raise NeonError(f"stage {name} {state} under {storage.redact_uri(cfg.output)}; run `neon-ray {name}` (or `neon-ray run`) first")
    return man


def context(cfg: RunConfig, name: str, files: dict[str, str] | None = None, options: dict | None = None) -> StageContext:
    """Everything stage `name` needs: its hash and its inputs (upstream stages must be current)."""
    reads = GRAPH[name].inputs_for(cfg)
    given = dict(files or {})
    upstream_hashes, config_hash = hashes(cfg, name, given, options, reads)
    inputs, upstream = dict(given), {}
    for dep in reads.needs:
        if dep in inputs:
            continue
        if dep == BASE:
            inputs[BASE] = cfg.model.checkpoint or require(cfg, "pretrain").uri(cfg.output, "model")
        else:
            upstream[dep] = require(cfg, dep)
    reusable = {other: man for other in reads.reuses if (man := read_manifest(cfg.output, other)) is not None}
    return StageContext(cfg=cfg, name=name, config_hash=config_hash, upstream_hashes=upstream_hashes, upstream=upstream,
                        files=inputs, options=dict(options or {}), reusable=reusable)


# ----------------------------------------------------------------------------------------------
# Running stages


def run_stage(cfg: RunConfig, name: str, tracker: Tracker, force: bool = False, files: dict[str, str] | None = None,
              options: dict | None = None) -> tuple[Manifest, bool]:
    """(manifest, skipped): run stage `name` unless its manifest is current for this config."""
    ctx = context(cfg, name, files, options)
    done = None if force else read_manifest(cfg.output, name)
    if done is not None and done.config_hash == ctx.config_hash:
        log.info("%s: up to date (config %s), skipping", name, ctx.config_hash)
        return done, True
    if done is not None and done.outdated_scheme:
        log.info("%s: finished by neon-ray %s, whose config hashes missed some inputs (data.options, data.path, the "
                 "reference's source); redoing it once", name, done.neon_ray_version)
    ctx.tracker, ctx.force = tracker, force
    ctx.run_id = tracker.start_stage(name, ctx.config_hash)
    try:
        manifest = GRAPH[name].module.run(getattr(cfg, name), ctx)
    except BaseException:
        tracker.end_child(ctx.run_id, ok=False)
        raise
    tracker.finish_stage(ctx.run_id, manifest)
    return manifest, False


def write_config(cfg: RunConfig) -> None:
    """The resolved config beside the outputs (credentials in URIs redacted)."""
    data = redact(cfg.model_dump(mode="json"))
    storage.write_bytes_atomic(storage.join(cfg.output, "config.yaml"), to_yaml(type(cfg).model_validate(data)).encode())


def run_command(cfg: RunConfig, name: str, force: bool = False, files: dict[str, str] | None = None,
                options: dict | None = None) -> Manifest:
    """One stage as its own command, tracked in the output's MLflow parent run."""
    context(cfg, name, files, options)  # upstream checks before any MLflow or Ray set-up
    tracker = Tracker(cfg)
    tracker.open()
    try:
        manifest, _ = run_stage(cfg, name, tracker, force, files, options)
    except BaseException:
        tracker.close(ok=False)
        raise
    tracker.close(ok=True)
    return manifest


def run(cfg: RunConfig, force: bool = False) -> dict:
    """`neon-ray run`: every stage of `plan(cfg)` in order (finished ones skipped), then the summary."""
    tracker = Tracker(cfg)
    tracker.open()
    write_config(cfg)
    manifests: dict[str, Manifest] = {}
    seconds: dict[str, float] = {}
    try:
        stages = plan(cfg)
        for i, name in enumerate(stages, 1):
            log.info("[%d/%d] %s ...", i, len(stages), name)
            t0 = time.time()
            manifests[name], skipped = run_stage(cfg, name, tracker, force)
            seconds[name] = round(time.time() - t0, 2)
            log.info("[%d/%d] %s %s in %.1f s", i, len(stages), name, "up to date" if skipped else "done", seconds[name])
        summary = _summary(cfg, manifests, seconds, tracker)
        with tempfile.TemporaryDirectory(prefix="neon-report-") as tmp:
            images = _images(cfg, manifests, summary, tmp)
            storage.write_json_atomic(storage.join(cfg.output, "summary.json"), summary)
            tracker.log_summary(summary, images)
    except BaseException:
        tracker.close(ok=False)
        raise
    tracker.close(ok=True)
    return summary


def _summary(cfg: RunConfig, m: dict[str, Manifest], seconds: dict[str, float], tracker: Tracker) -> dict:
    """The headline numbers; files are named relative to the output root.

    With `tune.final_seeds`, fid_base / fid_neon are the rescored means (base at its best sampler setting,
    Neon at its best (w, setting)); without, the search's own scores at the configured sampler."""
    ev, tu, ft, gen = m["evaluate"].metrics, m["tune"].metrics, m["finetune"].metrics, m["generate"].metrics
    best = next((t for t in tu["trials"] if t["w"] == tu["best_w"] and t["sampler"] == tu.get("best_sampler", {})), {})
    final = tu.get("final")
    base_best = tu.get("best_base")
    # Rescored: both picks' numbers from their fresh seed sets. Else the search's own: the base at the
    # configured sampler (evaluate) and the best trial.
    base = final["base"] if final else {"fid_mean": ev["fid"], "fid_sd": None, "class_consistency": ev["class_consistency"],
                                        "precision": ev.get("precision"), "recall": ev.get("recall"), "fid_floor": ev.get("fid_floor"),
                                        "n": ev["n"], "sampler": (base_best or {}).get("sampler", {})}
    neon = final["neon"] if final else {"fid_mean": tu["best_fid"], "fid_sd": None, "class_consistency": tu["best_class_consistency"],
                                        "precision": best.get("precision"), "recall": best.get("recall")}
    return {
        "dataset": cfg.data.name,
        "model": f"{cfg.model.family}/{cfg.model.preset}",
        "sampler": cfg.sampler.model_dump(mode="json"),
        "guidance": getattr(cfg.sampler, "guidance", None),
        "scoring_sampler": cfg.scoring_sampler().model_dump(mode="json"),
        "fid_base": base["fid_mean"],
        "fid_neon": neon["fid_mean"],
        "fid_base_sd": base["fid_sd"],
        "fid_neon_sd": neon["fid_sd"],
        "best_w": tu["best_w"],
        "best_sampler": tu.get("best_sampler", {}),
        "base_best_sampler": base["sampler"],
        "fid_base_configured": ev["fid"],
        "headline": final,
        "second_space": (final or {}).get("second_space"),  # the pair in tune.headline_extractor's features, if set
        "base_class_consistency": base["class_consistency"],
        "neon_class_consistency": neon["class_consistency"],
        "base_precision": base["precision"],
        "base_recall": base["recall"],
        "neon_precision": neon["precision"],
        "neon_recall": neon["recall"],
        "fid_floor": base["fid_floor"],
        "n_eval": base["n"],
        "n_synthetic": gen["n_synthetic"],
        "finetune_images": ft["finetune_images"],
        "extra_compute_fraction": ft["extra_compute_fraction"],
        "compute": _compute(cfg, m),  # the extra-compute fraction three ways, image-equivalents and seconds per stage
        "diagnosis": {k: m["diagnose"].metrics[k] for k in ("sign", "bracket", "bracket_open", "cosine", "g_dot_delta",
                                                            "g_dot_delta_se", "loss_argmin_w", "seconds")} if "diagnose" in m else None,
        "search": {**{k: m["tune"].params.get(k) for k in ("search", "scheduler", "rungs", "space", "final_seeds", "prior")},
                   "trials": len(tu["trials"]), "images_scored": tu.get("images_scored")},
        "trials": tu["trials"],
        "stage_seconds": seconds,
        "stage_wall_seconds": {k: v.wall_seconds for k, v in m.items()},
        "best_model": m["tune"].outputs["best_model"],
        "registered_model": {k: m["tune"].params[f"registered_{k}"] for k in ("model", "version")}
        if "registered_model" in m["tune"].params else None,
        "mlflow_ui": tracker.ui_hint(),
    }


def _compute(cfg: RunConfig, m: dict[str, Manifest]) -> dict:
    """What each stage cost, in training image-equivalents (neon_ray.cost) and measured wall seconds, and the extra
    compute three ways relative to the base's training: the fine-tune alone, + generating S, + the search (its
    trials, the base's evaluation, the rescored headline and the diagnosis)."""
    from .cost import fractions, sampling_equivalents

    ev, tu, ft, gen = m["evaluate"].metrics, m["tune"].metrics, m["finetune"].metrics, m["generate"].metrics
    scoring = cfg.scoring_sampler().model_dump()
    search = sum(sampling_equivalents(t.get("n") or 0, scoring | t.get("sampler", {})) for t in tu["trials"])
    search += sampling_equivalents(ev["n"], scoring)
    if (final := tu.get("final")):
        for pick in ("base", "neon"):
            search += sampling_equivalents(final[pick].get("n", ev["n"]) * len(final[pick].get("fids", [])),
                                           scoring | (final[pick].get("sampler") or {}))
    if "diagnose" in m:
        d = m["diagnose"].metrics  # a forward + backward (3 passes) and a forward per w ≠ 0, per held-out sample
        search += d["images"] * (3 + len(d["losses"]) - 1) / 3
    equivalents = {"finetune": float(ft["finetune_images"]), "generate": sampling_equivalents(gen["n_synthetic"], cfg.sampler),
                   "search": search}
    seconds = {name: man.wall_seconds for name, man in m.items()}
    base_seconds = seconds.get("pretrain")  # the base's training measured here (none for an imported checkpoint)
    search_seconds = sum(seconds.get(k, 0.0) for k in ("evaluate", "tune", "diagnose"))
    return {
        "base_train_images": ft.get("base_train_images"),
        "image_equivalents": {k: round(v, 1) for k, v in equivalents.items()},
        "extra_compute_fraction": fractions(ft.get("base_train_images"), *equivalents.values()),
        "seconds": seconds,
        "seconds_fraction": {"finetune": seconds["finetune"] / base_seconds,
                             "with_generation": (seconds["finetune"] + seconds["generate"]) / base_seconds,
                             "with_search": (seconds["finetune"] + seconds["generate"] + search_seconds) / base_seconds}
        if base_seconds else None,
    }


def _images(cfg: RunConfig, m: dict[str, Manifest], summary: dict, tmp: str) -> dict[str, str]:
    """Render the comparison grid and the search's plots into `tmp`; upload them next to summary.json."""
    from .report import save_comparison_grid, save_fid_curves, save_fid_heatmap
    from .runtime.run_model import dataset_of

    final = summary.get("headline")
    base_samples = (storage.resolve(cfg.output, final["base"]["samples"]) if final else m["evaluate"].uri(cfg.output, "samples"))
    neon_samples = (storage.resolve(cfg.output, final["neon"]["samples"]) if final else m["tune"].uri(cfg.output, "best_samples"))
    settings = ", ".join(f"{k}={v}" for k, v in summary["best_sampler"].items())
    grid = save_comparison_grid(base_samples, neon_samples, os.path.join(tmp, "samples_base_vs_neon.png"),
                                f"base FID {summary['fid_base']:.3f}  vs  Neon w={summary['best_w']:.3g}{' ' + settings if settings else ''}"
                                f" FID {summary['fid_neon']:.3f}", kind=dataset_of(cfg).kind)
    model = summary["model"]
    best = {"w": summary["best_w"], "sampler": summary["best_sampler"]}
    searched_base = any(t["w"] == 0.0 for t in summary["trials"])
    evaluated_at = m["evaluate"].metrics["n"] == min(min(int(k) for k in t["fid_by_n"]) for t in summary["trials"])
    base_fid = m["evaluate"].metrics["fid"] if not searched_base and evaluated_at else None  # only at the curves' n
    files = {"samples_base_vs_neon.png": grid,
             "fid_vs_w.png": save_fid_curves(summary["trials"], os.path.join(tmp, "fid_vs_w.png"), f"FID vs w: {model}",
                                             base_fid=base_fid, best=best, headline=final)}
    heat = save_fid_heatmap(summary["trials"], os.path.join(tmp, "fid_heatmap.png"), f"FID over the search: {model}", best=best)
    if heat:
        files["fid_heatmap.png"] = heat
    for name, path in files.items():
        storage.upload_file_atomic(path, storage.join(cfg.output, name))
    return files
