"""Search short, train long: a sweep's best configs trained for many samples, as a sweep.

    python sweep/run.py --from runs/sweep --top 3 --samples 15000000

takes the experiment's Pareto front (val MSE against parameters, within --max-params),
and trains the --top configs with the lowest val MSE for --samples samples each, as the
trials of a new experiment (default name: the source's name + "-long"). Ray Tune schedules
them as any sweep's trials (on CPUs or GPUs, on a cluster), the same command resumes them,
and each is scored on the full test protocol at the end. No search and no early stop: the
configs are chosen, the point is their score.

    python sweep/run.py --from results/2026-11-26-long-small/checkpoint.pt --samples 30000000

trains one checkpoint's design (the config it trained with) the same way: a design found
outside a sweep, or one to train longer than it was, as a sweep of one trial.

    python sweep/run.py --from runs/x-long/trial_.../checkpoint_000005/checkpoint.pt \
        --extend --samples 28000000 --name x-longer

goes on from the checkpoint instead (its weights, optimizer, step and stream of pairs), as
a longer run of it: epochs of its size up to --samples in all, its schedule stretched to
the new end. For a long run whose forecast says it needs more samples than it was given:
extended early, its learning rate barely moves.
"""

from __future__ import annotations

import math
from pathlib import Path, PurePosixPath

from sweep.scoring import TEST_PAIRS  # the task's protocol: 10 sets of 20,000 pairs

LONG_EPOCHS = 40  # epochs of a long run unless --max-epochs says otherwise: a curve of 40
# points, and validation (2,000 pairs an epoch) stays well under 1% of the training.
LONG_VAL_PAIRS = 2_000


class SourceError(Exception):
    """The experiment to take configs from cannot be read; the message names it."""


def is_checkpoint(source: str) -> bool:
    """--from names a checkpoint file, not a sweep's experiment."""
    return source.endswith(".pt")


def defaults(source: str) -> dict:
    """The flags' defaults (config.py) for long runs from `source`, where they differ
    from a sweep's. A checkpoint's long run is named after its folder."""
    path = PurePosixPath(source.rstrip("/"))
    # max_epochs and val_pairs: LONG_EPOCHS and LONG_VAL_PAIRS, or a checkpoint's own with
    # --extend (config.py), where giving them is refused; samples_per_epoch from --samples.
    return {"name": f"{(path.parent if is_checkpoint(source) else path).name}-long", "top": 3,
            "max_epochs": None, "max_params": 0, "early_stop": False,
            "warm_start": False, "val_pairs": None, "test_pairs": TEST_PAIRS,
            "samples_per_epoch": None}


def extension_budget(source: str, samples: int) -> tuple[int, int, int]:
    """A longer run of a checkpoint (--extend): (epochs, samples per epoch, val pairs). Its
    epochs keep their size, so `samples` sets their count, and its validation its pairs."""
    from sweep.train import TrainConfig

    state = load(source)
    cfg = TrainConfig(**{k: v for k, v in state["train_config"].items()
                         if k in TrainConfig.__dataclass_fields__})
    epochs = math.ceil(samples / cfg.epoch_samples)
    if epochs <= state["epoch"]:
        raise SourceError(f"{source} has trained {state['epoch'] * cfg.epoch_samples:,} "
                          f"samples already ({state['epoch']} epochs); --samples {samples:,} "
                          "would train none more")
    return epochs, cfg.samples_per_epoch, cfg.val_pairs


def front_configs(source: str, top: int, max_params: int | None, samples: int, epochs: int,
                  val_pairs: int, test_pairs: int, extend: bool = False) -> list[dict]:
    """The long runs' configs: the chosen trials' configs with the long budget (or the
    checkpoint's config, if within max_params; with `extend`, as a longer run of it:
    `epochs` from extension_budget)."""
    from model.unet import params_of
    from sweep import storage
    from sweep.report import load_trials
    from sweep.train import split_config

    if is_checkpoint(source):
        config = checkpoint_config(source)
        params = params_of(split_config(config)[0])
        if max_params is not None and params > max_params:
            raise SourceError(f"{source}: its design has {params:,} parameters, over "
                              f"--max-params {max_params:,}")
        if extend:
            return [{**config, "epochs": epochs, "test_pairs": test_pairs, "extends": source}]
        return [long_config(config, samples, epochs, val_pairs, test_pairs)]

    try:
        found = storage.names(source, "experiment_state*.json")
    except Exception as e:  # noqa: BLE001 - pyarrow's errors: unreachable, denied, ...
        raise SourceError(f"{source}: {storage.why(e)}") from None
    if not found:
        raise SourceError(f"{source} is not a sweep's experiment (no experiment_state*.json "
                          "in it)")
    try:
        trials = load_trials(source)
    except (KeyError, TypeError, ValueError) as e:  # Tune's state file, damaged or foreign
        raise SourceError(f"{source}: Ray Tune cannot read its experiment state "
                          f"({type(e).__name__}: {e})") from None
    trials = pick_front(trials, top, max_params)
    return [long_config(t.config, samples, epochs, val_pairs, test_pairs) for t in trials]


def checkpoint_config(source: str) -> dict:
    """The config a checkpoint (a local file) trained with, as a trial's config: its model
    and training fields, without those that only say how that run ran (threads, device)."""
    from sweep.train import RUNTIME_FIELDS

    state = load(source)
    train = {k: v for k, v in state["train_config"].items() if k not in RUNTIME_FIELDS}
    return {**state["model_config"], **train}


def load(source: str) -> dict:
    """A checkpoint file's state, or SourceError naming what is wrong with it."""
    from sweep.checkpoint import CheckpointError, load_checkpoint

    try:
        return load_checkpoint(Path(source))
    except CheckpointError as e:
        raise SourceError(str(e)) from None


def pick_front(trials, top: int, max_params: int | None) -> list:
    """The `top` trials of the front (val MSE against params) with the lowest val MSE,
    within max_params, best first."""
    from sweep.report import build_report, trial_record

    df = build_report([trial_record(t) for t in trials])
    front = df[df["pareto"] & df["val_mse"].notna()]
    if max_params:
        front = front[front["params"] <= max_params]
    chosen = front.nsmallest(top, "val_mse")["trial_id"].tolist()
    by_id = {t.trial_id: t for t in trials}
    return [by_id[trial_id] for trial_id in chosen]


def long_config(config: dict, samples: int, epochs: int, val_pairs: int,
                test_pairs: int) -> dict:
    """A short trial's config, given the long budget: `samples` in `epochs` epochs (whole
    batches), and its scoring sizes (by default the task's). Model and training settings
    stay as they were; a trial of a sweep begun before the recipe was written into its
    config (the legacy recipe, AdamW) gets today's recipe instead, with today's learning
    rate: the one its sweep found was AdamW's on every weight."""
    from sweep.train import TrainConfig, default_recipe

    per_epoch = math.ceil(samples / epochs / config["batch_size"]) * config["batch_size"]
    recipe = {} if "optimizer" in config else {**default_recipe(), "lr": TrainConfig().lr}
    return {**config, **recipe, "epochs": epochs, "samples_per_epoch": per_epoch,
            "val_pairs": val_pairs, "test_pairs": test_pairs}
