"""The sweep's Optuna study, kept in real Optuna storage while the sweep runs, so that
optuna-dashboard (or `optuna.load_study`) can read it live and after the end.

By default an SQLite file in the experiment directory (it moves with the experiment on
`--fresh`); `--study-storage URL` names an Optuna RDB storage instead (PostgreSQL, MySQL),
e.g. where the experiment directory is on NFS, which SQLite's locking does not trust.
The study is named after the experiment (`--name`).

Tune pickles the searcher with each experiment snapshot and gives it back on a resume;
it pickles the study's trials, not a handle on its storage (sweep/study_search.py). So an
experiment is a whole that can be moved, copied or resumed from another machine: the
default study file is found in the experiment wherever it is now, and where it is missing
(object storage resumed from a driver with an empty cache) the study is rebuilt from the
snapshot. A `--study-storage` URL is never rewritten. After a killed driver the snapshot
lags the storage, which Optuna writes at once; `StudySearch.restore` reconciles the two,
so that the stored study stays true: no trial stays RUNNING forever, none is told twice.
"""

from __future__ import annotations

import pickle
import shlex
import sqlite3
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from sweep import stored_study
from sweep.stored_study import (
    STUDY_FILE,
    StudyError,
    directions_of,
    open_storage,
    open_study,
    rebuild_fix,
    shown,
    where,
)

LOCK_WAIT_S = 10  # how long a resume waits for another process's write lock on the file
SNAPSHOTS = "searcher-state-*.pkl"  # Tune's snapshots of the searcher, in the experiment


def __getattr__(name: str):
    """`study.StudySearch`, the class path under which sweeps begun before it moved to
    sweep/study_search.py pickled their searcher: their tuner.pkl still unpickles. Imported
    on first use: it subclasses Ray's OptunaSearch, whose import (all of Ray Tune) costs
    about 1.4 s that `run.py --help` or a bad flag need not pay."""
    if name == "StudySearch":
        from sweep.study_search import StudySearch

        return StudySearch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def dashboard_command(url: str) -> str:
    return f"optuna-dashboard {shlex.quote(shown(url))}"


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


def check_sqlite_file(url: str, name: str) -> None:
    """An SQLite study file that another process holds a write lock on (sqlite3 would
    give up after 5 s in the middle of the sweep), or that is not a database: a
    StudyError naming the file and the fix, the file untouched."""
    if not url.startswith("sqlite:///"):
        return
    file = Path(url.removeprefix("sqlite:///"))
    if not file.exists():
        return
    db = sqlite3.connect(f"file:{file}?mode=rw", uri=True, timeout=LOCK_WAIT_S)
    try:
        db.execute("PRAGMA schema_version")  # reads the header: a damaged file fails here
        db.execute("BEGIN IMMEDIATE")  # the write lock Optuna will need
        db.rollback()
    except sqlite3.OperationalError as e:
        if "locked" not in str(e):
            raise StudyError(f"{where(url)}: cannot open it ({e})") from None
        raise StudyError(f"{where(url)}: another process holds a write lock on the study "
                         f"(waited {LOCK_WAIT_S} s); stop it (fuser {shlex.quote(str(file))}"
                         " names it) and run the same command again") from None
    except sqlite3.DatabaseError as e:
        raise StudyError(f"{where(url)}: damaged, not an SQLite database ({e}); "
                         f"{rebuild_fix(url, name)}") from None
    finally:
        db.close()


def last_snapshot(experiment_uri: str) -> dict | None:
    """The searcher's state in the experiment's newest snapshot (Tune names them by the
    driver's start time); None before the first one, or for a snapshot pickled before
    the study's trials were in it."""
    from sweep import storage

    names = storage.names(experiment_uri, SNAPSHOTS)
    if not names:
        return None
    location = storage.join(experiment_uri, names[-1])
    try:
        state = pickle.loads(storage.read_bytes(location))
    except Exception as e:  # noqa: BLE001 - pickle's errors, and the classes' own
        raise StudyError(storage.damaged_snapshot(location, SNAPSHOTS, experiment_uri, e)) from None
    return state if isinstance(state, dict) and "_study_trials" in state else None


def resume(c, url: str) -> None:
    """Before Ray starts, on a resume: the study's file usable (not locked, not damaged),
    the stored study the experiment's own, or rebuilt from the experiment's last snapshot
    where the storage lacks it."""
    check_sqlite_file(url, c.name)
    snapshot = last_snapshot(c.experiment_uri)
    if snapshot is None:  # killed before its first snapshot: made on first use
        open_storage(url).engine.dispose()
        return
    open_study(url, snapshot["_study_name"], directions_of(snapshot["_mode"]), None,
               snapshot["_study_trials"])


def url_of(c) -> str:
    """The study's storage URL for a sweep's config (config.py's SweepConfig)."""
    return c.study_storage or default_url(c.experiment)


def prepare(c, new: bool) -> str:
    """Open the study's storage before Ray starts (an unreachable database is found now),
    and for a new sweep make room for its study; returns the URL. The default file is the
    experiment's own: one left by an earlier sweep (object storage keeps the experiment
    elsewhere, so --fresh moves only that) is moved aside, as --fresh moves experiments."""
    url = url_of(c)
    stored_study.found_own_file(None if c.study_storage else url)
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
        resume(c, url)
    return url
