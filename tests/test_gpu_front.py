"""bench/gpu_front.py without a GPU: its dry run on the CPU from IDX files without Ray,
a failed part that leaves the others, a trainer killed at its deadline, and the sizing
that makes a run's schedule end inside its window (docs/gpu-check.md)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data.sources import write_idx
from sweep.checkpoint import load_checkpoint
from sweep.recipe import lr_factor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # bench/ holds scripts, not an installed package
from bench import gpu_front  # noqa: E402
from bench.gpu_front import Context, Trainer, chosen_batch, size_run  # noqa: E402

GPU_FRONT = REPO / "bench" / "gpu_front.py"
ABSENT_THERE = ("ray", "optuna", "tensorboardX")  # the GPU machine has none of these


def test_dry_run_on_the_cpu_from_idx_files_without_ray(tmp_path: Path) -> None:
    idx = tmp_path / "idx"
    write_idx(idx, level=1)  # the data as it travels to the GPU machine
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    for name in ABSENT_THERE:
        (blocked / f"{name}.py").write_text(f"raise ImportError('{name} is not there')\n")
    env = {**os.environ, "PYTHONPATH": str(blocked), "CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "out"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(GPU_FRONT), "--device", "cpu", "--quick",
         "--mnist-dir", str(idx / "mnist"), "--fashion-dir", str(idx / "fashion-mnist"),
         "--out", str(out)], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    took = time.monotonic() - started
    text = result.stdout
    assert result.returncode == 0, text[-3000:] + result.stderr[-2000:]
    assert text.splitlines()[-1] == "gpu_front: ok"
    assert took < gpu_front.QUICK.total_s + 15, took  # its own deadline, plus start-up
    # Part 1: throughput of each design at each batch, an exact resume, the CPU's score.
    rows = list(csv.DictReader((out / "throughput.csv").open()))
    assert {(r["design"], int(r["batch_size"])) for r in rows} == {
        (d, b) for d in gpu_front.QUICK.designs for b in gpu_front.QUICK.batches}
    assert "same weights bit for bit" in text
    assert "device and CPU scores 0.00% apart" in text
    # Parts 2 and 3: every design trained to the end of its schedule and scored.
    front = {r["design"]: r for r in csv.DictReader((out / gpu_front.FRONT_CSV).open())}
    assert set(front) == set(gpu_front.QUICK.designs)
    for name in gpu_front.QUICK.designs:
        figures = json.loads((out / name / "figures.json").read_text())
        assert figures["status"] == "finished" and figures["epoch"] == figures["epochs"]
        assert figures["test_pairs"] == gpu_front.QUICK.test_pairs
        assert 0 < figures["test_mse_mean"] < 0.1
        state = load_checkpoint(out / name / "checkpoint.pt")
        # The schedule ran to its end: the last lr is the schedule's floor.
        floor = lr_factor(gpu_front.RECIPE.schedule, 1.0) * state["train_config"]["lr"]
        assert math.isclose(state["metrics"]["lr"], floor, rel_tol=1e-6, abs_tol=1e-12)
        assert (out / name / "metrics.csv").is_file() and (out / name / "curve.png").is_file()
        line = next(x for x in text.splitlines() if x.startswith(f"  {name}: ") and "-> " in x)
        assert f"test {figures['test_mse_mean']:.3e}" in line


def test_a_failed_part_leaves_the_others(tmp_path: Path, monkeypatch, capsys) -> None:
    def broken(*_):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(gpu_front, "fast_throughput", broken)
    monkeypatch.setattr(gpu_front, "fast_resume", broken)
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    try:
        code = gpu_front.main(["--device", "cpu", "--quick", "--designs", "tiny",
                               "--out", str(out)])
    finally:
        torch.set_num_threads(threads)  # the script's own, for this process's other tests
    lines = capsys.readouterr().out.splitlines()
    assert code == 1
    assert lines[-1] == (
        "gpu_front: FAILED: throughput: CUDA error: an illegal memory access was encountered; "
        "resume: CUDA error: an illegal memory access was encountered; device against cpu: "
        f"{out / 'resume-check' / 'straight.pt'}: no such checkpoint file")
    # The front trained anyway, at the plan's first batch, as no rate was measured.
    figures = json.loads((out / "tiny" / "figures.json").read_text())
    assert figures["status"] == "finished"
    assert figures["batch_size"] == gpu_front.QUICK.batches[0]


def test_a_trainer_past_its_deadline_is_killed_and_said(tmp_path: Path, capsys) -> None:
    ctx = Context(device=torch.device("cpu"), plan=gpu_front.QUICK, out=tmp_path, cache=tmp_path,
                  started=time.monotonic(), started_fast=time.monotonic(), designs=("tiny",),
                  together=True)
    hung = Trainer("tiny", tmp_path / "tiny", 4, deadline=time.monotonic() + 1.0)
    hung.folder.mkdir()
    hung.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                 start_new_session=True)
    hung.started = time.monotonic()
    started = time.monotonic()
    gpu_front.wait_for(ctx, [hung])
    assert time.monotonic() - started < 5
    assert hung.proc.returncode == -9  # killed
    assert ctx.failures == ["tiny: killed at its deadline"]
    assert "tiny: no checkpoint" in capsys.readouterr().out


def test_an_in_process_part_ends_at_its_deadline(capsys) -> None:
    ctx = Context(device=torch.device("cpu"), plan=gpu_front.QUICK, out=Path("."),
                  cache=Path("."), started=time.monotonic(), started_fast=time.monotonic(),
                  designs=("tiny",), together=True)
    started = time.monotonic()
    gpu_front.run_part(ctx, "throughput", 0.5, time.sleep, 30)
    assert time.monotonic() - started < 2
    assert ctx.failures == ["throughput: past its 0.5 s deadline"]


@pytest.mark.parametrize("per_s,seconds,batch,epoch_s", [
    (1000.0, 10.0, 10, 2.0), (30_000.0, 400.0, 1024, 30.0), (50.0, 1.0, 64, 2.0)])
def test_a_run_is_sized_to_end_inside_its_window(per_s, seconds, batch, epoch_s) -> None:
    sizing = size_run(per_s, seconds, batch, epoch_s)
    assert sizing.samples_per_epoch % batch == 0 and sizing.epochs >= 1
    total = sizing.epochs * sizing.samples_per_epoch
    # Whole batches within SAFETY x the window at the measured rate (at least one batch).
    assert total <= max(per_s * seconds * gpu_front.SAFETY, batch * sizing.epochs)


def test_the_batch_is_the_smallest_that_keeps_the_device_busy() -> None:
    assert chosen_batch({256: 20_000.0, 1024: 45_000.0, 4096: 50_000.0}, 256) == 1024
    assert chosen_batch({256: 49_000.0, 1024: 45_000.0, 4096: 50_000.0}, 256) == 256
    assert chosen_batch({}, 256) == 256  # nothing measured: the plan's first


def test_only_a_design_with_batch_norm_gets_its_learning_rates_scaled_with_the_batch() -> None:
    # On an H200 the reference (no batch norm) diverged at 2x the recipe's learning rates
    # while `small` (batch norm) trained well (results/2026-12-04-gpu).
    small, reference = gpu_front.DESIGNS["small263k"], gpu_front.DESIGNS["reference"]
    assert small.model.batch_norm and not reference.model.batch_norm
    recipe = gpu_front.RECIPE
    assert gpu_front.scaled_lr(small, 256) == pytest.approx(2 * recipe.lr)  # sqrt(256 / 64)
    assert gpu_front.scaled_lr(small, 4096) == pytest.approx(gpu_front.MAX_LR_SCALE * recipe.lr)
    assert gpu_front.lr_scale(small, recipe.batch_size) == 1.0
    assert gpu_front.scaled_lr(reference, 4096) == recipe.lr
    assert gpu_front.lr_scale(reference, 4096) == 1.0
