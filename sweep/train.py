"""One training trial: build a U-Net, train it epoch by epoch, checkpoint, resume exactly.

The same code runs alone and inside a sweep:

    python sweep/train.py --preset small --epochs 1        # trains, prints per epoch
    python sweep/train.py --preset reference --summary     # config, params, FLOPs; no training

Beside its checkpoint a run keeps metrics.csv (a row per epoch) and curve.png.

`run_trial` is a generator: it yields (metrics, checkpoint, model) after every epoch, and
the caller decides where they go (this CLI: a file and stdout; the sweep: `tune.report`).
Resuming is one branch: pass the last checkpoint back in.
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pandas as pd
import torch

if __package__ in (None, ""):  # run as a script from a plain checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.mixture import Sources, load_sources
from data.sources import DataError
from model.unet import (
    PRESETS,
    ConfigError,
    UNet,
    UNetConfig,
    count_params,
    preset,
    train_flops_per_sample,
)
from sweep import signals
from sweep.checkpoint import (
    CHECKPOINT_FILE,
    CheckpointError,
    load_checkpoint,
    load_weights,
    model_from_checkpoint,
    save_checkpoint,
)
from sweep.device import FastPath, choose_fast_path, pick_device
from sweep.files import write_csv
from sweep.plots import plot_curve
from sweep.recipe import OPTIMIZERS, SCHEDULES, Ema, build_optimizer, build_schedule, make_step_fn
from sweep.scoring import SCORED_IN, test_score, val_mse

HISTORY_FILE = "metrics.csv"  # beside the checkpoint: one row per epoch
CURVE_FILE = "curve.png"
PRECISIONS = ("auto", "fp32", "bf16")
LOSSES = ("mse", "l1")
SWITCHES = ("auto", "on", "off")
# Fields that change how a trial runs, not which run it is: free to differ on resume. The
# device's kind may not (check_resumable); a precision that differs is said (precision_note).
# `extends` too: the checkpoint a longer run began from says where it came from, not what it is.
RUNTIME_FIELDS = {"threads", "device", "compile", "compile_step", "test_pairs", "precision",
                  "channels_last", "extends"}
# The recipe's fields, and what every run trained with before they existed (2026-12-03):
# a trial's config or a checkpoint that names no optimizer is from then, and goes on so.
RECIPE_FIELDS = ("optimizer", "schedule", "muon_lr", "muon_momentum", "muon_ns_steps")
LEGACY_RECIPE = {"optimizer": "adamw", "schedule": "cosine", "muon_lr": 0.02,
                 "muon_momentum": 0.95, "muon_ns_steps": 5}
# Those runs' learning rate. Every trial config names its lr, so it is not a field a config
# may lack; it is here for the benchmarks that reproduce figures made with that recipe.
LEGACY_LR = 3e-3


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    samples_per_epoch: int = 50_000  # pairs are drawn afresh, so an epoch is a budget
    batch_size: int = 64
    lr: float = 1e-2  # AdamW's peak (with optimizer muon: for the parameters off Muon)
    weight_decay: float = 1e-4  # AdamW's (Muon's filters take none)
    # The recipe (sweep/recipe.py): adamw, or muon (Muon on the hidden conv filters, AdamW
    # on the rest); the schedule over all epochs: cosine to lr/100, linear to 0, or wsd.
    # Defaults measured against the clock (results/2026-12-03-time-to-quality); before
    # them, LEGACY_RECIPE with LEGACY_LR.
    optimizer: str = "muon"
    schedule: str = "linear"
    muon_lr: float = 0.05
    muon_momentum: float = 0.9  # Nesterov
    muon_ns_steps: int = 5  # Newton-Schulz iterations per update
    loss: str = "mse"  # what training minimizes; validation and test always score MSE
    # Weight EMA (Polyak averaging) per step; 0 = off. With it on, validation, test and the
    # checkpoint's "model" are the averaged weights, so evaluate.py scores those.
    ema_decay: float = 0.0
    val_pairs: int = 2_000  # fixed validation pairs from the held-out images
    test_pairs: int = 0  # >0: score the test protocol (10 sets of this size) at the end
    seed: int = 0
    precision: str = "auto"  # auto: bf16 autocast only where the hardware has native bf16
    channels_last: str = "auto"
    compile: bool = False  # torch.compile: pays off on GPUs and long runs only
    # torch.compile over forward, backward and the optimizer's update as one graph
    compile_step: bool = False
    device: str = "auto"  # auto: cuda if torch sees one, else cpu
    threads: int = 0  # torch CPU threads; 0 = torch's default (a sweep sets its CPU share)
    # A checkpoint this run goes on from, as a longer run of it (as_longer_run); "": none.
    # Set by sweep/run.py --extend, not a flag of this CLI.
    extends: str = ""

    def __post_init__(self) -> None:
        positive = ("epochs", "samples_per_epoch", "batch_size", "val_pairs")
        for name in positive + ("test_pairs", "seed", "threads", "muon_ns_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
            if value < (1 if name in positive else 0):
                raise ConfigError(f"{name} must be >= {1 if name in positive else 0}, "
                                  f"got {value}")
        if self.batch_size > self.samples_per_epoch:
            raise ConfigError("batch_size must not exceed samples_per_epoch")
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("lr", "muon_lr"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 < value <= 1:
                raise ConfigError(f"{name} must be in (0, 1], got {value!r}")
        if not isinstance(self.muon_momentum, int | float) or not 0 <= self.muon_momentum < 1:
            raise ConfigError(f"muon_momentum must be in [0, 1), got {self.muon_momentum!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not isinstance(self.ema_decay, int | float) or not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.channels_last not in SWITCHES:
            raise ConfigError(f"channels_last must be one of {SWITCHES}, "
                              f"got {self.channels_last!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")

    @property
    def steps_per_epoch(self) -> int:
        return self.samples_per_epoch // self.batch_size

    @property
    def epoch_samples(self) -> int:
        """Samples an epoch trains on: whole batches, up to a batch short of samples_per_epoch."""
        return self.steps_per_epoch * self.batch_size

    def fast_path(self) -> FastPath:
        """The device and precision this config resolves to on this machine."""
        return choose_fast_path(pick_device(self.device), self.precision, self.channels_last)


def default_recipe() -> dict:
    """Today's recipe, field by field: what a new sweep writes into each trial's config."""
    return {name: getattr(TrainConfig(), name) for name in RECIPE_FIELDS}


def with_recipe(flat: dict) -> dict:
    """A config (a trial's, a checkpoint's) with its recipe's fields: those of the legacy
    recipe where it names no optimizer, since it predates them; else as it says."""
    return flat if "optimizer" in flat else {**LEGACY_RECIPE, **flat}


def split_config(flat: dict) -> tuple[UNetConfig, TrainConfig]:
    """A flat dict (a sweep's config, a checkpoint's) -> (model config, train config)."""
    flat = with_recipe(flat)
    model_keys = {f.name for f in fields(UNetConfig)}
    train_keys = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(flat) - model_keys - train_keys)
    if unknown:
        raise ConfigError(f"unknown config field(s) {unknown}")
    model = UNetConfig(**{k: v for k, v in flat.items() if k in model_keys})
    train = TrainConfig(**{k: v for k, v in flat.items() if k in train_keys})
    return model, train


@dataclass
class Trial:
    """Everything that changes while training; a checkpoint is exactly this, as data."""

    model: UNet
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    batches: torch.Generator  # draws the training pairs
    ema: Ema | None = None  # the averaged weights, when ema_decay > 0
    epoch: int = 0
    train_seconds: float = 0.0

    @property
    def scored_model(self) -> UNet:
        """The weights that validation, test and evaluate.py score."""
        return self.ema.module if self.ema is not None else self.model

    def state(self, model_cfg: UNetConfig, cfg: TrainConfig, fast: FastPath,
              metrics: dict) -> dict:
        return {
            "model_config": model_cfg.to_dict(),
            "train_config": asdict(cfg),
            # What "auto" resolved to: where the random pairs come from, which arithmetic.
            "fast_path": {"device": fast.device.type, "bf16": fast.bf16},
            "epoch": self.epoch,
            "train_seconds": self.train_seconds,
            "model": self.scored_model.state_dict(),
            **self.ema_state(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "rng": {"batches": self.batches.get_state(), "torch": torch.get_rng_state()},
            "metrics": metrics,
        }

    def ema_state(self) -> dict:
        """With EMA, "model" holds the averaged weights; training resumes from these."""
        if self.ema is None:
            return {}
        return {"trained_model": self.model.state_dict(),
                "ema_updates": self.ema.updates}

    def restore(self, state: dict) -> None:
        if self.ema is not None:
            load_weights(self.ema.module, state)
            load_weights(self.model, {"model": state["trained_model"]})
            self.ema.updates = state["ema_updates"]
        else:
            load_weights(self.model, state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.batches.set_state(state["rng"]["batches"])
        torch.set_rng_state(state["rng"]["torch"])
        self.epoch = state["epoch"]
        self.train_seconds = state["train_seconds"]


def build_trial(model_cfg: UNetConfig, cfg: TrainConfig, fast: FastPath) -> Trial:
    torch.manual_seed(cfg.seed)
    model = UNet(model_cfg).to(fast.device, memory_format=fast.memory_format())
    optimizer = build_optimizer(model, cfg, fast)
    schedule = build_schedule(optimizer, cfg, cfg.epochs * cfg.steps_per_epoch)
    batches = torch.Generator(device=fast.device).manual_seed(cfg.seed)
    ema = Ema.of(model, cfg.ema_decay) if cfg.ema_decay else None
    return Trial(model, optimizer, schedule, batches, ema)


def check_resumable(state: dict, model_cfg: UNetConfig, cfg: TrainConfig,
                    fast: FastPath) -> None:
    """Refuse to continue a checkpoint under a different config, or on another kind of
    device: the result would be neither run (and the random stream of pairs, a generator
    on the device, cannot move between kinds)."""
    # A field newer than the checkpoint took its default there (the legacy recipe's, for
    # the recipe's fields): the run it made.
    defaults = {**UNetConfig().to_dict(), **asdict(TrainConfig())}
    saved = {**defaults, **state["model_config"], **with_recipe(state["train_config"])}
    wanted = {**model_cfg.to_dict(), **asdict(cfg)}
    differ = [k for k in wanted if k not in RUNTIME_FIELDS and saved[k] != wanted[k]]
    if differ:
        changes = ", ".join(f"{k}: {saved.get(k)!r} -> {wanted[k]!r}" for k in differ)
        raise ConfigError(f"the checkpoint was trained with another config ({changes})")
    if (trained_on := device_kind(state)) != fast.device.type:
        raise ConfigError(f"the checkpoint was trained on {trained_on}, this run would use "
                          f"{fast.device.type}; continue it where torch sees {trained_on} "
                          f"(--device {trained_on})")


def as_longer_run(state: dict, cfg: TrainConfig) -> dict:
    """A checkpoint as the start of a longer run of its config: `cfg`, the same but for
    more epochs of the same size. Training goes on from its weights, optimizer, step and
    stream of pairs; the schedule stretches over the new length, so the learning rate at
    this step rises to where the longer schedule has it (a little, if the run is extended
    early; from zero back up, if its schedule has ended)."""
    saved = with_recipe(state["train_config"])
    if (saved["samples_per_epoch"], saved["batch_size"]) != (cfg.samples_per_epoch,
                                                             cfg.batch_size):
        raise ConfigError(f"a longer run keeps the checkpoint's epochs of "
                          f"{saved['samples_per_epoch']:,} samples in batches of "
                          f"{saved['batch_size']}")
    if state["metrics"].get("status") == "diverged":
        raise ConfigError(f"the checkpoint diverged at epoch {state['epoch']}")
    if cfg.epochs <= state["epoch"]:
        raise ConfigError(f"the checkpoint has trained {state['epoch']} epochs already; a "
                          f"longer run needs more than that, not {cfg.epochs}")
    schedule = dict(state["schedule"])
    if "T_max" in schedule:  # torch's cosine keeps its length; LambdaLR's comes from cfg
        schedule["T_max"] = cfg.epochs * cfg.steps_per_epoch
    return {**state, "schedule": schedule,
            "train_config": {**state["train_config"], "epochs": cfg.epochs},
            "metrics": {**state["metrics"], "status": "running"}}


def device_kind(state: dict) -> str:
    """The kind of device a checkpoint trained on: "cpu" or "cuda"."""
    return state.get("fast_path", {}).get("device", "cpu")  # older ones: CPU only


def precision_note(state: dict, fast: FastPath) -> str:
    """A resumed run whose arithmetic changes (a machine with native bf16, or without):
    allowed, since bf16 autocast matches fp32 within noise, but said. "" if unchanged."""
    trained_bf16 = state.get("fast_path", {}).get("bf16", False)
    if trained_bf16 == fast.bf16:
        return ""
    names = {True: "bf16 autocast", False: "fp32"}
    return (f"note: the checkpoint trained in {names[trained_bf16]}, this run continues in "
            f"{names[fast.bf16]}; --precision {'bf16' if trained_bf16 else 'fp32'} keeps it")


def train_epoch(trial: Trial, cfg: TrainConfig, step: Callable[[], torch.Tensor],
                log: Callable[[str], None] | None) -> float:
    """One epoch of steps; returns the mean train loss (NaN if it diverged)."""
    trial.model.train()
    loss_sum = torch.zeros((), device=trial.batches.device)
    last_log = time.perf_counter()
    for i in range(1, cfg.steps_per_epoch + 1):
        loss_sum += step()
        if i % 50 == 0 and not torch.isfinite(loss_sum):
            return math.nan  # stop now; the caller ends the trial with status "diverged"
        if log and time.perf_counter() - last_log > 30:
            last_log = time.perf_counter()
            log(f"  epoch {trial.epoch + 1}: step {i}/{cfg.steps_per_epoch}, "
                f"loss {loss_sum.item() / i:.3e}")
    return loss_sum.item() / cfg.steps_per_epoch


def scores_on_test(model: UNet, sources: Sources, mixture: str, fast: FastPath,
                   pairs: int) -> dict:
    """The test protocol's score, as the metrics of a run's last epoch carry it."""
    mean, std = test_score(model, sources.test, mixture, fast, pairs)
    return {"test_mse_mean": mean, "test_mse_std": std, "test_pairs": pairs}


def run_trial(
    model_cfg: UNetConfig,
    cfg: TrainConfig,
    sources: Sources,
    fast: FastPath,
    resume: dict | None = None,
    log: Callable[[str], None] | None = None,
) -> Iterator[tuple[dict, dict, UNet]]:
    """Train from scratch or from `resume`; after each epoch yield (metrics, checkpoint,
    model).

    metrics["status"] is "running" until the last epoch ("finished"), or "diverged" when
    the loss turned NaN/inf (the generator then stops)."""
    trial = build_trial(model_cfg, cfg, fast)
    if resume is not None:
        check_resumable(resume, model_cfg, cfg, fast)
        trial.restore(resume)
    step = make_step_fn(trial, sources.train, model_cfg, cfg, fast)
    params = count_params(trial.model)
    while trial.epoch < cfg.epochs:
        start = time.perf_counter()
        train_loss = train_epoch(trial, cfg, step, log)
        seconds = time.perf_counter() - start
        trial.epoch += 1
        trial.train_seconds += seconds
        diverged = not math.isfinite(train_loss)
        eval_start = time.perf_counter()
        metrics = {
            "epoch": trial.epoch,
            "train_loss": train_loss,
            "val_mse": math.nan if diverged else val_mse(
                trial.scored_model, sources.val, model_cfg.mixture, fast, cfg.val_pairs),
            "samples_per_s": cfg.epoch_samples / seconds,
            "train_seconds": trial.train_seconds,
            "lr": trial.schedule.get_last_lr()[0],
            "params": params,
            "scored_in": SCORED_IN,  # val and test scores: fp32 whatever the fast path
            "status": "diverged" if diverged else
                      "finished" if trial.epoch == cfg.epochs else "running",
        }
        if metrics["status"] == "finished" and cfg.test_pairs:
            metrics |= scores_on_test(trial.scored_model, sources, model_cfg.mixture, fast,
                                      cfg.test_pairs)
        metrics["eval_seconds"] = time.perf_counter() - eval_start  # this epoch's scoring
        yield metrics, trial.state(model_cfg, cfg, fast, metrics), trial.scored_model
        if diverged:
            return


# --- command line -------------------------------------------------------------------------

def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field (--base-filters, --no-batch-norm, ...), default: unset."""
    for cls, title in ((UNetConfig, "model (overrides the preset)"), (TrainConfig, "training")):
        group = parser.add_argument_group(title)
        for f in fields(cls):
            if f.name == "extends":  # the sweep's --extend; this CLI resumes only its own
                continue
            flag = "--" + f.name.replace("_", "-")
            if f.type in ("bool", bool):
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
            else:
                kind = {"int": int, "float": float}.get(str(f.type), str)
                group.add_argument(flag, type=kind, default=None, metavar=f.name.upper(),
                                   help=f"default {f.default!r}")


def configs_from_args(args: argparse.Namespace) -> tuple[UNetConfig, TrainConfig]:
    model_overrides = {f.name: getattr(args, f.name) for f in fields(UNetConfig)
                       if getattr(args, f.name) is not None}
    train_values = {f.name: getattr(args, f.name, None) for f in fields(TrainConfig)
                    if getattr(args, f.name, None) is not None}
    return preset(args.preset, **model_overrides), TrainConfig(**train_values)


def summary(model_cfg: UNetConfig, cfg: TrainConfig, fast: FastPath) -> str:
    lines = [f"model:  {model_cfg}", f"train:  {cfg}",
             f"fast path: bf16={fast.bf16} channels_last={fast.channels_last} "
             f"({fast.device}; {fast.reason})",
             f"params: {count_params(UNet(model_cfg))}",
             f"train_flops_per_sample: {train_flops_per_sample(model_cfg)}"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--out", type=Path, default=None,
                        help="run directory (default runs/<preset>); an existing checkpoint "
                             "there is resumed")
    parser.add_argument("--fresh", action="store_true",
                        help="start over: move an existing run directory aside first")
    parser.add_argument("--summary", action="store_true", help="print and exit, no training")
    parser.add_argument("--mnist-dir", type=Path, help="directory of MNIST IDX files")
    parser.add_argument("--fashion-dir", type=Path, help="directory of Fashion-MNIST IDX files")
    add_config_flags(parser)
    return parser.parse_args(argv)


def history_row(metrics: dict, cfg: TrainConfig) -> dict:
    """An epoch's line of metrics.csv."""
    row = {"epoch": metrics["epoch"],
           "samples": metrics["epoch"] * cfg.epoch_samples}
    keys = ("train_loss", "val_mse", "lr", "samples_per_s", "train_seconds",
            "test_mse_mean", "test_mse_std")
    return row | {k: metrics[k] for k in keys if k in metrics}


def write_history(history: list[dict], cfg: TrainConfig, out: Path) -> None:
    """metrics.csv and curve.png, both rebuilt whole from the history the checkpoint holds:
    a run killed between writes gets them back complete from its next epoch."""
    df = pd.DataFrame(history)
    write_csv(df, out / HISTORY_FILE)
    plot_curve(df, cfg.epochs * cfg.epoch_samples, out / CURVE_FILE)


def lacks_test_score(metrics: dict, cfg: TrainConfig) -> bool:
    """A finished run asked for a test score it has not got (none, or of another size)."""
    return (metrics.get("status") == "finished" and cfg.test_pairs > 0
            and metrics.get("test_pairs") != cfg.test_pairs)


def print_test_score(metrics: dict) -> None:
    if "test_mse_mean" in metrics:
        print(f"test_mse {metrics['test_mse_mean']:.3e} "
              f"± {metrics['test_mse_std']:.1e} ({metrics['test_pairs']} pairs x 10)")


def set_threads(threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    signals.handle_sigterm_as_ctrl_c()  # a batch scheduler's SIGTERM: the same as Ctrl-C
    args = parse_args(argv)
    try:
        model_cfg, cfg = configs_from_args(args)
    except (ConfigError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    set_threads(cfg.threads)
    try:
        fast = cfg.fast_path()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.summary:
        print(summary(model_cfg, cfg, fast))
        return 0

    out = args.out or Path("runs") / args.preset
    ckpt_path = out / CHECKPOINT_FILE
    if args.fresh and out.exists():
        aside = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(out, aside)
        print(f"moved the previous run to {aside}")
    try:
        resume = load_checkpoint(ckpt_path) if ckpt_path.exists() else None
        metrics = resume["metrics"] if resume else {}
        if metrics.get("status") == "diverged":
            print(f"{ckpt_path} diverged at epoch {resume['epoch']}; use --fresh to start over")
            return 1
        if resume:
            print(f"resuming from {ckpt_path} (epoch {resume['epoch']})")
            if note := precision_note(resume, fast):
                print(note)
        sources = load_sources(fast.device, args.mnist_dir, args.fashion_dir)
        print(f"params: {count_params(UNet(model_cfg))}, device {fast.device}, "
              f"bf16={fast.bf16}, channels_last={fast.channels_last}, "
              f"threads {torch.get_num_threads()}")
        history = list(resume.get("history", [])) if resume else []
        for metrics, state, _ in run_trial(model_cfg, cfg, sources, fast, resume, log=print):
            history.append(history_row(metrics, cfg))
            save_checkpoint({**state, "history": history}, ckpt_path)
            write_history(history, cfg, out)
            print(f"epoch {metrics['epoch']}/{cfg.epochs}: val_mse {metrics['val_mse']:.3e} "
                  f"train_loss {metrics['train_loss']:.3e} "
                  f"{metrics['samples_per_s']:.0f} samples/s "
                  f"elapsed {metrics['train_seconds']:.0f}s [{metrics['status']}]")
            print_test_score(metrics)
        if lacks_test_score(metrics, cfg):  # finished before, without this test score
            model = model_from_checkpoint(resume, fast.device)
            metrics = metrics | scores_on_test(model, sources, model_cfg.mixture, fast,
                                               cfg.test_pairs)
            history[-1:] = [history_row(metrics, cfg)]  # older checkpoints kept none
            save_checkpoint({**resume, "metrics": metrics, "history": history}, ckpt_path)
            write_history(history, cfg, out)
            print_test_score(metrics)
    except (ConfigError, CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, say: the message names the file and what is kept
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: the checkpoint on disk is whole (written atomically)
        where = f"its last epoch ({ckpt_path})" if ckpt_path.exists() else "the start"
        print(f"\ninterrupted: the same command resumes from {where}", file=sys.stderr)
        return signals.interrupted_exit_code()  # 130 after a Ctrl-C, 143 after a SIGTERM
    print(f"checkpoint: {ckpt_path}")
    return 1 if metrics.get("status") == "diverged" else 0


if __name__ == "__main__":
    sys.exit(main())
