"""The sweep for real: a Ray instance, Optuna, tiny trials on real data, a killed driver."""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import optuna
import pandas as pd
import pytest

from data.sources import load_mnist
from model.unet import PRESETS, UNetConfig, params_of, train_flops_per_sample
from sweep import curve, long_runs, run, tuner
from sweep import report as report_cli
from sweep.config import SETTINGS_FILE, first_rung, scoring_pairs
from sweep.experiment import check_same_sweep
from sweep.progress import best_val_mse, epoch_news
from sweep.report import COLUMNS, build_report, load_trials, pareto_front
from sweep.space import SMALLEST, fit_budget, space, start_points
from sweep.train import TrainConfig, split_config

REPO = Path(__file__).resolve().parents[1]
# Tiny trials: the smallest corner of the space, a few hundred samples an epoch.
TINY = ["--samples-per-epoch", "512", "--val-pairs", "100", "--test-pairs", "100",
        "--max-params", "20000", "--max-epochs", "2"]


def sweep_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["--storage", str(tmp_path / "runs"), "--report", str(tmp_path / "report.csv"),
            *TINY, *extra]


def every_trial_the_warm_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every trial of an in-process sweep with TINY's budget trains the warm start's design
    (the first trial's: `small` fitted to --max-params), not the one Optuna draws. For
    tests whose checks hold whatever the designs: they wait for their slowest trial, and
    a random draw within the budget can train 8x slower per sample than the warm start."""
    point = start_points(int(TINY[TINY.index("--max-params") + 1]))[0]
    # A partial of a module's function: the searcher is pickled with the experiment.
    monkeypatch.setattr(tuner, "space", functools.partial(warm_start_design, point=point))


def warm_start_design(trial, constants: dict, point: dict, **kw) -> dict:
    return {**space(trial, constants, **kw), **point}


def results(experiment: Path) -> dict[str, list[dict]]:
    """Every result line each trial reported, from its result.json, by trial id; read while
    the driver appends to them, so a last line still being written is left for the next
    look."""
    lines = {}
    for trial_dir in experiment.glob("trial_*"):
        path, rows = trial_dir / "result.json", []
        for text in path.read_text().splitlines() if path.exists() else []:
            try:
                rows.append(json.loads(text))
            except json.JSONDecodeError:
                break
        lines[trial_dir.name.removeprefix("trial_")] = rows
    return lines


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals],
                    key=lambda x: (x[0], x[1]))
    running = best = 0
    for _, change in events:
        running += change
        best = max(best, running)
    return best


# --- the command line ----------------------------------------------------------------------

@pytest.mark.parametrize("argv, flag", [
    (["--gpus", "-1"], "--gpus"),
    (["--trials", "0"], "--trials"),
    (["--trials", "many"], "--trials"),
    (["--objective", "fastest"], "--objective"),
    (["--gpus", "2", "--gpus-per-trial", "3"], "--gpus-per-trial"),
    (["--cpus", "1", "--cpus-per-trial", "2"], "--cpus-per-trial"),
    (["--max-params", "10"], "--max-params"),
    (["--time-budget", "nan"], "--time-budget"),
    (["--name", "../elsewhere"], "--name"),
    (["--address", "auto", "--cpus", "2"], "--address"),
    (["--gpu", "4"], "--gpu"),
    (["--trial", "5"], "--trial"),  # no abbreviations: a resume compares exact settings
])
def test_bad_flags_are_refused_with_one_line(tmp_path, capsys, argv, flag):
    try:
        code = run.main(sweep_args(tmp_path) + argv)
    except SystemExit as e:  # argparse's own refusal: usage line + error line, exit 2
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert flag in err[-1] and "error" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "runs").exists(), "nothing may start on a bad flag"


def test_long_runs_refuse_what_they_cannot_do_in_one_line(tmp_path, capsys):
    """--from: a source that is no experiment, or one Tune cannot read, the target itself,
    --samples-per-epoch, --study-storage or no --samples; --top alone. And a resumed long
    run keeps its trial count, where --fresh picks anew from the source."""
    source = tmp_path / "runs" / "src"
    source.mkdir(parents=True)
    base = ["--storage", str(tmp_path / "runs"), "--report", str(tmp_path / "r.csv")]
    cases = [
        (["--top", "2"], "--top and --samples choose long runs"),
        (["--from", str(source), "--samples", "1000"], "is not a sweep's experiment"),
        (["--from", str(source), "--samples", "1000", "--name", "src"],
         "is the experiment the long runs would go to"),
        (["--from", str(source), "--samples", "1000", "--samples-per-epoch", "512"],
         "--samples-per-epoch does not go with --from"),
        (["--from", str(source), "--samples", "1000", "--study-storage", "sqlite:///x.db"],
         "--study-storage does not go with --from"),
        (["--from", str(source)], "--from needs --samples"),
    ]
    for argv, phrase in cases:
        assert run.main(base + argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and phrase in err, (argv, err)
    (source / "experiment_state-2026-12-01_00-00-00.json").write_text("{}")
    assert run.main(base + ["--from", str(source), "--samples", "1000"]) == 2
    assert "Ray Tune cannot read its experiment state" in capsys.readouterr().err
    # Resuming: the count the experiment began with, without reading the source again.
    target = tmp_path / "runs" / "src-long"
    target.mkdir()
    (target / SETTINGS_FILE).write_text('{"trials": 3}')
    assert run.parse_args(base + ["--from", str(source), "--samples", "1000"]).trials == 3
    assert run.main(base + ["--from", str(source), "--samples", "1000", "--fresh"]) == 2
    assert "Ray Tune cannot read" in capsys.readouterr().err  # --fresh: picked anew


def test_a_long_run_from_a_checkpoint_trains_its_design(tmp_path, capsys, sources):
    """--from FILE.pt: the config a checkpoint trained with becomes one long run, named
    after its folder, without the fields that only said how it ran; a checkpoint from
    before the recipe fields gets today's recipe. One that is missing, or over
    --max-params, is refused in one line."""
    from sweep.checkpoint import save_checkpoint
    from sweep.progress import source_trials
    from sweep.train import LEGACY_RECIPE, run_trial

    model_cfg = UNetConfig(base_filters=8, depth=1)
    cfg = TrainConfig(epochs=1, samples_per_epoch=64, val_pairs=20, threads=1, lr=5e-3,
                      optimizer="adamw", schedule="wsd")
    [(_, state, _)] = list(run_trial(model_cfg, cfg, sources, cfg.fast_path()))
    run_dir = tmp_path / "2026-12-03-tiny"
    run_dir.mkdir()
    save_checkpoint(state, run_dir / "checkpoint.pt")
    base = ["--storage", str(tmp_path / "runs"), "--report", str(tmp_path / "r.csv"),
            "--samples", "1000", "--max-epochs", "2"]
    c = run.parse_args(["--from", str(run_dir / "checkpoint.pt"), *base])
    assert (c.name, c.trials) == ("2026-12-03-tiny-long", 1)
    assert source_trials(c) == []  # no sweep's trials to report beside it
    [long] = long_runs.front_configs(c.from_experiment, 3, None, 1000, 2, 50, 100)
    assert split_config(long)[0] == model_cfg
    assert (long["optimizer"], long["schedule"], long["lr"]) == ("adamw", "wsd", 5e-3)
    assert (long["epochs"], long["test_pairs"]) == (2, 100)
    assert not {"threads", "device", "precision", "compile"} & set(long)

    for key in LEGACY_RECIPE:  # a checkpoint saved before the recipe fields
        del state["train_config"][key]
    save_checkpoint(state, run_dir / "checkpoint.pt")
    [long] = long_runs.front_configs(c.from_experiment, 3, None, 1000, 2, 50, 100)
    today = TrainConfig()
    assert (long["optimizer"], long["schedule"], long["lr"]) == (
        today.optimizer, today.schedule, today.lr)

    params = params_of(model_cfg)
    cases = [(["--from", str(tmp_path / "gone.pt")], "gone.pt: no such checkpoint file"),
             (["--from", str(run_dir / "checkpoint.pt"), "--max-params", str(params - 1)],
              f"its design has {params:,} parameters, over --max-params {params - 1:,}")]
    for argv, phrase in cases:
        assert run.main(base + argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and phrase in err, (argv, err)


def test_a_longer_run_goes_on_from_its_checkpoint_with_the_schedule_stretched(
        tmp_path, capsys, sources):
    """--from FILE.pt --extend --samples N: one trial that begins at the checkpoint's epoch,
    from its state, and trains epochs of its size up to N samples, the linear schedule
    stretched to the new end: the very weights of the checkpoint resumed by hand under the
    longer config. The same command again trains nothing; what cannot be extended is
    refused in one line."""
    import torch

    from bench import forecast
    from sweep.checkpoint import save_checkpoint
    from sweep.train import as_longer_run, run_trial
    from sweep.trainable import newest_good_checkpoint

    model_cfg = UNetConfig(base_filters=8, depth=1)
    cfg = TrainConfig(epochs=2, samples_per_epoch=64, val_pairs=20, schedule="linear")
    _, state, _ = next(run_trial(model_cfg, cfg, sources, cfg.fast_path()))  # 1 epoch of 2
    source = tmp_path / "2026-12-03-tiny" / "checkpoint.pt"
    source.parent.mkdir()
    save_checkpoint(state, source)
    where = ["--test-pairs", "50", "--storage", str(tmp_path / "runs"),
             "--report", str(tmp_path / "r.csv"), "--cpus", "1"]
    argv = ["--from", str(source), "--extend", "--samples", "256", "--name", "longer", *where]
    assert run.main(argv) == 0
    assert f"long runs of {source}, extended" in capsys.readouterr().out
    experiment = tmp_path / "runs" / "longer"
    [rows] = results(experiment).values()
    assert [r["epoch"] for r in rows] == [2, 3, 4] and rows[-1]["status"] == "finished"
    # Linear to 0 over 4 epochs now: half the peak after epoch 2 (the checkpoint's own
    # schedule would have ended there), a quarter after epoch 3.
    peak = state["optimizer"]["param_groups"][0]["initial_lr"]
    assert [r["lr"] for r in rows] == pytest.approx([peak / 2, peak / 4, 0])
    assert rows[0]["train_seconds"] > state["train_seconds"]  # its clock goes on too

    [trial_dir] = experiment.glob("trial_*")
    final, _, _ = newest_good_checkpoint(trial_dir)
    longer = replace(cfg, epochs=4, test_pairs=50)
    *_, (_, by_hand, _) = run_trial(model_cfg, longer, sources, longer.fast_path(),
                                    as_longer_run(state, longer))
    assert final["epoch"] == by_hand["epoch"] == 4
    assert all(torch.equal(final["model"][k], by_hand["model"][k]) for k in by_hand["model"])
    assert final["train_config"]["extends"] == str(source)

    before = results(experiment)
    assert run.main(argv) == 0 and results(experiment) == before

    # Longer again, from epoch 3: its curve runs through both, cut where it went on, and
    # is drawn the same from a copy of the storage folder elsewhere (a clone).
    [epoch3] = [r["checkpoint_dir_name"] for r in rows if r["epoch"] == 3]
    again = ["--from", str(trial_dir / epoch3 / "checkpoint.pt"), "--extend", "--samples",
             "384", "--name", "longest", *where]
    assert run.main(again) == 0
    capsys.readouterr()
    moved = tmp_path / "clone" / "runs"
    shutil.copytree(tmp_path / "runs", moved)
    for storage_dir in (tmp_path / "runs", moved):
        [longest] = (storage_dir / "longest").glob("trial_*")
        assert curve.main([str(longest)]) == 0
        assert "5 epochs (longer -> longest), 384 of 384 samples" in capsys.readouterr().out
        drawn = pd.read_csv(longest / "curve.csv")
        assert drawn["epoch"].tolist() == [2, 3, 4, 5, 6]
        assert drawn["run"].tolist() == ["longer"] * 2 + ["longest"] * 3
        assert (longest / "curve.png").read_bytes()[:4] == b"\x89PNG"
    # bench/forecast.py reads a finished trial's curve the same way, the source's epochs in.
    newest, newest_path, _ = newest_good_checkpoint(longest)
    assert forecast.learning_curve(newest_path, newest)["samples"].tolist() \
        == drawn["samples"].tolist()
    assert curve.main([str(experiment)]) == 2
    assert "is not a trial's folder" in capsys.readouterr().err

    # The annealed probe of epoch 3, as anneal_forecast.py prints it, then one cut short.
    probe = subprocess.run([sys.executable, str(REPO / "bench" / "anneal_forecast.py"),
                            str(trial_dir / epoch3 / "checkpoint.pt"), "--samples", "64",
                            "--threads", "1"], capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    [score] = [float(line.split()[1]) for line in probe.stdout.splitlines()
               if line.startswith("annealed_val_mse: ")]
    probes = tmp_path / "probes.txt"
    probes.write_text(f"{probe.stdout}== killed\n{trial_dir / epoch3}: epoch 3, val_mse 1e-3\n")
    assert curve.probe_scores(probes.read_text()) == [(3, score)]
    assert curve.main([str(longest), "--probes", str(probes)]) == 0
    assert "5 epochs (longer -> longest), annealed probes: 1" in capsys.readouterr().out
    assert curve.main([str(longest), "--probes", str(tmp_path / "gone.txt")]) == 2
    assert "--probes" in capsys.readouterr().err

    cases = [(["--extend"], "--extend goes on from a checkpoint"),
             (["--from", str(experiment), "--extend", "--samples", "256"],
              "--extend goes on from a checkpoint"),
             (["--from", str(source), "--extend", "--samples", "64"],
              "has trained 64 samples already (1 epochs)"),
             (["--from", str(source), "--extend", "--samples", "256", "--max-epochs", "8"],
              "--max-epochs and --val-pairs do not go with --extend")]
    for extra, phrase in cases:
        assert run.main([*extra, "--name", "other", *where]) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and phrase in err, (extra, err)


def test_default_scoring_sets_grow_with_the_trial_up_to_the_task_sizes():
    assert scoring_pairs(8192, 2) == (512, 54)  # the default sweep
    assert scoring_pairs(512, 1) == (250, 50)  # floors
    assert scoring_pairs(100_000, 60) == (2_000, 20_000)  # the task's own sizes
    config = run.parse_args(["--samples-per-epoch", "48000", "--max-epochs", "10"])
    assert (config.val_pairs, config.test_pairs) == (2_000, 1_600)
    config = run.parse_args(["--val-pairs", "300", "--test-pairs", "0"])  # given: kept
    assert (config.val_pairs, config.test_pairs) == (300, 0)


def test_asha_first_compares_trials_after_enough_samples():
    assert first_rung(8192, 2) == 1  # the default sweep: one epoch is plenty
    assert first_rung(2048, 8) == 2  # two short epochs, not one
    assert first_rung(1000, 8) == 5  # ceil(4096 / 1000)
    assert first_rung(512, 2) == 2  # never past the last epoch
    assert first_rung(62_500, 8, 250_000) == 4  # --first-rung-samples 250000
    config = run.parse_args(["--first-rung-samples", "250000"])
    assert config.first_rung_samples == 250_000


def test_the_search_starts_from_the_small_preset_fitted_to_the_budget():
    study = optuna.create_study()

    def first_trial(max_params):
        point = start_points(max_params)[0]  # fitted before Optuna gets it
        study.enqueue_trial(point)
        trial = study.ask()
        config = space(trial, constants={})
        # The point names exactly what the space asks for, so Optuna suggests nothing else,
        # and the config that trains is the point Optuna stores.
        assert trial.params == point
        assert {k: config[k] for k in point} == point
        assert (config["lr"], config["batch_size"]) == (TrainConfig().lr, 64)
        return split_config(config)[0]

    assert first_trial(max_params=None) == PRESETS["small"]
    assert params_of(first_trial(max_params=20_000)) <= 20_000


def test_every_suggestion_builds_fits_its_budget_and_smallest_is_the_floor():
    """Random suggestions of the whole space, levers included: each builds, none has fewer
    parameters than SMALLEST, and fit_budget (the start point's) shrinks every one to fit a
    budget of SMALLEST's size (a NAF-block or gated model too), so run.py's floor check is
    the true floor."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    floor = params_of(SMALLEST)
    seen = set()
    for _ in range(60):
        trial = study.ask()
        config = space(trial, constants={})
        free = split_config(config)[0]
        assert params_of(free) >= floor
        seen.add((free.block, free.output))
        if free.output == "one":  # the projection is moot there, so never asked
            assert "mixture_consistent" not in trial.params
        model = {k: v for k, v in config.items() if k in UNetConfig.__dataclass_fields__}
        shrunk = split_config({**config, **fit_budget(model, floor)})[0]
        assert params_of(shrunk) <= floor
        # A sweep begun before suggestions were refused binds max_params: resumed, it goes
        # on shrinking them as it began.
        resumed = split_config(space(study.ask(), constants={}, max_params=floor))[0]
        assert params_of(resumed) <= floor
    assert seen == {(b, o) for b in ("plain", "residual", "naf") for o in ("both", "one")}


# --- the report ------------------------------------------------------------------------------

def test_pareto_flag_on_a_hand_made_table():
    params = pd.Series([100, 200, 200, 300, 400, 50, 500])
    mse = pd.Series([0.5, 0.3, 0.4, 0.3, 0.1, float("nan"), 0.1])
    # 100/0.5: smallest with a score; 200/0.3 better; 200/0.4 dominated by 200/0.3;
    # 300/0.3 ties in MSE with fewer params elsewhere; 400/0.1 better; NaN never;
    # 500/0.1 dominated by 400/0.1.
    assert pareto_front(params, mse).tolist() == [True, True, False, False, True, False, False]


def test_build_report_has_every_column_and_flags_the_front():
    records = [{"trial_id": "b", "status": "finished", "params": 10, "val_mse": 0.2},
               {"trial_id": "a", "status": "finished", "params": 20, "val_mse": 0.1},
               {"trial_id": "c", "status": "error", "params": 30, "val_mse": None}]
    df = build_report(records)
    assert list(df.columns) == COLUMNS
    assert df["trial_id"].tolist() == ["a", "b", "c"]
    assert df["pareto"].tolist() == [True, True, False]



def test_the_progress_line_says_when_a_trial_reaches_its_last_epoch():
    result = {"epoch": 50, "val_mse": 5.293e-4, "time_this_iter_s": 250.0}
    assert epoch_news(result, 140) == "epoch 50/140: val_mse 5.293e-04, ~6.2 h to epoch 140"
    assert epoch_news({**result, "epoch": 138}, 140).endswith(", ~8 min to epoch 140")
    assert epoch_news({**result, "epoch": 140}, 140) == "epoch 140/140: val_mse 5.293e-04"
    assert epoch_news({"epoch": 3}, None) == "epoch 3: val_mse nan"  # an old trial's config


def test_the_progress_lines_best_counts_the_result_being_reported():
    # Tune hands a result to the callbacks before it becomes the trial's last_result: the
    # best printed beside an epoch's news must count that epoch, not the one before.
    a = SimpleNamespace(trial_id="a", last_result={"val_mse": 5.158e-4})
    b = SimpleNamespace(trial_id="b", last_result={})
    assert best_val_mse([a, b], newest={"a": {"val_mse": 5.087e-4}}) == "5.087e-04"
    assert best_val_mse([a, b]) == "5.158e-04"
    assert best_val_mse([b], newest={"b": {"val_mse": math.nan}}) == "-"


# --- whole sweeps ----------------------------------------------------------------------------

def test_sweep_runs_reports_and_rebuilds(tmp_path, capsys):
    # The multi-objective search here; the other sweeps in the tests use the default (mse).
    argv = sweep_args(tmp_path, "--trials", "4", "--objective", "pareto")
    assert run.main(argv) == 0
    out = capsys.readouterr().out
    df = pd.read_csv(tmp_path / "report.csv")
    best = df.sort_values("val_mse").iloc[0]
    assert f"best: trial {best.trial_id}, val_mse {best.val_mse:.3e}" in out
    assert f"evaluate:   python sweep/evaluate.py {best.checkpoint}" in out

    assert list(df.columns) == COLUMNS
    assert len(df) == 4
    assert set(df["status"]) <= {"finished", "stopped early"}
    assert (df["params"] <= 20000).all()
    finished = df[df["status"] == "finished"]
    assert len(finished) >= 1
    assert finished["test_mse_mean"].notna().all() and (finished["test_pairs"] == 100).all()
    assert (df.loc[df["val_mse"].notna(), "scored_in"] == "fp32").all()
    assert df["pareto"].any()
    assert all(Path(p).is_file() for p in df["checkpoint"])
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"

    experiment = tmp_path / "runs" / "sweep"
    for trial_dir in experiment.glob("trial_*"):  # scalars (Tune) and images (ours)
        assert list(trial_dir.glob("events.out.tfevents.*"))
        assert list((trial_dir / "images").glob("events.out.tfevents.*"))
    # 4 trials, 2 at a time: workers went on to later trials (reuse_actors), and each
    # trial's images still landed in its own directory (checked above).
    pids = {rows[0]["pid"] for rows in results(experiment).values()}
    assert len(pids) < 4, pids
    configs = {t.trial_id: t.config for t in load_trials(experiment)}
    # The warm start: one trial has the small preset's settings (shrunk to the budget).
    warm = [c for c in configs.values() if (c["lr"], c["batch_size"]) == (TrainConfig().lr, 64)]
    assert len(warm) >= 1
    # Size and FLOPs are counted by the report, from each trial's config.
    for row in df.itertuples():
        model_cfg = split_config(configs[row.trial_id])[0]
        assert row.flops_per_sample == train_flops_per_sample(model_cfg) > 0
        assert row.params == params_of(model_cfg)

    rebuilt = tmp_path / "rebuilt.csv"
    assert report_cli.main([str(experiment), "--out", str(rebuilt)]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(rebuilt), df)

    # The same command again: everything ended, nothing runs twice.
    before = results(experiment)
    assert run.main(argv) == 0
    assert results(experiment) == before

    check_long_runs_of_the_front(experiment, tmp_path, capsys)

    # Another command on the same experiment: Tune would resume it with the settings it
    # began with and ignore the new ones, so it is refused (--fresh starts anew).
    capsys.readouterr()
    other = sweep_args(tmp_path, "--trials", "6", "--objective", "pareto", "--seed", "3")
    assert run.main(other) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {experiment} is a sweep begun "
                                                    "with --trials 4 (asked: 6), --seed 0 "
                                                    "(asked: 3); its own command continues it")
    assert results(experiment) == before
    # Where it runs may change on resume (a lost node, another machine): not refused.
    check_same_sweep(run.parse_args(argv + ["--cpus", "1"]))
    # --fresh moves the old experiment aside, whole, and starts anew with the new settings:
    # here a time budget that ends the sweep, running trials stopped early, the rest never
    # started. Tune keeps the budget's clock with the experiment, so the end must not say
    # "run the same command to continue": that command would end at once.
    capsys.readouterr()
    budget = sweep_args(tmp_path, "--trials", "40", "--samples-per-epoch", "2048",
                        "--time-budget", "10", "--fresh")
    assert run.main(budget) == 0
    out = capsys.readouterr().out
    [aside] = experiment.parent.glob("sweep.old-*")
    assert results(aside) == before
    df = pd.read_csv(tmp_path / "report.csv")
    assert 0 < len(df) < 40 and "stopped early" in set(df["status"])
    assert f"time budget used up (10 s): {len(df)} of 40 trials ran" in out
    assert "interrupted" not in out


def check_long_runs_of_the_front(source: Path, tmp_path: Path, capsys) -> None:
    """--from SOURCE --top 2 --samples N: the two front configs with the lowest val MSE,
    trained again for N samples as the trials of SOURCE-long, reported beside the source's
    own trials; the same command again trains nothing."""
    argv = ["--from", str(source), "--top", "2", "--samples", "1024", "--max-epochs", "2",
            "--test-pairs", "100", "--storage", str(tmp_path / "runs"),
            "--report", str(tmp_path / "long.csv")]
    capsys.readouterr()
    assert run.main(argv) == 0
    out = capsys.readouterr().out
    assert "long runs of 2 configs" in out and "study:" not in out  # no search, no study
    experiment = tmp_path / "runs" / f"{source.name}-long"
    source_trials = load_trials(source)
    chosen = [t.config for t in long_runs.pick_front(source_trials, 2, None)]
    long_trials = load_trials(experiment)
    budget = {"epochs", "samples_per_epoch", "val_pairs", "test_pairs"}
    # In any key order: Tune orders a long run's config as its param_space, the first
    # chosen config's keys.
    assert sorted(str(sorted((k, v) for k, v in t.config.items() if k not in budget))
                  for t in long_trials) == sorted(
        str(sorted((k, v) for k, v in c.items() if k not in budget)) for c in chosen)
    for t in long_trials:  # whole batches, 2 epochs of at least 512 samples each
        assert t.config["epochs"] == 2 and t.config["samples_per_epoch"] >= 512
        assert t.config["samples_per_epoch"] % t.config["batch_size"] == 0
    df = pd.read_csv(tmp_path / "long.csv")
    assert len(df) == len(source_trials) + 2  # the source's rows beside the long runs'
    ours = df[df["trial_id"].isin({t.trial_id for t in long_trials})]
    assert (ours["status"] == "finished").all() and (ours["epochs"] == 2).all()
    assert (ours["test_pairs"] == 100).all() and ours["test_mse_mean"].notna().all()
    before = results(experiment)
    assert run.main(argv) == 0 and results(experiment) == before


def test_report_cli_refuses_a_directory_that_is_no_experiment(tmp_path, capsys):
    assert report_cli.main([str(tmp_path)]) == 2
    assert "not a sweep's experiment directory" in capsys.readouterr().err
    (tmp_path / "experiment_state-2026.json").write_text("{}")  # foreign: Tune cannot read it
    assert report_cli.main([str(tmp_path), "--out", str(tmp_path / "r.csv")]) == 2
    assert "Ray Tune cannot read its experiment state" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        report_cli.main([str(tmp_path), "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "is a directory" in capsys.readouterr().err


def test_logical_gpus_bound_concurrency(tmp_path, monkeypatch):
    """Logical GPUs on this CPU machine: 4 half-GPU trials packed two to a GPU on 2, each
    seeing its device's id; the trials still run on the CPU. One trial more than the GPUs
    hold waits: 16 CPUs alone would run it. (A case of 4 one-GPU trials on 4 GPUs ran the
    same code with other numbers, for 43 s of CI's 10 minutes.)"""
    # All the warm start's design: the 4 spans overlap if the last to start does so before
    # the first ends, and the first 4 always held the warm start, so none ends sooner.
    every_trial_the_warm_start(monkeypatch)
    gpus, gpus_per_trial = "2", "0.5"
    expected = round(float(gpus) / float(gpus_per_trial))
    argv = sweep_args(tmp_path, "--gpus", gpus, "--gpus-per-trial", gpus_per_trial,
                      "--cpus", "16", "--trials", str(expected + 1), "--max-epochs", "1",
                      "--samples-per-epoch", "4096", "--test-pairs", "0")
    assert run.main(argv) == 0
    trials_run = load_trials(tmp_path / "runs" / "sweep")
    assert len(trials_run) == expected + 1
    spans, devices = [], []
    for t in trials_run:
        r = t.last_result
        spans.append((r["started_at"], r["reported_at"]))
        devices.append(r["cuda_visible_devices"])
        assert r["threads"] == 1  # one CPU each: no oversubscription
    assert max_overlap(spans) == expected
    assert set(devices) <= {str(i) for i in range(int(gpus))}
    # Trials at once on one device: one at a whole GPU; at half a GPU two, as they must.
    on_one_device = [max_overlap([span for span, d in zip(spans, devices, strict=True)
                                  if d == device]) for device in set(devices)]
    assert max(on_one_device) == round(1 / float(gpus_per_trial))


def test_two_node_cluster_runs_trials_on_both_nodes_each_with_its_own_data_cache(
        tmp_path, capsys):
    """A two-node cluster whose second node has a data cache of its own, empty. A trial no
    node can hold is refused before anything starts. Trials run on both nodes: the driver
    fills only its own cache, and the trial on the second node fills that node's (once:
    sources.py locks it, tests/test_data.py forces the race) and finishes. With that cache
    damaged, a trial there ends at once as error, the reason in one line in the report, not
    retried. Before, Tune retried a DataError that cannot succeed, twice."""
    import ray
    from ray.cluster_utils import Cluster

    other_cache = tmp_path / "second-node-cache"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1, env_vars={"UNET_SWEEP_CACHE": str(other_cache)})
    cluster.wait_for_nodes()
    try:
        # Two trials at once, one on each node (one CPU each).
        argv = sweep_args(tmp_path, "--address", cluster.address, "--trials", "2",
                          "--max-epochs", "1", "--no-early-stop")
        # A trial no node can hold (2 CPUs; each node has 1) is refused, not left waiting.
        assert run.main([*argv, "--cpus-per-trial", "2"]) == 2
        assert "--cpus-per-trial 2 is more than any node has" in capsys.readouterr().err
        assert not list((tmp_path / "runs" / "sweep").glob("trial_*"))
        assert run.main(argv) == 0
        df = pd.read_csv(tmp_path / "report.csv")
        assert (df["status"] == "finished").all() and df["node"].nunique() == 2, df
        assert load_mnist(cache_dir=other_cache).source == f"cache {other_cache / 'mnist'}"
        (other_cache / "mnist" / "train.npy").write_bytes(b"damaged")
        capsys.readouterr()
        assert run.main([*argv, "--name", "damaged"]) == 0
    finally:
        ray.shutdown()
        cluster.shutdown()
    out = capsys.readouterr().out
    df = pd.read_csv(tmp_path / "report.csv")
    # Which trials land on the damaged node is Ray's choice: a trial that fails there at
    # once frees its CPU, and the next may be placed there too. Each ends one way or the
    # other, and at least one tried the damaged node.
    errors = df.loc[df["status"] == "error", "error"]
    assert len(errors) >= 1 and set(df["status"]) <= {"error", "finished"}, df
    for error in errors:
        assert error.startswith("no data on this node: ") and "\n" not in error, error
        assert f"{other_cache / 'mnist' / 'train.npy'}: unreadable cache file" in error
    assert "retry" not in out, out


@pytest.mark.slow  # the same, killed at each point of a sweep: tests/test_faults.py
def test_sigkill_of_the_driver_then_the_same_command_resumes(tmp_path):
    cmd = [sys.executable, str(REPO / "sweep" / "run.py"),
           # No ASHA: a trial it stopped looks running (its reused worker lives on).
           *sweep_args(tmp_path, "--trials", "5", "--max-epochs", "3",
                       "--samples-per-epoch", "3072", "--max-params", "12000",
                       "--no-early-stop")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    experiment = tmp_path / "runs" / "sweep"
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    # Kill once a trial has finished and another holds a checkpoint that is a few seconds
    # old (so Tune's 2 s experiment snapshot knows it).
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        time.sleep(0.5)
        lines = results(experiment)
        finished = [t for t, r in lines.items() if r and r[-1]["status"] == "finished"]
        running = [t for t, r in lines.items() if r and r[-1]["status"] == "running"
                   and time.time() - r[-1]["reported_at"] > 3  # the snapshot knows it
                   and Path(f"/proc/{r[-1]['pid']}").exists()]  # not stopped by ASHA
        if finished and running:
            break
    else:
        driver.kill()
        pytest.fail("the sweep never reached the state to kill it in:\n"
                    + (tmp_path / "driver.log").read_text()[-3000:])
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    before = results(experiment)

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert "resuming the sweep" in rerun.stdout
    # The progress clock goes on from the last snapshot (2 s, and 0.1 min rounding).
    clock = re.compile(r"^\[\s*([\d.]+) min\]", re.M)
    killed_at = float(clock.findall((tmp_path / "driver.log").read_text())[-1])
    assert float(clock.findall(rerun.stdout)[0]) >= killed_at - 0.15, rerun.stdout[-2000:]
    after = results(experiment)
    df = pd.read_csv(tmp_path / "report.csv")
    assert len(df) == 5 and set(df["status"]) == {"finished"}
    # The Optuna study went on from its saved state: a study started afresh with the same
    # seed would propose the configs before the kill again, and the warm start twice.
    configs = [t.config for t in load_trials(experiment)]
    assert len({json.dumps(c, sort_keys=True) for c in configs}) == 5
    assert sum(c["lr"] == TrainConfig().lr and c["batch_size"] == 64 for c in configs) == 1

    for trial in finished:  # kept as it was: no epoch trained again
        # train_seconds, not val_mse: training is exact, so a retrained epoch would score
        # the same; its wall-clock time would not. (A trial that ended between Tune's
        # snapshots reports its saved last result once more: the same row again.)
        epochs_before = [(r["epoch"], r["train_seconds"]) for r in before[trial]]
        assert sorted(set((r["epoch"], r["train_seconds"]) for r in after[trial])) == \
            epochs_before
    for trial in running:  # continued from its checkpoint, not from scratch
        resumed = [r for r in after[trial][len(before[trial]):]]
        assert resumed, f"trial {trial} did not continue"
        # From the newest checkpoint on disk: at least the last epoch the driver logged
        # (the worker may have saved one more before the driver died).
        first = resumed[0]
        assert first["resumed_from_epoch"] >= before[trial][-1]["epoch"]
        if first["resumed_from_epoch"] == 3:
            # Its last epoch was saved after the driver's last look: reported as it ended,
            # not trained again (seen once in CI).
            assert first["status"] == "finished" and first["epoch"] == 3
        else:
            assert first["epoch"] == first["resumed_from_epoch"] + 1
