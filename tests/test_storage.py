"""Experiments on object storage, against a real S3 protocol server on 127.0.0.1 (moto's
standalone server, as Ray's own tests use for S3 storage): a sweep to a bucket, its driver
SIGKILLed mid-sweep, the same command finishing it, the report rebuilt from the bucket
alone; a wrong endpoint, a missing bucket and bad credentials refused before any trial."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from test_faults import Driver
from test_study import check_study_matches_report
from test_sweep import sweep_args

from sweep import evaluate, run, storage, study
from sweep import report as report_cli
from sweep.checkpoint import load_checkpoint

# One xdist worker runs this module (`make test` runs two at once): its `s3`
# fixture, a module's worth of set-up, then runs once.
pytestmark = pytest.mark.xdist_group("test_storage")

BUCKET = "sweeps"
ALLOW_ALL = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": "*", "Resource": "*"}]})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on loopback that checks credentials, as AWS does: the first 3
    requests are let through (INITIAL_NO_AUTH_ACTION_COUNT) to make a user, its policy and
    its key; every later one must be signed with that key. The environment points boto3,
    pyarrow and Ray's workers at it. Yields the endpoint."""
    port = free_port()
    env = {"INITIAL_NO_AUTH_ACTION_COUNT": "3", "PATH": "/usr/bin:/bin"}
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                               "-p", str(port)], env=env, stdout=log, stderr=log)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail("moto's server did not start")
                time.sleep(0.1)
        import boto3

        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                           aws_access_key_id="anyone", aws_secret_access_key="anyone")
        iam.create_user(UserName="sweeper")
        iam.put_user_policy(UserName="sweeper", PolicyName="all", PolicyDocument=ALLOW_ALL)
        key = iam.create_access_key(UserName="sweeper")["AccessKey"]
        with pytest.MonkeyPatch.context() as mp:
            for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1",
                                "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                                "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}.items():
                mp.setenv(name, value)
            for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
                mp.delenv(name, raising=False)
            boto3.client("s3").create_bucket(Bucket=BUCKET)
            yield endpoint
    finally:
        server.kill()
        server.wait()
        log.close()


def bucket_results(experiment: str) -> dict[str, list[dict]]:
    """Every result line of each trial, from its result.json in the bucket."""
    lines = {}
    for name in storage.names(experiment, "trial_*"):
        try:
            text = storage.read_bytes(storage.join(experiment, name, "result.json")).decode()
        except FileNotFoundError:
            text = ""
        lines[name.removeprefix("trial_")] = [json.loads(x) for x in text.splitlines() if x]
    return lines


def test_bad_object_storage_is_refused_in_one_line_before_any_trial(s3, tmp_path, capsys,
                                                                    monkeypatch):
    def refused(uri: str) -> str:
        started = time.monotonic()
        assert run.main(sweep_args(tmp_path)[2:] + ["--storage", uri]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: --storage {uri}: "), err
        assert time.monotonic() - started < 20  # found by the check, not by Ray or a trial
        return err

    assert "there is no bucket 'no-such-bucket'; create it (for S3: aws s3 mb " \
           "s3://no-such-bucket)" in refused("s3://no-such-bucket/runs")
    with monkeypatch.context() as mp:
        mp.setenv("AWS_SECRET_ACCESS_KEY", "not-the-key")
        assert "access denied; check the credentials" in refused(f"s3://{BUCKET}/runs")
    with monkeypatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
        assert "no object store answers" in refused(f"s3://{BUCKET}/runs")
    assert not storage.names(f"s3://{BUCKET}/runs")  # nothing was written
    assert not (tmp_path / "report.csv").exists()


def test_sweep_on_s3_killed_then_finished_and_reported_from_the_bucket(s3, tmp_path,
                                                                      data_cache, monkeypatch):
    """The driver is SIGKILLed the instant the first trial ends (the others mid-way); the
    same command, from a driver whose cache is empty (another machine: its own data, no
    copy of the study), finishes the sweep from the bucket: every trial once, no epoch
    trained twice, the study rebuilt from the experiment's snapshot and true. report.py
    rebuilds the report from the bucket alone, evaluate.py scores a checkpoint there. On
    local disk: only the driver's lock, the study and the checkpoint copies. Before, the
    second driver failed with Optuna's KeyError: 'Record does not exist.'"""
    uri = f"s3://{BUCKET}/runs"
    experiment, trials = f"{uri}/sweep", 3
    argv = [*sweep_args(tmp_path, "--trials", str(trials), "--no-early-stop",
                        "--samples-per-epoch", "1024")[2:], "--storage", uri]
    driver = Driver(argv, kill_on=r" ended \(")
    driver.wait()
    assert driver.killed_at, driver.output[-3000:]
    assert f"new sweep in {experiment}" in driver.output
    # Killed mid-sweep: checkpoints in the bucket, not every trial ended (the results Tune
    # syncs every 2 s may not show the trial that just ended).
    before = bucket_results(experiment)
    assert any(storage.names(f"{experiment}/trial_{t}", "checkpoint_*") for t in before)
    assert sum(bool(r) and r[-1]["status"] == "finished" for r in before.values()) < trials

    first_study = storage.local_dir(experiment) / study.STUDY_FILE
    other_machine = tmp_path / "other-machine-cache"
    for name in ("mnist", "fashion-mnist"):  # its own data, and nothing else
        shutil.copytree(data_cache / name, other_machine / name)
    monkeypatch.setenv("UNET_SWEEP_CACHE", str(other_machine))
    driver = Driver(argv)
    assert driver.wait() == 0, driver.output[-3000:]
    assert f"resuming the sweep in {experiment}" in driver.output
    assert "study: 'sweep' rebuilt in sqlite:///" in driver.output
    df = pd.read_csv(tmp_path / "report.csv")
    after = bucket_results(experiment)
    assert len(df) == trials and sorted(df["trial_id"]) == sorted(after), df
    assert (df["status"] == "finished").all() and (df["epochs"] == 2).all(), df
    # Each epoch trained once: one train_seconds per epoch, before the kill and after. (Tune
    # rewrites a resumed trial's result.json in the bucket from its restart on.)
    for trial, rows in after.items():
        runs = {(r["epoch"], r["train_seconds"]) for r in before.get(trial, []) + rows}
        assert len(runs) == len({epoch for epoch, _ in runs}), (trial, runs)
        assert storage.names(f"{experiment}/trial_{trial}/images", "events.out.tfevents.*")
    for row in df.itertuples():  # the report names checkpoints in the bucket
        assert row.checkpoint.startswith(f"{experiment}/trial_{row.trial_id}/checkpoint_")
        assert storage.exists(row.checkpoint)

    url = study.default_url(storage.local_dir(experiment))
    assert url == f"sqlite:///{other_machine}/experiments/s3/{BUCKET}/runs/sweep/" \
                  f"{study.STUDY_FILE}"
    check_study_matches_report(url, df)
    assert first_study.exists()  # the first machine's copy, untouched

    rebuilt = tmp_path / "rebuilt.csv"
    assert report_cli.main([experiment, "--out", str(rebuilt)]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(rebuilt), df)

    best = df.sort_values("val_mse").iloc[0]
    assert evaluate.main([best.checkpoint, "--pairs", "50", "--threads", "1"]) == 0
    local = evaluate.local_copy(best.checkpoint)
    assert load_checkpoint(local)["epoch"] == 2 and local.with_name("separation.png").exists()
    # Nothing of the experiment went to local storage: no runs/ beside the report.
    assert not (tmp_path / "runs").exists()
    assert Path(storage.local_dir(experiment)).with_name(".sweep.driver.lock").exists()
