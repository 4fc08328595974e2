"""What the Ray runtime costs: the same generation + FID scoring through neon-ray's Ray path and through a
plain in-process loop, side by side in one run, on the quickstart base.

    python benchmarks/ray_overhead.py [--samples 2000] [--cpus 2] [--repeats 1]

Ray path: `runtime.sampling.sample_to_parquet` (a Ray Data actor pool; each work item sampled, PNG-encoded
and written as a Parquet part) then `scoring.score_samples` (a feature actor pool reading the parts,
float64 moments merged on the driver). Plain loop: one process with the same number of torch threads in
all, the same seeds, labels and batches, images straight from the sampler into the extractor, no files.
Both score against the same cached reference statistics (computed before timing). Prints a table with
both wall times, their ratio (the target is ≤ 1.3×) and both FIDs (they must agree: same images).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from neon_ray.config import load_config  # noqa: E402


def plain_loop(cfg, checkpoint: str, n: int, threads: int, reference) -> tuple[float, float]:
    """(seconds, FID): sample and featurize in this process, batch by batch."""
    from neon_ray.data.codec import CODECS
    from neon_ray.fid.extractors import create_extractor, get_extractor, prepare
    from neon_ray.fid.stats import Moments, Statistics, frechet_distance
    from neon_ray.runtime.run_model import load_model, spec_of
    from neon_ray.runtime.seeds import balanced_labels, sample_seeds

    torch.set_num_threads(threads)
    t0 = time.time()
    family, net = load_model(spec_of(cfg), checkpoint)
    info = get_extractor(cfg.evaluate.extractor)
    extractor = create_extractor(cfg.evaluate.extractor, info.weights(cfg.evaluate.extractor_weights), [info.feature])
    codec, settings, moments = CODECS["image"], cfg.scoring_sampler(), None
    for start in range(0, n, cfg.generate.batch_size):
        idx = np.arange(start, min(n, start + cfg.generate.batch_size))
        labels = balanced_labels(idx, family.spec.num_classes)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.generate.bf16):
            images = family.sample(net, torch.from_numpy(labels), sample_seeds(cfg.evaluate.seed, "eval", idx), settings)
        with torch.no_grad():
            features = extractor(prepare(codec.from_model(images), cfg.evaluate.extractor))[0].float().numpy()
        m = Moments.of(features)
        moments = m if moments is None else moments.merge(m)
    stats = Statistics.from_moments(moments, reference.feature_space, "plain", "plain loop")
    return time.time() - t0, frechet_distance(stats, reference)


def ray_path(cfg, checkpoint: str, n: int, dest: str, reference) -> tuple[float, float]:
    from neon_ray.runtime.run_model import spec_of
    from neon_ray.runtime.sampling import sample_to_parquet
    from neon_ray.scoring import score_samples

    t0 = time.time()
    info = sample_to_parquet(spec_of(cfg), checkpoint, cfg.scoring_sampler(), "image", n, cfg.evaluate.seed, "eval", dest,
                             cfg.generate, fresh=True)
    scores = score_samples(cfg, info["uri"], reference)
    return time.time() - t0, scores["fid"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs for both: Ray's actors × 1 thread, or the loop's threads")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    out = tempfile.mkdtemp(prefix="neon-overhead-")
    cfg = load_config(ROOT / "neon_ray/configs/quickstart.yaml", [
        f"ray.num_cpus={args.cpus}", f"generate.actors={args.cpus}", "generate.threads_per_actor=1", f"evaluate.actors={args.cpus}",
        "evaluate.prc=false", "evaluate.floor=false", f"evaluate.num_samples={args.samples}", "evaluate.feature_batch_size=500",
        "mlflow.enabled=false"], out)  # 500: shards of the measured table (docs/results.md)
    checkpoint = cfg.model.checkpoint

    from neon_ray.runtime.cluster import ensure_ray
    from neon_ray.scoring import reference_statistics

    t0 = time.time()
    ensure_ray(cfg.ray)
    ray_start = time.time() - t0
    reference = reference_statistics(cfg)  # computed once, before timing, for both paths
    rows = []
    for r in range(args.repeats):
        ray_s, ray_fid = ray_path(cfg, checkpoint, args.samples, os.path.join(out, f"samples-{r}"), reference)
        plain_s, plain_fid = plain_loop(cfg, checkpoint, args.samples, args.cpus, reference)
        rows.append((ray_s, plain_s, ray_fid, plain_fid))
    print(f"# generation + FID scoring of {args.samples} quickstart samples (DDIM 10, CFG 3, bf16={cfg.generate.bf16}), "
          f"{args.cpus} CPUs, {os.cpu_count()} on the machine; Ray start-up {ray_start:.1f} s (not counted)")
    print("| repeat | Ray runtime (s) | plain loop (s) | ratio | FID (Ray) | FID (plain) |")
    print("|---|---|---|---|---|---|")
    for r, (ray_s, plain_s, ray_fid, plain_fid) in enumerate(rows):
        print(f"| {r} | {ray_s:.1f} | {plain_s:.1f} | {ray_s / plain_s:.2f}× | {ray_fid:.4f} | {plain_fid:.4f} |")


if __name__ == "__main__":
    main()
