"""The training recipe, defined once: optimizer, learning-rate schedule, weight EMA and
the training step. sweep/train.py, the benches and bench/time_to_quality.py all build
their training from here; `TrainConfig` (sweep/train.py) selects the parts.

    optimizer  adamw: AdamW on every parameter (the default, today's recipe)
               muon:  Muon on the hidden conv and transposed-conv filters, AdamW on the
                      rest (sweep/muon.py says which is which)
    schedule   cosine: cosine decay to lr/100 (the default); linear: linear decay to 0;
               wsd: warmup-stable-decay (WSD_WARMUP linear warmup, flat, linear decay to
               0 over the last WSD_DECAY)

A schedule is a function of progress in [0, 1]. A run budgeted in steps (train.py) takes
progress = step / total steps; a run budgeted in wall time (bench/time_to_quality.py)
takes progress = seconds trained / seconds allowed, so its schedule ends at its budget
whatever speed the machine gives it (make_step_fn's `progress`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from data.mixture import make_batch, random_indices
from model.unet import UNet, UNetConfig
from sweep.device import FastPath
from sweep.muon import MuonWithAdamW, split_for_muon

if TYPE_CHECKING:  # train.py imports this module; the types only are needed here
    from sweep.train import TrainConfig, Trial

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "linear", "wsd")
COSINE_FLOOR = 0.01  # cosine ends at lr / 100, as every run before the recipe's options did
WSD_WARMUP = 0.02  # share of the budget spent warming up from ~0 to the peak
WSD_DECAY = 0.2  # share of the budget spent decaying linearly to 0 at the end


def lr_factor(schedule: str, progress: float) -> float:
    """The learning rate over its peak at `progress` (0 = start, 1 = end of the budget)."""
    p = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        return COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * p))
    if schedule == "linear":
        return 1 - p
    if schedule == "wsd":
        # Never exactly 0 at the first step: the warmup starts one step's worth above it.
        warm = min(1.0, max(p, 1e-3) / WSD_WARMUP)
        return min(warm, (1 - p) / WSD_DECAY)
    raise ValueError(f"unknown schedule {schedule!r}")


def build_optimizer(model: UNet, cfg: TrainConfig, fast: FastPath) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    filters, rest = split_for_muon(model)
    # Newton-Schulz in bf16 where the hardware has it (the speedruns' choice), else fp32:
    # emulated bf16 runs many times slower than fp32 on CPUs without it.
    return MuonWithAdamW(filters, rest, lr=cfg.muon_lr, momentum=cfg.muon_momentum,
                         ns_steps=cfg.muon_ns_steps, adamw_lr=cfg.lr,
                         weight_decay=cfg.weight_decay,
                         ns_dtype=torch.bfloat16 if fast.bf16 else torch.float32)


def build_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                   total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The LR per step over `total_steps`; each parameter group scales its own peak."""
    if cfg.schedule == "cosine" and cfg.optimizer == "adamw":
        # The recipe every run before the options trained with, kept as it was (torch's
        # recursive cosine), so that their checkpoints resume bit for bit.
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps,
                                                          cfg.lr * COSINE_FLOOR)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg.schedule, step / total_steps))


def set_lr_by_progress(optimizer: torch.optim.Optimizer, schedule: str,
                       progress: float) -> None:
    """A wall-time budget's schedule: each group's LR from its peak and the progress."""
    factor = lr_factor(schedule, progress)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor


@dataclass
class Ema:
    """Weight EMA (Polyak averaging) of parameters and buffers (batch norm's running
    statistics too). The count of updates is a Python int, so an update never waits for
    the device (AveragedModel compares a tensor counter on the host every step). The
    arithmetic is AveragedModel's with get_ema_multi_avg_fn: a copy first, then lerp."""

    module: UNet
    decay: float
    updates: int = 0

    @classmethod
    def of(cls, model: UNet, decay: float) -> Ema:
        module = copy.deepcopy(model)
        module.requires_grad_(False)
        return cls(module, decay)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ours = [*self.module.parameters(), *self.module.buffers()]
        theirs = [*model.parameters(), *model.buffers()]
        if self.updates == 0:
            torch._foreach_copy_(ours, theirs)
        else:
            floats = [(a, b) for a, b in zip(ours, theirs, strict=True) if a.is_floating_point()]
            torch._foreach_lerp_([a for a, _ in floats], [b for _, b in floats],
                                 1 - self.decay)
            for a, b in zip(ours, theirs, strict=True):
                if not a.is_floating_point():  # batch norm's step counter, as AveragedModel
                    a.copy_(a * self.decay + b * (1 - self.decay))
        self.updates += 1


def make_step_fn(trial: Trial, train_pair, model_cfg: UNetConfig, cfg: TrainConfig,
                 fast: FastPath, progress: Callable[[], float] | None = None
                 ) -> Callable[[], torch.Tensor]:
    """One training step as a closure: fresh random pairs, forward, backward, update, LR,
    EMA. Returns the loss (a tensor, so the device need not sync every step).

    The LR follows trial.schedule step by step, or, given `progress` (a wall-time
    budget's clock), cfg.schedule at progress() before each update. compile_step compiles
    forward, backward and the optimizer's update as one graph."""
    model = torch.compile(trial.model) if cfg.compile else trial.model
    loss_fn = F.l1_loss if cfg.loss == "l1" else F.mse_loss

    def update(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with fast.autocast():
            pred = model(x)
        loss = loss_fn(pred.float(), y)
        trial.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trial.optimizer.step()
        return loss.detach()

    if cfg.compile_step:
        update = compile_whole_step(update)

    def step() -> torch.Tensor:
        idx1, idx2 = random_indices(train_pair, cfg.batch_size, trial.batches)
        x, y = make_batch(train_pair, idx1, idx2, model_cfg.mixture)
        if progress is not None:
            set_lr_by_progress(trial.optimizer, cfg.schedule, progress())
        loss = update(x.contiguous(memory_format=fast.memory_format()), y)
        if progress is None:
            trial.schedule.step()
        if trial.ema is not None:
            trial.ema.update(trial.model)
        return loss

    return step


def compile_whole_step(update: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                       ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """torch.compile over forward, backward and optimizer step: compiled autograd traces
    the backward into the graph instead of breaking it there. The first calls compile
    (minutes on a CPU); a wall-time budget counts them."""
    compiled = torch.compile(update)

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch._dynamo.config.patch(compiled_autograd=True):
            return compiled(x, y)

    return run
