"""Human-facing outputs of a run: the sample grid, the FID-vs-w plot and the closing table."""

from __future__ import annotations

import numpy as np

from . import storage
from .imageio import decode_png
from .runtime.samplesets import read_samples


def sample_grid(samples_uri: str, rows: int, cols: int) -> np.ndarray:
    """A rows×cols grid (H·rows, W·cols) uint8 of the first images (ordered by index: labels cycle per column)."""
    table = read_samples(samples_uri, columns=["index", "png"])
    pngs = table.column("png").to_pylist()[: rows * cols]
    images = [decode_png(p) for p in pngs]
    c, h, w = images[0].shape
    grid = np.zeros((c, rows * h, cols * w), np.uint8)
    for k, im in enumerate(images):
        r, q = divmod(k, cols)
        grid[:, r * h : (r + 1) * h, q * w : (q + 1) * w] = im
    return grid


def sample_points(samples_uri: str, limit: int) -> np.ndarray:
    """The first `limit` vector samples (N, D) float32 of a set (for scatter plots of low-dimensional data)."""
    from .data.codec import VectorCodec

    codec = VectorCodec()
    table = read_samples(samples_uri, columns=["index", codec.column])
    return codec.decode_batch(table.column(codec.column).to_pylist()[:limit])


def save_comparison_grid(base_uri: str, neon_uri: str, path: str, title: str, rows: int = 8, cols: int = 10,
                         kind: str = "image") -> str:
    """Base vs Neon side by side: an image grid, or a scatter of the first two coordinates for vector data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.4), dpi=110, sharex=kind == "vector", sharey=kind == "vector")
    for ax, uri, name in ((axes[0], base_uri, "base"), (axes[1], neon_uri, "Neon")):
        if kind == "vector":
            pts = sample_points(uri, 5000)
            ax.scatter(pts[:, 0], pts[:, 1] if pts.shape[1] > 1 else np.zeros(len(pts)), s=2, alpha=0.4)
            ax.set_aspect("equal")
        else:
            g = sample_grid(uri, rows, cols)
            ax.imshow(g[0] if g.shape[0] == 1 else np.transpose(g, (1, 2, 0)), cmap="gray", vmin=0, vmax=255)
            ax.axis("off")
        ax.set_title(name)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def save_fid_plot(trials: list[dict], fid_base: float, path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ws = [t["w"] for t in trials]
    fids = [t["fid"] for t in trials]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    ax.plot(ws, fids, "o-", label="Neon θ(w)")
    ax.axhline(fid_base, color="gray", linestyle="--", label="base (w = 0)")
    best = int(np.argmin(fids))
    ax.plot([ws[best]], [fids[best]], "r*", markersize=14, label=f"best w = {ws[best]:.3g}")
    ax.set_xlabel("w")
    ax.set_ylabel("FID")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _settings(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items())


def print_summary(summary: dict, output: str) -> None:
    line = "─" * 64
    print(line)
    print(f"Neon on {summary['dataset']} · {summary['model']} · sampler {_settings(summary['sampler'])}")
    if summary.get("scoring_sampler") not in (None, summary["sampler"]):
        print(f"models scored with sampler {_settings(summary['scoring_sampler'])}")
    print(line)
    print(f"{'':22}{'FID':>10}{'precision':>11}{'recall':>9}{'class consistency':>20}")
    for name, key in (("base (w = 0)", "base"), ("Neon (w = %.3g)" % summary["best_w"], "neon")):
        print(f"{name:22}{summary['fid_' + key]:>10.4f}{_num(summary.get(key + '_precision')):>11}{_num(summary.get(key + '_recall')):>9}"
              f"{_pct(summary.get(key + '_class_consistency')):>20}")
    change = (summary["fid_neon"] - summary["fid_base"]) / summary["fid_base"] * 100 if summary["fid_base"] else float("nan")
    print(f"{'change':22}{change:>+9.1f}%")
    if summary.get("fid_floor") is not None:
        print(f"real-vs-real FID floor at n = {summary['n_eval']}: {summary['fid_floor']:.4f} (differences below it are noise)")
    print(line)
    print("FID by w: " + ", ".join(f"{t['w']:.3g}: {t['fid']:.3f}" for t in summary.get("trials", [])))
    print(f"|S| = {summary['n_synthetic']}, fine-tune images = {summary['finetune_images']}, "
          f"extra compute = {_pct(summary.get('extra_compute_fraction'), 2)} of the base's training")
    print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["stage_seconds"].items()))
    print(f"best model: {storage.redact_uri(storage.resolve(output, summary['best_model']))}")
    if summary.get("registered_model"):
        print(f"registered: {summary['registered_model']['model']} version {summary['registered_model']['version']} (MLflow Model Registry)")
    print(f"summary: {storage.redact_uri(storage.join(output, 'summary.json'))}")
    ui = summary["mlflow_ui"]
    print(f"MLflow:  {ui}" + ("   (then open http://127.0.0.1:5000)" if ui.startswith("mlflow ui") else ""))


def _num(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _pct(x, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"
