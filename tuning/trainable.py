"""One Tune trial: merge θ_neon(w), sample the evaluation set, score it, report.

Every trial samples with the same evaluation seeds and labels as the base model's evaluation, so FID
differences come from w, not sampling noise. A finished trial leaves `result.json` (paths relative
to the output root) and is reused, not redone, by any later search whose trial hash matches.
"""

from __future__ import annotations

from neon_ray import storage
from neon_ray.config import RunConfig
from neon_ray.fid.stats import Statistics
from neon_ray.merge import merge_uris
from neon_ray.scoring import score_checkpoint

SCORES = ("fid", "precision", "recall", "fid_floor", "class_consistency", "n", "sample_seconds")
RESULT = "result.json"
STARTED = "trial.json"  # written first: which trial hash the folder's files belong to
MODEL = "model.safetensors"


def trial_dir(tune_dir: str, w: float) -> str:
    return storage.join(tune_dir, "trials", f"w={w:.6g}")


def reported(result: dict) -> dict:
    """What a trial reports to Tune: its numbers (Tune's own result files keep them)."""
    return {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}


def read_result(tune_dir: str, w: float, trial_hash: str) -> dict | None:
    uri = storage.join(trial_dir(tune_dir, w), RESULT)
    if not storage.exists(uri):
        return None
    done = storage.read_json(uri)
    return done if done.get("config_hash") == trial_hash else None


def neon_trial(config: dict, cfg_json: dict, base: str, finetuned: str, reference: str, tune_dir: str, trial_hash: str) -> None:
    """The Tune function trainable (runs in a Ray worker)."""
    from ray import tune

    cfg = RunConfig.model_validate(cfg_json)
    w = float(config["w"])
    if (done := read_result(tune_dir, w, trial_hash)) is not None:
        tune.report(reported(done))
        return
    tdir = trial_dir(tune_dir, w)
    model = storage.join(tdir, MODEL)
    marker = storage.join(tdir, STARTED)
    if not (storage.exists(marker) and storage.read_json(marker).get("config_hash") == trial_hash):
        storage.remove(tdir)  # what is there belongs to another θ_ft or sampler: never reuse it
        storage.write_json_atomic(marker, {"config_hash": trial_hash, "w": w})
    if not storage.exists(model):  # written atomically: present means complete (a retried trial keeps it and its samples)
        merge_uris(base, finetuned, model, w, allow_negative=cfg.tune.allow_negative_w)
    ref = Statistics.from_bytes(storage.read_bytes(reference), reference)
    scores = score_checkpoint(cfg, model, tdir, ref)
    result = {"w": w, "config_hash": trial_hash, "model": storage.relative(cfg.output, model),
              "samples": storage.relative(cfg.output, scores["samples"]), **{k: scores[k] for k in SCORES}}
    storage.write_json_atomic(storage.join(tdir, RESULT), result)
    tune.report(reported(result))
