"""What a GPU machine gets by default, shown on this CPU machine with torch's view of CUDA
faked (as tests/test_faults.py does): a sweep's --gpus is the GPUs torch sees, a trial
uses CUDA only when Ray gave it a GPU, and scoring reads the device once per score."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data.mixture import fixed_indices
from model.unet import PRESETS, UNet
from sweep import run
from sweep.device import choose_fast_path
from sweep.scoring import VAL_SEED, mse_on_pairs, val_mse
from sweep.train import TrainConfig
from sweep.trainable import on_given_device


def fake_gpus(monkeypatch, count: int) -> None:
    """torch sees `count` CUDA GPUs (an H200 each); nothing may really run on them."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *_, **__: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H200")


def sweep_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["--storage", str(tmp_path / "runs"), "--report", str(tmp_path / "report.csv"),
            *extra]


@pytest.mark.parametrize("gpus,flags,expected", [
    (2, (), 2),  # a GPU machine: its GPUs, as a user expects
    (2, ("--gpus", "0"), 0),  # asked for none
    (2, ("--gpus", "1"), 1),
    (0, (), 0),  # a CPU machine
])
def test_a_sweep_uses_the_machines_gpus_by_default(tmp_path, monkeypatch, gpus, flags,
                                                   expected) -> None:
    fake_gpus(monkeypatch, gpus)
    assert run.parse_args(sweep_args(tmp_path, *flags)).gpus == expected


def test_a_trial_uses_cuda_only_when_ray_gave_it_a_gpu(monkeypatch) -> None:
    # Ray leaves CUDA_VISIBLE_DEVICES unset for a trial given no GPU, so torch sees all of
    # the machine's; "auto" alone put every such trial on cuda:0, where Ray counts none.
    fake_gpus(monkeypatch, 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cfg = TrainConfig()
    assert on_given_device(cfg, gpus_given=0).fast_path().device == torch.device("cpu")
    assert on_given_device(cfg, gpus_given=1).fast_path().device == torch.device("cuda")
    assert on_given_device(cfg, gpus_given=0.25).fast_path().device == torch.device("cuda")
    # A device named in the config is what was asked for: kept.
    named = TrainConfig(device="cuda:1")
    assert on_given_device(named, gpus_given=0) == named


def test_scoring_reads_the_device_once_per_score(sources, monkeypatch) -> None:
    torch.manual_seed(0)
    model = UNet(PRESETS["tiny"])
    fast = choose_fast_path(torch.device("cpu"), "fp32")
    reads = []
    item = torch.Tensor.item

    def counted(self):
        reads.append(self.shape)
        return item(self)

    monkeypatch.setattr(torch.Tensor, "item", counted)
    score = val_mse(model, sources.val, PRESETS["tiny"].mixture, fast, 2_000)  # 8 batches of 256
    assert len(reads) == 1  # one host sync, not one per batch
    monkeypatch.setattr(torch.Tensor, "item", item)
    # The same sum as one batch of all 2,000 pairs: accumulated in float64 as before.
    idx = fixed_indices(len(sources.val[0]), len(sources.val[1]), 2_000, VAL_SEED)
    whole = mse_on_pairs(model, sources.val, *idx, PRESETS["tiny"].mixture, fast, batch_size=2_000)
    assert score == pytest.approx(whole, rel=1e-5)
