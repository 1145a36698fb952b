"""The Ray Tune trainable: `run_trial` wired to `tune.report`, checkpoints and TensorBoard."""

from __future__ import annotations

import functools
import math
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import ray
import torch
from ray import tune
from tensorboardX import SummaryWriter

from data.mixture import Sources, load_sources
from data.sources import DataError
from model.unet import ConfigError, params_of
from sweep import storage
from sweep.checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint, save_checkpoint
from sweep.device import FastPath
from sweep.scoring import separation_rows
from sweep.train import (
    TrainConfig,
    as_longer_run,
    device_kind,
    precision_note,
    run_trial,
    split_config,
)


def trial_dir_name(trial_id: str) -> str:
    """A trial's directory in the experiment (tuner.py names them so for Tune)."""
    return f"trial_{trial_id}"


def newest_good_checkpoint(trial_dir: Path) -> tuple[dict | None, Path | None, str]:
    """The checkpoint on disk with the latest epoch that loads and its file (None, None:
    start from scratch), and a note of what was done, for the driver to print ("" when the
    trial starts fresh).

    From disk, not the one Tune names: after a driver is killed, Tune restores its last
    experiment snapshot, which may predate this trial's latest checkpoints, or know none
    at all (a trial that ended between two snapshots). By epoch, not by directory name:
    Tune, restored from such a snapshot, numbers the next checkpoints from its own count
    and may write a later epoch into a lower-numbered directory. A damaged file falls back
    to the one before it (Tune keeps two).
    """
    good, damaged = [], []
    for directory in sorted(trial_dir.glob("checkpoint_*"), reverse=True):
        path = directory / CHECKPOINT_FILE
        try:
            good.append((load_checkpoint(path), path))
        except CheckpointError as e:
            damaged.append(f"{directory.name} is damaged "
                           f"({str(e).removeprefix(f'{path}: ')})")
    if good:
        state, path = max(good, key=lambda pair: pair[0]["epoch"])
        resumed = f"resumed from {path.parent.name} (epoch {state['epoch']})"
        return state, path, "; ".join([*damaged, resumed])
    if not damaged:  # no checkpoint yet: a fresh start, nothing to say
        return None, None, ""
    return None, None, "; ".join([*damaged, "no usable checkpoint: started from scratch"])


@functools.cache
def sources_on(device: torch.device) -> Sources:
    """The images, loaded once per worker process: Tune reuses a worker for the next trial
    (reuse_actors in tuner.py), which then starts without reading and verifying them again.
    Each node reads its own data cache: the driver filled and verified its own before any
    trial started; on another node the first trial fills it, once (sources.py locks it)."""
    return load_sources(device)


def out_of_memory(e: BaseException) -> bool:
    """CUDA raises OutOfMemoryError; the CPU allocator a RuntimeError; numpy MemoryError."""
    return isinstance(e, MemoryError | torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def tune_trial(config: dict, experiment: str) -> None:
    """A trial under Tune. A config that cannot be built, a model that does not fit in
    memory or images this node cannot get (its data cache, sources.py) fail the same way on
    every attempt: the trial ends with status "error" and the reason in one line, instead
    of being retried (Tune retries a dead worker, FailureConfig in tuner.py)."""
    # Torch threads = the CPUs Ray gave this trial: more would oversubscribe the cores.
    given = ray.get_runtime_context().get_assigned_resources()
    torch.set_num_threads(max(1, math.floor(given.get("CPU", 1))))
    try:
        train_trial(config, storage.join(experiment, trial_dir_name(
            tune.get_context().get_trial_id())), gpus_given=given.get("GPU", 0))
    except ConfigError as e:
        end_with_error(f"config cannot be built: {e}")
    except DataError as e:  # this node cannot get the images: no retry would
        end_with_error(f"no data on this node: {' '.join(str(e).split())}")
    except Exception as e:
        if not out_of_memory(e):
            raise
        end_with_error(f"out of memory: {(str(e).strip().splitlines() or [''])[0][:200]}")


def end_with_error(reason: str) -> None:
    print(f"[trial] {reason}", flush=True)
    report({"status": "error", "reason": reason, "val_mse": math.nan, "params": math.nan})


def report(metrics: dict, checkpoint_dir: str | None = None) -> None:
    """tune.report, stamped with the worker's pid and the time (the harness bench and the
    tests read them to tell reused workers and the gaps between trials)."""
    stamped = {**metrics, "pid": os.getpid(), "reported_at": time.time()}
    checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
    tune.report(stamped, checkpoint=checkpoint)


def on_given_device(cfg: TrainConfig, gpus_given: float) -> TrainConfig:
    """A trial's device "auto" is the GPU Ray gave it, or else the CPU. Ray leaves
    CUDA_VISIBLE_DEVICES unset for a trial given no GPU, so on a GPU machine "auto" alone
    would put every such trial on cuda:0, where Ray counts none of them."""
    if cfg.device == "auto" and not gpus_given:
        return replace(cfg, device="cpu")
    return cfg


def fast_path_to_resume(fast: FastPath, cfg: TrainConfig,
                        resume: dict | None) -> tuple[FastPath, str]:
    """Where a trial runs: on `fast`, the machine's own path, unless it resumes a checkpoint
    from another kind of device (a sweep resumed on other machines). Its stream of random
    pairs lives on the device it began on, so it goes on there: on the CPU, which every
    machine has, with a note; a trial begun on CUDA cannot go on without (ConfigError)."""
    if resume is None or (began_on := device_kind(resume)) == fast.device.type:
        return fast, ""
    if began_on != "cpu":
        raise ConfigError(f"it began on {began_on}, which torch does not see on this "
                          f"machine; resume the sweep where there is {began_on}")
    return (replace(cfg, device="cpu").fast_path(),
            "it began on cpu and goes on there, where its random pairs are drawn")


def train_trial(config: dict, trial_uri: str, gpus_given: float = 0) -> None:
    """`trial_uri`: the trial's directory in the experiment, or its URI in object storage,
    whose checkpoints are copied to `trial_dir` on this node's disk (storage.download).
    `gpus_given`: the GPUs Ray gave this trial (a share of one, or none)."""
    model_cfg, cfg = split_config(config)
    cfg = on_given_device(cfg, gpus_given)
    params = params_of(model_cfg)
    where = {
        "params": params,
        "threads": torch.get_num_threads(),
        "started_at": time.time(),
        "node": ray.get_runtime_context().get_node_id()[:12],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
    }

    trial_dir = storage.download(trial_uri, "checkpoint_*")
    resume, resume_file, note = newest_good_checkpoint(trial_dir)
    if resume is None and cfg.extends:  # a longer run of a checkpoint: it starts there
        try:
            resume = as_longer_run(load_checkpoint(Path(cfg.extends)), cfg)
        except (CheckpointError, ConfigError) as e:
            end_with_error(f"cannot go on from {cfg.extends}: {e}")
            return
        note = f"goes on from {cfg.extends} (epoch {resume['epoch']})"
    try:
        fast, moved = fast_path_to_resume(cfg.fast_path(), cfg, resume)
    except ConfigError as e:
        end_with_error(f"cannot go on from {resume_file.parent.name} "
                       f"(epoch {resume['epoch']}): {e}")
        return
    sources = sources_on(fast.device)
    if resume and (changed := moved or precision_note(resume, fast)):
        note = f"{note}; {changed}"
    where["resumed_from_epoch"] = resume["epoch"] if resume else 0
    if note:  # in the first result only: the driver prints it
        print(f"[trial] {note}", flush=True)
    first = {"resume_note": note} if note else {}
    if resume and resume["metrics"].get("status") in ("finished", "diverged"):
        # It ended before the driver died, after Tune's last snapshot: report, never re-run.
        # The snapshot may know none of its checkpoints: the report takes this one's file.
        stored = storage.join(trial_uri, resume_file.parent.name, resume_file.name)
        report({**where, **resume["metrics"], **first, "checkpoint_file": stored})
        return
    # Straight into the trial's directory in the experiment, beside its checkpoints: a
    # reused worker's working directory is not always the one Tune syncs for this trial.
    # Closed however the trial ends: Tune stops one (ASHA, the time budget) by raising
    # SystemExit in tune.report, and the reused worker would keep its writer's thread.
    with SummaryWriter(str(trial_dir / "images")) as writer:
        for metrics, state, model in run_trial(model_cfg, cfg, sources, fast, resume):
            rows = separation_rows(model, sources.val, model_cfg.mixture, fast)
            writer.add_image("val/mixture|true1|true2|pred1|pred2", rows, metrics["epoch"],
                             dataformats="HW")
            writer.flush()
            storage.upload(trial_dir / "images", storage.join(trial_uri, "images"))
            with tempfile.TemporaryDirectory() as directory:
                save_checkpoint(state, Path(directory) / CHECKPOINT_FILE)
                report({**where, **metrics, **first}, checkpoint_dir=directory)
            first = {}
