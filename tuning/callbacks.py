"""Ray Tune callback that logs each trial to MLflow as it reports (on the driver, through neon_ray.tracking)."""

from __future__ import annotations

from ray.tune import Callback


class MLflowTrials(Callback):
    """Each trial: an MLflow child run of the tune stage's run, named by its w, with its scores.

    Runs on the driver, so trials on any node are logged to the driver's tracking store. Tune saves
    its callbacks with the experiment state; the tracker (a live client) is not part of that state.
    """

    def __init__(self, tracker, parent_run: str | None):
        self.tracker, self.parent_run = tracker, parent_run
        self.runs: dict[str, str] = {}

    def __getstate__(self) -> dict:
        return {"tracker": None, "parent_run": None, "runs": {}}

    def _run_of(self, trial) -> str | None:
        if self.tracker is None or not self.tracker.enabled:
            return None
        if trial.trial_id not in self.runs:
            w = float(trial.config["w"])
            run = self.tracker.start_child(f"trial w={w:.4g}", parent=self.parent_run, tags={"stage": "tune-trial"})
            self.tracker.log_params(run, {"w": w})
            self.runs[trial.trial_id] = run
        return self.runs[trial.trial_id]

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run = self._run_of(trial)
        if run is not None:
            scores = {k: v for k, v in result.items() if k in ("fid", "precision", "recall", "fid_floor", "class_consistency", "n")}
            self.tracker.log_metrics(run, scores, step=int(result.get("training_iteration", 1)))

    def on_trial_complete(self, iteration, trials, trial, **info):
        if (run := self.runs.get(trial.trial_id)) is not None:
            self.tracker.end_child(run, ok=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        if (run := self._run_of(trial)) is not None:
            self.tracker.end_child(run, ok=False)
