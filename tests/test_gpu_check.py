"""bench/gpu_check.py without a GPU: its dry run on the CPU from IDX files, its one-line
refusal where CUDA is absent, and the rule it holds a resumed run to.

The dry run is the whole check at tiny sizes: the same train.py runs, Ctrl-C and resume,
evaluate.py runs and shared trials a GPU machine would do, so the script cannot rot
between the rare runs on a real GPU (docs/gpu-check.md)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.sources import write_idx
from sweep.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # bench/ holds scripts, not an installed package
from bench import gpu_check  # noqa: E402
from bench.gpu_check import CheckFailed, resume_verdict  # noqa: E402

GPU_CHECK = REPO / "bench" / "gpu_check.py"
# The GPU machine has torch, numpy, pandas and matplotlib, but none of these.
ABSENT_THERE = ("ray", "optuna", "tensorboardX")


def run_check(*args: str, env: dict[str, str] | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GPU_CHECK), *args], capture_output=True,
                          text=True, cwd=REPO, timeout=timeout, env=env)


def test_without_cuda_it_says_so_in_one_line_and_exits_2(tmp_path: Path, capsys,
                                                         monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU machine
    work = tmp_path / "work"
    assert gpu_check.main(["--work", str(work)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1, err
    assert err.startswith("gpu_check: no CUDA device: torch ")
    assert "--device cpu --quick" in err  # says how to dry-run it instead
    assert not work.exists()  # refused before anything was written


def test_missing_idx_files_are_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    code = gpu_check.main(["--device", "cpu", "--quick", "--mnist-dir", str(tmp_path / "empty"),
                           "--work", str(tmp_path / "work")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train-images-idx3-ubyte: missing" in err, err


def test_a_failed_part_ends_the_check_with_its_reason(tmp_path: Path, capsys,
                                                      monkeypatch) -> None:
    def broken(*_):
        raise CheckFailed("reference batch 32 fast default: CUDA error: misaligned address")

    monkeypatch.setattr(gpu_check, "part_throughput", broken)
    code = gpu_check.main(["--device", "cpu", "--quick", "--work", str(tmp_path / "work")])
    assert code == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == ("gpu_check: FAILED: reference batch 32 fast default: CUDA error: "
                         "misaligned address")
    assert not any(line.startswith("[2/4]") for line in lines)  # it stopped there


def test_dry_run_on_the_cpu_from_idx_files_without_ray(tmp_path: Path) -> None:
    # The data as it travels to a GPU machine: IDX files rebuilt from the verified images.
    idx = tmp_path / "idx"
    paths = write_idx(idx, level=1)  # the fastest gzip: the bytes are the same
    assert sorted(p.relative_to(idx).as_posix() for p in paths) == [
        "fashion-mnist/t10k-images-idx3-ubyte.gz", "fashion-mnist/train-images-idx3-ubyte.gz",
        "mnist/t10k-images-idx3-ubyte.gz", "mnist/train-images-idx3-ubyte.gz"]
    # Modules the GPU machine lacks fail to import here too, in the check and its children.
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    for name in ABSENT_THERE:
        (blocked / f"{name}.py").write_text(f"raise ImportError('{name} is not on the GPU "
                                            "machine')\n")
    env = {**os.environ, "PYTHONPATH": str(blocked), "CUDA_VISIBLE_DEVICES": ""}
    work = tmp_path / "work"
    result = run_check("--device", "cpu", "--quick", "--mnist-dir", str(idx / "mnist"),
                       "--fashion-dir", str(idx / "fashion-mnist"), "--work", str(work),
                       env=env)
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-2000:]
    assert out.splitlines()[-1] == "gpu_check: ok"
    assert "data: IDX files, verified" in out
    assert (work / "cache" / "mnist" / "train.npy").is_file()  # what the children read
    # Throughput: both models, both modes, with their achieved TFLOP/s.
    for model in ("reference", "small"):
        for mode in ("fp32 eager", "fast default"):
            assert re.search(rf"^{model} +\d+ +{mode} .* \d+\.\d\dx", out, re.M), (model, mode)
    # 2 epochs = 1 epoch + Ctrl-C + resume, exactly, on the CPU; the checkpoint loads back.
    assert "resume: same weights bit for bit" in out
    loaded = re.search(r"checkpoint loads back on cpu: val_mse (\S+) \(stored (\S+)\)", out)
    # Scored again by a process with another thread count: equal up to float summation order.
    assert loaded and math.isclose(float(loaded[1]), float(loaded[2]), rel_tol=1e-3)
    # Four trials at once, each trained to the end on the device it was given.
    assert re.search(r"aggregate epoch 2: [\d,.]+ samples/s against [\d,.]+ alone: \d+\.\d\dx", out)
    for i in range(gpu_check.QUICK.sharers):
        state = load_checkpoint(work / f"shared-{i}")
        assert state["epoch"] == 2 and state["fast_path"]["device"] == "cpu"
    # evaluate.py's score, the same on the "device" (here the CPU) and the CPU.
    scores = re.findall(r"test_mse: (\S+) ± \S+ \(in fp32; std over 10 sets of 100 pairs", out)
    assert len(scores) == 2 and scores[0] == scores[1], out
    assert "device and CPU scores 0.00% apart" in out


def state(weight: float, epoch: int = 2) -> dict:
    return {"epoch": epoch, "metrics": {"status": "finished" if epoch == 2 else "running"},
            "model": {"w": torch.full((3,), weight), "b": torch.zeros(2)}}


def test_a_resumed_run_is_held_to_the_noise_between_straight_runs() -> None:
    straight = state(1.0)
    # Deterministic kernels (the CPU): anything but bit for bit is a resume bug.
    assert resume_verdict(straight, state(1.0), [state(1.0)] * 4) == \
        "same weights bit for bit"
    with pytest.raises(CheckFailed, match="while 4 repeats match it bit for bit"):
        resume_verdict(straight, state(1.0 + 1e-7), [state(1.0)] * 4)
    # Kernels that are not bitwise deterministic (some of CUDA's): the repeats set the bar.
    noisy = [state(1.0 + d) for d in (1e-4, -2e-4, 5e-5, 0.0)]
    assert "within run-to-run noise" in resume_verdict(straight, state(1.0 + 3e-4), noisy)
    with pytest.raises(CheckFailed, match="more than 2x"):
        resume_verdict(straight, state(1.0 + 1e-3), noisy)
    with pytest.raises(CheckFailed, match="resumed run ended at epoch 1"):
        resume_verdict(straight, state(1.0, epoch=1), noisy)


def test_each_trial_sees_the_checked_gpu_as_its_only_one(monkeypatch) -> None:
    # What runs only on a GPU machine, checked here: the CUDA_VISIBLE_DEVICES of the trials.
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_check.cuda_view(torch.device("cuda")) == "0"
    assert gpu_check.cuda_view(torch.device("cuda:2")) == "2"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")  # cuda:1 is the machine's GPU 7
    assert gpu_check.cuda_view(torch.device("cuda:1")) == "7"
