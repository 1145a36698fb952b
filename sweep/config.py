"""The sweep's settings: its flags, `SweepConfig`, their checks, and the one-line
`UsageError` a bad flag ends in (exit code 2). Nothing here starts Ray or trains."""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import socket
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from model.unet import params_of
from sweep import long_runs, storage, study
from sweep.space import BATCH_SIZES, SMALLEST

OBJECTIVES = ("mse", "pareto")
MAX_FAILURES = 2  # retries of a trial whose worker died (killed, lost node), from checkpoint
SEARCHES = ("tpe", "random")
ASHA_FIRST_RUNG_SAMPLES = 4_096  # see first_rung(); --first-rung-samples sets it
SETTINGS_FILE = "sweep_settings.json"  # in the experiment: the settings it began with
# Where a sweep runs, not what it is: free to change when it resumes (a lost node, another
# machine); storage and name are where the experiment is.
WHERE_FIELDS = {"fresh", "address", "gpus", "cpus", "storage", "name"}


class UsageError(Exception):
    """A bad flag: one line naming it and what is allowed; exit code 2."""


@dataclass(frozen=True)
class SweepConfig:
    name: str = "sweep"
    storage: str = "runs"  # a directory, or a URI pyarrow understands (sweep/storage.py)
    report: Path = Path("results/report.csv")
    trials: int = 6
    objective: str = "mse"
    search: str = "tpe"  # tpe, or random (a baseline)
    early_stop: bool = True  # ASHA
    first_rung_samples: int = ASHA_FIRST_RUNG_SAMPLES  # ASHA's first comparison
    warm_start: bool = True  # the first trial is the `small` preset (space.start_points)
    gpus: float = 0  # GPUs on this machine (logical ones are fine for testing scheduling)
    gpus_per_trial: float = 1
    cpus: int | None = None  # CPUs Ray may use here; default: all
    cpus_per_trial: float = 1
    address: str | None = None  # join this Ray cluster instead of starting one
    max_epochs: int = 2
    samples_per_epoch: int = 8_192
    val_pairs: int | None = None  # None: scoring_pairs() sizes them to the trial
    test_pairs: int | None = None  # per test set, 10 sets, for finished trials (0: none)
    time_budget: float | None = None  # seconds
    max_params: int | None = 100_000
    seed: int = 0
    study_storage: str | None = None  # an Optuna RDB URL; None: SQLite in the experiment
    # Long runs (sweep/long_runs.py): this experiment's best front configs, trained long.
    from_experiment: str | None = None
    top: int | None = None  # how many of its front's configs (default 3)
    samples: int | None = None  # training samples per long run
    extend: bool = False  # go on from the --from checkpoint rather than train its design anew
    fresh: bool = False

    @property
    def experiment_uri(self) -> str:
        """Where Ray Tune keeps the experiment: a directory, or s3://bucket/prefix/NAME."""
        return storage.join(storage.normalize(self.storage), self.name)

    @property
    def experiment(self) -> Path:
        """The experiment on this disk: the experiment itself, or for object storage the
        local folder of the driver's lock and the checkpoints copied to resume from."""
        return storage.local_dir(self.experiment_uri)


def number(kind: type, allow_zero: bool = False, most: float = math.inf):
    """An argparse type: a finite int/float > 0 (or >= 0), at most `most`, else a one-line
    error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"must be {'>=' if allow_zero else '>'} 0, "
                                             f"got {text}")
        if value > most:
            raise argparse.ArgumentTypeError(f"must be at most {most}, got {text}")
        return value
    return parse

def parse_args(argv: list[str] | None, usage: str) -> SweepConfig:
    """The command line as a SweepConfig; `usage` is run.py's docstring: its first
    paragraph heads --help, the rest ends it."""
    d = SweepConfig()
    p = argparse.ArgumentParser(description=usage.split("\n\n")[0], allow_abbrev=False,
                                epilog=usage.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default=d.name, help="experiment name (default %(default)s)")
    p.add_argument("--storage", type=storage.normalize, default=d.storage,
                   help="experiment root: a directory (on a cluster one every node mounts) "
                        "or object storage such as s3://bucket/prefix (default %(default)s)")
    p.add_argument("--report", type=Path, default=d.report, help="default %(default)s")
    p.add_argument("--trials", type=number(int), default=d.trials)
    p.add_argument("--objective", choices=OBJECTIVES, default=d.objective,
                   help="mse: minimize val MSE; pareto: val MSE against parameter count")
    p.add_argument("--search", choices=SEARCHES, default=d.search,
                   help="Optuna sampler: tpe (default) or random, a baseline")
    p.add_argument("--early-stop", action=argparse.BooleanOptionalAction, default=d.early_stop,
                   help="ASHA stops weak trials early (default on)")
    p.add_argument("--first-rung-samples", type=number(int), default=d.first_rung_samples,
                   help="training samples a trial sees before ASHA first compares it "
                        "(default %(default)s; trials near 300k parameters rank reliably "
                        "only after about 250,000: results/2026-12-01-levers)")
    p.add_argument("--warm-start", action=argparse.BooleanOptionalAction,
                   default=d.warm_start,
                   help="the first trial is the small preset fitted to --max-params, "
                        "then the sampler takes over (default on)")
    p.add_argument("--gpus", type=number(float, allow_zero=True), default=None,
                   help="GPUs Ray may give trials here (default: this machine's, as torch "
                        "sees them; 0: trials on CPUs only)")
    p.add_argument("--gpus-per-trial", type=number(float), default=d.gpus_per_trial)
    p.add_argument("--cpus", type=number(int), default=d.cpus)
    p.add_argument("--cpus-per-trial", type=number(float), default=d.cpus_per_trial)
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster to join (default: $RAY_ADDRESS, else start one here)")
    p.add_argument("--max-epochs", type=number(int), default=d.max_epochs)
    p.add_argument("--samples-per-epoch", type=number(int), default=d.samples_per_epoch)
    p.add_argument("--val-pairs", type=number(int), default=d.val_pairs,
                   help="validation pairs scored each epoch (default: sized to the trial)")
    p.add_argument("--test-pairs", type=number(int, allow_zero=True), default=d.test_pairs,
                   help="pairs per test set, 10 sets, for finished trials; 0: no test score "
                        "(default: sized to the trial)")
    p.add_argument("--time-budget", type=number(float), default=d.time_budget,
                   help="seconds; then the sweep stops cleanly")
    p.add_argument("--max-params", type=number(int, allow_zero=True),
                   default=d.max_params,
                   help="the search draws only models of at most this many parameters "
                        "(default %(default)s; 0 = no limit; with --from: the front's "
                        "configs within it, default no limit)")
    p.add_argument("--seed", type=number(int, allow_zero=True, most=2**32 - 1), default=d.seed,
                   help="Optuna's sampler seed, 0 to 2**32-1 (default %(default)s)")
    p.add_argument("--study-storage", type=study.check_url, default=d.study_storage,
                   help="Optuna storage of the study, e.g. postgresql://user@host/db "
                        "(default: an SQLite file in the experiment); see "
                        "docs/optuna-dashboard.md")
    long = p.add_argument_group("long runs: train the best configs of a sweep's front long")
    long.add_argument("--from", dest="from_experiment", type=storage.normalize,
                      help="the sweep's experiment (directory or URI); its front's configs "
                           "with the lowest val MSE, within --max-params, are trained as "
                           "the trials of a new experiment, NAME-long by default; or a "
                           "checkpoint file (.pt), whose config is trained so")
    long.add_argument("--top", type=number(int), help="how many configs (default 3)")
    long.add_argument("--samples", type=number(int),
                      help="training samples per long run, in --max-epochs epochs "
                           f"(default {long_runs.LONG_EPOCHS}); each is scored on the full "
                           "test protocol at the end")
    long.add_argument("--extend", action="store_true",
                      help="with --from FILE.pt: go on from the checkpoint (weights, "
                           "optimizer, step, stream of pairs) to --samples in all, in epochs "
                           "of its size, its schedule stretched to the new end")
    p.add_argument("--fresh", action="store_true",
                   help="start over; the old experiment is moved aside, not deleted")
    args = p.parse_args(argv)
    if args.extend and not long_runs.is_checkpoint(args.from_experiment or ""):
        raise UsageError("--extend goes on from a checkpoint: give --from FILE.pt")
    if args.from_experiment:  # other defaults fit a long run: parse again with them
        p.set_defaults(**long_runs.defaults(args.from_experiment))
        args = p.parse_args(argv)
        if args.samples_per_epoch is not None:
            raise UsageError("--samples-per-epoch does not go with --from: long runs take "
                             "--samples in --max-epochs epochs")
        if args.study_storage:
            raise UsageError("--study-storage does not go with --from: long runs search "
                             "nothing, so they keep no study")
        if args.extend and args.samples:
            extension_budget(args)
        else:
            args.max_epochs = args.max_epochs or long_runs.LONG_EPOCHS
            args.val_pairs = args.val_pairs or long_runs.LONG_VAL_PAIRS
            args.samples_per_epoch = math.ceil((args.samples or 1) / args.max_epochs)
    if args.gpus is None:  # a joined cluster counts its own GPUs (--address)
        args.gpus = 0 if args.address else machine_gpus()
    val_pairs, test_pairs = scoring_pairs(args.samples_per_epoch, args.max_epochs)
    args.val_pairs = val_pairs if args.val_pairs is None else args.val_pairs
    args.test_pairs = test_pairs if args.test_pairs is None else args.test_pairs
    config = SweepConfig(**{k: v for k, v in vars(args).items()})
    check(config)
    if config.address:
        check_reachable(config.address)
    if config.from_experiment:
        config = replace(config, trials=long_run_count(config))
    return config


def extension_budget(args: argparse.Namespace) -> None:
    """--extend: the epochs' size and count and the validation pairs come from the
    checkpoint (a longer run of it keeps them), so giving them is refused."""
    if args.max_epochs is not None or args.val_pairs is not None:
        raise UsageError("--max-epochs and --val-pairs do not go with --extend: a longer run "
                         "keeps its checkpoint's epoch size and validation pairs")
    try:
        args.max_epochs, args.samples_per_epoch, args.val_pairs = long_runs.extension_budget(
            args.from_experiment, args.samples)
    except long_runs.SourceError as e:
        raise UsageError(f"--from {e}") from None


def machine_gpus() -> int:
    """The GPUs torch sees here: what a user of a GPU machine expects a sweep to use."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def long_run_count(c: SweepConfig) -> int:
    """How many long runs: as many as the experiment began with when it resumes (the
    source's front may have moved since), else as many as the source's front gives."""
    if not c.fresh:  # --fresh moves the old experiment aside: its count is not ours
        try:
            saved = json.loads(storage.read_bytes(storage.join(c.experiment_uri,
                                                               SETTINGS_FILE)))
            return saved["trials"]
        except (OSError, ValueError, KeyError):
            pass
    try:
        configs = long_run_configs(c)
    except long_runs.SourceError as e:
        raise UsageError(f"--from {e}") from None
    if not configs:
        raise UsageError(f"--from {c.from_experiment}: no trial on its front has a val MSE"
                         + (f" within --max-params {c.max_params}" if c.max_params else ""))
    return len(configs)


def long_run_configs(c: SweepConfig) -> list[dict]:
    return long_runs.front_configs(c.from_experiment, c.top, c.max_params or None,
                                   c.samples, c.max_epochs, c.val_pairs, c.test_pairs,
                                   c.extend)


def scoring_pairs(samples_per_epoch: int, max_epochs: int) -> tuple[int, int]:
    """Default (validation pairs, pairs per test set), sized so that scoring stays a few
    percent of a trial. A forward pass costs about a third of a training sample (measured:
    3.2x), so validating 1/16 of an epoch's samples costs ~2% of each epoch and ten test
    sets of 1/300 of all training samples ~1% of the trial. Floors keep small sets
    meaningful (the test floor is 50: at 100, ten sets of a 2 x 4,096-sample trial cost
    its scoring 5.3% of the trial); ceilings are the task's own sizes."""
    val = min(max(samples_per_epoch // 16, 250), 2_000)
    test = min(max(samples_per_epoch * max_epochs // 300, 50), 20_000)
    return val, test


def first_rung(samples_per_epoch: int, max_epochs: int,
               rung_samples: int = ASHA_FIRST_RUNG_SAMPLES) -> int:
    """The epoch at which ASHA first compares trials: after `rung_samples`, not
    before. Earlier, learning curves still cross: in a measured sweep of 8 x 2,048-sample
    trials the trial that ended best was the worst of six after its first epoch (val MSE
    4.1e-2 against 9e-3 to 2.6e-2), and ASHA stopped it there; after 4,096 samples it
    ranked second."""
    return min(max_epochs, math.ceil(rung_samples / samples_per_epoch))


def check(c: SweepConfig) -> None:
    """Cross-flag checks argparse cannot do alone."""
    if not c.from_experiment and (c.top or c.samples):
        raise UsageError("--top and --samples choose long runs; give --from EXPERIMENT too")
    if c.from_experiment and not c.samples:
        raise UsageError("--from needs --samples: how many samples each long run trains on")
    if c.from_experiment and c.from_experiment.rstrip("/") == c.experiment_uri.rstrip("/"):
        raise UsageError(f"--from {c.from_experiment} is the experiment the long runs would "
                         "go to; give them another --name")
    if c.gpus and c.gpus_per_trial > c.gpus:
        raise UsageError(f"--gpus-per-trial {c.gpus_per_trial:g} is more than --gpus {c.gpus:g}")
    if c.cpus is not None and c.cpus_per_trial > c.cpus:
        raise UsageError(f"--cpus-per-trial {c.cpus_per_trial:g} is more than --cpus {c.cpus:g}")
    if not c.address and c.cpus is None and c.cpus_per_trial > (os.cpu_count() or 1):
        # Ray would accept it and no trial would ever start.
        raise UsageError(f"--cpus-per-trial {c.cpus_per_trial:g} is more than the "
                         f"{os.cpu_count()} CPUs of this machine")
    if not c.address and c.gpus:
        import torch

        if torch.cuda.is_available() and c.gpus > torch.cuda.device_count():
            raise UsageError(f"--gpus {c.gpus:g} is more than the {torch.cuda.device_count()} "
                             "GPUs of this machine (logical GPUs only where there is none)")
    if not c.from_experiment and c.samples_per_epoch < max(BATCH_SIZES):
        raise UsageError(f"--samples-per-epoch {c.samples_per_epoch} is less than the largest "
                         f"batch size in the space, {max(BATCH_SIZES)}")
    if c.max_params and c.max_params < params_of(SMALLEST):
        raise UsageError(f"--max-params {c.max_params}: no variant fits; the smallest in the "
                         f"space has {params_of(SMALLEST)} parameters")
    if c.address and (c.cpus is not None or c.gpus):
        raise UsageError("--cpus/--gpus describe a Ray instance started here; with --address "
                         "the cluster's own resources are used")
    if not c.name or "/" in c.name or c.name.startswith("."):
        raise UsageError(f"--name must be a plain directory name, got {c.name!r}")
    # Found now, not when the first report is written after an hour of training.
    if storage.is_uri(c.storage):
        try:
            storage.check_usable(c.storage)
        except storage.StorageError as e:
            raise UsageError(f"--storage {e}") from None
    else:
        check_writable("--storage", Path(c.storage), want_dir=True)
    check_writable("--report", c.report, want_dir=False)


def check_writable(flag: str, path: Path, want_dir: bool) -> None:
    if path.exists() and path.is_dir() != want_dir:
        raise UsageError(f"{flag} {path} is a {'file' if want_dir else 'directory'}; give a "
                         f"{'directory' if want_dir else 'file path'}")
    existing = path.resolve() if want_dir else path.resolve().parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {existing} is not writable")


def check_reachable(address: str) -> None:
    """ray.init waits minutes on a host:port where no Ray listens: knock first."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--address {address}: expected host:port, auto or ray://host:port")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise UsageError(f"--address {address}: no Ray cluster answers there "
                         f"({e.strerror or e}); start one with `ray start --head`") from None


def sweep_settings(c: SweepConfig) -> dict:
    """What defines a sweep, as JSON values (paths made absolute)."""
    return {k: str(v.resolve()) if isinstance(v, Path) else v
            for k, v in asdict(c).items() if k not in WHERE_FIELDS}


def as_flags(c: SweepConfig) -> str:
    """The settings as the flags that give them (`--trials 6 --max-epochs 2 ...`), to print."""
    flags = []
    for key, value in asdict(c).items():
        flag = "--from" if key == "from_experiment" else "--" + key.replace("_", "-")
        if value is None or key == "fresh":  # a default that is no value; a one-off action
            continue
        if isinstance(value, bool):
            flags.append(flag if value else f"--no-{flag[2:]}")
            continue
        if key == "study_storage":
            text = study.shown(value)  # its password masked
        else:
            text = format(value, "g") if isinstance(value, float) else str(value)
        flags.append(f"{flag} {shlex.quote(text)}")
    return " ".join(flags)


def objective(c: SweepConfig) -> dict:
    """The searcher's metric and mode for --objective."""
    if c.objective == "pareto":
        return dict(metric=["val_mse", "params"], mode=["min", "min"])
    return dict(metric="val_mse", mode="min")

