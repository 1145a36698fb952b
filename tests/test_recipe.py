"""Tests of the training recipe (sweep/recipe.py, sweep/muon.py): Muon's update against a
computation by hand, the schedules, the EMA against torch's AveragedModel, batch norm
as the speedruns use it, and bench/time_to_quality.py's dry run."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from model.unet import PRESETS, UNet, count_params, preset
from sweep.device import choose_fast_path
from sweep.muon import MuonWithAdamW, split_for_muon
from sweep.recipe import Ema, build_optimizer, build_schedule, lr_factor
from sweep.train import LEGACY_LR, LEGACY_RECIPE, RECIPE_FIELDS, TrainConfig

REPO = Path(__file__).resolve().parents[1]


# --- Muon -------------------------------------------------------------------------------------


def muon_by_hand(weight: np.ndarray, grads: list[np.ndarray], lr: float, momentum: float,
                 ns_steps: int) -> np.ndarray:
    """Muon written out in float64: Nesterov momentum, the (dim 0, rest) matrix, the
    quintic Newton-Schulz iteration on its wide orientation, sqrt(max(1, rows/cols))."""
    a, b, c = 3.4445, -4.7750, 2.0315
    w, buf = weight.astype(np.float64), np.zeros_like(weight, dtype=np.float64)
    for g in grads:
        buf = momentum * buf + (1 - momentum) * g
        nesterov = (1 - momentum) * g + momentum * buf
        m = nesterov.reshape(len(nesterov), -1)
        x = m if m.shape[0] <= m.shape[1] else m.T
        x = x / (np.linalg.norm(x) + 1e-7)
        for _ in range(ns_steps):
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
        x = x if m.shape[0] <= m.shape[1] else x.T
        w = w - lr * math.sqrt(max(1, m.shape[0] / m.shape[1])) * x.reshape(w.shape)
    return w


@pytest.mark.parametrize("layer", [nn.Conv2d(6, 4, 3), nn.ConvTranspose2d(12, 2, 2, stride=2)],
                         ids=["conv (4, 6*3*3): wide", "transposed conv (12, 2*2*2): tall"])
def test_muon_update_of_a_filter_matches_the_computation_by_hand(layer: nn.Module) -> None:
    torch.manual_seed(0)
    layer = layer.to(memory_format=torch.channels_last)  # as the trials keep their weights
    start = layer.weight.detach().numpy().copy()
    opt = MuonWithAdamW([layer.weight], [layer.bias], lr=0.02, momentum=0.95, ns_steps=5,
                        adamw_lr=3e-3, weight_decay=1e-4, ns_dtype=torch.float32)
    grads = [torch.randn(layer.weight.shape) for _ in range(3)]
    for g in grads:
        layer.weight.grad = g.clone().contiguous(memory_format=torch.channels_last)
        layer.bias.grad = torch.randn(layer.bias.shape)
        opt.step()
    want = muon_by_hand(start, [g.numpy() for g in grads], 0.02, 0.95, 5)
    np.testing.assert_allclose(layer.weight.detach().numpy(), want, rtol=1e-4, atol=1e-6)
    # ... and the step is an orthogonalized one: singular values near 1, not the grad's.
    step = (want - muon_by_hand(start, [g.numpy() for g in grads[:2]], 0.02, 0.95, 5))
    singular = np.linalg.svd(step.reshape(len(step), -1) / 0.02, compute_uv=False)
    scale = math.sqrt(max(1, step.shape[0] / step[0].size))
    assert np.all((singular / scale > 0.5) & (singular / scale < 1.5)), singular


def test_muon_s_adamw_part_is_torch_s_adamw() -> None:
    torch.manual_seed(0)
    ours, theirs = nn.Linear(5, 3), nn.Linear(5, 3)
    theirs.load_state_dict(ours.state_dict())
    opt = MuonWithAdamW([], list(ours.parameters()), lr=0.02, momentum=0.95, ns_steps=5,
                        adamw_lr=3e-3, weight_decay=1e-4)
    ref = torch.optim.AdamW(theirs.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(5):
        x = torch.randn(8, 5)
        for model, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            model(x).square().mean().backward()
            o.step()
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_muon_takes_the_hidden_filters_and_adamw_the_first_conv_head_norms_biases() -> None:
    model = UNet(PRESETS["small"])
    filters, _ = split_for_muon(model)
    names = {id(p): n for n, p in model.named_parameters()}
    on_muon = {names[id(p)] for p in filters}
    assert "down.0.0.weight" not in on_muon  # the first conv reads the 1-channel mixture
    assert {"down.0.3.weight", "bottleneck.0.weight", "upsample.0.weight",
            "up.1.3.weight"} <= on_muon
    assert all(n.endswith(".weight") and not n.startswith("head.") for n in on_muon)
    assert all(model.get_parameter(n).ndim == 4 for n in on_muon)
    # every conv weight but the first and the head's
    convs = {n for n, p in model.named_parameters() if p.ndim == 4}
    assert convs - on_muon == {"down.0.0.weight", "head.0.weight", "head.1.weight"}


# --- schedules --------------------------------------------------------------------------------


def test_schedules_start_at_the_peak_and_end_where_they_say() -> None:
    assert lr_factor("cosine", 0) == 1 and lr_factor("cosine", 1) == pytest.approx(0.01)
    assert lr_factor("linear", 0) == 1 and lr_factor("linear", 1) == 0
    assert lr_factor("linear", 0.25) == pytest.approx(0.75)
    assert 0 < lr_factor("wsd", 0) < 0.1 and lr_factor("wsd", 1) == 0
    assert lr_factor("wsd", 0.5) == 1 and lr_factor("wsd", 0.9) == pytest.approx(0.5)
    assert lr_factor("linear", 1.7) == 0  # past its budget a clock-driven run stays at the end


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd"])
def test_a_step_budget_s_schedule_ends_at_its_last_step(optimizer: str, schedule: str) -> None:
    cfg = TrainConfig(optimizer=optimizer, schedule=schedule)
    model = UNet(PRESETS["tiny"])
    opt = build_optimizer(model, cfg, choose_fast_path(torch.device("cpu"), "fp32", "off"))
    sched = build_schedule(opt, cfg, total_steps=40)
    for _ in range(40):
        opt.step()
        sched.step()
    for group in opt.param_groups:
        assert group["lr"] == pytest.approx(group["initial_lr"] * lr_factor(schedule, 1),
                                            abs=1e-12)
    if optimizer == "muon":
        assert [g["initial_lr"] for g in opt.param_groups] == [cfg.muon_lr, cfg.lr]


# --- EMA --------------------------------------------------------------------------------------


def test_ema_without_host_sync_matches_averaged_model_bit_for_bit() -> None:
    """The old arithmetic (AveragedModel + get_ema_multi_avg_fn, buffers too), so a
    checkpoint made with it continues the same average."""
    torch.manual_seed(0)
    model = UNet(PRESETS["tiny"])
    ours = Ema.of(model, 0.9)
    theirs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(4, 1, 32, 32)).square().mean().backward()  # moves BN stats too
        opt.step()
        ours.update(model)
        theirs.update_parameters(model)
    assert ours.updates == int(theirs.n_averaged) == 4
    for key, value in theirs.module.state_dict().items():
        assert torch.equal(ours.module.state_dict()[key], value), key


def test_ema_update_reads_nothing_back_from_the_device(monkeypatch) -> None:
    """No tensor turned into a Python value (on a GPU: a sync per step), where
    AveragedModel compares its counter on the host."""
    model = UNet(PRESETS["tiny"])
    ours = Ema.of(model, 0.9)
    theirs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)

    def host_read(self, *args):
        raise AssertionError("a tensor read on the host")

    for name in ("__bool__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    for _ in range(2):
        ours.update(model)
    with pytest.raises(AssertionError, match="read on the host"):
        theirs.update_parameters(model)


# --- batch norm as the speedruns use it ------------------------------------------------------


def test_batch_norm_without_a_learned_scale_drops_one_parameter_per_channel() -> None:
    assert {name: count_params(UNet(cfg)) for name, cfg in PRESETS.items()} == \
        {"reference": 3_684_214, "small": 262_822, "tiny": 806}  # the defaults: unchanged
    speedrun = UNet(preset("small", bn_scale=False, bn_momentum=0.4))
    bns = [m for m in speedrun.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.weight is None and m.bias is not None and m.momentum == 0.4
                       for m in bns)
    assert count_params(speedrun) == 262_822 - sum(m.num_features for m in bns) == 262_342
    assert speedrun(torch.randn(2, 1, 32, 32)).shape == (2, 2, 32, 32)


# --- the clock: bench/time_to_quality.py ------------------------------------------------------

HEADLINE = re.compile(r"time_to_quality: B@T=(\S+) A@kT=(\S+) factor>=2: (yes|no)")


def test_time_to_quality_dry_run(tmp_path: Path) -> None:
    """Seconds-long budgets: A and B at once, then C on B's core, each ending its schedule
    at its budget."""
    minutes = 0.04
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "time_to_quality.py"), "--preset", "tiny",
         "--minutes", str(minutes), "--factor", "2", "--evals", "2", "--val-pairs", "100",
         "--b", "--optimizer muon --schedule linear", "--c", "--schedule wsd",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=240, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    [(b, a, verdict)] = HEADLINE.findall(result.stdout)
    assert (verdict == "yes") == (float(b) <= float(a))
    summary = pd.read_csv(tmp_path / "summary.csv").set_index("run")
    assert summary.loc["B", "train_seconds"] >= minutes * 60
    assert summary.loc["C", "train_seconds"] >= minutes * 60
    assert summary.loc["C", "flags"] == "--optimizer muon --schedule linear --schedule wsd"
    [(c, b_again)] = re.findall(r"^C@T=(\S+) against B@T=(\S+): [+-][\d.]+%$", result.stdout,
                                re.MULTILINE)
    assert (float(c), b_again) == (pytest.approx(summary.loc["C", "val_mse"], rel=1e-3), b)
    assert summary.loc["A", "train_seconds"] >= 2 * minutes * 60
    assert summary.loc["A", "samples"] > summary.loc["B", "samples"]
    curves = pd.read_csv(tmp_path / "curves.csv")
    assert len(curves) == 6 and curves.val_mse.notna().all()
    mid, last = curves.groupby("run").lr.first(), curves.groupby("run").lr.last()
    # Each run's last step began in the last fifth of its budget: nothing finer holds, a
    # step on a slow, busy machine being a twentieth of these seconds-long budgets. Then
    # linear's LR is below a fifth of its peak (Muon's 0.05), and wsd's, at its peak at
    # mid-budget, is decaying (below a fifth of the peak only in the last 4%).
    assert last["B"] < 0.2 * 0.05
    assert mid["C"] == 0.05 and last["C"] < 0.05
    assert last["A"] < 0.2 * LEGACY_LR
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert "cpu:" in (tmp_path / "machine.txt").read_text()


def test_time_to_quality_s_recipes_are_the_legacy_recipe_and_today_s_defaults() -> None:
    """A and B are spelled out as flags so that they stay put when defaults move; spelled
    out, they must still say what their names do."""
    from bench.time_to_quality import RECIPE_A, RECIPE_B, configs

    _, a = configs("small", "", RECIPE_A)
    _, b = configs("small", "", RECIPE_B)
    # Muon's fields do nothing under AdamW: A need not spell them.
    assert (a.optimizer, a.schedule, a.lr) == (LEGACY_RECIPE["optimizer"],
                                               LEGACY_RECIPE["schedule"], LEGACY_LR)
    def recipe_of(cfg: TrainConfig) -> dict:
        return {k: getattr(cfg, k) for k in (*RECIPE_FIELDS, "lr", "batch_size", "weight_decay")}

    assert recipe_of(b) == recipe_of(TrainConfig())


def test_time_to_quality_bad_recipe_flags_are_one_line_exit_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "time_to_quality.py"), "--b",
         "--optimizer sgd", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: optimizer must be one of ('adamw', 'muon'), "
                                     "got 'sgd'")


# --- one run on both cores: bench/two_cores.py ------------------------------------------------

def test_two_cores_dry_run_trains_both_ways_and_the_data_parallel_ranks_agree() -> None:
    """Seconds-long rounds: one process with two threads, two gloo processes (whose weights
    the bench compares after training, or fails), two independent runs."""
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "two_cores.py"), "--preset", "tiny",
         "--seconds", "1", "--rounds", "1", "--batch-size", "16"],
        capture_output=True, text=True, timeout=240, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    rates = dict(re.findall(r"round 1: (two threads|ddp 2x1|two runs) +([\d.]+) samples/s",
                            result.stdout))
    assert set(rates) == {"two threads", "ddp 2x1", "two runs"}
    assert all(float(rate) > 0 for rate in rates.values())
    assert re.search(r"^two_cores: ddp/threads=[\d.]+$", result.stdout, re.MULTILINE)


def test_two_cores_a_process_that_dies_is_an_error_at_once_and_its_partner_is_killed():
    """A rank that dies before its result (as one whose rendezvous failed did: its
    partner, and the bench, then waited for ever): the bench fails within seconds, and
    the other process, which would wait on the dead one, is killed."""
    import multiprocessing
    import signal
    import time
    from concurrent.futures import ThreadPoolExecutor

    from bench.two_cores import collect

    ctx = multiprocessing.get_context("spawn")
    dies = ctx.Process(target=sys.exit, args=(3,))
    waits = ctx.Process(target=time.sleep, args=(600,))
    for p in (dies, waits):
        p.start()
    try:
        with ThreadPoolExecutor(1) as pool:
            collecting = pool.submit(collect, ctx.Queue(), [dies, waits], "ddp 2x1")
            with pytest.raises(RuntimeError, match=r"ddp 2x1: a process failed \(exit 3\)"):
                collecting.result(timeout=60)  # a TimeoutError here: it waited on
        waits.join(timeout=10)
        assert waits.exitcode == -signal.SIGKILL
    finally:
        waits.kill()
