"""The searchers and the scheduler of `tune.search` / `tune.scheduler`, all Ray Tune objects.

- grid: Ray Tune's grid (`tune.grid_search` over every field's choices);
- optuna: Optuna's TPE through Ray Tune's `OptunaSearch`, one study over both arms (base and Neon);
- bracket: `BracketSearch`, a Ray Tune `Searcher` that scores w = 0 and then runs a golden-section search
  over w at each sampler setting. FID(w) is U-shaped around one optimum (measured: steep on both sides),
  i.e. unimodal, which is all golden-section needs; each step shrinks the bracket by 0.618. It brackets on
  the first rung (cheap) and then runs the best base setting and the best (w, setting) through every rung;
- line: `LineSearch`, w = 0 and one probe w at each sampler setting on the first rung, FID(w) predicted at every w
  from those two sets' feature moments, and the predicted best (w, setting) through every rung.

The ASHA scheduler stops poor Neon trials at a rung; trials of the base arm always run every rung, since
they are what Neon is compared with.
"""

from __future__ import annotations

import json
import logging
import math

from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import Searcher

from neon_ray.config import RunConfig
from neon_ray.scoring import reference_uri

from .spaces import FIDELITY, W, OptunaSpace, choice_settings, grid_space, searches_base, trial_key

log = logging.getLogger("neon_ray")

GOLDEN = (math.sqrt(5) - 1) / 2  # 0.618…: the bracket shrinks by this factor per evaluation


class GoldenSection:
    """Golden-section minimisation of f over [low, high] with a fixed number of evaluations (log scale optional).

    `ask()` gives the next point to evaluate (None while waiting for a result it needs), `tell(x, f)` takes a
    result. The two interior points of the first step can be evaluated at once; after that each step needs one.
    """

    def __init__(self, low: float, high: float, steps: int, log: bool = False):
        self.log, self.steps = log, steps
        self.a, self.b = self._to(low), self._to(high)
        self.c, self.d = self.b - GOLDEN * (self.b - self.a), self.a + GOLDEN * (self.b - self.a)
        self.fc: float | None = None
        self.fd: float | None = None
        self.pending: list[str] = []  # interior points ("c", "d") asked and not yet told
        self.results: list[tuple[float, float]] = []  # (x, f) in the caller's scale

    def _to(self, x: float) -> float:
        return math.log(x) if self.log else x

    def _from(self, u: float) -> float:
        return math.exp(u) if self.log else u

    def ask(self) -> float | None:
        if len(self.results) + len(self.pending) >= self.steps:
            return None
        for name in ("c", "d"):
            if getattr(self, "f" + name) is None and name not in self.pending:
                self.pending.append(name)
                return self._from(getattr(self, name))
        return None

    def tell(self, x: float, f: float) -> None:
        u = self._to(x)
        name = min(self.pending, key=lambda n: abs(getattr(self, n) - u))
        self.pending.remove(name)
        self.results.append((x, f))
        setattr(self, "f" + name, f)
        if self.fc is None or self.fd is None:
            return
        if self.fc <= self.fd:  # the minimum lies in [a, d]: d becomes the upper end, c the new upper point
            self.b, self.d, self.fd = self.d, self.c, self.fc
            self.c, self.fc = self.b - GOLDEN * (self.b - self.a), None
        else:  # the minimum lies in [c, b]
            self.a, self.c, self.fc = self.c, self.d, self.fd
            self.d, self.fd = self.a + GOLDEN * (self.b - self.a), None

    @property
    def done(self) -> bool:
        return len(self.results) >= self.steps

    def best(self) -> tuple[float, float]:
        return min(self.results, key=lambda r: r[1])

    def state(self) -> dict:
        return {k: getattr(self, k) for k in ("log", "steps", "a", "b", "c", "d", "fc", "fd", "results")}

    @classmethod
    def from_state(cls, state: dict) -> "GoldenSection":
        g = cls.__new__(cls)
        for k, v in state.items():
            setattr(g, k, [tuple(r) for r in v] if k == "results" else v)
        g.pending = []  # points asked but never told (trials lost with the driver) are asked again
        return g


class JsonStateSearcher(Searcher):
    """A Ray Tune `Searcher` whose state (`get_state`/`set_state`, plain data) Tune saves with the experiment as JSON,
    so restoring an experiment never unpickles. Subclasses define the two (Ray's `Searcher` declares them)."""

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "w") as f:
            json.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as f:
            self.set_state(json.load(f))


class BracketSearch(JsonStateSearcher):
    """w = 0 and a golden-section search over w at each sampler setting, on the first rung; then the best base
    setting and the best (w, setting) through every rung (`fidelity`)."""

    def __init__(self, settings: list[dict], low: float, high: float, steps: int, rungs: int, log: bool = False,
                 with_base: bool = True, metric: str = "fid", mode: str = "min"):
        super().__init__(metric=metric, mode=mode)
        self.settings, self.rungs, self.with_base = settings, rungs, with_base
        self.brackets = [GoldenSection(low, high, steps, log) for _ in settings]
        self.base_fid: list[float | None] = [None] * len(settings)
        self.base_asked = [not with_base] * len(settings)
        self.live: dict[str, list] = {}  # trial id → [setting index, w, phase]
        self.confirm: list[dict] | None = None  # the full-fidelity trials, once every bracket is done

    @staticmethod
    def trials_needed(settings: int, steps: int, with_base: bool) -> int:
        return settings * (steps + int(with_base)) + 2

    def suggest(self, trial_id: str):
        if self.confirm is None and self._bracketing_done():
            self.confirm = self._confirm_trials()
        if self.confirm is not None:
            if not self.confirm:
                return None if self.live else Searcher.FINISHED
            config = self.confirm.pop(0)
            self.live[trial_id] = [-1, config[W], "confirm"]
            return config
        for i, setting in enumerate(self.settings):
            if not self.base_asked[i]:
                self.base_asked[i] = True
                self.live[trial_id] = [i, 0.0, "base"]
                return self._config(i, 0.0, 1)
            if (w := self.brackets[i].ask()) is not None:
                self.live[trial_id] = [i, w, "bracket"]
                return self._config(i, w, 1)
        return None  # waiting for results

    def _config(self, i: int, w: float, fidelity: int) -> dict:
        return {W: float(w), **self.settings[i], FIDELITY: fidelity}

    def _bracketing_done(self) -> bool:
        bases = not self.with_base or all(f is not None for f in self.base_fid)
        return bases and all(b.done for b in self.brackets) and not self.live

    def _confirm_trials(self) -> list[dict]:
        if self.rungs < 2:
            return []  # the first rung is the last: nothing to confirm
        neon = min(((b.best()[1], i, b.best()[0]) for i, b in enumerate(self.brackets)))
        out = [self._config(neon[1], neon[2], self.rungs)]
        if self.with_base:
            base = min((f, i) for i, f in enumerate(self.base_fid))
            out.append(self._config(base[1], 0.0, self.rungs))
        return out

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        i, w, phase = self.live.pop(trial_id, [None, None, None])
        if phase is None or phase == "confirm":
            return
        fid = float("inf") if error or not result or self.metric not in result else float(result[self.metric])
        if phase == "base":
            self.base_fid[i] = fid
        else:
            self.brackets[i].tell(w, fid)

    def get_state(self) -> dict:
        return {"settings": self.settings, "rungs": self.rungs, "with_base": self.with_base,
                "brackets": [b.state() for b in self.brackets], "base_fid": self.base_fid, "base_asked": self.base_asked,
                "confirm": self.confirm}

    def set_state(self, state: dict) -> None:
        self.settings, self.rungs, self.with_base = state["settings"], state["rungs"], state["with_base"]
        self.brackets = [GoldenSection.from_state(s) for s in state["brackets"]]
        self.base_fid, self.base_asked, self.confirm = state["base_fid"], state["base_asked"], state["confirm"]
        self.live = {}
        for i in range(len(self.settings)):  # a base trial asked but never told is asked again
            if self.base_fid[i] is None and self.with_base:
                self.base_asked[i] = False


class LineSearch(JsonStateSearcher):
    """w = 0 and one probe w_p at each sampler setting, on the first rung; then FID(w) predicted along the line at
    every w of the searched range from those two sets' feature moments alone (`neon_ray.fid.stats.along_line`: μ and Σ
    linear in w), and the predicted best (w, setting) and the best base setting through every rung.

    Why it can work with two sets: with common random numbers the distribution of θ_w's samples moves smoothly with
    w, and to first order its feature moments move linearly; FID, a function of those moments, is then predicted at
    every w without sampling any other θ_w (measured against the full grid in benchmarks/search_cost.py and
    benchmarks/feature_line.py). It costs 2 first-rung sets per sampler setting plus the two confirmations; the
    prediction, with the measured FIDs of the probes, is written to `line.json` in the tune folder."""

    def __init__(self, settings: list[dict], ws: list[float], probe: float, rungs: list[int], tune_dir: str, reference: str,
                 metric: str = "fid", mode: str = "min"):
        super().__init__(metric=metric, mode=mode)
        self.settings, self.ws, self.probe, self.rungs = settings, sorted(set(ws) | {0.0, probe}), probe, rungs
        self.tune_dir, self.reference = tune_dir, reference
        self.measured: dict[str, float] = {}  # first-rung FID by trial key
        self.asked: list[str] = []
        self.live: dict[str, str] = {}  # Tune trial id → trial key ("confirm" trials: "")
        self.confirm: list[dict] | None = None

    @staticmethod
    def trials_needed(settings: int) -> int:
        return 2 * settings + 2

    def _probes(self) -> list[dict]:
        return [{W: w, **setting, FIDELITY: 1} for setting in self.settings for w in (0.0, self.probe)]

    def suggest(self, trial_id: str):
        if self.confirm is None and len(self.measured) == 2 * len(self.settings) and not self.live:
            self.confirm = self._confirm_trials()
        if self.confirm is not None:
            if not self.confirm:
                return None if self.live else Searcher.FINISHED
            self.live[trial_id] = ""
            return self.confirm.pop(0)
        for config in self._probes():
            key = trial_key(config)
            if key not in self.asked:
                self.asked.append(key)
                self.live[trial_id] = key
                return config
        return None  # waiting for the probes

    def _statistics(self, config: dict):
        from neon_ray import storage
        from neon_ray.fid.stats import Statistics

        from .trainable import stats_uri, trial_dir

        uri = stats_uri(trial_dir(self.tune_dir, trial_key(config)), self.rungs[0])
        return Statistics.from_bytes(storage.read_bytes(uri), uri)

    def predict(self) -> list[dict]:
        """Per sampler setting: the predicted FID at every w of the line (first rung's n), from the w = 0 and probe moments."""
        from neon_ray import storage
        from neon_ray.fid.stats import Statistics, along_line, frechet_distance

        reference = Statistics.from_bytes(storage.read_bytes(self.reference), self.reference)
        out = []
        for setting in self.settings:
            base, probe = ({W: w, **setting} for w in (0.0, self.probe))
            a, b = self._statistics(base), self._statistics(probe)
            curve = {w: frechet_distance(along_line(a, b, w / self.probe), reference) for w in self.ws}
            out.append({"setting": setting, "predicted": curve, "measured": {0.0: self.measured[trial_key(base)],
                                                                                self.probe: self.measured[trial_key(probe)]}})
        return out

    def _confirm_trials(self) -> list[dict]:
        lines = self.predict()
        best_fid, best_i, best_w = min((min((f, i, w) for w, f in line["predicted"].items() if w != 0)) for i, line in enumerate(lines))
        base_fid, base_i = min((line["measured"][0.0], i) for i, line in enumerate(lines))
        self._write(lines, best_i, best_w, base_i)
        top = len(self.rungs)
        out = [{W: float(best_w), **self.settings[best_i], FIDELITY: top}]
        if top > 1:  # the base at its best setting through every rung; with one rung it is scored already
            out.append({W: 0.0, **self.settings[base_i], FIDELITY: top})
        return out

    def _write(self, lines: list[dict], best_i: int, best_w: float, base_i: int) -> None:
        from neon_ray import storage

        def keyed(d: dict) -> dict:
            return {f"{w:.6g}": v for w, v in d.items()}

        storage.write_json_atomic(storage.join(self.tune_dir, "line.json"), {
            "probe": self.probe, "n": self.rungs[0], "pick": {W: best_w, **self.settings[best_i]},
            "base_pick": self.settings[base_i],
            "lines": [{"setting": ln["setting"], "predicted": keyed(ln["predicted"]), "measured": keyed(ln["measured"])} for ln in lines]})
        log.info("tune: the line search predicts w %.4g at %s (FID %.4g at n = %d); base best at %s",
                 best_w, self.settings[best_i] or "the scoring sampler", lines[best_i]["predicted"][best_w], self.rungs[0],
                 self.settings[base_i] or "the scoring sampler")

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        key = self.live.pop(trial_id, None)
        if not key:
            return
        if error or not result or self.metric not in result:
            self.asked.remove(key)  # asked again: the search cannot predict without it (Tune retried it already)
            return
        self.measured[key] = float(result[self.metric])

    def get_state(self) -> dict:
        return {"settings": self.settings, "ws": self.ws, "probe": self.probe, "rungs": self.rungs, "tune_dir": self.tune_dir,
                "reference": self.reference, "measured": self.measured, "confirm": self.confirm}

    def set_state(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
        self.asked, self.live = list(self.measured), {}  # probes asked but never told are asked again


def line_points(w) -> tuple[list[float], float]:
    """(the w the line search predicts at, its default probe) for the searched w dimension."""
    if not w.is_range:
        ws = sorted(float(c) for c in w.choice)
        middle = (ws[0] + ws[-1]) / 2
        # A tie goes up: on the quickstart a probe short of the FID-best w predicted too small a w (docs/results.md).
        return ws, min(ws, key=lambda c: (abs(c - middle), -c))
    if w.scale == "log":
        ws = [w.low * (w.high / w.low) ** (i / 64) for i in range(65)]
        return ws, math.sqrt(w.low * w.high)
    return [w.low + (w.high - w.low) * i / 64 for i in range(65)], (w.low + w.high) / 2


class BaseArmASHA(ASHAScheduler):
    """ASHA that never stops a base-arm trial (w = 0): the base at every sampler setting is scored at every rung."""

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if float(trial.config.get(W, 1.0)) == 0.0 and action == TrialScheduler.STOP and result.get("training_iteration", 0) < self._max_t:
            return TrialScheduler.CONTINUE
        return action


def make_search(cfg: RunConfig, prior: tuple[float, float] | None = None, tune_dir: str | None = None) -> tuple[object | None, dict, int]:
    """(search_alg or None for the grid, param_space, num_samples) for `tune.search`. `prior`: a w bracket (the
    diagnosis's, already clipped to the allowed w) the bracket searcher searches instead of the configured range and
    Optuna evaluates first (its ends and middle, within the configured range); the grid and line searchers ignore it.
    `tune_dir`: where the trials' folders are (the line searcher reads its probes' statistics there)."""
    t = cfg.tune
    rungs = len(cfg.search_rungs())
    if t.search == "grid":
        return None, grid_space(cfg), 1
    w = t.w_dimension()
    if t.search == "optuna":
        from optuna.samplers import TPESampler  # present: the config check (tune.search) ran at load
        from ray.tune.search.optuna import OptunaSearch

        startup = max(3, min(10, t.num_trials // 3))  # random trials before TPE models the space
        sampler = TPESampler(seed=cfg.seed, n_startup_trials=startup)
        points = prior_points(cfg, prior) if prior else None
        return (OptunaSearch(space=OptunaSpace(cfg), metric="fid", mode="min", sampler=sampler, points_to_evaluate=points), {},
                t.num_trials)
    settings = choice_settings(cfg)
    if t.search == "line":
        ws, probe = line_points(w)
        probe = t.line_probe or probe
        search = LineSearch(settings, ws, probe, cfg.search_rungs(), tune_dir, reference_uri(cfg))
        return search, {}, LineSearch.trials_needed(len(settings))
    with_base = searches_base(t)
    low, high = prior or (w.low, w.high)
    search = BracketSearch(settings, low, high, t.bracket_steps, rungs, log=w.scale == "log", with_base=with_base)
    return search, {}, BracketSearch.trials_needed(len(settings), t.bracket_steps, with_base)


def prior_points(cfg: RunConfig, prior: tuple[float, float]) -> list[dict]:
    """Optuna's first trials: the prior bracket's ends and middle, as points of the Neon arm inside the configured w range."""
    from .spaces import ARM

    w = cfg.tune.w_dimension()
    lo, hi = (w.low, w.high) if w.is_range else (min(w.choice), max(w.choice))
    points = []
    for x in (prior[0], (prior[0] + prior[1]) / 2, prior[1]):
        x = min(max(float(x), lo), hi)
        if w.is_range and x not in [p[W] for p in points]:
            points.append({W: x})
        elif not w.is_range:  # a choice list: the nearest choice
            x = float(min(w.choice, key=lambda c: abs(float(c) - x)))
            if x not in [p[W] for p in points]:
                points.append({W: x})
    return [({ARM: "neon"} if searches_base(cfg.tune) else {}) | p for p in points]


def make_scheduler(cfg: RunConfig):
    t = cfg.tune
    if t.scheduler != "asha":
        return None
    return BaseArmASHA(time_attr="training_iteration", max_t=len(cfg.search_rungs()), grace_period=1,
                       reduction_factor=t.reduction_factor)
