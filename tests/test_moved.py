"""An experiment is a whole, with its study: moved or copied after a killed driver, it
finishes at its new place; a study file that is locked, damaged or another sweep's is
refused in one line and kept as it is."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
from test_faults import Driver
from test_study import TINY, check_study_matches_report

from sweep import evaluate, run, study
from sweep import report as report_cli

# One xdist worker runs this module (`make test` runs two at once): its `killed_sweep`
# fixture, a module's worth of set-up, then runs once.
pytestmark = pytest.mark.xdist_group("test_moved")


@pytest.fixture(scope="module")
def killed_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A tiny sweep whose driver was SIGKILLed the instant its first trial ended (the
    others mid-way): (its storage folder, the flags but --storage). Tests copy it."""
    tmp = tmp_path_factory.mktemp("killed")
    argv = ["--report", str(tmp / "report.csv"), *TINY, "--trials", "3", "--no-early-stop"]
    driver = Driver(["--storage", str(tmp / "runs"), *argv], kill_on=r" ended \(")
    driver.wait()
    assert driver.killed_at, driver.output[-3000:]
    return tmp / "runs", argv


def copy_of(killed_sweep, to: Path) -> tuple[Path, list[str]]:
    """The killed sweep copied to `to` (its storage folder); the command that resumes it."""
    runs, argv = killed_sweep
    shutil.copytree(runs, to, symlinks=True)
    return to / "sweep", ["--storage", str(to), *argv]


def finished_from(experiment: Path, argv: list[str], output: str) -> pd.DataFrame:
    """The report of a resumed sweep that ended, checked whole: every trial finished, its
    checkpoint at the experiment's place, the study in the experiment's own file true."""
    assert f"resuming the sweep in {experiment}" in output
    report = pd.read_csv(argv[argv.index("--report") + 1])
    assert len(report) == 3 and (report["status"] == "finished").all(), report
    check_study_matches_report(study.default_url(experiment), report)
    for row in report.itertuples():
        assert row.checkpoint.startswith(f"{experiment}/trial_{row.trial_id}/checkpoint_")
        assert Path(row.checkpoint).exists()
    return report


def test_an_experiment_moved_after_a_kill_finishes_from_its_new_place(killed_sweep,
                                                                       tmp_path):
    """The experiment is moved (another disk, a renamed runs/) and the same sweep resumed
    with --storage at the new place: it finishes there, report.py and evaluate.py work on
    it. Before: sqlalchemy's traceback, unable to open database file (the searcher's
    snapshot named the old path); then Tune started new trials at the old place."""
    moved = tmp_path / "bigger-disk" / "sweeps"
    experiment, argv = copy_of(killed_sweep, tmp_path / "runs")
    moved.parent.mkdir()
    shutil.move(tmp_path / "runs", moved)
    experiment = moved / "sweep"
    driver = Driver(argv[:1] + [str(moved)] + argv[2:])
    assert driver.wait() == 0, driver.output[-3000:]
    report = finished_from(experiment, argv, driver.output)
    assert not (tmp_path / "runs").exists()  # nothing went back to the old place

    rebuilt = tmp_path / "rebuilt.csv"
    assert report_cli.main([str(experiment), "--out", str(rebuilt)]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(rebuilt), report)
    best = report.sort_values("val_mse").iloc[0]
    assert evaluate.main([best.checkpoint, "--pairs", "50", "--threads", "1"]) == 0


def refused(argv: list[str], capsys) -> str:
    """run.py's one line for a study it cannot resume: exit 2, no traceback."""
    capsys.readouterr()  # what came before (Optuna's line for the study a test made)
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_a_locked_damaged_or_foreign_study_file_is_refused_in_one_line_and_kept(
        killed_sweep, tmp_path, capsys, monkeypatch):
    """Each resume refused before Ray starts, naming the file and the fix; the file and
    the experiment as they were. Following the fix for a damaged file (move it aside),
    the same command rebuilds the study from the experiment and finishes the sweep."""
    experiment, argv = copy_of(killed_sweep, tmp_path / "runs")
    file = experiment / study.STUDY_FILE
    files = sorted(p.name for p in experiment.iterdir())

    # Locked: another process holds SQLite's write lock (sqlite3 would give up after 5 s,
    # in the middle of the sweep).
    monkeypatch.setattr(study, "LOCK_WAIT_S", 1)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys; db = sqlite3.connect(sys.argv[1]); "
         "db.execute('BEGIN IMMEDIATE'); print('locked', flush=True); sys.stdin.read()",
         str(file)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = file.read_bytes()
        err = refused(argv, capsys)
        assert f"{file}: another process holds a write lock on the study (waited 1 s); " \
               f"stop it (fuser {file} names it) and run the same command again" in err
        assert file.read_bytes() == before
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)

    # Another sweep's study under the same name.
    file.rename(tmp_path / "ours.db")
    other = optuna.create_study(study_name="sweep", storage=f"sqlite:///{file}")
    other.add_trial(optuna.trial.create_trial(value=1.0, params={"lr": 0.1}, distributions={
        "lr": optuna.distributions.FloatDistribution(1e-5, 1)}))
    before = file.read_bytes()
    err = refused(argv, capsys)
    assert f"{file} holds a study named 'sweep' that is not this experiment's (its trial " \
           f"0 differs from the experiment's last snapshot); move it aside (mv {file} " \
           f"{file}.old) and run the same command: the study is rebuilt from the " \
           "experiment" in err
    assert file.read_bytes() == before

    # Damaged: not a database at all.
    file.write_bytes(b"not a database\n" * 100)
    err = refused(argv, capsys)
    assert f"{file}: damaged, not an SQLite database (file is not a database); move it " \
           f"aside (mv {file} {file}.old)" in err
    assert file.read_bytes() == b"not a database\n" * 100
    assert sorted(p.name for p in experiment.iterdir()) == files  # nothing moved or made

    # The fix: moved aside, the study is rebuilt from the experiment's last snapshot.
    file.rename(file.with_name(f"{file.name}.old"))
    driver = Driver(argv)
    assert driver.wait() == 0, driver.output[-3000:]
    assert "study: 'sweep' rebuilt in sqlite:///" in driver.output
    finished_from(experiment, argv, driver.output)
