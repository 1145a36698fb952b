"""The sweep's study as Optuna stores it: the storage opened, the study opened (or made
again from an experiment's snapshot) and checked to be the experiment's own, and what
Optuna is told of a trial Tune ended. The driver (sweep/study.py) and the searcher
(sweep/study_search.py) both use it; it imports neither, so they need not import each
other."""

from __future__ import annotations

import math
import shlex
from pathlib import Path

import optuna
from optuna.trial import TrialState

STUDY_FILE = "optuna-study.db"  # in the experiment directory, the default storage
# A suggestion whose model is over --max-params: told PRUNED with this status, never run.
OVER_BUDGET = "over budget: not run"
# A diverged trial's val_mse as Optuna is told it: the worst MSE a model can score (its
# predictions are clamped to [0, 1], as the targets are), so that the sampler ranks the
# point below every trial that trained. FAIL, which TPE ignores, never taught it that.
DIVERGED_VAL_MSE = 1.0

# The experiment's own study file, where this driver found it (set by `prepare`): a
# searcher that Tune unpickles names the place it had when it was pickled, which a moved
# experiment, or one resumed from object storage on another machine, no longer has.
_own_file_url: str | None = None


def found_own_file(url: str | None) -> None:
    """Where this driver found the experiment's own study file (None: the study is at a
    --study-storage URL); study.prepare says so before Tune unpickles a searcher."""
    global _own_file_url
    _own_file_url = url


class StudyError(Exception):
    """The study storage cannot be used: one line naming the URL and the fix."""


def shown(url: str) -> str:
    """The URL as printed: any password masked."""
    import sqlalchemy

    return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage at `url`, its tables created if new; a StudyError naming the
    URL if it cannot be opened (a server that does not answer, a missing driver, a bad
    password), before any trial starts."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our line says where the study is
    try:
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.RDBStorage(url)
    except Exception as e:  # noqa: BLE001 - SQLAlchemy's and the drivers' errors are many
        cause = e.__cause__ or e.__context__
        if isinstance(cause, ModuleNotFoundError):  # Optuna's ImportError hides the name
            reason = f"its database driver {cause.name} is not installed"
        else:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StudyError(f"--study-storage {shown(url)}: cannot open it ({reason}); give an "
                         "Optuna RDB URL that this machine can reach") from None


def outcome(result: dict | None, metric: str | list[str], error: bool
            ) -> tuple[TrialState, list[float] | None]:
    """Optuna's state and values for a trial Tune ended. Ray's OptunaSearch tells every
    ended trial COMPLETE, and Optuna refuses a NaN value (a config the model refused): the
    trial then stayed RUNNING in the storage; it is FAIL. A diverged trial is COMPLETE with
    val_mse DIVERGED_VAL_MSE (its status user attr says "diverged"). A trial that ended
    before its last epoch (ASHA, the time budget) is PRUNED: Optuna keeps its last reported
    val_mse as its value, and TPE ranks it below the trials that finished."""
    if error:
        return TrialState.FAIL, None
    if not result:  # stopped before its first result (Ray's choice too)
        return TrialState.PRUNED, None
    metrics = metric if isinstance(metric, list) else [metric]
    if result.get("status") == "diverged":
        result = {**result, "val_mse": DIVERGED_VAL_MSE}
    values = [result.get(m) for m in metrics]
    if any(v is None or not math.isfinite(v) for v in values):
        return TrialState.FAIL, None
    if result.get("status") not in ("finished", "diverged", "error"):
        return TrialState.PRUNED, None
    return TrialState.COMPLETE, values


def located(url: str, own_file: bool) -> str:
    """Where a searcher pickled with `url` finds its study now: the experiment's own file
    where this driver found it; a --study-storage URL as it is."""
    return _own_file_url if own_file and _own_file_url else url


def directions_of(modes: str | list[str]) -> list[str]:
    modes = modes if isinstance(modes, list) else [modes]
    return ["minimize" if m == "min" else "maximize" for m in modes]


def open_study(url: str, name: str, directions: list[str], sampler,
               snapshot: list[optuna.trial.FrozenTrial]) -> optuna.Study:
    """The study `name` at `url`; where that storage lacks it (object storage resumed from
    a driver with an empty cache, a study file moved aside), made again from the trials of
    the experiment's last snapshot, numbers and all. A StudyError if the stored study is
    not the one the snapshot knows."""
    storage = open_storage(url)
    pruner = optuna.pruners.NopPruner()  # ASHA stops trials, as Ray's OptunaSearch has it
    try:
        found = optuna.load_study(study_name=name, storage=storage, sampler=sampler,
                                  pruner=pruner)
    except KeyError:  # no such study here
        found = optuna.create_study(storage=storage, study_name=name, sampler=sampler,
                                    pruner=pruner, directions=directions)
        for trial in snapshot:
            found.add_trial(trial)
        print(f"study: {name!r} rebuilt in {shown(url)} from the experiment's last "
              f"snapshot ({len(snapshot)} trials)")
        return found
    check_same_study(url, name, found, snapshot)
    return found


def check_same_study(url: str, name: str, found: optuna.Study,
                     snapshot: list[optuna.trial.FrozenTrial]) -> None:
    """The stored study may be ahead of the snapshot (Optuna writes at once, Tune
    snapshots every 2 s), never different: each trial the snapshot knows begun is there
    under its number, begun at the same instant with the same parameters."""
    stored = {t.number: t for t in found.get_trials(deepcopy=False)}
    for trial in snapshot:
        if trial.datetime_start is None:  # queued (the start point), not yet asked for
            continue
        mine = stored.get(trial.number)
        if mine is None or (mine.datetime_start, mine.params) != (trial.datetime_start,
                                                                    trial.params):
            raise StudyError(f"{where(url)} holds a study named {name!r} that is not this "
                             f"experiment's (its trial {trial.number} differs from the "
                             f"experiment's last snapshot); {rebuild_fix(url, name)}")


def where(url: str) -> str:
    """The study's storage as a message names it: the file, or the --study-storage URL."""
    if url == _own_file_url:
        return url.removeprefix("sqlite:///")
    return f"--study-storage {shown(url)}"


def rebuild_fix(url: str, name: str) -> str:
    """How to get a study rebuilt from the experiment: move the file aside (kept), or
    delete the study from a shared database."""
    if url == _own_file_url:
        file = url.removeprefix("sqlite:///")
        return (f"move it aside (mv {shlex.quote(file)} {shlex.quote(file)}.old) and run "
                "the same command: the study is rebuilt from the experiment")
    return (f"give the URL this sweep began with, or delete that study (optuna delete-study "
            f"--study-name {name} --storage {shlex.quote(shown(url))}) and run the same "
            "command: it is rebuilt from the experiment")
