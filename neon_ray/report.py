"""Human-facing outputs of a run: the sample grid, the FID-vs-w plot and the closing table."""

from __future__ import annotations

import numpy as np

from . import storage
from .imageio import decode_png
from .runtime.samplesets import open_samples


def sample_grid(samples_uri: str, rows: int, cols: int) -> np.ndarray:
    """A rows×cols grid (H·rows, W·cols) uint8 of the first images (ordered by index: labels cycle per column)."""
    pngs = open_samples(samples_uri).head(rows * cols).read_table().column("png").to_pylist()  # only the first parts are read
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
    return codec.decode_batch(open_samples(samples_uri).head(limit).read_table().column(codec.column).to_pylist())


def save_comparison_grid(base_uri: str, neon_uri: str, path: str, title: str, rows: int = 8, cols: int = 10,
                         kind: str = "image") -> str:
    """Base vs Neon side by side: an image grid, or a scatter of the first two coordinates for vector data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.4), dpi=110, sharex=kind == "vector", sharey=kind == "vector")
    for ax, uri, name in ((axes[0], base_uri, "base"), (axes[1], neon_uri, "Neon")):
        _draw_samples(ax, uri, kind, rows, cols)
        ax.set_title(name)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def save_sample_grid(samples_uri: str, path: str, title: str, rows: int = 4, cols: int = 8, kind: str = "image") -> str:
    """The first samples of one set (a search trial's, say): an image grid, or a scatter for vector data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(cols * 0.6 + 0.4, rows * 0.6 + 0.6) if kind != "vector" else (4, 4), dpi=110)
    _draw_samples(ax, samples_uri, kind, rows, cols, points=2000)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _draw_samples(ax, uri: str, kind: str, rows: int, cols: int, points: int = 5000) -> None:
    if kind == "vector":
        pts = sample_points(uri, points)
        ax.scatter(pts[:, 0], pts[:, 1] if pts.shape[1] > 1 else np.zeros(len(pts)), s=2, alpha=0.4)
        ax.set_aspect("equal")
    else:
        g = sample_grid(uri, rows, cols)
        ax.imshow(g[0] if g.shape[0] == 1 else np.transpose(g, (1, 2, 0)), cmap="gray", vmin=0, vmax=255)
        ax.axis("off")


def _first_rung(trials: list[dict]) -> tuple[int, list[tuple[dict, float]]]:
    """(n, [(trial, FID at n)]) at the first rung, the one n every trial was scored at (FID is only comparable at equal n)."""
    n = min(min(int(k) for k in t["fid_by_n"]) for t in trials)
    return n, [(t, t["fid_by_n"][str(n)]) for t in trials if str(n) in t["fid_by_n"]]


def _setting_name(sampler: dict) -> str:
    return ", ".join(f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}" for k, v in sampler.items()) or "scoring sampler"


def _picked(points: list[tuple[dict, float]], best: dict | None) -> tuple[dict, float]:
    """The search's pick (compared at its own, highest n) when given and plotted, else the lowest FID plotted."""
    if best is not None:
        for t, fid in points:
            if t["w"] == best["w"] and t["sampler"] == best["sampler"]:
                return t, fid
    return min(points, key=lambda p: p[1])


def save_fid_curves(trials: list[dict], path: str, title: str, base_fid: float | None = None, best: dict | None = None,
                    headline: dict | None = None) -> str:
    """FID against w at the first rung, one curve per sampler setting (w = 0 is the base at that setting), the
    real-vs-real floor at that n as a line, the best starred. Settings tried at one w only (a searcher that draws
    sampler values from a range) are points coloured by their value rather than one-point curves. `base_fid`: a base
    scored outside the search; `headline`: the rescored pair (tune's `final`), drawn as mean ± sd over its seed sets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, points = _first_rung(trials)
    floor = next((f for t, _ in points if (f := (t.get("floor_by_n") or {}).get(str(n))) is not None), None)
    groups: dict[str, list[tuple[float, float, dict]]] = {}
    for t, fid in points:
        groups.setdefault(_setting_name(t["sampler"]), []).append((t["w"], fid, t["sampler"]))
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    singles = []
    for name, pts in sorted(groups.items()):
        if len(pts) == 1:
            singles.append(pts[0])
            continue
        pts.sort(key=lambda p: p[0])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
    if singles:
        _scatter_settings(fig, ax, singles)
    if headline:
        _rescored(ax, headline)
    if base_fid is not None:
        ax.axhline(base_fid, color="gray", linestyle="--", label="base (w = 0)")
    if floor is not None:
        ax.axhline(floor, color="black", linestyle=":", label=f"real-vs-real floor ({floor:.3g})")
    best_t, best_fid = _picked(points, best)
    ax.plot([best_t["w"]], [best_fid], "r*", markersize=14, label=f"picked: w = {best_t['w']:.3g}, {_setting_name(best_t['sampler'])}")
    ax.set_xlabel("w (0 = base)")
    ax.set_ylabel(f"FID (n = {n})")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _scatter_settings(fig, ax, singles: list[tuple[float, float, dict]]) -> None:
    """Sampler settings scored at one w each: coloured by the searched field's value when there is one numeric field."""
    fields = sorted({k for _, _, s in singles for k in s})
    numeric = len(fields) == 1 and all(isinstance(s.get(fields[0]), (int, float)) for _, _, s in singles)
    xs, ys = [p[0] for p in singles], [p[1] for p in singles]
    if numeric:
        sc = ax.scatter(xs, ys, c=[float(s[fields[0]]) for _, _, s in singles], cmap="plasma", s=28, zorder=3,
                        label="one w per setting")
        fig.colorbar(sc, ax=ax, label=fields[0])
    else:
        ax.scatter(xs, ys, color="tab:gray", s=28, zorder=3, label="one w per setting")


def _rescored(ax, headline: dict) -> None:
    """The rescored base and Neon picks: mean ± sd of FID over tune.final_seeds fresh seed sets (at their own n)."""
    for arm, colour in (("base", "tab:blue"), ("neon", "tab:red")):
        row = headline.get(arm) or {}
        if row.get("fid_mean") is None:
            continue
        w = row.get("w", 0.0)
        ax.errorbar([w], [row["fid_mean"]], yerr=[row.get("fid_sd") or 0.0], fmt="D", color=colour, capsize=4, zorder=4,
                    label=f"{arm} rescored (n = {row.get('n')}, {len(row.get('fids') or [])} seed sets, mean ± sd)")


def save_fid_heatmap(trials: list[dict], path: str, title: str, best: dict | None = None) -> str | None:
    """FID over (w, a searched sampler field), one panel per field: every cell coloured by its FID (with several
    fields, the lowest FID over the other fields' values at that cell), the pick circled. None when no sampler field
    was searched."""
    fields = sorted({k for t in trials for k in t["sampler"] if isinstance(t["sampler"][k], (int, float))})
    if not fields:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, points = _first_rung(trials)
    best_t, _ = _picked(points, best)
    fig, axes = plt.subplots(1, len(fields), figsize=(6.4 * len(fields), 4.6), dpi=110, squeeze=False)
    for ax, field in zip(axes[0], fields):
        cells: dict[tuple[float, float], float] = {}
        for t, fid in points:
            if field in t["sampler"]:
                cell = (t["w"], float(t["sampler"][field]))
                cells[cell] = min(fid, cells.get(cell, fid))
        _heat_panel(fig, ax, cells, field, n, (best_t["w"], float(best_t["sampler"].get(field, np.nan))),
                    others=len(fields) > 1)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _heat_panel(fig, ax, cells: dict[tuple[float, float], float], field: str, n: int, pick: tuple[float, float],
                others: bool) -> None:
    from matplotlib.colors import LogNorm

    xs = np.array([c[0] for c in cells], float)
    ys = np.array([c[1] for c in cells], float)
    fids = np.array(list(cells.values()), float)
    positive = fids[fids > 0]
    norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if len(positive) == len(fids) and positive.min() < positive.max() else None
    sc = ax.scatter(xs, ys, c=fids, s=520, marker="s", cmap="viridis_r", norm=norm, edgecolors="white")
    for x, y, f in zip(xs, ys, fids):
        ax.annotate(f"{f:.4g}", (x, y), ha="center", va="center", fontsize=6, color="black",
                    bbox=dict(boxstyle="round,pad=0.1", fc="white", alpha=0.6, lw=0))
    ax.scatter([pick[0]], [pick[1]], s=1100, facecolors="none", edgecolors="red", linewidths=2,
               label=f"picked: w = {pick[0]:.3g}, {field} = {pick[1]:.3g}")
    fig.colorbar(sc, ax=ax, label=f"FID (n = {n}){', best over the other fields' if others else ''}")
    ax.set_xlabel("w (0 = base)")
    ax.set_ylabel(field)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), markerscale=0.3)


def _settings(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items())


def _fid(mean: float, sd: float | None) -> str:
    return f"{mean:.4f}" if sd is None else f"{mean:.3f} ± {sd:.3f}"


def _search_line(summary: dict) -> str:
    s = summary.get("search") or {}
    if not s:
        return ""
    rungs = s.get("rungs") or []
    parts = [f"search {s.get('search')}", f"{s.get('trials')} trials"]
    if len(rungs) > 1:
        parts.append("rungs " + " → ".join(str(r) for r in rungs) + (" with ASHA" if s.get("scheduler") == "asha" else ""))
    if s.get("images_scored"):
        parts.append(f"{s['images_scored']:,} images sampled + scored")
    return ", ".join(parts)


def print_summary(summary: dict, output: str) -> None:
    line = "─" * 72
    final = summary.get("headline")
    print(line)
    print(f"Neon on {summary['dataset']} · {summary['model']} · sampler {_settings(summary['sampler'])}")
    if (search := _search_line(summary)):
        print(search)
    print(line)
    base_name = "base (w = 0" + (f", {_settings(summary['base_best_sampler'])}" if summary.get("base_best_sampler") else "") + ")"
    neon_name = f"Neon (w = {summary['best_w']:.3g}" + (f", {_settings(summary['best_sampler'])}" if summary.get("best_sampler") else "") + ")"
    width = max(24, len(base_name) + 2, len(neon_name) + 2)
    print(f"{'':{width}}{'FID':>18}{'precision':>11}{'recall':>9}{'class consistency':>20}")
    for name, key in ((base_name, "base"), (neon_name, "neon")):
        fid = _fid(summary["fid_" + key], summary.get(f"fid_{key}_sd"))
        print(f"{name:{width}}{fid:>18}{_num(summary.get(key + '_precision')):>11}{_num(summary.get(key + '_recall')):>9}"
              f"{_pct(summary.get(key + '_class_consistency')):>20}")
    change = (summary["fid_neon"] - summary["fid_base"]) / summary["fid_base"] * 100 if summary["fid_base"] else float("nan")
    verdict = ""
    if final:
        within = final["comparison"].get("within_seed_spread")
        k = len(final["base"]["fids"])
        verdict = (f"   {'inside' if within else 'outside'} the seed spread ({k} fresh seed sets of n = {summary['n_eval']})"
                   if within is not None else f"   (1 seed set of n = {summary['n_eval']}: no spread measured)")
    else:
        verdict = "   (the search's own scores: optimistic; set tune.final_seeds ≥ 3 for a rescored headline)"
    print(f"{'change':{width}}{change:>+17.1f}%{verdict}")
    if summary.get("fid_floor") is not None:
        print(f"real-vs-real FID floor at n = {summary['n_eval']}: {summary['fid_floor']:.4f} (differences below it are noise)")
    if (second := summary.get("second_space")):
        from .fid.extractors import INCEPTION_SPACE

        standard = ", the standard FID Inception pool3" if second["feature_space"] == INCEPTION_SPACE else ""
        print(f"in {second['extractor']} features{standard} (n = {second['n']} per side, first seed set): base {second['fid_base']:.3f} → "
              f"Neon {second['fid_neon']:.3f} ({second['change_pct']:+.1f}%), real-vs-real floor {second['fid_floor']:.3f}")
    if final and summary.get("fid_base_configured") is not None:
        searched = {k: v for k, v in summary["scoring_sampler"].items() if k in summary.get("base_best_sampler", {})}
        print(f"base at the configured sampler{' (' + _settings(searched) + ')' if searched else ''}, "
              f"n = {summary.get('n_eval')} on the search's seeds: FID {summary['fid_base_configured']:.4f}")
    print(line)
    trials = sorted(summary.get("trials", []), key=lambda t: (-(t.get("n") or 0), t["fid"] if t.get("fid") is not None else float("inf")))
    if trials and not any(t.get("sampler") for t in trials):
        print("FID by w: " + ", ".join(f"{t['w']:.3g}: {t['fid']:.3f}" for t in sorted(trials, key=lambda t: t["w"])))
    elif trials:
        print("best trials: " + "; ".join(f"w {t['w']:.3g}, {_settings(t['sampler'])}: {t['fid']:.3f} (n {t['n']})" for t in trials[:5]))
    print(f"|S| = {summary['n_synthetic']}, fine-tune images = {summary['finetune_images']}, "
          f"extra compute = {_pct(summary.get('extra_compute_fraction'), 2)} of the base's training")
    print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["stage_seconds"].items()))
    if (compute := summary.get("compute")) and compute["extra_compute_fraction"]["finetune"] is not None:
        f = compute["extra_compute_fraction"]
        print(f"extra compute, in training image-equivalents of the base's {compute['base_train_images']:,}: fine-tune "
              f"{_pct(f['finetune'], 2)}, + generating S {_pct(f['with_generation'], 2)}, + the search {_pct(f['with_search'], 2)}")
    if compute and compute.get("seconds_fraction"):
        f = compute["seconds_fraction"]
        print(f"in wall seconds of the base's pretraining here: fine-tune {_pct(f['finetune'])}, + generating S "
              f"{_pct(f['with_generation'])}, + the search {_pct(f['with_search'])}")
    if (d := summary.get("diagnosis")):
        print(f"diagnosis: sign {d['sign']:+d}, bracket [{d['bracket'][0]:g}, {d['bracket'][1]:g}], cosine(g, −Δ) {d['cosine']:.3f}, "
              f"loss argmin w {d['loss_argmin_w']:g} ({d['seconds']:.1f} s)")
    if (prior := (summary.get("search") or {}).get("prior")):
        print(prior["note"])
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
