"""The search (tuning/): golden-section on its own, each searcher of `tune.search` through a real Ray Tune on a
known U-shaped FID(w, γ), multi-fidelity picking at equal n, and the bad inputs of tune.space / rungs."""

from __future__ import annotations

import math

import pytest

from _support import tiny_config


def test_golden_section_brackets_the_minimum():
    from tuning.searchers import GoldenSection

    for optimum in (0.12, 0.3, 0.5, 1.3):
        g = GoldenSection(0.1, 1.5, steps=7)
        while not g.done:
            points = []
            while (x := g.ask()) is not None:
                points.append(x)
            assert points, "golden-section asked nothing while not done"
            for x in points:
                g.tell(x, (x - optimum) ** 2)
        assert abs(g.best()[0] - optimum) < 0.1, (optimum, g.results)
    log = GoldenSection(0.01, 10.0, steps=8, log=True)
    while not log.done:
        x = log.ask()
        log.tell(x, (math.log(x) - math.log(0.3)) ** 2)
    assert abs(math.log(log.best()[0] / 0.3)) < 0.3
    restored = GoldenSection.from_state(log.state())
    assert restored.best() == log.best() and restored.done


def synthetic_trial_fn():
    """A Tune function trainable: the known FID, reported once per rung (biased upwards at small n, as FID is).
    Made in a function so that Ray pickles it by value (the tests folder is not importable in Ray workers)."""
    def u_shaped(w: float, guidance: float) -> float:
        """A known FID(w, γ): U-shaped in w with its optimum moving with γ (w* = 0.25·γ); Neon's best is w 0.5 at
        γ 2, the base's (w = 0) at γ = 12/11 ≈ 1.09 (the base prefers less guidance than Neon, as measured)."""
        return 10 + 40 * (w - 0.25 * guidance) ** 2 + 3 * (guidance - 2.0) ** 2

    def trial(config: dict, rungs: list[int]) -> None:
        from ray import tune

        from tuning.spaces import FIDELITY

        for n in rungs[: int(config.get(FIDELITY, len(rungs)))]:
            fid = u_shaped(float(config["w"]), float(config.get("guidance", 2.0))) + 100.0 / n
            tune.report({"fid": fid, "n": n, "w": float(config["w"])})

    return trial


SEARCHES = {
    "grid": ["tune.search=grid", "tune.space={w: {choice: [0.25, 0.5, 0.75, 1.0]}, guidance: {choice: [1.0, 2.0, 3.0]}}"],
    "optuna": ["tune.search=optuna", "tune.num_trials=40", "tune.space={w: {low: 0.05, high: 1.5}, guidance: {low: 1.0, high: 3.0}}"],
    "bracket": ["tune.search=bracket", "tune.bracket_steps=6", "tune.space={w: {low: 0.05, high: 1.5}, guidance: {choice: [1.0, 2.0, 3.0]}}"],
}


@pytest.mark.parametrize("search", sorted(SEARCHES))
def test_each_searcher_finds_the_known_optimum(search, ray_local, tmp_path):
    """Through a real Ray Tune: the Neon arm's pick is near (w 0.5, γ 2), the base arm's near γ 1.09, at the top rung's n."""
    from functools import partial

    from ray import tune

    from tuning.searchers import make_scheduler, make_search

    extra = ["tune.rungs=[10, 40]"] + (["tune.scheduler=asha"] if search != "bracket" else [])
    cfg = tiny_config(tmp_path / "out", *SEARCHES[search], *extra, "evaluate.num_samples=40")
    search_alg, space, num_samples = make_search(cfg)
    grid = tune.Tuner(
        tune.with_resources(partial(synthetic_trial_fn(), rungs=cfg.search_rungs()), {"cpu": 0.01}),
        param_space=space,
        tune_config=tune.TuneConfig(metric="fid", mode="min", search_alg=search_alg, scheduler=make_scheduler(cfg),
                                    num_samples=num_samples, max_concurrent_trials=4),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), name=search, verbose=0),
    ).fit()
    assert not grid.errors
    rows = [(r.config, r.metrics_dataframe) for r in grid]
    full = [(c, df["fid"].iloc[-1]) for c, df in rows if df["n"].iloc[-1] == 40]
    neon = min(((c, f) for c, f in full if float(c["w"]) > 0), key=lambda p: p[1])
    base = [(c, f) for c, f in full if float(c["w"]) == 0]
    assert base, "the base arm (w = 0) was not run through every rung"
    best_base = min(base, key=lambda p: p[1])[0]
    assert abs(float(best_base["guidance"]) - 12 / 11) < 0.6, best_base
    assert abs(float(neon[0]["w"]) - 0.5) < 0.2 and abs(float(neon[0]["guidance"]) - 2.0) < 0.6, neon
    if search != "bracket":  # ASHA stopped some Neon trials at the first rung; never a base trial
        stopped = [c for c, df in rows if df["n"].iloc[-1] == 10]
        assert stopped and all(float(c["w"]) > 0 for c in stopped), stopped


def line_trial_fn():
    """The synthetic trial of the line searcher: the same known FID, and on the first rung the feature statistics a
    real trial keeps, Gaussian moments whose Fréchet distance to N(0, I) is that FID less its constant and bias."""
    def trial(config: dict, rungs: list[int], tune_dir: str) -> None:
        import numpy as np
        from ray import tune

        from neon_ray import storage
        from neon_ray.fid.stats import Statistics
        from tuning.spaces import FIDELITY, trial_key
        from tuning.trainable import stats_uri, trial_dir

        w, g = float(config["w"]), float(config.get("guidance", 2.0))
        mu = np.array([math.sqrt(40) * (w - 0.25 * g), math.sqrt(3) * (g - 2.0)])  # linear in w: the line is exact
        fid = 10 + float(mu @ mu)
        for k, n in enumerate(rungs[: int(config.get(FIDELITY, len(rungs)))]):
            if k == 0:
                stats = Statistics(mu, np.eye(2), n, "synthetic")
                storage.write_bytes_atomic(stats_uri(trial_dir(tune_dir, trial_key(config)), n), stats.to_bytes())
            tune.report({"fid": fid + 100.0 / n, "n": n, "w": w})

    return trial


def test_the_line_searcher_predicts_the_optimum_from_two_sets_per_setting(ray_local, tmp_path):
    """Through a real Ray Tune: two first-rung trials per γ (w 0 and the probe), then only the predicted best (w 0.5,
    γ 2) and the base's best γ (1) through the top rung; the prediction is written beside the trials."""
    import json
    from functools import partial

    import numpy as np
    from ray import tune

    from neon_ray.fid.stats import Statistics
    from tuning.searchers import make_search

    reference = tmp_path / "reference.npz"
    reference.write_bytes(Statistics(np.zeros(2), np.eye(2), 1000, "synthetic").to_bytes())
    cfg = tiny_config(tmp_path / "out", "tune.search=line", "tune.rungs=[10, 40]", "evaluate.num_samples=40",
                      "tune.space={w: {low: 0.05, high: 1.5}, guidance: {choice: [1.0, 2.0, 3.0]}}", f"evaluate.reference={reference}")
    tune_dir = str(tmp_path / "tune")
    search_alg, space, num_samples = make_search(cfg, tune_dir=tune_dir)
    assert num_samples == 2 * 3 + 2
    grid = tune.Tuner(
        tune.with_resources(partial(line_trial_fn(), rungs=cfg.search_rungs(), tune_dir=tune_dir), {"cpu": 0.01}),
        param_space=space,
        tune_config=tune.TuneConfig(metric="fid", mode="min", search_alg=search_alg, num_samples=num_samples, max_concurrent_trials=4),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), name="line", verbose=0),
    ).fit()
    assert not grid.errors
    rows = [(r.config, r.metrics_dataframe) for r in grid]
    first = [c for c, df in rows if df["n"].iloc[-1] == 10]
    assert sorted((float(c["w"]), float(c["guidance"])) for c in first) == sorted((w, g) for g in (1.0, 2.0, 3.0) for w in (0.0, 0.775)), first
    full = sorted((float(c["w"]), float(c["guidance"])) for c, df in rows if df["n"].iloc[-1] == 40)
    assert len(full) == 2 and full[0] == (0.0, 1.0), full  # the base at its best γ, and the predicted Neon pick
    assert abs(full[1][0] - 0.5) < 0.03 and full[1][1] == 2.0, full
    line = json.loads((tmp_path / "tune" / "line.json").read_text())
    assert line["probe"] == pytest.approx(0.775) and line["n"] == 10 and line["pick"]["guidance"] == 2.0
    at_two = next(ln for ln in line["lines"] if ln["setting"] == {"guidance": 2.0})
    assert min(at_two["predicted"].values()) == pytest.approx(0.0, abs=0.02)  # FD along an exact line: 40·(w − 0.5)²


def test_pick_compares_trials_at_equal_n():
    from tuning.search import pick

    rung = lambda n, fid: {"n": n, "fid": fid}  # noqa: E731
    trials = [
        {"key": "a", "w": 0.5, "sampler": {}, "rungs": [rung(10, 9.0)]},  # lowest FID, but only at the small n
        {"key": "b", "w": 0.7, "sampler": {}, "rungs": [rung(10, 12.0), rung(40, 11.0)]},
        {"key": "c", "w": 1.0, "sampler": {}, "rungs": [rung(10, 11.0), rung(40, 10.5)]},
        {"key": "base", "w": 0.0, "sampler": {}, "rungs": [rung(10, 20.0), rung(40, 19.0)]},
    ]
    assert pick(trials, "neon")["key"] == "c"
    assert pick(trials, "base")["key"] == "base"


@pytest.mark.parametrize("overrides, field", [
    (["tune.space={guidance: {low: 3.0, high: 1.0}}", "tune.search=optuna"], "tune.space.guidance.high"),
    (["tune.space={guidance: {low: 2.0, high: 2.0}}", "tune.search=optuna"], "tune.space.guidance.high"),
    (["tune.space={guidance: {choice: []}}"], "tune.space.guidance.choice"),
    (["tune.space={temperature: {choice: [0.9, 1.0]}}"], "tune.space.temperature"),
    (["tune.space={w: {low: -1.0, high: 1.0}}", "tune.search=optuna"], "tune.space.w.low"),
    (["tune.space={guidance: {choice: [-1.0, 2.0]}}"], "tune.space.guidance.choice[0]"),
    (["tune.space={guidance: {low: 1.0, high: 3.0}}"], "tune.space.guidance"),
    (["tune.rungs=[20, 10]"], "tune.rungs[1]"),
    (["tune.rungs=[20, 400]"], "tune.rungs[1]"),
    (["tune.search=hyperopt"], "tune.search"),
    (["tune.scheduler=asha"], "tune.scheduler"),
    (["tune.search=bracket", "tune.scheduler=asha", "tune.rungs=[10, 40]"], "tune.scheduler"),
    (["tune.search=line", "tune.scheduler=asha", "tune.rungs=[10, 40]"], "tune.scheduler"),
    (["tune.search=line", "tune.space={guidance: {low: 1.0, high: 3.0}}"], "tune.space.guidance"),
    (["tune.search=line", "tune.line_probe=5"], "tune.line_probe"),
    (["tune.search=line", "tune.line_probe=0"], "tune.line_probe"),
    (["tune.final_seeds=1", "tune.headline_extractor=inception"], "tune.headline_extractor"),
    (["tune.headline_extractor=inception-fid-helper"], "tune.headline_extractor"),  # tiny.yaml: final_seeds 0
    (["tune.final_seeds=1", "tune.headline_extractor=inception-fid-helper", "tune.headline_samples=41"], "tune.headline_samples"),
])
def test_bad_search_input_names_the_field(overrides, field, tmp_path):
    from neon_ray.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path / "out", *overrides)
    message = str(err.value)
    assert message.startswith(field + ":") or message.startswith(field + " "), message
    assert "\n" not in message


def test_unknown_sampler_field_names_the_family_and_its_fields(tmp_path):
    from neon_ray.errors import ConfigError

    with pytest.raises(ConfigError, match=r"tune.space.top_k: the diffusion sampler has no field 'top_k'; its fields: \["):
        tiny_config(tmp_path / "out", "tune.space={top_k: {choice: [5]}}")



@pytest.mark.slow
def test_the_line_search_on_the_tiny_run_probes_then_confirms_its_prediction(tmp_path, undisturbed_tiny_run):
    """Through the product (real trials: samples, features, the merge): per γ the base and the probe on the first rung
    with their feature statistics kept, then the predicted pick and the base's best γ through the top rung; the
    prediction is in the stage's manifest."""
    import json
    import shutil

    from _support import TINY, neon_ray_cli

    made, _, sets = undisturbed_tiny_run
    out = tmp_path / "tiny"
    shutil.copytree(made, out)  # generate and finetune are current in the copy
    line = ["tune.search=line", "tune.rungs=[20, 40]", "tune.space={w: {low: 0.25, high: 1.5}, guidance: {choice: [1.0, 2.0]}}"]
    args = [a for s in [*sets, *line] for a in ("--set", s)]
    res = neon_ray_cli("tune", str(TINY), "--output", str(out), *args, timeout=600, env={"MLFLOW_TRACKING_URI": ""})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "the line search predicts w" in res.stderr + res.stdout
    m = json.loads((out / "tune" / "manifest.json").read_text())["metrics"]
    pred = m["line"]
    assert pred["probe"] == pytest.approx(0.875) and pred["n"] == 20 and len(pred["lines"]) == 2
    for ln in pred["lines"]:  # the probes' predicted FIDs are their measured ones (the line passes through them)
        for w, fid in ln["measured"].items():
            assert ln["predicted"][w] == pytest.approx(fid, rel=1e-6), ln
    trials = {t["key"]: t for t in m["trials"]}
    probes = [k for k in trials if k.startswith(("w=0,", "w=0.875,"))]
    assert len(probes) == 4 and all((out / "tune" / "trials" / k / "stats-n20.npz").exists() for k in probes)
    assert m["best_w"] == pytest.approx(pred["pick"]["w"]) and m["best_sampler"]["guidance"] == pred["pick"]["guidance"]
    assert m["best_n"] == 40 and m["best_base"]["n"] == 40 and m["best_base"]["sampler"] == pred["base_pick"]
    assert m["images_scored"] == sum(t["n"] for t in m["trials"]) and len(m["trials"]) <= 5
