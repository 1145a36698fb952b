"""The sweep's Optuna study in real storage: optuna-dashboard reads it over HTTP, a resume
after a killed driver leaves it true, and a storage that cannot be used is refused."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import pickle
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from sweep import run, stored_study, study
from sweep.space import space, start_points

# One xdist worker runs this module (`make test` runs two at once): its `finished_sweep`
# fixture, a module's worth of set-up, then runs once.
pytestmark = pytest.mark.xdist_group("test_study")

REPO = Path(__file__).resolve().parents[1]
TINY = ["--samples-per-epoch", "512", "--val-pairs", "100", "--test-pairs", "0",
        "--max-params", "20000", "--max-epochs", "1"]
# Where a report's status puts a trial in the study.
STATES = {"finished": TrialState.COMPLETE, "stopped early": TrialState.PRUNED,
          "diverged": TrialState.COMPLETE, "error": TrialState.FAIL}


def all_stored_trials(url: str, name: str = "sweep") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=url).get_trials()


def stored_trials(url: str, name: str = "sweep") -> list[optuna.trial.FrozenTrial]:
    """The stored trials Tune was given; the others are suggestions over --max-params,
    told PRUNED and never run (checked here)."""
    given = []
    for trial in all_stored_trials(url, name):
        if "trial_id" in trial.user_attrs:
            given.append(trial)
        else:
            assert trial.state == TrialState.PRUNED, trial
            assert trial.user_attrs["status"] == stored_study.OVER_BUDGET, trial
            assert trial.constraints["params_over_budget"] > 0, trial  # what TPE reads
    return given


def check_study_matches_report(url: str, report: pd.DataFrame) -> None:
    """Every trial of the report is one trial of the stored study, in the state its status
    says; any other stored trial is one a killed driver lost (FAIL); none is RUNNING."""
    trials = stored_trials(url)
    by_id = {t.user_attrs.get("trial_id"): t for t in trials}
    assert len(by_id) == len(trials), "two stored trials name the same Tune trial"
    for row in report.itertuples():
        trial = by_id[row.trial_id]
        assert trial.state == STATES[row.status], (row, trial)
        if row.status == "diverged":  # told as the worst score, so that TPE learns it
            assert trial.values[0] == stored_study.DIVERGED_VAL_MSE, (row, trial)
            assert trial.user_attrs["status"] == "diverged"
        elif trial.state == TrialState.COMPLETE:
            assert math.isclose(trial.values[0], row.val_mse, rel_tol=1e-6), (row, trial)
    for trial in trials:
        if trial.user_attrs.get("trial_id") not in set(report["trial_id"]):
            assert trial.state == TrialState.FAIL, trial
            assert trial.user_attrs["status"].startswith("lost: suggested after"), trial


# --- resume: the snapshot lags the storage -------------------------------------------------

def new_search(url: str, own_file: bool = False) -> study.StudySearch:
    define_by_run = functools.partial(space, constants={})  # as run.py's
    return study.StudySearch(define_by_run, metric="val_mse", mode="min", study_name="sweep",
                             max_params=20_000,
                             storage=study.open_storage(url), own_file=own_file,
                             sampler=optuna.samplers.RandomSampler(seed=0))


def test_a_resume_from_a_lagging_snapshot_leaves_no_trial_running_and_tells_none_twice(
        tmp_path):
    """What Tune does around a killed driver, on real storage: it pickles the searcher at
    the start (tuner.pkl) and with every snapshot; after the kill it unpickles the first
    and restores the last snapshot into it. Here trial c was asked for and trial a told
    after the last snapshot. Ray's OptunaSearch left c RUNNING forever and raised
    UpdateFinishedTrialError on a's next result, which failed the trial."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    search = new_search(url)
    at_start = pickle.dumps(search)
    for trial_id in ("a", "b"):
        search.suggest(trial_id)
        search.on_trial_result(trial_id, {"val_mse": 0.5, "training_iteration": 1})
    search.save(str(tmp_path / "snapshot.pkl"))
    search.suggest("c")  # ... then the driver is killed
    search.on_trial_result("a", {"val_mse": 0.2, "training_iteration": 2})
    search.on_trial_complete("a", {"val_mse": 0.2, "status": "finished"})

    resumed = pickle.loads(at_start)
    resumed.restore(str(tmp_path / "snapshot.pkl"))
    states = {t.user_attrs["trial_id"]: t.state for t in stored_trials(url)}
    assert states == {"a": TrialState.COMPLETE, "b": TrialState.RUNNING, "c": TrialState.FAIL}
    # Tune runs a again (its snapshot shows it running) and b on from its checkpoint.
    for trial_id in ("a", "b"):
        resumed.on_trial_result(trial_id, {"val_mse": 0.1, "training_iteration": 2})
    resumed.on_trial_complete("a", {"val_mse": 0.1, "status": "finished"})
    resumed.on_trial_complete("b", {"val_mse": 0.3, "status": "running"})  # ASHA stopped it
    resumed.suggest("d")
    resumed.on_trial_complete("d", {"val_mse": math.nan, "status": "diverged"})
    trials = {t.user_attrs["trial_id"]: t for t in stored_trials(url)}
    assert set(trials) == set("abcd")  # the dashboard shows Tune's id
    assert trials["a"].state == TrialState.COMPLETE and trials["a"].value == 0.2  # told once
    assert trials["b"].state == TrialState.PRUNED and trials["b"].value == 0.1  # last value
    assert trials["c"].state == TrialState.FAIL
    # NaN: Ray's OptunaSearch left it RUNNING; told as the worst score, TPE learns from it
    assert trials["d"].state == TrialState.COMPLETE
    assert trials["d"].value == stored_study.DIVERGED_VAL_MSE
    assert trials["d"].user_attrs["status"] == "diverged"


def test_a_snapshot_carries_its_study_to_wherever_the_experiment_is_now(tmp_path,
                                                                         monkeypatch):
    """The searcher Tune pickles names the experiment's own study file where it was; the
    experiment then moved, and the file is missing at the new place (object storage
    resumed from a driver with an empty cache). The resumed searcher rebuilds the study
    there from the snapshot's trials, numbers and all, and goes on; the old file is not
    touched. Before, it wrote to the old path (or failed: unable to open database file)."""
    was = f"sqlite:///{tmp_path / 'was' / study.STUDY_FILE}"
    search = new_search(was, own_file=True)
    at_start = pickle.dumps(search)
    for trial_id in ("a", "b"):
        search.suggest(trial_id)
        search.on_trial_result(trial_id, {"val_mse": 0.5, "training_iteration": 1})
    search.on_trial_complete("a", {"val_mse": 0.5, "status": "finished"})
    search.save(str(tmp_path / "snapshot.pkl"))
    snapshotted = [(t.number, t.state, t.params, t.user_attrs, t.intermediate_values)
                   for t in stored_trials(was)]
    search.suggest("c")  # after the snapshot, in the old place only

    now = f"sqlite:///{tmp_path / 'now' / study.STUDY_FILE}"
    monkeypatch.setattr(stored_study, "_own_file_url", now)  # what run.py's prepare finds
    resumed = pickle.loads(at_start)
    resumed.restore(str(tmp_path / "snapshot.pkl"))
    assert [(t.number, t.state, t.params, t.user_attrs, t.intermediate_values)
            for t in stored_trials(now)] == snapshotted
    resumed.on_trial_result("b", {"val_mse": 0.25, "training_iteration": 2})
    resumed.on_trial_complete("b", {"val_mse": 0.25, "status": "finished"})
    resumed.suggest("d")
    trials = stored_trials(now)
    assert [(t.user_attrs["trial_id"], t.state) for t in trials] == [
        ("a", TrialState.COMPLETE), ("b", TrialState.COMPLETE), ("d", TrialState.RUNNING)]
    assert trials[1].intermediate_values == {1: 0.5, 2: 0.25}
    assert [t.state for t in stored_trials(was)] == [  # the old place as it was left
        TrialState.COMPLETE, TrialState.RUNNING, TrialState.RUNNING]


def test_a_study_storage_url_is_kept_as_given_on_a_resume(tmp_path, monkeypatch):
    """--study-storage names a database a cluster shares: the resumed searcher goes on
    there, never at the experiment's own file."""
    shared = f"sqlite:///{tmp_path / 'shared.db'}"
    search = new_search(shared)
    search.suggest("a")
    search.save(str(tmp_path / "snapshot.pkl"))
    own_file = tmp_path / "experiment" / study.STUDY_FILE
    monkeypatch.setattr(stored_study, "_own_file_url", f"sqlite:///{own_file}")
    resumed = pickle.loads(pickle.dumps(search))
    resumed.restore(str(tmp_path / "snapshot.pkl"))
    resumed.on_trial_complete("a", {"val_mse": 0.5, "status": "finished"})
    assert [t.state for t in stored_trials(shared)] == [TrialState.COMPLETE]
    assert not (tmp_path / "experiment").exists()


def test_outcome_of_each_way_a_trial_ends():
    ok = {"val_mse": 0.1, "params": 1000}
    assert stored_study.outcome({**ok, "status": "finished"}, "val_mse", False) == (
        TrialState.COMPLETE, [0.1])
    assert stored_study.outcome({**ok, "status": "finished"}, ["val_mse", "params"], False) == (
        TrialState.COMPLETE, [0.1, 1000])
    assert (stored_study.outcome({**ok, "status": "running"}, "val_mse", False)[0]
            == TrialState.PRUNED)
    diverged = {"val_mse": math.nan, "params": 1000, "status": "diverged"}
    assert stored_study.outcome(diverged, ["val_mse", "params"], False) == (
        TrialState.COMPLETE, [stored_study.DIVERGED_VAL_MSE, 1000])
    assert stored_study.outcome({**ok, "status": "finished"}, "val_mse", True)[0] == TrialState.FAIL
    assert stored_study.outcome({"val_mse": math.nan, "status": "error"}, "val_mse", False)[0] == \
        TrialState.FAIL
    assert stored_study.outcome(None, "val_mse", False)[0] == TrialState.PRUNED  # before it began
    assert stored_study.outcome(None, "val_mse", True)[0] == TrialState.FAIL


# --- the study holds the configs that trained -----------------------------------------------

def test_every_stored_trial_is_the_config_that_trained(tmp_path):
    """A real pareto sweep under a budget most of the space exceeds (20,000 parameters; the
    small preset has 262,822): each trial Tune ran is stored with the parameters it trained
    with (its report row) and, as its `params` objective, its model's parameter count;
    every other stored trial is a suggestion over the budget, never run. Suggestions were
    shrunk to fit before, and Optuna kept the wide values it had suggested."""
    code = run.main(["--storage", str(tmp_path / "runs"), "--report",
                     str(tmp_path / "report.csv"), *TINY, "--trials", "4",
                     "--objective", "pareto", "--cpus", "2"])
    assert code == 0
    report = pd.read_csv(tmp_path / "report.csv")
    url = study.default_url(tmp_path / "runs" / "sweep")
    trials = {t.user_attrs.get("trial_id"): t for t in all_stored_trials(url)}
    first = min(trials.values(), key=lambda t: t.number)
    assert first.params == start_points(20_000)[0]  # the warm start, enqueued as it trains
    trials = {t.user_attrs["trial_id"]: t for t in stored_trials(url)}
    assert set(trials) == set(report["trial_id"])
    for row in report.itertuples():
        trial = trials[row.trial_id]
        for name, value in trial.params.items():
            got = getattr(row, name)
            assert (math.isclose(value, got, rel_tol=1e-12) if isinstance(value, float)
                    else value == got), (row.trial_id, name, value, got)
        assert row.params <= 20_000
        assert trial.constraints["params_over_budget"] == row.params - 20_000
        if trial.state == TrialState.COMPLETE:
            assert trial.values[1] == row.params, row.trial_id


# --- the storage refused before anything starts ---------------------------------------------

def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_study_storage_that_cannot_be_used_is_refused_with_one_line(tmp_path, capsys):
    argv = ["--storage", str(tmp_path / "runs"), "--report", str(tmp_path / "report.csv"),
            *TINY]
    taken = f"sqlite:///{tmp_path / 'shared.db'}"
    other = optuna.create_study(study_name="sweep", storage=taken)
    other.add_trial(optuna.trial.create_trial(value=1.0))
    cases = [
        (taken, f"error: --study-storage {taken} already holds a study named 'sweep' with 1 "
                f"trials; use another --name, or delete it: optuna delete-study --study-name "
                f"sweep --storage {taken}"),
        (f"postgresql://sweeper:secret@127.0.0.1:{closed_port()}/studies",
         "error: --study-storage postgresql://sweeper:***@127.0.0.1:"),
        ("not a url", "error: argument --study-storage: expected a database URL"),
    ]
    for url, error in cases:
        started = time.monotonic()
        try:
            code = run.main([*argv, "--study-storage", url])
        except SystemExit as e:  # argparse's own refusal
            code = e.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and error in err[-1], err
        assert "secret" not in err[-1] and "Traceback" not in "\n".join(err)
        assert not list(tmp_path.glob("runs/sweep/experiment_state*"))
        assert time.monotonic() - started < 15
    assert len(all_stored_trials(taken)) == 1  # the other sweep's study is untouched


# --- a sweep killed and resumed, then shown in optuna-dashboard -----------------------------

@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, pd.DataFrame, str]:
    """A tiny sweep, its driver SIGKILLed when its snapshot lags the storage in both ways,
    then resumed to its end: (study storage URL, report, the first driver's output).

    Two trials, one at a time; Tune snapshots the experiment once, at the start (its
    period set to an hour), when it knows the first trial only. The kill falls once the
    second trial has started: the first was told COMPLETE after that snapshot, the second
    asked for after it."""
    tmp = tmp_path_factory.mktemp("study-sweep")
    argv = [sys.executable, "-u", str(REPO / "sweep" / "run.py"), "--storage",
            str(tmp / "runs"), "--report", str(tmp / "report.csv"), *TINY, "--trials", "2",
            "--cpus", "2", "--cpus-per-trial", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # Its own process, stderr with stdout, as a user sees it (Ray logs to stderr).
    log = tmp / "driver.log"
    with open(log, "w") as out:
        driver = subprocess.Popen(argv, env={**env, "TUNE_GLOBAL_CHECKPOINT_S": "3600"},
                                  stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while len(list((tmp / "runs" / "sweep").glob("trial_*"))) < 2:
        if driver.poll() is not None or time.monotonic() > deadline:
            driver.kill()
            pytest.fail(f"the second trial never started:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    driver.kill()
    driver.wait()
    resumed = subprocess.run(argv, env=env, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, timeout=300)
    # With Ray's OptunaSearch alone, the first trial's result raised Optuna's
    # UpdateFinishedTrialError here, and the trial ended as an error.
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resuming the sweep" in resumed.stdout
    return (study.default_url(tmp / "runs" / "sweep"), pd.read_csv(tmp / "report.csv"),
            log.read_text())


def test_a_killed_and_resumed_sweep_leaves_its_stored_study_true(finished_sweep):
    """Read back with optuna.load_study: the first trial told once, the second (lost with
    the driver) FAIL, not RUNNING forever; the trial that took its place COMPLETE."""
    url, report, _ = finished_sweep
    assert len(report) == 2 and (report["status"] == "finished").all(), report
    check_study_matches_report(url, report)
    assert [t.state for t in stored_trials(url)] == [
        TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]


@contextlib.contextmanager
def dashboard(url: str) -> Iterator[str]:
    """optuna-dashboard serving `url` on 127.0.0.1; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [str(Path(sys.executable).with_name("optuna-dashboard")), url,
               "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/meta", timeout=5).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    server.kill()
                    pytest.fail(f"optuna-dashboard did not start: {server.stdout.read()}")
                time.sleep(0.2)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def test_optuna_dashboard_shows_the_finished_sweep_as_the_report_does(finished_sweep):
    url, report, out = finished_sweep
    # The driver says where the study is, as the command to run.
    assert f"watch it live with optuna-dashboard {url}" in out
    with dashboard(url) as base:
        [summary] = get(f"{base}/api/studies")["study_summaries"]
        assert summary["study_name"] == "sweep" and summary["directions"] == ["minimize"]
        detail = get(f"{base}/api/studies/{summary['study_id']}")
    ids = [{a["key"]: a["value"] for a in t["user_attrs"]}.get("trial_id")
           for t in detail["trials"]]
    shown = {i: t for i, t in zip(ids, detail["trials"], strict=True) if i}  # Tune's trials
    lost = {k: t for k, t in shown.items() if k not in set(report["trial_id"])}
    assert len(shown) == len(report) + len(lost)
    assert [t["state"] for t in lost.values()] == ["Fail"]  # lost with the killed driver
    for row in report.itertuples():
        trial = shown[row.trial_id]
        assert trial["state"] == STATES[row.status].name.capitalize(), trial["state"]
        if row.status == "finished":
            assert math.isclose(trial["values"][0], row.val_mse, rel_tol=1e-6)
        params = {p["name"]: p["param_external_value"] for p in trial["params"]}
        assert float(params["lr"]) == pytest.approx(row.lr)
        assert int(params["batch_size"]) == row.batch_size
    best = report.loc[report["val_mse"].idxmin()]
    [best_trial] = detail["best_trials"]
    assert shown[best.trial_id]["number"] == best_trial["number"]


def test_the_first_screen_shows_our_lines_not_rays(finished_sweep):
    """Ray's token-authentication notice, Tune's experiment table and its TensorBoard path
    into Ray's temp folder, Optuna's "A new study created": gone. The settings print as
    the flags that give them."""
    _, _, out = finished_sweep
    first = out.splitlines()[:6]
    assert [line.split(" ")[0] for line in first] == [
        "data:", "data:", "new", "settings:", "study:", "["], first
    assert first[3].startswith("settings: --name sweep --storage ") and "--trials 2" in first[3]
    assert "PosixPath" not in out
    for theirs in ("Token authentication", "View detailed results", "Configuration for exp",
                   "A new study created", "/tmp/ray/session", "snapshotting"):
        assert theirs not in out, theirs


def test_trials_the_time_budget_stopped_are_pruned_at_the_end(tmp_path):
    """Tune stops them without telling the searcher: they stayed RUNNING in the storage."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    search = new_search(url)
    search.suggest("a")
    search.on_trial_result("a", {"val_mse": 0.5, "training_iteration": 1})
    study.close_study(url, "sweep")
    [trial] = stored_trials(url)
    assert trial.state == TrialState.PRUNED and trial.value == 0.5
    assert trial.user_attrs["status"] == "stopped early"


def test_a_new_sweep_moves_an_earlier_study_file_aside_and_says_so(tmp_path, capsys):
    config = run.SweepConfig(storage=str(tmp_path), name="sweep")
    url = study.default_url(config.experiment)
    optuna.create_study(study_name="sweep", storage=study.open_storage(url)).add_trial(
        optuna.trial.create_trial(value=1.0))  # an earlier sweep's study, same name
    assert study.prepare(config, new=True) == url
    [aside] = config.experiment.glob(f"{study.STUDY_FILE}.old-*")
    assert len(all_stored_trials(f"sqlite:///{aside}")) == 1  # kept, whole
    assert f"moved aside to {aside.name}" in capsys.readouterr().out
    optuna.create_study(study_name="sweep", storage=url)  # the name is free again


def test_ray_tune_is_imported_only_when_a_sweep_needs_its_searcher():
    # run.py --help and a bad flag stay quick; a searcher pickled by an older sweep (as
    # sweep.study.StudySearch, in its tuner.pkl) still resolves, so the sweep resumes.
    old_reference = b"csweep.study\nStudySearch\n."  # pickle's GLOBAL opcode, protocol 0
    code = ("import sys, pickle; import sweep.run; assert 'ray.tune' not in sys.modules; "
            f"print(pickle.loads({old_reference!r}).__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "StudySearch"
