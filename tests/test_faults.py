"""Faults, bad input and load, each done for real: killed drivers and workers, damaged
checkpoints, trials that raise or diverge, a second driver, a full disk, open ports, and a
200-trial sweep. docs/faults.md, "What survives what", lists what each test shows."""

from __future__ import annotations

import csv
import functools
import json
import multiprocessing
import os
import pickle
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import matplotlib.image
import optuna
import pandas as pd
import pytest
import torch
from optuna.trial import TrialState
from test_study import check_study_matches_report, stored_trials
from test_sweep import REPO, every_trial_the_warm_start, results, sweep_args

from model.unet import ConfigError, params_of, preset
from sweep import cluster, config, run, trainable, tuner
from sweep import report as report_cli
from sweep.checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint, save_checkpoint
from sweep.device import FastPath, choose_fast_path
from sweep.experiment import (
    KEPT_TUNER_FILE,
    SNAPSHOT_FILES,
    TUNER_FILE,
    StateError,
    mend_tuner,
    set_aside_cut_snapshots,
    tell_study,
)
from sweep.files import atomic_write
from sweep.report import COLUMNS, METRICS, build_report
from sweep.space import SMALLEST
from sweep.space import space as real_space
from sweep.study import default_url
from sweep.train import TrainConfig, check_resumable, run_trial, split_config

RUN_PY = REPO / "sweep" / "run.py"


# --- helpers -------------------------------------------------------------------------------

def lines_of(experiment: Path, trial: str) -> list[dict]:
    return results(experiment).get(trial, [])


class Watcher(threading.Thread):
    """Runs `step` every 0.1 s beside an in-process sweep until it returns True; keeps
    its exception for the test to raise (an assert in a thread would go unseen)."""

    def __init__(self, step: Callable[[], bool], timeout: float = 240) -> None:
        super().__init__(daemon=True)
        self.step, self.deadline = step, time.monotonic() + timeout
        self.error: BaseException | None = None
        self.done = False

    def run(self) -> None:
        try:
            while time.monotonic() < self.deadline:
                if self.step():
                    self.done = True
                    return
                time.sleep(0.1)
            raise TimeoutError("the sweep never reached the state the test waits for")
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            self.error = e

    def check(self) -> None:
        self.join(timeout=5)
        if self.error is not None:
            raise self.error
        assert self.done


def ctrl_c_as_in_a_terminal() -> None:
    """SIGINT's default action, as a terminal's foreground job has it. Tests started from a
    background job (`make test &` in a script) inherit SIGINT ignored, and a Python started
    so never raises KeyboardInterrupt: the driver would sleep through the test's Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Driver:
    """`python sweep/run.py ARGV` in its own process, as a user runs it. A thread reads its
    output and can SIGKILL it (or send it `sig`) the instant a line matches `kill_on`, a
    pattern or a test of the line (no polling delay)."""

    def __init__(self, argv: list[str], kill_on: str | Callable[[str], bool] | None = None,
                 sig: signal.Signals = signal.SIGKILL, env: dict | None = None) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-u", str(RUN_PY), *argv], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, preexec_fn=ctrl_c_as_in_a_terminal)
        self.lines: list[str] = []
        self.kill_on = re.compile(kill_on).search if isinstance(kill_on, str) else kill_on
        self.sig = sig
        self.killed_at: str | None = None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if self.kill_on and self.killed_at is None and self.kill_on(line):
                self.proc.send_signal(self.sig)
                self.killed_at = line.strip()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_until(self, condition: Callable[[], bool], what: str, timeout: float = 180):
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None and self.killed_at is None:
                pytest.fail(f"the driver ended before {what}:\n{self.output[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"timed out waiting for {what}:\n{self.output[-3000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.reader.join(timeout=10)

    def wait(self, timeout: float = 300) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the driver did not end:\n{self.output[-3000:]}")
        self.reader.join(timeout=10)
        return code


# --- the driver killed at each point -----------------------------------------------------------

def write_forever(target: Path, versions: list[bytes]) -> None:
    for i in range(10**9):
        atomic_write(target, lambda f: f.write(versions[i % 2]))  # noqa: B023 - called now


def test_atomic_write_gives_files_the_mode_open_would(tmp_path):
    # Not mkstemp's 0600: a report on shared storage must be readable by the team.
    atomic_write(tmp_path / "report.csv", lambda f: f.write(b"x"))
    (tmp_path / "plain.csv").write_bytes(b"x")
    assert (tmp_path / "report.csv").stat().st_mode == (tmp_path / "plain.csv").stat().st_mode


def test_atomic_write_killed_at_any_instant_leaves_one_whole_version(tmp_path):
    """What the report and checkpoints rely on: a writer SIGKILLed at any instant leaves
    the file as one whole version, never a stub or a mix, and the temp file the dead
    writer left goes with the next write. (Writing in place, 4 MB at a time, a kill
    mid-write leaves a stub: this is the test that would catch it.)"""
    target = tmp_path / "report.csv"
    versions = [b"A" * 4_000_000, b"B" * 4_000_000]
    fork = multiprocessing.get_context("fork")  # a child without a new interpreter
    for delay in (0.02, 0.05, 0.08, 0.11, 0.14, 0.17, 0.2, 0.25):
        writer = fork.Process(target=write_forever, args=(target, versions))
        writer.start()
        time.sleep(delay)
        writer.kill()
        writer.join()
        if target.exists():
            assert target.read_bytes() in versions
    atomic_write(target, lambda f: f.write(b"last"))
    assert target.read_bytes() == b"last"
    assert [p.name for p in tmp_path.iterdir()] == ["report.csv"]  # no temp file left


STATUSES = {"finished", "stopped early", "diverged", "error", "running", "pending", "paused"}


def whole_or_absent(report: Path, trials: int) -> None:
    """What a SIGKILL may leave: the previous report or none, never a torn one. Whole: the
    header, every row with all its fields (a row cut short has fewer), a known status and
    numbers that parse (a number cut in two can still parse, a status seldom does), one
    row per trial and no more rows than trials; the plot a PNG that decodes whole."""
    if report.exists():
        with report.open(newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0] == COLUMNS, rows[0]
        assert all(len(row) == len(COLUMNS) for row in rows), rows
        df = pd.read_csv(report)
        assert 0 < len(df) <= trials and df["trial_id"].is_unique, df
        assert df["status"].isin(STATUSES).all(), df["status"]
        for column in METRICS:
            pd.to_numeric(df[column], errors="raise")
    png = report.with_name("pareto.png")
    if png.exists():
        data = png.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82")
        assert matplotlib.image.imread(png).size  # every chunk decodes


def finished_checkpoints(experiment: Path) -> dict[Path, bytes]:
    """Every checkpoint of a trial that finished, as bytes: a re-run would rewrite it (its
    train_seconds at least would differ)."""
    found = {}
    for path in experiment.glob("trial_*/checkpoint_*/checkpoint.pt"):
        if load_checkpoint(path)["metrics"]["status"] == "finished":
            found[path] = path.read_bytes()
    return found


def test_driver_killed_at_each_point_then_the_same_command_ends_the_sweep(tmp_path, capsys):
    """SIGKILL the driver during start-up, the instant it starts rewriting the report, and
    after the last trial but before the final report; each time the same command goes on.
    In the end every trial is in the report once, and in the stored Optuna study in the
    state the report gives it, and no epoch was trained twice. While a driver runs, a
    second one on the same experiment is refused and changes nothing."""
    experiment, report, trials = tmp_path / "runs" / "sweep", tmp_path / "report.csv", 3
    argv = sweep_args(tmp_path, "--trials", str(trials), "--max-epochs", "1",
                      "--test-pairs", "0")

    # 1. Start-up: Ray is up and the Tuner built, no trial started.
    driver = Driver(argv, kill_on=r"^new sweep in ")
    driver.wait()
    assert driver.killed_at, driver.output[-3000:]
    assert not any(results(experiment).values())

    # 2. A second driver is refused while one runs, with --fresh too, and moves nothing ...
    driver = Driver(argv, kill_on=r" ended \(")  # printed just before the report is rewritten
    lock = experiment.with_name(f".{experiment.name}.driver.lock")
    driver.wait_until(lambda: lock.exists() and lock.read_text() == str(driver.proc.pid),
                      "the driver's lock")
    for extra in ([], ["--fresh"]):
        assert run.main(argv + extra) == 2
        assert (f"another sweep is running on {experiment} (driver pid {driver.proc.pid})"
                in capsys.readouterr().err)
    assert not list(experiment.parent.glob("sweep.old-*"))  # --fresh moved nothing
    # ... and the driver is killed the instant it starts rewriting the report.
    driver.wait()
    assert driver.killed_at, driver.output[-3000:]
    whole_or_absent(report, trials)
    kept = finished_checkpoints(experiment)

    # 3. After the last trial has ended (and is in the report), before the final report.
    def all_in_report() -> bool:
        try:
            df = pd.read_csv(report)
        except (FileNotFoundError, pd.errors.EmptyDataError):
            return False
        return len(df) == trials and (df["status"] == "finished").all()

    driver = Driver(argv)
    driver.wait_until(all_in_report, "every trial's end in the report")
    driver.kill()
    assert "best: trial" not in driver.output, "too late: the final report was written"
    whole_or_absent(report, trials)
    kept.update(finished_checkpoints(experiment))

    # 4. The same command ends the sweep. A kill within a snapshot period of a trial's start
    # leaves its directory unknown to the snapshot (it happens by chance above; here for
    # sure): the resumed sweep moves it aside, whole, and never counts it. (A trial that
    # ended unknown to the snapshot is kept: the next test forces that race.)
    orphan = experiment / "trial_0a0a0a0a"
    orphan.mkdir()
    (orphan / "result.json").write_text('{"epoch": 1}\n')
    # And a kill while the resumed Tune copied tuner.pkl back with a snapshot cuts it short
    # (here for sure): it is put back from its kept copy. Ray Tune's traceback (EOFError) before.
    tuner_pkl = experiment / TUNER_FILE
    whole_tuner = tuner_pkl.read_bytes()
    tuner_pkl.write_bytes(whole_tuner[: len(whole_tuner) // 2])
    # And a kill while Tune wrote a snapshot leaves one of its files cut short (CI met an
    # empty searcher-state-*.pkl so, 2026-12-05; here for sure): that snapshot's files go
    # to lost/ and the sweep resumes from the snapshot before. A refusal before.
    searcher = max(experiment.glob("searcher-state-*.pkl"))
    searcher.write_bytes(b"")
    driver = Driver(argv)
    assert driver.wait() == 0, driver.output[-3000:]
    assert f"{tuner_pkl} was cut short by a kill: put back from {KEPT_TUNER_FILE}" \
        in driver.output
    assert f"{searcher} was cut short by a kill" in driver.output
    assert (experiment / "lost" / searcher.name.replace("searcher-state-", "snapshot-")
            .removesuffix(".pkl") / searcher.name).read_bytes() == b""
    assert tuner_pkl.read_bytes() == whole_tuner
    assert "resuming the sweep" in driver.output
    assert f"moved to {experiment / 'lost' / orphan.name}" in driver.output
    assert (experiment / "lost" / orphan.name / "result.json").read_text() == '{"epoch": 1}\n'
    # Whatever else a kill above left in lost/ by chance is a trial that never finished.
    for lost in (experiment / "lost").iterdir():
        assert not any(load_checkpoint(path)["metrics"]["status"] in ("finished", "diverged")
                       for path in lost.glob("checkpoint_*/checkpoint.pt")), lost
    df = pd.read_csv(report)
    lines = results(experiment)
    assert len(df) == trials and sorted(df["trial_id"]) == sorted(lines)
    assert (df["status"] == "finished").all(), df
    # Each row names its final checkpoint, also a trial re-reported from disk after a kill
    # (Tune's snapshot may know none of its checkpoints): evaluate.py's input.
    for row in df.itertuples():
        assert isinstance(row.checkpoint, str) and Path(row.checkpoint).is_file(), df
        assert load_checkpoint(Path(row.checkpoint))["epoch"] == row.epochs, df
    for trial, rows in lines.items():  # each epoch trained once: one train_seconds per epoch
        runs = {(r["epoch"], r["train_seconds"]) for r in rows}
        if not runs:  # ended after the last snapshot and kept (adopted) before the driver's
            # logger wrote its result: its finished checkpoint, kept byte for byte, is all
            assert any(path.parts[-3] == f"trial_{trial}" for path in kept), (trial, kept)
            continue
        assert len(runs) == 1, f"trial {trial} trained its epoch {len(runs)} times: {rows}"
    assert kept and all(path.read_bytes() == data for path, data in kept.items())
    assert not list(tmp_path.glob(".report.csv.*")) + list(tmp_path.glob(".pareto.png.*"))
    # The stored Optuna study too: each trial told once, none left RUNNING by a kill.
    check_study_matches_report(default_url(experiment), df)


def files_of(directory: Path) -> dict[str, bytes]:
    """Every file under a directory, by its path there, as bytes."""
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def snapshot_trials(experiment: Path) -> set[str]:
    """The ids of the trials Tune's newest experiment snapshot knows."""
    newest = max(experiment.glob("experiment_state-*.json"))
    return {json.loads(state)["trial_id"]
            for state, _ in json.loads(newest.read_text())["trial_data"]}


def test_a_trial_that_ended_after_the_last_snapshot_is_kept_and_never_trained_again(
        tmp_path, sources, capsys):
    """The race CI met by chance, forced. Tune snapshots the experiment once, as its first
    step ends (its period set to a day), when it knows at most the two trials that fit at
    once; the third is made, trains, ends and is told COMPLETE in the Optuna study unknown
    to any snapshot, and the driver is SIGKILLed the instant it ends (the second may still
    be training then, or not). The same command keeps that trial as the disk has it: in
    the report once, finished, its directory byte for byte, no trial trained in its place,
    the study as the report. A trial directory unknown to the snapshot that never finished
    (planted: a real checkpoint after the first of two epochs) goes to lost/, whole.
    Before, the finished trial went to lost/ too and another was trained in its place.
    Then each kind of snapshot file in turn is cut short: all that snapshot's files go to
    lost/, whole, and the one before is the newest."""
    experiment, report, trials = tmp_path / "runs" / "sweep", tmp_path / "report.csv", 3
    argv = sweep_args(tmp_path, "--trials", str(trials), "--max-epochs", "1",
                      "--test-pairs", "0", "--cpus", "2")
    # Killed as the first trial the snapshot does not know ends, whichever ends last: on a
    # loaded machine the second can outlast the third, and the snapshot knows it.
    def unknown_to_the_snapshot_ends(line: str) -> bool:
        ended = re.search(r"\| (\w+) ended \(finished\)$", line)
        return bool(ended) and ended.group(1) not in snapshot_trials(experiment)

    driver = Driver(argv, kill_on=unknown_to_the_snapshot_ends,
                    env={"TUNE_GLOBAL_CHECKPOINT_S": "86400"})
    driver.wait()
    assert driver.killed_at, driver.output[-3000:]
    last = driver.killed_at.rsplit("| ", 1)[1].split()[0]
    assert last not in snapshot_trials(experiment), "the snapshot knew it: no race forced"
    ended = experiment / f"trial_{last}"
    assert any(path.parent.parent == ended for path in finished_checkpoints(experiment))
    kept = files_of(ended)

    planted = experiment / "trial_0a0a0a0a"
    first_of_two = saved_checkpoint(sources, tmp_path / "planted")[0]
    assert load_checkpoint(first_of_two)["metrics"]["status"] == "running"
    (planted / "checkpoint_000000").mkdir(parents=True)
    shutil.copy(first_of_two, planted / "checkpoint_000000" / CHECKPOINT_FILE)
    planted_files = files_of(planted)

    driver = Driver(argv)
    assert driver.wait() == 0, driver.output[-3000:]
    assert f"trial_{last} ended (finished) after the driver's last snapshot" in driver.output
    assert f"moved to {experiment / 'lost' / planted.name}" in driver.output
    assert files_of(ended).items() >= kept.items()  # nothing of it changed or went
    assert [p.name for p in (experiment / "lost").iterdir()] == [planted.name]
    assert files_of(experiment / "lost" / planted.name) == planted_files

    df = pd.read_csv(report)
    whole_or_absent(report, trials)
    on_disk = sorted(p.name.removeprefix("trial_") for p in experiment.glob("trial_*"))
    assert len(df) == trials and sorted(df["trial_id"]) == on_disk, (df, on_disk)
    assert (df["status"] == "finished").all(), df
    row = df.set_index("trial_id").loc[last]
    assert Path(row.checkpoint).parent.parent == ended, row
    assert load_checkpoint(Path(row.checkpoint))["metrics"]["val_mse"] == row.val_mse
    for trial, rows in results(experiment).items():  # each epoch trained once
        assert len({(r["epoch"], r["train_seconds"]) for r in rows}) <= 1, (trial, rows)
    url = default_url(experiment)
    check_study_matches_report(url, df)
    assert len(stored_trials(url)) == trials  # none asked for in the finished one's place

    # A snapshot file cut short (a driver killed while Tune wrote it; CI met an empty
    # searcher-state-*.pkl so): all of that snapshot's files go to lost/, whole, and the
    # sweep resumes from the snapshot before. Ray Tune's traceback before; then a refusal
    # that left the move to the user. Checked in this process, on a copy per kind of file:
    # a driver resuming from the snapshot before is the driver-killed test's forced race.
    cut = [pattern for pattern in SNAPSHOT_FILES if list(experiment.glob(pattern))]
    assert len(cut) == 4, cut  # all but the basic variant generator's (--from's)
    for pattern in cut:
        copy = tmp_path / f"copy-{pattern.split('-')[0]}"
        shutil.copytree(experiment, copy)
        newest = max(copy.glob(pattern))
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
        stamp = re.search(r"-(\d{4}-\d\d-\d\d_[\d-]+)\.", newest.name).group(1)
        before = files_of(copy)
        assert set_aside_cut_snapshots(str(copy)) == [stamp]
        assert f"{newest} was cut short by a kill" in capsys.readouterr().out
        aside = copy / "lost" / f"snapshot-{stamp}"
        moved = {name: data for name, data in before.items() if f"-{stamp}." in name}
        assert len(moved) >= 3 and files_of(aside) == moved  # whole, the cut file as it was
        assert files_of(copy) == {**{k: v for k, v in before.items() if k not in moved},
                                  **{f"lost/snapshot-{stamp}/{k}": v for k, v in moved.items()}}
        assert max(copy.glob(pattern)).name < newest.name  # the one before is the newest now

    # Whole but damaged (a pickle naming a class that is not there): no kill did that, so
    # nothing is moved; refused in one line naming the file and the fix, nothing changed.
    # Refused before Ray starts, so checked in this process.
    newest = max(experiment.glob("searcher-state-*.pkl"))
    newest.write_bytes(b"\x80\x02cno_such_module\nThing\nq\x00)\x81q\x01.")
    before = files_of(experiment)
    assert run.main(argv) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith(
        f"error: {newest} is cut short or damaged (ModuleNotFoundError"), out + err
    assert "Move that snapshot's files" in err and files_of(experiment) == before


def test_a_cut_short_tuner_pkl_is_put_back_removed_or_refused(tmp_path, capsys):
    """tuner.pkl cut short by a kill: put back from its kept copy; without one and before
    any snapshot (killed while the Tuner was built), removed, so that the sweep begins
    anew; without one after a snapshot, refused in one line. A whole one is kept once."""
    experiment = str(tmp_path)
    tuner_pkl, kept = tmp_path / TUNER_FILE, tmp_path / KEPT_TUNER_FILE
    whole = pickle.dumps({"searcher": list(range(1000))})
    tuner_pkl.write_bytes(whole)
    mend_tuner(experiment)
    assert kept.read_bytes() == whole and capsys.readouterr().out == ""

    for cut in (b"", whole[:1], whole[: len(whole) // 2], whole[:-1]):
        tuner_pkl.write_bytes(cut)
        mend_tuner(experiment)
        assert tuner_pkl.read_bytes() == whole
        assert "cut short by a kill: put back" in capsys.readouterr().out

    kept.unlink()
    tuner_pkl.write_bytes(whole[:100])
    mend_tuner(experiment)
    assert not tuner_pkl.exists() and "beginning it anew" in capsys.readouterr().out

    (tmp_path / "experiment_state-2026-12-04_10-00-00.json").write_text("{}")
    tuner_pkl.write_bytes(b"")
    with pytest.raises(StateError, match="cut short or damaged and has no kept copy.*--fresh"):
        mend_tuner(experiment)
    assert tuner_pkl.read_bytes() == b""  # refused: nothing changed


def test_an_adopted_trial_the_killed_driver_never_told_is_told_as_it_ended(tmp_path):
    """The kill can fall between a trial's last checkpoint and its end reaching the driver:
    the trial is adopted from disk, and its Optuna trial, still RUNNING, is told as the
    searcher would have told it (else the resumed searcher, which does not know it, marks
    it FAIL as lost); one told already stays as it is."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    stored = optuna.create_study(study_name="sweep", storage=url)
    untold, told = stored.ask(), stored.ask()
    untold.set_user_attr("trial_id", "a")
    told.set_user_attr("trial_id", "b")
    stored.tell(told, 0.5)
    tell_study(url, "sweep", "val_mse", {"a": {"status": "finished", "val_mse": 0.25},
                                         "b": {"status": "finished", "val_mse": 0.75}})
    a, b = stored_trials(url)
    assert (a.state, a.values, a.user_attrs["status"]) == (TrialState.COMPLETE, [0.25],
                                                            "finished")
    assert (b.state, b.values) == (TrialState.COMPLETE, [0.5])


def test_ctrl_c_at_start_up_between_and_within_trials_then_the_same_command_goes_on(
        tmp_path):
    """Ctrl-C (SIGINT) the driver, or SIGTERM it as a batch scheduler does; each time it
    exits 130 (143 for SIGTERM) and the same command goes on. During start-up (a traceback
    before; SIGTERM, a silent death); the instant a trial ends, in a sweep with a time
    budget (it said the budget was used up and exited 0 when no trial was left running to
    show otherwise); mid-trial, by SIGTERM (that trial was saved as ended, "stopped
    early", and never continued; SIGTERM printed Ray's C++ stack dump and aborted). In the
    end every trial has finished, in the report and in the stored Optuna study; no ended
    trial trained again, the one stopped mid-trial went on from its newest checkpoint."""
    experiment, report = tmp_path / "runs" / "sweep", tmp_path / "report.csv"
    # One trial at a time, of 4 short epochs: a Ctrl-C after its first or second lands
    # mid-trial even if Tune lets the trial end the epoch under way.
    argv = sweep_args(tmp_path, "--trials", "2", "--cpus-per-trial", "2", "--max-epochs", "4",
                      "--samples-per-epoch", "1024", "--test-pairs", "0", "--no-early-stop",
                      "--time-budget", "900")
    interrupted = re.compile(r"^interrupted: 1/2 trials ended; run the same command to "
                             r"continue$", re.M)

    def finished() -> dict[str, list[dict]]:
        return {t: rows for t, rows in results(experiment).items()
                if rows and rows[-1]["status"] == "finished"}

    # 0. During start-up, before Tune's graceful stop is in place: one line, no traceback.
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        driver = Driver(argv, kill_on=r"^data: ", sig=sig)
        assert driver.wait() == code, driver.output[-3000:]
        assert "Traceback" not in driver.output and driver.lines[-1] == (
            "interrupted: run the same command to continue (from the experiment's last "
            "snapshot, if it has one)"), driver.output[-3000:]

    # 1. The instant the first trial ends.
    driver = Driver(argv, kill_on=r" ended \(", sig=signal.SIGINT)
    code = driver.wait()
    assert driver.killed_at and code == 130, driver.output[-3000:]
    assert interrupted.search(driver.output), driver.output[-3000:]
    assert "time budget used up" not in driver.output
    ended = finished()
    assert len(ended) == 1, driver.output[-3000:]

    # 2. Mid-trial: the other trial has saved its first or second of 4 epochs. Its
    # checkpoint lands in the experiment at once; result.json only with Tune's snapshots,
    # 2 s apart, by which time the trial may have ended.
    def mid_trial() -> str | None:
        for trial_dir in experiment.glob("trial_*"):
            trial = trial_dir.name.removeprefix("trial_")
            if trial not in ended and 1 <= newest_epoch_on_disk(trial_dir) <= 2:
                return trial
        return None

    driver = Driver(argv)
    driver.wait_until(lambda: mid_trial() is not None, "the other trial's first epochs")
    stopped = mid_trial()
    driver.proc.send_signal(signal.SIGTERM)  # as Slurm or Kubernetes would, ahead of a kill
    assert driver.wait() == 143, driver.output[-3000:]
    assert interrupted.search(driver.output), driver.output[-3000:]
    assert "SIGTERM received" not in driver.output, driver.output[-3000:]  # Ray's dump
    assert "Tuner.restore" not in driver.output  # Tune's advice: ours is the same command
    assert stopped not in finished(), "it finished before the SIGTERM: no mid-trial stop"
    # Tune lets a stopped trial end the step it is in; an epoch it so ends is kept too.
    newest = newest_epoch_on_disk(experiment / f"trial_{stopped}")
    assert newest >= 1

    # 3. The same command ends the sweep.
    driver = Driver(argv)
    assert driver.wait() == 0, driver.output[-3000:]
    df = pd.read_csv(report)
    assert len(df) == 2 and (df["status"] == "finished").all(), df
    after = results(experiment)
    for trial, rows in ended.items():  # not trained again
        assert {(r["epoch"], r["train_seconds"]) for r in after[trial]} == \
            {(r["epoch"], r["train_seconds"]) for r in rows}
    assert after[stopped][-1]["resumed_from_epoch"] == newest, after[stopped]
    check_study_matches_report(default_url(experiment), df)


# --- a trial's worker killed; its checkpoints damaged ------------------------------------------

def damage(path: Path, how: str) -> str:
    """Truncate the file, or flip one byte in the middle of its largest tensor (only the
    zip record's CRC-32 can tell; the middle of the file may be padding). Returns the
    name of the record flipped."""
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
        return ""
    with zipfile.ZipFile(path) as archive:
        tensors = [r for r in archive.infolist() if "/data/" in r.filename]
        record = max(tensors, key=lambda r: r.file_size)
    name_len, extra_len = struct.unpack("<HH", data[record.header_offset + 26:
                                                     record.header_offset + 30])
    data[record.header_offset + 30 + name_len + extra_len + record.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return record.filename


def newest_epoch_on_disk(trial_dir: Path) -> int:
    """The epoch of the newest checkpoint that loads: where a retry must resume."""
    epochs = [0]
    for path in trial_dir.glob("checkpoint_*/checkpoint.pt"):
        try:
            epochs.append(load_checkpoint(path)["epoch"])
        except CheckpointError:
            pass
    return max(epochs)


def test_killed_worker_is_retried_from_its_newest_good_checkpoint_then_given_up(
        tmp_path, capsys, monkeypatch):
    """One trial's worker is SIGKILLed mid-epoch three times: the first retry continues from
    its newest checkpoint; before the second kill its newest checkpoint is truncated, so the
    second retry falls back to the one before and says so; the third kill is one more than
    FailureConfig allows, so the trial ends as "error". The other trial finishes."""
    experiment = tmp_path / "runs" / "sweep"
    # 10 epochs: the three kills come near epochs 1-4, so the driver may lag behind the
    # worker by several epochs (it did on a loaded CI machine with 4) before the trial
    # could finish unkilled. Both trials train the warm start's design, the one the first
    # to report (the one killed) mostly had: the other's draw took up to 8x as long for
    # its 10 epochs, the test's end, while the kills were long over.
    every_trial_the_warm_start(monkeypatch)
    argv = sweep_args(tmp_path, "--trials", "2", "--cpus", "2", "--max-epochs", "10",
                      "--samples-per-epoch", "2048", "--test-pairs", "0", "--no-early-stop",
                      "--time-budget", "300")
    state: dict = {"target": None, "killed": [], "first_lines": [], "expected": []}

    def step() -> bool:
        if state["target"] is None:  # the first trial to report an epoch
            firsts = [t for t, rows in results(experiment).items() if rows]
            if not firsts:
                return False
            state["target"] = firsts[0]
        if len(state["killed"]) == 3:
            return True
        trial_dir = experiment / f"trial_{state['target']}"
        fresh = [r for r in lines_of(experiment, state["target"])
                 if r["pid"] not in state["killed"]]  # from the attempt now running
        if not fresh:
            return False
        assert fresh[-1]["status"] == "running", f"it ended before the kill: {fresh[-1]}"
        state["first_lines"].append(fresh[0])
        if len(state["killed"]) == 1:  # before the second kill: damage the newest
            newest = sorted(trial_dir.glob("checkpoint_*"))[-1] / "checkpoint.pt"
            state["damaged_epoch"] = load_checkpoint(newest)["epoch"]
            damage(newest, "truncate")
        os.kill(fresh[-1]["pid"], signal.SIGKILL)  # the trial's worker, mid-epoch
        state["killed"].append(fresh[-1]["pid"])
        state["expected"].append(newest_epoch_on_disk(trial_dir))  # it is dead: final
        return False

    watcher = Watcher(step)
    watcher.start()
    code = run.main(argv)
    watcher.check()
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]

    first, after_one, after_two = state["first_lines"]
    assert first["resumed_from_epoch"] == 0
    assert after_one["resumed_from_epoch"] == state["expected"][0] >= 1  # the newest
    assert after_two["resumed_from_epoch"] == state["expected"][1] == state["damaged_epoch"] - 1
    target = state["target"]
    assert f"{target}: resumed from checkpoint_" in out
    assert re.search(rf"{target}: checkpoint_\d+ is damaged \(unreadable or unsafe "
                     rf"checkpoint .*\); resumed from checkpoint_\d+ \(epoch "
                     rf"{state['damaged_epoch'] - 1}\)", out)
    assert f"{target} failed" in out and "retry 1 of 2" in out and "retry 2 of 2" in out
    assert f"{target} failed for good" in out

    df = pd.read_csv(tmp_path / "report.csv").set_index("trial_id")
    assert len(df) == 2
    assert df.loc[target, "status"] == "error"
    assert "died" in df.loc[target, "error"].lower(), df.loc[target, "error"]
    other = df.drop(index=target)
    assert other["status"].tolist() == ["finished"]
    # The saved experiment says so too (Ray 2.60 left the trial RUNNING there).
    rebuilt = tmp_path / "rebuilt.csv"
    assert report_cli.main([str(experiment), "--out", str(rebuilt)]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(rebuilt).set_index("trial_id"), df)


def saved_checkpoint(sources, tmp_path: Path, epochs: int = 2) -> list[Path]:
    """A real trial's checkpoints after each of `epochs` epochs, as Tune lays them out."""
    cfg = TrainConfig(epochs=epochs, samples_per_epoch=256, val_pairs=100, threads=1)
    fast = choose_fast_path(torch.device("cpu"))
    paths = []
    for epoch, (_, state, _) in enumerate(run_trial(preset("tiny"), cfg, sources, fast)):
        paths.append(tmp_path / f"checkpoint_{epoch:06d}" / CHECKPOINT_FILE)
        save_checkpoint(state, paths[-1])
    return paths


def test_an_altered_checkpoint_is_refused(sources, tmp_path):
    """One flipped byte inside a tensor: torch.load reads it without complaint; the
    CRC-32 of its zip record does not match, so load_checkpoint refuses it."""
    path = saved_checkpoint(sources, tmp_path, epochs=1)[0]
    record = damage(path, "flip")
    torch.load(path, weights_only=True)  # why the CRC check is needed
    with pytest.raises(CheckpointError, match=f"record {record} fails its CRC"):
        load_checkpoint(path)


def test_resume_falls_back_past_damaged_checkpoints_then_starts_from_scratch(sources,
                                                                             tmp_path):
    first, second = saved_checkpoint(sources, tmp_path)
    assert trainable.newest_good_checkpoint(tmp_path)[0]["epoch"] == 2
    damage(second, "truncate")
    state, path, note = trainable.newest_good_checkpoint(tmp_path)
    assert state["epoch"] == 1 and path == first
    assert re.fullmatch(r"checkpoint_000001 is damaged \(unreadable or unsafe checkpoint .+\); "
                        r"resumed from checkpoint_000000 \(epoch 1\)", note)
    damage(first, "flip")
    state, path, note = trainable.newest_good_checkpoint(tmp_path)
    assert state is None and path is None
    assert re.fullmatch(r"checkpoint_000001 is damaged \(.+\); checkpoint_000000 is damaged "
                        r"\(unreadable or unsafe checkpoint .+\); no usable checkpoint: "
                        r"started from scratch", note)
    assert trainable.newest_good_checkpoint(tmp_path / "nothing") == (None, None, "")


def test_resume_takes_the_latest_epoch_whatever_the_directory_is_called(sources, tmp_path):
    # Tune restored from an old snapshot numbers new checkpoints from its own count: a
    # later epoch can land in a lower-numbered directory.
    first, second = saved_checkpoint(sources, tmp_path)
    epoch_1, epoch_2 = first.read_bytes(), second.read_bytes()
    first.write_bytes(epoch_2)
    second.write_bytes(epoch_1)
    state, path, note = trainable.newest_good_checkpoint(tmp_path)
    assert state["epoch"] == 2 and path == first
    assert note == "resumed from checkpoint_000000 (epoch 2)"


def test_a_sweep_resumed_on_another_kind_of_device_goes_on_where_each_trial_began(sources,
                                                                                 tmp_path):
    """A sweep begun on CPUs resumed on a GPU machine, and the reverse: a trial's stream of
    random pairs lives on its device, so it goes on there (CPU), or ends saying where it
    can go on (CUDA on a machine without)."""
    _, checkpoint = saved_checkpoint(sources, tmp_path)
    state = load_checkpoint(checkpoint)
    cfg = TrainConfig(device="auto")
    cpu = choose_fast_path(torch.device("cpu"))
    gpu = FastPath(torch.device("cuda"), bf16=True, channels_last=True, reason="a GPU machine")
    assert trainable.fast_path_to_resume(cpu, cfg, state) == (cpu, "")
    assert trainable.fast_path_to_resume(gpu, cfg, None) == (gpu, "")  # a fresh trial
    fast, note = trainable.fast_path_to_resume(gpu, cfg, state)
    assert fast.device == torch.device("cpu") and note.startswith("it began on cpu")
    # The trial then continues exactly as on its own machine: check_resumable agrees.
    check_resumable(state, *split_config({**state["model_config"], **state["train_config"]}),
                    fast)
    on_gpu = {**state, "fast_path": {**state["fast_path"], "device": "cuda"}}
    with pytest.raises(ConfigError, match="it began on cuda, which torch does not see"):
        trainable.fast_path_to_resume(cpu, cfg, on_gpu)


# --- trials that raise or diverge --------------------------------------------------------------

DIVERGES = {**preset("reference", base_filters=4).to_dict(), "lr": 1.0, "seed": 2,
            "batch_size": 64, "samples_per_epoch": 256, "epochs": 3,
            "optimizer": "adamw"}  # test_train: NaN at once
FAULTS = [
    ("cannot be built", {"depth": 5}),
    ("out of memory", {"batch_size": 10**15, "samples_per_epoch": 10**15}),  # > any RAM
    ("diverges", DIVERGES),
    ("fine", {**SMALLEST.to_dict(), "lr": 3e-3, "batch_size": 64}),
]


def faulty_space(trial, constants: dict) -> dict:
    """The real search space, with trial N's config overridden by FAULTS[N]."""
    config = real_space(trial, constants)
    return {**config, **SMALLEST.to_dict(), **FAULTS[trial.number % len(FAULTS)][1]}


def test_trials_that_raise_or_diverge_end_with_the_reason_and_the_sweep_goes_on(
        tmp_path, capsys, monkeypatch):
    """A config the model refuses (depth 5), an allocation larger than any machine's memory
    (the CPU allocator raises; nothing is touched) and a NaN loss: each ends at once with
    its status and reason in the report, is not retried, and the last trial finishes."""
    monkeypatch.setattr(tuner, "space", faulty_space)
    argv = sweep_args(tmp_path, "--trials", str(len(FAULTS)), "--max-epochs", "1",
                      "--max-params", "0", "--test-pairs", "0", "--cpus", "2")
    assert run.main(argv) == 0
    out = capsys.readouterr().out

    df = pd.read_csv(tmp_path / "report.csv")
    assert len(df) == len(FAULTS)
    # Trial ids follow Optuna's trial numbers (the order of suggestion).
    experiment = tmp_path / "runs" / "sweep"
    by_case = {}
    for trial_id, rows in results(experiment).items():
        row = df[df["trial_id"] == trial_id].iloc[0]
        assert len(rows) == 1, f"trial {trial_id} ran more than once: {rows}"
        assert not (experiment / f"trial_{trial_id}" / "error.txt").exists()  # no retry
        by_case[row["status"], str(row["error"])] = rows[0]
    statuses = sorted(status for status, _ in by_case)
    assert statuses == ["diverged", "error", "error", "finished"], by_case.keys()
    errors = sorted(error for status, error in by_case if status == "error")
    assert errors[0].startswith("config cannot be built: depth must be in [1, 4], got 5")
    assert errors[1].startswith("out of memory: ") and "can't allocate memory" in errors[1]
    assert "ended (error): config cannot be built" in out
    assert "ended (error): out of memory" in out and "ended (diverged)" in out


# --- a full disk -------------------------------------------------------------------------------

# Inside a private mount namespace: a 1 MiB tmpfs at $DIR holding the files in $SEED, filled
# to the last page, so that every write there fails with ENOSPC as on a full disk; then the
# command; then a copy of what $DIR holds (the ballast aside) in $AFTER.
FULL_DISK = r"""
set -e
mount -t tmpfs -o size=1m tmpfs "$DIR"
cp -a "$SEED"/. "$DIR"/
dd if=/dev/zero of="$DIR/.ballast" bs=4k 2>/dev/null || true
set +e
"$@"
code=$?
rm -f "$DIR/.ballast"
cp -a "$DIR"/. "$AFTER"/
exit $code
"""


@functools.cache
def mount_namespace() -> list[str] | None:
    """`unshare` arguments that give a private mount namespace where tmpfs can be mounted
    (as root, or as a user where user namespaces are allowed), or None."""
    for prefix in (["unshare", "--mount"], ["unshare", "--mount", "--map-root-user"]):
        probe = [*prefix, "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || "
                 "mount -t tmpfs -o size=64k tmpfs /tmp"]
        try:
            if subprocess.run(probe, capture_output=True, timeout=30).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            continue
    return None


def on_full_disk(command: list[str], directory: Path, seed: Path, after: Path,
                 timeout: float = 300) -> subprocess.CompletedProcess:
    prefix = mount_namespace()
    if prefix is None:
        pytest.skip("cannot mount a small tmpfs here (needs root or user namespaces)")
    for d in (directory, after):
        d.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "DIR": str(directory), "SEED": str(seed),
           "AFTER": str(after)}
    return subprocess.run([*prefix, "sh", "-c", FULL_DISK, "sh", *command], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_report_on_a_full_disk_keeps_the_previous_one_and_the_sweep_goes_on(tmp_path):
    """The report's disk is full from the start: every rewrite fails, the previous report
    stays byte for byte, no temp file is left, each failure is one warning naming the file,
    every trial still runs; the end says where the results are and how to rebuild the
    report; report.py does, once there is room."""
    seed, results_dir, after = tmp_path / "seed", tmp_path / "results", tmp_path / "after"
    seed.mkdir()
    old = build_report([{"trial_id": "yesterday", "status": "finished", "params": 1000,
                         "val_mse": 0.01}])
    old.to_csv(seed / "report.csv", index=False)
    argv = sweep_args(tmp_path, "--trials", "2", "--max-epochs", "1", "--test-pairs", "0",
                      "--report", str(results_dir / "report.csv"))
    done = on_full_disk([sys.executable, str(RUN_PY), *argv], results_dir, seed, after)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out[-3000:]
    report = results_dir / "report.csv"
    warning = (f"warning: [Errno 28] could not write {report} (No space left on device); the "
               "previous file is unchanged; the sweep goes on")
    assert out.count(warning) == 2, out[-3000:]  # once per trial's end
    assert (f"error: [Errno 28] could not write {report} (No space left on device); the "
            "previous file is unchanged") in done.stderr
    experiment = tmp_path / "runs" / "sweep"
    assert f"python sweep/report.py {experiment} --out {report}" in done.stderr
    assert sorted(p.name for p in after.iterdir()) == ["report.csv"]  # no temp file left
    assert (after / "report.csv").read_bytes() == (seed / "report.csv").read_bytes()

    rebuilt = tmp_path / "rebuilt.csv"
    assert report_cli.main([str(experiment), "--out", str(rebuilt)]) == 0
    df = pd.read_csv(rebuilt)
    assert len(df) == 2 and (df["status"] == "finished").all()


def test_checkpoint_on_a_full_disk_keeps_the_previous_one(tmp_path, sources):
    """train.py resumes epoch 1 of 2 on a full disk: saving epoch 2 fails, the error says
    which file and that the previous checkpoint is unchanged, and it is, byte for byte."""
    model_cfg = preset("tiny")
    cfg = TrainConfig(epochs=2, samples_per_epoch=512, val_pairs=100, threads=1)
    _, state, _ = next(run_trial(model_cfg, cfg, sources, choose_fast_path(torch.device("cpu"))))
    seed, disk, after = tmp_path / "seed", tmp_path / "disk", tmp_path / "after"
    save_checkpoint(state, seed / CHECKPOINT_FILE)
    args = ["--preset", "tiny", "--epochs", "2", "--samples-per-epoch", "512", "--val-pairs",
            "100", "--threads", "1", "--out", str(disk)]
    done = on_full_disk([sys.executable, str(REPO / "sweep" / "train.py"), *args], disk, seed,
                        after)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"resuming from {disk / CHECKPOINT_FILE} (epoch 1)" in done.stdout
    assert done.stderr.strip().splitlines() == [
        f"error: [Errno 28] could not write {disk / CHECKPOINT_FILE} (No space left on "
        "device); the previous file is unchanged"]
    assert [p.name for p in after.iterdir()] == [CHECKPOINT_FILE]  # no temp file left
    assert (after / CHECKPOINT_FILE).read_bytes() == (seed / CHECKPOINT_FILE).read_bytes()


# --- bad input -----------------------------------------------------------------------------------

def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # free again once closed: nothing listens there


# Beyond tests/test_sweep.py's: each one started a sweep that crashed after Ray was up,
# hung for minutes, or ran for an hour before failing on its report.
BAD_FLAGS = [
    (lambda tmp: ["--seed", "-1"], "--seed"),  # TPESampler raised after Ray started
    (lambda tmp: ["--seed", str(2**32)], "--seed"),
    (lambda tmp: ["--max-epochs", "1.5"], "--max-epochs"),
    (lambda tmp: ["--val-pairs", "-3"], "--val-pairs"),
    (lambda tmp: ["--gpus-per-trial", "0"], "--gpus-per-trial"),
    (lambda tmp: ["--test-pairs", "some"], "--test-pairs"),
    (lambda tmp: ["--objective", "pareto", "--search", "grid"], "--search"),
    # Every trial drawing batch size 128 would have failed.
    (lambda tmp: ["--samples-per-epoch", "64"], "--samples-per-epoch"),
    # Ray accepted it and no trial ever started.
    (lambda tmp: ["--cpus-per-trial", str((os.cpu_count() or 1) + 1)], "--cpus-per-trial"),
    # Found only when the first report was written.
    (lambda tmp: ["--report", str(tmp)], "--report"),
    (lambda tmp: ["--storage", str(tmp / "a-file")], "--storage"),
    # ray.init waited for minutes.
    (lambda tmp: ["--address", f"127.0.0.1:{closed_port()}"], "--address"),
    (lambda tmp: ["--address", "nowhere"], "--address"),
]


@pytest.mark.parametrize("flags, flag", BAD_FLAGS, ids=[f for _, f in BAD_FLAGS])
def test_more_bad_flags_are_refused_before_anything_starts(tmp_path, capsys, flags, flag):
    (tmp_path / "a-file").write_text("not a directory")
    argv = sweep_args(tmp_path) + flags(tmp_path)
    started = time.monotonic()
    try:
        code = run.main(argv)
    except SystemExit as e:  # argparse's own refusal: usage line + error line, exit 2
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert flag in err[-1] and "error" in err[-1], err
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "runs").exists(), "nothing may start on a bad flag"
    assert time.monotonic() - started < 15


def test_more_gpus_than_the_machine_has_is_refused(tmp_path, capsys, monkeypatch):
    """On a machine with 2 real GPUs (torch's view faked: this one has none), --gpus 4
    would schedule trials on GPUs that do not exist."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert run.main(sweep_args(tmp_path, "--gpus", "4")) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --gpus 4 is more than the 2 GPUs of this machine (logical GPUs only where "
        "there is none)")
    assert not (tmp_path / "runs").exists()


# --- ports ---------------------------------------------------------------------------------------

def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo += children.get(pid, [])
    return found


def listening(pids: set[int]) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every TCP/UDP socket these processes listen on,
    from /proc/net (what `ss -ltup` shows)."""
    owner = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                link = os.readlink(fd) if fd.is_symlink() else ""
                if link.startswith("socket:["):
                    owner[link[8:-1]] = pid
        except OSError:
            continue  # the process ended meanwhile
    found = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        for row in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = row.split()
            if fields[9] not in owner or (table.startswith("tcp") and fields[3] != "0A"):
                continue  # 0A: LISTEN
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # host order
            family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
            name = Path(f"/proc/{owner[fields[9]]}/comm").read_text().strip()
            found.append((socket.inet_ntop(family, raw), int(port, 16), name))
    return found


def test_the_local_ray_listens_on_loopback_only_and_refuses_trials_that_fit_no_node():
    """Every port of the Ray the sweep starts (GCS, raylet, object manager, agents, the
    driver's and a worker's own) listens on loopback: nothing is reachable from the
    network. Without the fix they listened on every interface."""
    import ray

    cluster.start_ray(config.SweepConfig(cpus=1))
    try:
        ray.get(ray.remote(lambda: os.getpid()).remote())  # a worker, as a trial has
        ports = listening(descendants(os.getpid()))
        with pytest.raises(config.UsageError, match=r"--cpus-per-trial 2 is more than any node "
                                                    r"has \(1 CPUs at most\)"):
            cluster.check_fits(config.SweepConfig(cpus_per_trial=2))
    finally:
        ray.shutdown()
    print("listening:", sorted(ports))
    names = {name for _, _, name in ports}
    assert {"gcs_server", "raylet"} <= names and any(n.startswith("ray::") for n in names)
    loopback = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
    assert {address for address, _, _ in ports} <= loopback, ports


# --- load ----------------------------------------------------------------------------------------

def memory_kib(pid: int) -> tuple[int, int]:
    """(current, peak) resident memory of a process, KiB."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines() if ":" in line)
    return int(status["VmRSS"].split()[0]), int(status["VmHWM"].split()[0])


@pytest.mark.slow
def test_200_tiny_trials_run_to_the_end_with_bounded_driver_memory(tmp_path):
    """200 trials of the smallest model, one short epoch each, two at a time on this
    2-core machine. Prints trials per minute and the driver's peak memory; the driver's
    memory after the 200th trial is near what it was after the 50th."""
    trials = 200
    report = tmp_path / "report.csv"
    argv = sweep_args(tmp_path, "--trials", str(trials), "--max-epochs", "1",
                      "--samples-per-epoch", "128", "--val-pairs", "50", "--test-pairs", "0",
                      "--max-params", str(params_of(SMALLEST)))
    started = time.monotonic()
    driver = Driver(argv)
    at_50 = peak = 0
    while driver.proc.poll() is None:
        try:
            rss, peak = memory_kib(driver.proc.pid)
        except (OSError, KeyError):
            break  # it just ended
        if not at_50 and report.exists() and len(report.read_text().splitlines()) > 50:
            at_50 = rss
        time.sleep(1)
    assert driver.wait(timeout=60) == 0, driver.output[-3000:]
    minutes = (time.monotonic() - started) / 60
    df = pd.read_csv(report)
    print(f"\n{trials} trials in {minutes:.1f} min: {trials / minutes:.1f} trials/min; driver "
          f"peak RSS {peak / 1024:.0f} MiB (after 50 trials: {at_50 / 1024:.0f} MiB)")
    assert len(df) == trials and (df["status"] == "finished").all(), df["status"].value_counts()
    assert df["trial_id"].is_unique
    assert peak < 2 * 1024**2, "the driver's memory is not bounded"
    assert at_50 and peak < at_50 * 1.5, "the driver's memory grows with the trials"
