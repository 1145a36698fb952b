"""The sweep's Optuna study, kept in real Optuna storage while the sweep runs, so that
optuna-dashboard (or `optuna.load_study`) can read it live and after the end.

By default an SQLite file in the experiment directory (it moves with the experiment on
`--fresh`); `--study-storage URL` names an Optuna RDB storage instead (PostgreSQL, MySQL),
e.g. where the experiment directory is on NFS, which SQLite's locking does not trust.
The study is named after the experiment (`--name`).

Tune pickles the searcher, study handle included, with each experiment snapshot and gives
it back on a resume. After a killed driver that snapshot lags the storage, which Optuna
writes at once; `StudySearch.restore` reconciles the two, so that the stored study stays
true: no trial stays RUNNING forever, none is told twice.
"""

from __future__ import annotations

import math
import shlex
import time
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


def __getattr__(name: str):
    """`study.StudySearch` on first use: it subclasses Ray's OptunaSearch, whose import
    (all of Ray Tune) costs about 1.4 s that `run.py --help` or a bad flag need not pay."""
    if name == "StudySearch":
        from sweep.study_search import StudySearch

        return StudySearch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class StudyError(Exception):
    """The study storage cannot be used: one line naming the URL and the fix."""


def default_url(experiment: Path) -> str:
    return f"sqlite:///{experiment.resolve() / STUDY_FILE}"


def check_url(text: str) -> str:
    """An argparse type for --study-storage: an RDB URL Optuna (SQLAlchemy) can parse."""
    import argparse

    import sqlalchemy

    try:
        sqlalchemy.engine.make_url(text)
    except sqlalchemy.exc.ArgumentError:
        raise argparse.ArgumentTypeError(
            f"expected a database URL such as postgresql://user@host/db or "
            f"sqlite:////abs/path.db, got {text!r}") from None
    return text


def shown(url: str) -> str:
    """The URL as printed: any password masked."""
    import sqlalchemy

    return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)


def dashboard_command(url: str) -> str:
    return f"optuna-dashboard {shlex.quote(shown(url))}"


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


def check_new_study(url: str, name: str) -> None:
    """A new sweep needs its study name free in the storage. A study with no trial run is
    what a driver killed during start-up leaves: it goes. One with trials belongs to
    another sweep: refused, as Optuna would otherwise continue it."""
    storage = open_storage(url)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
        ran = [t for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING]
        if not ran:
            optuna.delete_study(study_name=name, storage=storage)
            return
    except KeyError:  # no such study: the usual case
        return
    finally:
        storage.engine.dispose()
    raise StudyError(f"--study-storage {shown(url)} already holds a study named {name!r} "
                     f"with {len(ran)} trials; use another --name, or delete it: "
                     f"optuna delete-study --study-name {name} --storage "
                     f"{shlex.quote(shown(url))}")


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


def close_study(url: str, name: str) -> None:
    """At a sweep's end: trials Tune stopped without telling the searcher (the time budget
    ran out) are PRUNED, not left RUNNING."""
    storage = open_storage(url)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study._storage.set_trial_user_attr(trial._trial_id, "status", "stopped early")
            study.tell(trial.number, state=TrialState.PRUNED)
    finally:
        storage.engine.dispose()


def url_of(c) -> str:
    """The study's storage URL for a sweep's config (run.py's SweepConfig)."""
    return c.study_storage or default_url(c.experiment)


def prepare(c, new: bool) -> str:
    """Open the study's storage before Ray starts (an unreachable database is found now),
    and for a new sweep make room for its study; returns the URL. The default file is the
    experiment's own: one left by an earlier sweep (object storage keeps the experiment
    elsewhere, so --fresh moves only that) is moved aside, as --fresh moves experiments."""
    url = url_of(c)
    if new and not c.study_storage:
        file = Path(url.removeprefix("sqlite:///"))
        try:
            check_new_study(url, c.name)
        except StudyError:
            aside = file.with_name(f"{file.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            file.rename(aside)
            print(f"study: {file} held an earlier sweep's study; moved aside to {aside.name}")
    elif new:
        check_new_study(url, c.name)
    else:
        open_storage(url).engine.dispose()
    return url
