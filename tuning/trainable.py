"""One Tune trial: θ(w) at one sampler setting, scored rung by rung (multi-fidelity), each rung reported.

θ(w) is θ_base for w = 0 (the base arm) and the merged θ_neon(w) = θ_base − w·(θ_ft − θ_base) otherwise.
At rung k the first `rungs[k]` evaluation samples are scored; rung k only samples the images rung k−1
did not have. Every trial samples with the same evaluation seeds and labels (common random numbers),
whatever its w or sampler setting, so FID differences come from the model and the sampler, not from
sampling noise. Each scored rung leaves `rung-n<N>.json` (and `result.json`, the latest rung) in the
trial's folder, named by its config (`w=0.5,guidance=2`): a rerun, a retried trial or any later search
whose trial hash matches reuses them instead of scoring again. Under the line searcher the first rung also
leaves the set's feature statistics, `stats-n<N>.npz`, which the searcher reads on the driver.
"""

from __future__ import annotations

from neon_ray import storage
from neon_ray.config import RunConfig, fingerprint
from neon_ray.fid.stats import Statistics
from neon_ray.merge import merge_uris
from neon_ray.scoring import score_rung

from .spaces import FIDELITY, W, overrides_of, settings_of, trial_key

SCORES = ("fid", "precision", "recall", "fid_floor", "class_consistency", "n", "sample_seconds")
RESULT = "result.json"
STARTED = "trial.json"  # written first: which trial hash the folder's files belong to
MODEL = "model.safetensors"


def trial_dir(tune_dir: str, key: str | float) -> str:
    """The folder of a trial by its key (`trial_key`), or by w alone when no sampler field is searched."""
    name = key if isinstance(key, str) else f"w={key:.6g}"
    return storage.join(tune_dir, "trials", name)


def rung_uri(tdir: str, n: int) -> str:
    return storage.join(tdir, f"rung-n{n}.json")


def reported(result: dict) -> dict:
    """What a trial reports to Tune: its numbers (Tune's own result files keep them)."""
    return {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}


def config_hash_of(trial_hash: str, key: str, settings) -> str:
    return fingerprint("tune-trial-setting", trial_hash, key, settings.model_dump(mode="json"))


def stats_uri(tdir: str, n: int) -> str:
    """The feature statistics (μ, Σ) of a trial's rung, kept for the line searcher's first rung only."""
    return storage.join(tdir, f"stats-n{n}.npz")


def scored_rung(tdir: str, n: int, config_hash: str) -> dict | None:
    """The result of rung n in a trial folder when it was scored for `config_hash`, else None."""
    uri = rung_uri(tdir, n)
    if storage.exists(uri) and (done := storage.read_json(uri)).get("config_hash") == config_hash:
        return done
    return None


def read_rungs(tune_dir: str, config: dict, trial_hash: str, cfg: RunConfig, rungs: list[int]) -> list[dict]:
    """The rung results of a trial config scored under `trial_hash`, in rung order (stops at the first missing)."""
    key = trial_key(config)
    expected = config_hash_of(trial_hash, key, settings_of(cfg, config))
    out = []
    for n in rungs:
        if (done := scored_rung(trial_dir(tune_dir, key), n, expected)) is None:
            break
        out.append(done)
    return out


def neon_trial(config: dict, cfg_json: dict, base: str, finetuned: str, reference: str, tune_dir: str, trial_hash: str,
               rungs: list[int], donors: tuple[str, ...] = ()) -> None:
    """The Tune function trainable (runs in a Ray worker): one report per rung, so a scheduler can stop it early.
    `donors`: sample folders of other stages (the evaluate stage's); the base arm at the setting they were sampled
    with copies its samples from them instead of sampling them again."""
    from ray import tune

    cfg = RunConfig.model_validate(cfg_json)
    w, key, settings = float(config[W]), trial_key(config), settings_of(cfg, config)
    fidelity = int(config.get(FIDELITY, len(rungs)))
    tdir = trial_dir(tune_dir, key)
    chash = config_hash_of(trial_hash, key, settings)
    marker = storage.join(tdir, STARTED)
    if not (storage.exists(marker) and storage.read_json(marker).get("config_hash") == chash):
        storage.remove(tdir)  # what is there belongs to another θ_ft or sampler: never reuse it
        storage.write_json_atomic(marker, {"config_hash": chash, "w": w, "sampler": overrides_of(config)})
    model, ref = base, None
    for k, n in enumerate(rungs[:fidelity]):
        keep_stats = cfg.tune.search == "line" and k == 0  # the line searcher predicts FID(w) from these moments
        if (done := scored_rung(tdir, n, chash)) is not None and not (keep_stats and not storage.exists(stats_uri(tdir, n))):
            tune.report(reported(done) | {"rung": k})
            continue
        if w != 0.0:  # the merged model is written atomically: present means complete (a retried trial keeps it)
            model = storage.join(tdir, MODEL)
            if not storage.exists(model):
                merge_uris(base, finetuned, model, w, allow_negative=cfg.tune.allow_negative_w)
        ref = ref or Statistics.from_bytes(storage.read_bytes(reference), reference)
        scores = score_rung(cfg, model, tdir, ref, settings, rungs, k, donors=donors)
        done = {"w": w, "key": key, "sampler": overrides_of(config), "config_hash": chash, "rung": k,
                "model": storage.relative(cfg.output, model) if w != 0.0 else None,
                "samples": storage.relative(cfg.output, scores["samples"]), **{s: scores[s] for s in SCORES}}
        if keep_stats:  # before the rung's result: a reported first rung always has its statistics
            storage.write_bytes_atomic(stats_uri(tdir, n), scores["statistics"].to_bytes())
        storage.write_json_atomic(rung_uri(tdir, n), done)
        storage.write_json_atomic(storage.join(tdir, RESULT), done)
        tune.report(reported(done) | {"rung": k})
