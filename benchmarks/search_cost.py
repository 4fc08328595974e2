"""What each searcher costs against the full grid, on the quickstart base, side by side in one run.

    python benchmarks/search_cost.py [--out outputs/search_cost] [--n 1000] [--final-seeds 0] [--set key=value ...]
    python benchmarks/search_cost.py --config fmnist_var --gammas 1.5,3,4.5 \
        --set model.checkpoint=RUN/pretrain/model.safetensors     # another family, on a base pretrained by its run

One output holds generate + finetune (+ evaluate) of `--config` (default `neon_ray/configs/quickstart.yaml`; a
config that pretrains needs `--set model.checkpoint=…`: the search compares searchers, not bases); each search then runs
`neon-ray tune` on its own copy of that output (outputs are relocatable), so every search scores the same
θ_base and θ_ft with the same evaluation seeds (common random numbers: a (w, γ) scores the same FID in every
search at the same n). Searches: the full grid (6 w × 3 γ, one rung at the full n), the same grid under ASHA
with rungs n/4 → n/2 → n, Optuna's TPE, the bracket searcher, and the line searcher (w = 0 and one probe w per
γ on the first rung, FID(w) predicted from their feature moments, the predicted best confirmed at n; first rung
n/4 as the bracket's, and n/5 as the shipped configs' 200 → 1,000). Prints per search: trials,
images sampled + scored (the cost unit), wall seconds, the Neon pick (w, γ) and its FID at the full n, the base
at its own best γ, and the real-vs-real floor at n. `--final-seeds K` also rescores each pick on K fresh seed
sets (6·K·n more images per search); with K ≥ 2 a second criterion is printed, stricter than the floor: the pick's
rescored mean within one rescored seed-set standard deviation of the grid pick's. The targets: one searcher's pick
within the floor of the grid's at ≤ 25% of the grid's images; with the diagnosis's prior, ≤ 15% on both criteria.

With and without the diagnosis's prior (issue 26): the shared output also runs `neon-ray diagnose`, and
"optuna + prior" / "bracket + prior" are the same searches under `tune.prior: diagnose` (the bracket searcher
searches w over the diagnosed bracket, Optuna evaluates its ends and middle first). Those two alone:

    python benchmarks/search_cost.py --only "grid (full n)" --only "bracket" --only "bracket + prior" \
        --only "optuna + ASHA" --only "optuna + prior"
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
W_GRID = "0.25,0.5,0.75,1,1.25,1.5"
GAMMAS = "1.5,2,3"


def searches(n: int, w_grid: list[float], gammas: list[float]) -> dict[str, list[str]]:
    """The searches over the same (w, γ) space: the grid's w values, or the range they span (w_grid[0] / 2.5 up)."""
    g = f"guidance: {{choice: {gammas}}}"
    grid = f"tune.space={{w: {{choice: {w_grid}}}, {g}}}"
    ranged = f"tune.space={{w: {{low: {w_grid[0] / 2.5:g}, high: {w_grid[-1]:g}}}, {g}}}"
    rungs = f"tune.rungs=[{n // 4}, {n // 2}, {n}]"
    return {
        "grid (full n)": ["tune.search=grid", grid, "tune.rungs=[]", "tune.scheduler=fifo"],
        "grid + ASHA": ["tune.search=grid", grid, rungs, "tune.scheduler=asha"],
        "optuna + ASHA": ["tune.search=optuna", "tune.num_trials=12", ranged, rungs, "tune.scheduler=asha"],
        "bracket": ["tune.search=bracket", "tune.bracket_steps=4", ranged, f"tune.rungs=[{n // 4}, {n}]", "tune.scheduler=fifo"],
        "optuna + prior": ["tune.search=optuna", "tune.num_trials=12", ranged, rungs, "tune.scheduler=asha", "tune.prior=diagnose"],
        "line": ["tune.search=line", ranged, f"tune.rungs=[{n // 4}, {n}]", "tune.scheduler=fifo"],
        "line (first rung n/5)": ["tune.search=line", ranged, f"tune.rungs=[{n // 5}, {n}]", "tune.scheduler=fifo"],
        "bracket + prior": ["tune.search=bracket", "tune.bracket_steps=4", ranged, f"tune.rungs=[{n // 4}, {n}]", "tune.scheduler=fifo",
                            "tune.prior=diagnose"],
    }


def neon_ray(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "neon_ray", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(args[:2])} failed:\n{proc.stderr[-3000:]}")
    return proc


def sets(overrides: list[str]) -> list[str]:
    return [x for o in overrides for x in ("--set", o)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/search_cost")
    parser.add_argument("--config", default="quickstart", help="a shipped config's name or a YAML file")
    parser.add_argument("--w-grid", default=W_GRID, help="the grid's w values, comma-separated (the ranged searchers span them)")
    parser.add_argument("--gammas", default=GAMMAS, help="the CFG scales γ every search covers, comma-separated")
    parser.add_argument("--n", type=int, default=1000, help="the full n (evaluate.num_samples); rungs are n/4, n/2, n")
    parser.add_argument("--final-seeds", type=int, default=0, help="rescore each pick on this many fresh seed sets")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="overrides for every run (key=value)")
    parser.add_argument("--only", action="append", default=[], help="run only these searches (by name)")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    config = str(Path(args.config).resolve()) if args.config.endswith((".yaml", ".yml")) else args.config
    w_grid, gammas = floats(args.w_grid, "--w-grid"), floats(args.gammas, "--gammas")
    # The searches' costs only: no second-space headline (it rescores the rescoring sets, when there are any).
    common = sets([f"evaluate.num_samples={args.n}", f"tune.final_seeds={args.final_seeds}", "tune.headline_extractor=null",
                   "mlflow.enabled=false", *args.extra])
    shared = out / "shared"
    for stage in ("generate", "finetune", "diagnose", "evaluate"):
        neon_ray(stage, config, "--output", str(shared), *common)
    diagnosis = json.loads((shared / "diagnose" / "manifest.json").read_text())["metrics"]
    rows = []
    for name, overrides in searches(args.n, w_grid, gammas).items():
        if args.only and name not in args.only:
            continue
        where = out / name.replace(" ", "_").replace("+", "").replace("(", "").replace(")", "").replace("/", "")
        if not (where / "tune" / "manifest.json").exists():
            shutil.rmtree(where, ignore_errors=True)
            shutil.copytree(shared, where, symlinks=True)
        t0 = time.time()
        neon_ray("tune", config, "--output", str(where), *common, *sets(overrides))
        wall = time.time() - t0
        m = json.loads((where / "tune" / "manifest.json").read_text())["metrics"]
        base, final = m["best_base"], m["final"]
        row = {"search": name, "trials": len(m["trials"]), "images": m["images_scored"], "seconds": wall, "w": m["best_w"],
               "gamma": m["best_sampler"].get("guidance"), "fid": m["best_fid"], "n": m["best_n"],
               "base": base["fid"], "base_gamma": base["sampler"].get("guidance"), "floor": base["fid_floor"]}
        if (prior := json.loads((where / "tune" / "manifest.json").read_text())["params"].get("prior")):
            row["search"] += f" [{'bracket ' + ', '.join(f'{x:g}' for x in prior['used']) if prior['used'] else 'not used'}]"
        if final:
            row["rescored"] = f"{final['neon']['fid_mean']:.3f} ± {final['neon']['fid_sd']:.3f} vs base {final['base']['fid_mean']:.3f} ± {final['base']['fid_sd']:.3f}"
            row["rescored_mean"], row["rescored_sd"] = final["neon"]["fid_mean"], final["neon"]["fid_sd"]
        rows.append(row)
    grid = next((r for r in rows if r["search"] == "grid (full n)"), None)
    rescored = any("rescored" in r for r in rows)
    strict = grid is not None and bool(grid.get("rescored_sd"))  # one rescored sd of the grid's pick: needs K ≥ 2
    print(f"diagnosis: sign {diagnosis['sign']:+d}, bracket {diagnosis['bracket']}, cosine(g, −Δ) {diagnosis['cosine']:.3f}, "
          f"loss argmin w {diagnosis['loss_argmin_w']:g}, {diagnosis['seconds']:.1f} s")
    print(f"n = {args.n}; FIDs at the full n on the shared evaluation seeds" + (f"; rescored on {args.final_seeds} fresh seed sets" if rescored else ""))
    print("| search | trials | images sampled + scored | % of grid | wall s | Neon pick (w, γ) | its FID at n | base at its best γ | floor at n |"
          + (" rescored |" if rescored else "") + (" within one rescored sd of the grid's? |" if strict else ""))
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if rescored else "") + ("---|" if strict else ""))
    for r in rows:
        share = f"{100 * r['images'] / grid['images']:.1f}%" if grid else "n/a"
        within = f" ({'within' if abs(r['fid'] - grid['fid']) <= r['floor'] else 'outside'} the floor of the grid's)" if grid and r is not grid else ""
        print(f"| {r['search']} | {r['trials']} | {r['images']:,} | {share} | {r['seconds']:.0f} | {r['w']:.3g}, {r['gamma']} | "
              f"{r['fid']:.3f}{within} | {r['base']:.3f} (γ {r['base_gamma']}) | {r['floor']:.3f} |" + (f" {r.get('rescored', '')} |" if rescored else "")
              + (f" {within_sd(r, grid)} |" if strict else ""))


def floats(text: str, flag: str) -> list[float]:
    try:
        values = sorted(float(x) for x in text.split(","))
    except ValueError:
        values = []
    if not values or values[0] <= 0:
        print(f"{flag}: expected positive numbers separated by commas, got {text!r}", file=sys.stderr)
        sys.exit(2)
    return values


def within_sd(row: dict, grid: dict) -> str:
    """The stricter criterion: |rescored mean − the grid pick's| ≤ the grid pick's rescored seed-set sd."""
    if row is grid:
        return f"(sd {grid['rescored_sd']:.3f})"
    if "rescored_mean" not in row:
        return "n/a"
    return "yes" if abs(row["rescored_mean"] - grid["rescored_mean"]) <= grid["rescored_sd"] else "no"


if __name__ == "__main__":
    main()
