"""The Ray Tune trainable: `run_trial` wired to `tune.report`, checkpoints and TensorBoard."""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path

import ray
import torch
from ray import tune
from tensorboardX import SummaryWriter

from data.mixture import load_sources
from model.unet import params_of
from model.unet import train_flops_per_sample as flops_of
from sweep.checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint, save_checkpoint
from sweep.device import choose_fast_path, pick_device
from sweep.scoring import separation_rows
from sweep.train import run_trial, split_config


def newest_good_checkpoint() -> dict | None:
    """The newest checkpoint on disk that loads, or None to start from scratch.

    Newest on disk, not only the one Tune names: after a driver is killed, Tune restores
    its last experiment snapshot, which may predate this trial's latest checkpoints; a
    damaged newest file falls back to the one before it (Tune keeps two). Says what it did.
    """
    latest = tune.get_checkpoint()
    if latest is None:
        return None
    trial_dir = Path(latest.path).parent
    for directory in sorted(trial_dir.glob("checkpoint_*"), reverse=True):
        try:
            state = load_checkpoint(directory / CHECKPOINT_FILE)
        except CheckpointError as e:
            print(f"[trial] skipping damaged checkpoint: {e}", flush=True)
            continue
        print(f"[trial] resuming from {directory} (epoch {state['epoch']})", flush=True)
        return state
    print("[trial] no usable checkpoint: starting from scratch", flush=True)
    return None


def tune_trial(config: dict, max_params: int | None = None) -> None:
    # Torch threads = the CPUs Ray gave this trial: more would oversubscribe the cores.
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, math.floor(cpus)))
    model_cfg, cfg = split_config(config)
    params = params_of(model_cfg)
    where = {
        "params": params,
        "threads": torch.get_num_threads(),
        "started_at": time.time(),
        "flops_per_sample": flops_of(model_cfg),
        "node": ray.get_runtime_context().get_node_id()[:12],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "pid": os.getpid(),
    }
    if max_params is not None and params > max_params:
        tune.report({**where, "status": "skipped", "epoch": 0, "val_mse": math.nan,
                     "reason": f"{params} params > --max-params {max_params}"})
        return

    fast = choose_fast_path(pick_device(cfg.device), cfg.precision, cfg.channels_last)
    sources = load_sources(fast.device)  # the driver filled and verified the cache
    resume = newest_good_checkpoint()
    where["resumed_from_epoch"] = resume["epoch"] if resume else 0
    if resume and resume["metrics"].get("status") in ("finished", "diverged"):
        # It ended before the driver died, after Tune's last snapshot: report, never re-run.
        tune.report({**where, **resume["metrics"], "reported_at": time.time()})
        return
    writer = SummaryWriter(str(Path(tune.get_context().get_trial_dir()) / "images"))
    for metrics, state, model in run_trial(model_cfg, cfg, sources, fast, resume):
        rows = separation_rows(model, sources.val, model_cfg.mixture, fast)
        writer.add_image("val/mixture|true1|true2|pred1|pred2", rows, metrics["epoch"],
                         dataformats="HW")
        writer.flush()
        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint(state, Path(directory) / CHECKPOINT_FILE)
            tune.report({**where, **metrics, "reported_at": time.time()},
                        checkpoint=tune.Checkpoint.from_directory(directory))
    writer.close()

