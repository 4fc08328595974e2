"""Search spaces over Neon's w and the family's sampler fields (`tune.space`), one form per searcher.

FID(w) is steep and U-shaped near its optimum and the best w moves with the guidance scale (our probe:
γ 1.0 → w 0, γ 1.5 → w 0.3, γ 2 → w 0.5), so w and the sampler are searched together. When sampler
fields are searched, the base (w = 0) is searched over the same fields in the same run, so the base at
its own best setting is a result of the search, not a side note. A trial's config is {"w": ..., <sampler
field>: ...} plus control keys (`arm`, `fidelity`) that are not sampler settings.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from neon_ray.config import RunConfig, SearchDimension, TuneConfig

W = "w"
ARM = "arm"  # optuna's categorical choice between the base arm (w = 0) and the Neon arm
FIDELITY = "fidelity"  # how many rungs a trial runs (the bracket searcher brackets on the first)
CONTROL = {ARM, FIDELITY}


def overrides_of(config: dict) -> dict[str, Any]:
    """The sampler fields a trial sets (everything but w and the control keys), in a stable order."""
    return {k: config[k] for k in sorted(config) if k != W and k not in CONTROL}


def settings_of(cfg: RunConfig, config: dict):
    """The typed sampler settings of a trial: the scoring sampler with the trial's searched fields."""
    from neon_ray.models import registry

    family = registry.get_family(cfg.model.family)
    return family.validate_sampler({**cfg.scoring_sampler().model_dump(), **overrides_of(config)}, field="tune.space")


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def trial_key(config: dict) -> str:
    """A trial's folder name: `w=0.5`, or `w=0.5,guidance=2` when sampler fields are searched."""
    return ",".join(f"{k}={_fmt(v)}" for k, v in [(W, float(config[W]))] + list(overrides_of(config).items()))


def describe(config: dict) -> str:
    """A readable name for plots and MLflow: `w=0.5 guidance=2`."""
    return trial_key(config).replace(",", " ")


def searches_base(t: TuneConfig) -> bool:
    """The base is searched when sampler fields are; otherwise the evaluate stage has already scored it."""
    return bool(t.sampler_space())


def typed(value: Any, like: Any) -> Any:
    return int(round(value)) if isinstance(like, int) and not isinstance(like, bool) else value


def choice_settings(cfg: RunConfig) -> list[dict[str, Any]]:
    """Every combination of the searched sampler fields' choices (one empty setting when none is searched)."""
    space = cfg.tune.sampler_space()
    names = sorted(space)
    return [dict(zip(names, combo)) for combo in itertools.product(*(space[n].choice for n in names))]


def grid_space(cfg: RunConfig) -> dict:
    """Ray Tune's grid: every w (with w = 0 when the base is searched) × every sampler choice."""
    from ray import tune

    ws = [float(w) for w in cfg.tune.w_dimension().choice]
    if searches_base(cfg.tune) and 0.0 not in ws:
        ws = [0.0] + ws
    space = {W: tune.grid_search(ws)}
    scoring = cfg.scoring_sampler().model_dump()
    for name, dim in cfg.tune.sampler_space().items():
        space[name] = tune.grid_search([typed(v, scoring[name]) for v in dim.choice])
    return space


def _suggest(trial, name: str, dim: SearchDimension, like: Any):
    if not dim.is_range:
        return trial.suggest_categorical(name, list(dim.choice))
    if isinstance(like, int) and not isinstance(like, bool):
        return trial.suggest_int(name, math.ceil(dim.low), math.floor(dim.high), log=dim.scale == "log")
    return trial.suggest_float(name, dim.low, dim.high, log=dim.scale == "log")


class OptunaSpace:
    """A define-by-run space for Optuna's TPE: the sampler fields, then the arm (base or Neon), then w for Neon.

    One study holds both arms, so TPE spends trials where FID is low in either; the base arm has no w. A class,
    not a closure: OptunaSearch pickles its space with the experiment's state."""

    def __init__(self, cfg: RunConfig):
        t = cfg.tune
        scoring = cfg.scoring_sampler().model_dump()
        self.sampler_dims = {name: (dim, scoring[name]) for name, dim in sorted(t.sampler_space().items())}
        self.w_dim = t.w_dimension()
        self.with_base = searches_base(t)

    def __call__(self, trial) -> dict[str, Any] | None:
        for name, (dim, like) in self.sampler_dims.items():
            _suggest(trial, name, dim, like)
        if self.with_base and trial.suggest_categorical(ARM, ["base", "neon"]) == "base":
            return {W: 0.0}
        _suggest(trial, W, self.w_dim, 0.0)
        return None
