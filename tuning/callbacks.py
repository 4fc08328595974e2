"""Ray Tune callback that logs each trial to MLflow as it reports (on the driver, through neon_ray.tracking)."""

from __future__ import annotations

from ray.tune import Callback


RUNG_SCORES = ("fid", "precision", "recall", "fid_floor", "class_consistency")


class MLflowTrials(Callback):
    """Each trial: an MLflow child run of the tune stage's run, named by its w and sampler fields and tagged with its
    key (`trial_key`, its folder's name), with its scores at every rung under keys that name the rung's sample count
    (`fid_n1000`, `precision_n1000`, ...): MLflow's comparison views then set trials side by side at equal n only.
    After the search the tune stage tags each run with its status, stop rung and whether it won
    (`Tracker.annotate_trials`).

    Runs on the driver, so trials on any node are logged to the driver's tracking store. Tune saves its
    callbacks with the experiment (and `Tuner.restore` brings them back), so the live tracker is not part of
    the callback's state: the tune stage `attach`es it for the duration of the search.
    """

    _tracker = None
    _parent_run: str | None = None

    @classmethod
    def attach(cls, tracker, parent_run: str | None) -> None:
        cls._tracker, cls._parent_run = tracker, parent_run

    def __init__(self):
        self.runs: dict[str, str] = {}

    def __getstate__(self) -> dict:
        return {"runs": {}}

    def _run_of(self, trial) -> str | None:
        tracker = type(self)._tracker
        if tracker is None or not tracker.enabled:
            return None
        if trial.trial_id not in self.runs:
            from .spaces import W, describe, overrides_of, trial_key

            # Tune keeps a trial's id through `Tuner.restore`: a resumed trial reopens the run it started
            # (its params logged again with the same values, which MLflow accepts), even a finished one: a trial
            # that completed after Tune last saved its experiment state is run again by the restored search.
            tags = {"stage": "tune-trial", "trial_id": trial.trial_id, "trial_key": trial_key(trial.config)}
            run = tracker.resume_child(f"trial {describe(trial.config)}", type(self)._parent_run, tags, key=("stage", "trial_id"),
                                       unfinished=False)
            tracker.log_params(run, {"w": float(trial.config[W]), **{f"sampler.{k}": v for k, v in overrides_of(trial.config).items()}})
            self.runs[trial.trial_id] = run
        return self.runs[trial.trial_id]

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run = self._run_of(trial)
        if run is not None and "n" in result:
            n = int(result["n"])
            scores = {f"{k}_n{n}": v for k, v in result.items() if k in RUNG_SCORES}
            type(self)._tracker.log_metrics(run, scores | {"n": n}, step=n)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if (run := self.runs.get(trial.trial_id)) is not None and type(self)._tracker is not None:
            type(self)._tracker.end_child(run, ok=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        if (run := self._run_of(trial)) is not None:
            type(self)._tracker.end_child(run, ok=False)
