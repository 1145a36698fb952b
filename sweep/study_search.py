"""The sweep's searcher: Ray's OptunaSearch with its study in real storage, kept true
across resumes and moves (sweep/study.py says why). Apart from study.py because importing
Ray Tune is slow: only a sweep that builds or restores its Tuner imports it."""

from __future__ import annotations

import pickle

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from sweep.space import model_params
from sweep.stored_study import (
    OVER_BUDGET,
    STUDY_FILE,
    directions_of,
    located,
    open_study,
    outcome,
)


class StudySearch(OptunaSearch):
    """Ray's OptunaSearch with its study in real storage, kept true across resumes, and
    every trial's parameters the config that trains: none over `max_params` is run.

    What Tune pickles (tuner.pkl at the start, searcher-state-*.pkl with each snapshot) is
    the study's trials themselves and the URL the study had then, never a live handle on
    its storage: the experiment may be resumed from another place (moved, copied, on
    object storage from a driver with an empty cache). The handle is made again on first
    use, at the place this driver's run.py found for it (stored_study.py)."""

    def __init__(self, *args, max_params: int | None = None, own_file: bool = False,
                 **kwargs) -> None:
        """`own_file`: the study is the experiment's own file, found wherever the
        experiment is on a resume; otherwise its storage URL is kept as given."""
        self._max_params = max_params
        super().__init__(*args, **kwargs)
        self._url = self._storage.url  # where the study was when this searcher last had it
        self._own_file = own_file
        self._study_trials: list[optuna.trial.FrozenTrial] = []

    # --- pickling: the study's trials, not its storage ----------------------------------

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if self._ot_study is None:  # unpickled and not used since: already in this form
            return state
        state["_study_trials"] = self._ot_study.get_trials(deepcopy=False)
        state["_ot_trials"] = {trial_id: trial.number
                               for trial_id, trial in self._ot_trials.items()}
        state["_storage"] = state["_ot_study"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        if state.get("_ot_study") is not None:  # pickled by a sweep begun before this form
            url = state["_storage"].url
            state = {**state, "_url": url, "_own_file": url.endswith(f"/{STUDY_FILE}"),
                     "_study_trials": [],
                     "_ot_trials": {trial_id: trial._cached_frozen_trial.number
                                    for trial_id, trial in state["_ot_trials"].items()},
                     "_storage": None, "_ot_study": None}
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__getstate__(), f)

    def _attach(self) -> None:
        """The study at its place for this driver, rebuilt from the pickled trials if that
        storage lacks it; the pickled trials become Optuna trials on it again."""
        url = located(self._url, self._own_file)
        found = open_study(url, self._study_name, directions_of(self._mode),
                           self._sampler, self._study_trials)
        ids = {t.number: t._trial_id for t in found.get_trials(deepcopy=False)}
        self._ot_study, self._storage, self._url = found, found._storage, url
        self._ot_trials = {trial_id: optuna.trial.Trial(found, ids[number])
                           for trial_id, number in self._ot_trials.items()}

    # --- Tune's calls ---------------------------------------------------------------------

    def suggest(self, trial_id: str) -> dict | None:
        """Optuna's next suggestion within the parameter budget. One over it is told to
        Optuna as PRUNED with status OVER_BUDGET and never run. Every trial carries the
        constraint `params_over_budget` (its parameters minus the budget; > 0: infeasible),
        which TPE reads to rank refused points below every feasible one and draw fewer.
        Shrinking it instead would credit Optuna's point with another model's result."""
        if self._ot_study is None:
            self._attach()
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
        if self._ot_study is None:
            self._attach()
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if trial_id in self._completed_trials:
            return
        if self._ot_study is None:
            self._attach()
        state, values = outcome(result, self.metric, error)
        trial = self._ot_trials[trial_id]
        if result and result.get("status"):
            trial.set_user_attr("status", result["status"])
        # skip_if_finished: a trial is told once, whatever a resume replays.
        self._ot_study.tell(trial, values, state=state, skip_if_finished=True)
        self._completed_trials.add(trial_id)

    def restore(self, checkpoint_path: str) -> None:
        """Tune's last snapshot of the searcher, on the study at its place now (rebuilt
        from the snapshot where that storage lacks it), reconciled with the storage, which
        may be ahead of the snapshot after a killed driver:
        - a trial asked for after the snapshot is unknown to the resumed Tune, which never
          runs it: it would stay RUNNING forever; it is marked FAIL;
        - a trial told after the snapshot is one the snapshot still shows running: Tune
          runs it again from its last checkpoint, and telling it again would raise
          (UpdateFinishedTrialError for its results); it counts as told."""
        with open(checkpoint_path, "rb") as f:
            self.__setstate__(pickle.load(f))
        self._attach()
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
