"""The sweep's searcher: Ray's OptunaSearch with its study in real storage, kept true
across resumes (sweep/study.py says why). Apart from study.py because importing Ray Tune
is slow; `study.StudySearch` imports it on first use."""

from __future__ import annotations

from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from sweep.space import model_params
from sweep.study import OVER_BUDGET, outcome


class StudySearch(OptunaSearch):
    """Ray's OptunaSearch with its study in real storage, kept true across resumes, and
    every trial's parameters the config that trains: none over `max_params` is run."""

    def __init__(self, *args, max_params: int | None = None, **kwargs) -> None:
        self._max_params = max_params
        super().__init__(*args, **kwargs)

    def suggest(self, trial_id: str) -> dict | None:
        """Optuna's next suggestion within the parameter budget. One over it is told to
        Optuna as PRUNED with status OVER_BUDGET and never run. Every trial carries the
        constraint `params_over_budget` (its parameters minus the budget; > 0: infeasible),
        which TPE reads to rank refused points below every feasible one and draw fewer.
        Shrinking it instead would credit Optuna's point with another model's result."""
        while True:
            params = super().suggest(trial_id)
            trial = self._ot_trials.get(trial_id)
            if params is None or trial is None or "trial_id" in trial.user_attrs:
                return params  # a point this trial was given before (Tune asks again)
            budget = getattr(self, "_max_params", None)  # unpickled from before it was kept
            if budget is not None:
                over = model_params(params) - budget
                trial.set_constraint("params_over_budget", over)
            if budget is None or over <= 0:
                trial.set_user_attr("trial_id", trial_id)  # the report's id, in the dashboard
                return params
            trial.set_user_attr("status", OVER_BUDGET)
            self._ot_study.tell(trial, state=TrialState.PRUNED)
            del self._ot_trials[trial_id]

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._completed_trials:  # told before the driver was killed
            return
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if trial_id in self._completed_trials:
            return
        state, values = outcome(result, self.metric, error)
        trial = self._ot_trials[trial_id]
        if result and result.get("status"):
            trial.set_user_attr("status", result["status"])
        # skip_if_finished: a trial is told once, whatever a resume replays.
        self._ot_study.tell(trial, values, state=state, skip_if_finished=True)
        self._completed_trials.add(trial_id)

    def restore(self, checkpoint_path: str) -> None:
        """Tune's last snapshot of the searcher, reconciled with the storage, which may be
        ahead of it after a killed driver:
        - a trial asked for after the snapshot is unknown to the resumed Tune, which never
          runs it: it would stay RUNNING forever; it is marked FAIL;
        - a trial told after the snapshot is one the snapshot still shows running: Tune
          runs it again from its last checkpoint, and telling it again would raise
          (UpdateFinishedTrialError for its results); it counts as told."""
        super().restore(checkpoint_path)
        known = {trial.number: trial_id for trial_id, trial in self._ot_trials.items()}
        for frozen in self._ot_study.get_trials(deepcopy=False):
            trial_id = known.get(frozen.number)
            if trial_id is None and frozen.state == TrialState.RUNNING:
                self._ot_study._storage.set_trial_user_attr(
                    frozen._trial_id, "status", "lost: suggested after the driver's last "
                    "snapshot, and the driver was killed")
                self._ot_study.tell(frozen.number, state=TrialState.FAIL)
            elif trial_id is not None and frozen.state.is_finished():
                self._completed_trials.add(trial_id)
