"""What would a long run score if its learning rate came down now? A forecast.

    python bench/anneal_forecast.py results/2026-11-26-long-small/checkpoint.pt [--samples 32000]

Midway through a cosine schedule the val MSE is measured at a high learning rate, whose
noise hides much of what the model has learned; the schedule's tail removes it. This
script reads the checkpoint (the file is never written), continues training a copy with
the same step, its learning rate falling linearly from where the schedule is to 1/100 of
that over --samples samples, and scores the same val pairs. Probes of a run's past
checkpoints (kept in git) trace its annealed learning curve, which extrapolates to its end.

Ends with the line `annealed_val_mse: X`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a plain checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from data.mixture import load_sources
from data.sources import DataError
from model.unet import ConfigError
from sweep.checkpoint import CheckpointError, load_checkpoint
from sweep.recipe import make_step_fn
from sweep.scoring import val_mse
from sweep.train import build_trial, check_resumable, split_config, train_epoch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--samples", type=int, default=32_000,
                        help="training samples over which the learning rate falls")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    try:
        state = load_checkpoint(args.checkpoint)
        model_cfg, cfg = split_config({**state["model_config"], **state["train_config"]})
        if args.samples < cfg.batch_size:
            parser.error(f"--samples must be at least the run's batch size, {cfg.batch_size}")
        fast = cfg.fast_path()
        check_resumable(state, model_cfg, cfg, fast)
        sources = load_sources(fast.device)
    except (CheckpointError, ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    torch.set_num_threads(args.threads)
    trial = build_trial(model_cfg, cfg, fast)
    trial.restore(state)
    lr = trial.schedule.get_last_lr()[0]
    # The anneal is one "epoch" of --samples: train_epoch's loop, progress and NaN stop.
    anneal = replace(cfg, samples_per_epoch=args.samples)
    # LinearLR scales the optimizer's current rate (the restored schedule's), not its peak.
    trial.schedule = torch.optim.lr_scheduler.LinearLR(
        trial.optimizer, 1.0, 0.01, anneal.steps_per_epoch)
    step = make_step_fn(trial, sources.train, model_cfg, cfg, fast)
    before = state["metrics"]["val_mse"]
    print(f"{args.checkpoint}: epoch {state['epoch']}, val_mse {before:.3e} at lr {lr:.2e}; "
          f"lr -> {lr / 100:.2e} over {anneal.steps_per_epoch} steps of {cfg.batch_size}")
    train_loss = train_epoch(trial, anneal, step, log=print)
    print(f"  train loss {train_loss:.3e} while annealing")
    after = val_mse(trial.scored_model, sources.val, model_cfg.mixture, fast, cfg.val_pairs)
    print(f"val_mse on {cfg.val_pairs} pairs: {before:.3e} -> {after:.3e} annealed "
          f"({after / before - 1:+.1%})")
    print(f"annealed_val_mse: {after:.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
