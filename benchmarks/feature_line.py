"""Predict FID along w from θ_base and θ_ft alone: extrapolate each sample's features, measure against the search.

    python benchmarks/feature_line.py RUN [--n 500] [--gammas 1.5,3] [--threads 2]

RUN is a finished `neon-ray run` output (generate, finetune and tune done). For each searched γ the script samples
the same n evaluation images (the tune stage's own seeds: stream "eval", evaluate.seed, labels i mod K) from θ_base
and from θ_ft, extracts their features with the run's extractor, and extrapolates each image's features along the
Neon line with common random numbers, f_w(i) = f_base(i) − w·(f_ft(i) − f_base(i)) (θ_w = θ_base − w·Δ to first
order in feature space). The predicted FID(w) is the Fréchet distance of {f_w(i)} to the run's reference
statistics; its argmin over w (and γ) is the prediction. The table sets it beside the FID the search measured at
each (w, γ) of the run's tune stage (at the search's full n), so one can see whether the line predicts the
FID-best w without sampling a single image from any θ_w.

Cost: 2·n images per γ, against the search's (#w + 1)·n per γ at full n.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from neon_ray import scoring, storage  # noqa: E402
from neon_ray.config import load_config  # noqa: E402
from neon_ray.data.codec import CODECS  # noqa: E402
from neon_ray.fid.extractors import create_extractor, get_extractor, prepare  # noqa: E402
from neon_ray.merge import neon_tensor  # noqa: E402
from neon_ray.models.checkpoint import load_checkpoint  # noqa: E402
from neon_ray.fid.stats import Moments, Statistics, frechet_distance  # noqa: E402
from neon_ray.runtime.run_model import dataset_of, load_model, spec_of  # noqa: E402
from neon_ray.runtime.seeds import balanced_labels, sample_seeds  # noqa: E402

W_LINE = [round(x, 3) for x in np.arange(-0.5, 2.0001, 0.125)]


def base_checkpoint(cfg, run: str) -> str:
    pretrained = storage.join(run, "pretrain", "model.safetensors")
    return pretrained if storage.exists(pretrained) else cfg.model.checkpoint


@torch.no_grad()
def features_of(cfg, family, net, settings: dict, n: int, batch: int, extractor) -> np.ndarray:
    """Features (n, D) of the first n evaluation samples of `net` at `settings` (the tune stage's seeds)."""
    sampler = family.validate_sampler(settings)
    codec = CODECS[dataset_of(cfg).kind]
    out = []
    for start in range(0, n, batch):
        idx = np.arange(start, min(n, start + batch))
        labels = torch.from_numpy(balanced_labels(idx, family.spec.num_classes))
        seeds = sample_seeds(cfg.evaluate.seed, scoring.STREAM, idx)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(cfg.evaluate.bf16)):
            images = family.sample(net, labels, seeds, sampler)
        stored = torch.from_numpy(np.asarray(codec.from_model(images).cpu().numpy()))
        out.append(extractor(prepare(stored, cfg.evaluate.extractor))[0].float().numpy())
    return np.concatenate(out)


def predicted_fid(feats: list[np.ndarray], coeffs: list[float], reference: Statistics, mode: str) -> float:
    """FID at one w: of the per-sample feature polynomial ("samples"), or of the moments' polynomial ("moments")."""
    if mode == "samples":
        return fid_of(sum(c * f for c, f in zip(coeffs, feats)), reference)
    moments = [Moments.of(f) for f in feats]
    mu = sum(c * m.mean for c, m in zip(coeffs, moments))
    sigma = sum(c * m.sigma for c, m in zip(coeffs, moments))
    return frechet_distance(Statistics(mu, sigma, len(feats[0]), reference.feature_space), reference)


def lagrange_weights(probes: list[float], w: float) -> list[float]:
    """Weights of each probe's features in the per-sample polynomial through the probes, evaluated at w."""
    out = []
    for j, pj in enumerate(probes):
        lj = 1.0
        for m, pm in enumerate(probes):
            if m != j:
                lj *= (w - pm) / (pj - pm)
        out.append(lj)
    return out


def fid_of(features: np.ndarray, reference: Statistics) -> float:
    stats = Statistics.from_moments(Moments.of(features), reference.feature_space)
    return frechet_distance(stats, reference)


def measured_curves(summary: dict, guidance: float) -> tuple[int, dict[float, dict[float, float]]]:
    """(n, γ → {w: FID at n}) from the run's tune trials, at the largest n every trial was scored at (the first rung
    under ASHA), so that every searched w is compared at one n. A search over w alone keeps the configured γ
    (`guidance`), which its trials do not record."""
    by_trial = [({int(k): v for k, v in t["fid_by_n"].items()}, float(t["sampler"].get("guidance", guidance)), float(t["w"]))
                for t in summary["trials"]]
    n = max(set.intersection(*(set(b) for b, _, _ in by_trial)))
    curves: dict[float, dict[float, float]] = {}
    for fids, g, w in by_trial:
        curves.setdefault(g, {})[w] = fids[n]
    return n, curves


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run")
    ap.add_argument("--n", type=int, default=0, help="images per arm and γ (default: the n every search trial was scored at)")
    ap.add_argument("--gammas", default=None, help="comma-separated γ (default: every γ the run's search scored)")
    ap.add_argument("--probes", default="-1,0", help="w values sampled (θ_w by the merge; -1 is θ_ft, 0 θ_base); the "
                    "features are the per-sample polynomial through them (two probes: a line)")
    ap.add_argument("--mode", choices=["samples", "moments"], default="samples",
                    help="interpolate each sample's features (common random numbers) or the feature moments")
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the per-γ curves here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    run = args.run.rstrip("/")
    cfg = load_config(storage.join(run, "config.yaml"), output=run)
    summary = storage.read_json(storage.join(run, "summary.json"))
    scoring_settings = cfg.scoring_sampler().model_dump()
    n_measured, measured = measured_curves(summary, scoring_settings.get("guidance", 1.0))
    n = args.n or n_measured
    gammas = [float(g) for g in args.gammas.split(",")] if args.gammas else sorted(measured)
    reference = Statistics.from_bytes(storage.read_bytes(scoring.reference_uri(cfg)), "reference")
    info = get_extractor(cfg.evaluate.extractor)
    extractor = create_extractor(cfg.evaluate.extractor, cfg.evaluate.extractor_weights, [info.feature])
    base_sd, _ = load_checkpoint(base_checkpoint(cfg, run))
    ft_sd, _ = load_checkpoint(storage.join(run, "finetune", "model.safetensors"))
    family, net = load_model(spec_of(cfg), base_checkpoint(cfg, run))
    probes = [float(p) for p in args.probes.split(",")]

    print(f"# {run}: n = {n} per probe and γ, probes w ∈ {probes}, mode {args.mode}, w line {W_LINE[0]} … {W_LINE[-1]} (step 0.125), extractor {cfg.evaluate.extractor}")
    print("| γ | predicted FID at w 0 | predicted argmin w | predicted FID there | measured FID-best w (search, same n) | measured FID there | measured at w 0 | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    rows, best_pred, best_meas = [], None, None
    for g in gammas:
        t0 = time.time()
        settings = {**scoring_settings, "guidance": g}
        feats = []
        for p in probes:
            family.load_state_dict(net, {k: neon_tensor(base_sd[k], ft_sd[k], p) for k in base_sd}, f"θ at w {p:g}")
            feats.append(features_of(cfg, family, net, settings, n, args.batch, extractor))
        curve = measured.get(g, {})
        line = {w: predicted_fid(feats, lagrange_weights(probes, w), reference, args.mode)
                for w in sorted(set(W_LINE) | set(curve))}
        w_pred = min(line, key=line.get)
        neon = {w: v for w, v in curve.items() if w != 0}
        w_meas = min(neon, key=neon.get) if neon else None
        seconds = time.time() - t0
        rows.append({"gamma": g, "predicted": line, "measured": curve, "seconds": seconds})
        print(f"| {g:g} | {line[0.0]:.2f} | {w_pred:g} | {line[w_pred]:.2f} | {w_meas if w_meas is not None else '—'} | "
              f"{neon[w_meas]:.2f} | {curve.get(0.0, float('nan')):.2f} | {seconds:.0f} |" if w_meas is not None else
              f"| {g:g} | {line[0.0]:.2f} | {w_pred:g} | {line[w_pred]:.2f} | — | — | — | {seconds:.0f} |", flush=True)
        if best_pred is None or line[w_pred] < best_pred[2]:
            best_pred = (w_pred, g, line[w_pred])
        print("  predicted / measured: " + ", ".join(f"w {w:g}: {line[w]:.1f} / {v:.1f}" for w, v in sorted(curve.items())), flush=True)
        if w_meas is not None and (best_meas is None or neon[w_meas] < best_meas[2]):
            best_meas = (w_meas, g, neon[w_meas])
    print(f"\npredicted Neon pick (w, γ) = ({best_pred[0]:g}, {best_pred[1]:g}), predicted FID {best_pred[2]:.2f}")
    if best_meas:
        print(f"measured Neon pick (w, γ) = ({best_meas[0]:g}, {best_meas[1]:g}), FID {best_meas[2]:.2f} (the search's grid)")
        pred_at_meas = {r["gamma"]: r["measured"] for r in rows}.get(best_pred[1], {})
        nearest = min(pred_at_meas, key=lambda w: abs(w - best_pred[0])) if pred_at_meas else None
        if nearest is not None:
            print(f"the search's measured FID at the grid point nearest the prediction (w {nearest:g}, γ {best_pred[1]:g}): "
                  f"{pred_at_meas[nearest]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"run": run, "n": n, "rows": rows}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
