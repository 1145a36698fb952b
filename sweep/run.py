"""Run (or resume) a sweep of the U-Net family: Ray Tune schedules, Optuna searches.

    python sweep/run.py                  # small CPU-sized default sweep, a few minutes
    python sweep/run.py --gpus 4         # 4 GPUs, one trial per GPU
    python sweep/run.py --address auto   # join a running Ray cluster
    python sweep/run.py --from runs/sweep --top 3 --samples 15000000   # train the front long

Run the same command again after an interruption and the sweep continues where it
stopped; `--fresh` starts over (the old run is moved aside, never deleted).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import json
import logging
import math
import os
import shlex
import signal
import socket
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a plain checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.sources import DataError, load_fashion_mnist, load_mnist
from model.unet import params_of
from sweep import long_runs, signals, storage, study
from sweep.experiment import StateError, reconcile, tell_study
from sweep.space import BATCH_SIZES, SMALLEST, space, start_points

OBJECTIVES = ("mse", "pareto")
MAX_FAILURES = 2  # retries of a trial whose worker died (killed, lost node), from checkpoint
SEARCHES = ("tpe", "random")
ASHA_FIRST_RUNG_SAMPLES = 4_096  # see first_rung(); --first-rung-samples sets it
PLOT_EVERY_S = 60  # pareto.png is redrawn at most this often while the sweep runs
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


def parse_args(argv: list[str] | None) -> SweepConfig:
    d = SweepConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                epilog=__doc__.split("\n\n", 1)[1],
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
                           "the trials of a new experiment, NAME-long by default")
    long.add_argument("--top", type=number(int), help="how many configs (default 3)")
    long.add_argument("--samples", type=number(int),
                      help="training samples per long run, in --max-epochs epochs "
                           f"(default {long_runs.LONG_EPOCHS}); each is scored on the full "
                           "test protocol at the end")
    p.add_argument("--fresh", action="store_true",
                   help="start over; the old experiment is moved aside, not deleted")
    args = p.parse_args(argv)
    if args.from_experiment:  # other defaults fit a long run: parse again with them
        p.set_defaults(**long_runs.defaults(args.from_experiment))
        args = p.parse_args(argv)
        if args.samples_per_epoch is not None:
            raise UsageError("--samples-per-epoch does not go with --from: long runs take "
                             "--samples in --max-epochs epochs")
        if args.study_storage:
            raise UsageError("--study-storage does not go with --from: long runs search "
                             "nothing, so they keep no study")
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
                                   c.samples, c.max_epochs, c.val_pairs, c.test_pairs)


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


# --- the experiment directory ---------------------------------------------------------------

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


def check_same_sweep(c: SweepConfig) -> None:
    """Tune resumes a sweep with the settings it began with (kept in its tuner.pkl: trial
    count, budget, search, the live report's path) and would quietly ignore new ones; the
    trials would see some of them. Refuse a command that asks for others."""
    try:
        saved = json.loads(storage.read_bytes(storage.join(c.experiment_uri, SETTINGS_FILE)))
    except (OSError, ValueError):  # a new sweep, or one begun before the file was kept
        return
    wanted = sweep_settings(c)
    differ = [k for k in wanted if saved.get(k, wanted[k]) != wanted[k]]
    if differ:
        changes = ", ".join(f"--{k.replace('_', '-')} {saved[k]} (asked: {wanted[k]})"
                            for k in differ)
        raise UsageError(f"{c.experiment_uri} is a sweep begun with {changes}; its own command "
                         "continues it, --fresh or another --name starts a new one")


def lock_experiment(experiment: Path):
    """Hold an exclusive lock for this driver's lifetime: a second driver on the same
    experiment would corrupt it. The OS drops the lock when the process dies, however.
    The lock file sits beside the experiment, not in it, so that `--fresh` can move the
    experiment aside under the lock."""
    experiment.parent.mkdir(parents=True, exist_ok=True)
    handle = open(experiment.with_name(f".{experiment.name}.driver.lock"), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        raise UsageError(f"another sweep is running on {experiment} (driver pid {owner}); "
                         "wait for it, or use another --name") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def save_final_states(experiment: str, trials) -> None:
    """Write the driver's final trial states over stale ones in the saved experiment.

    Ray 2.60 does not snapshot a trial whose worker died for the last time: its state
    stays RUNNING on disk (TuneController._schedule_trial_stop sets it ERROR but returns,
    its actor gone, before marking the trial for the next snapshot), and report.py or a
    resume would read it as unfinished.
    """
    states = storage.names(experiment, "experiment_state-*.json")
    if not states:
        return
    newest = storage.join(experiment, states[-1])
    saved = json.loads(storage.read_bytes(newest))
    live = {t.trial_id: t for t in trials}
    changed = False
    for i, (state, _) in enumerate(saved["trial_data"]):
        state = json.loads(state)
        trial = live.get(state["trial_id"])
        if trial is not None and state["status"] != trial.status:
            trial.invalidate_json_state()
            saved["trial_data"][i] = list(trial.get_json_state())
            changed = True
    if changed:
        storage.write_bytes(newest, json.dumps(saved).encode())


def move_aside(experiment: str, name: str) -> str:
    aside = storage.sibling(experiment, f"{name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    storage.move(experiment, aside)
    return aside


# --- Ray -----------------------------------------------------------------------------------

def start_ray(c: SweepConfig) -> None:
    import ray
    import torch

    # Ray's start-up lines off the console (its token-authentication notice among them):
    # warnings and errors still show.
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    if c.address:
        ray.init(address=c.address, log_to_driver=False, logging_level=logging.WARNING)
        return
    if c.gpus and not torch.cuda.is_available():
        # Logical GPUs on a CPU machine (for testing the scheduling): ray.init refuses when
        # CUDA_VISIBLE_DEVICES lists fewer devices than declared.
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    with loopback_only():
        # address="local": a Ray of our own, even where someone ran `ray start --head` on
        # this machine; without it ray.init joins theirs (and refuses num_cpus there).
        ray.init(address="local", num_cpus=c.cpus, num_gpus=c.gpus, include_dashboard=False,
                 dashboard_host="127.0.0.1", log_to_driver=False,
                 object_store_memory=200 * 1024**2, logging_level=logging.WARNING)


@contextlib.contextmanager
def loopback_only():
    """Ray's processes listen on the node's address: on Linux the machine's network
    address, on every interface (GCS, raylet, workers, agents; seen with Ray 2.60), unless
    Ray's cluster mode is off. Off, the node address is 127.0.0.1 and every port listens on
    loopback only (tests/test_faults.py checks). A cluster is `ray start` + --address.
    The switch is read when ray is imported, hence the module flag besides the variable
    the processes Ray spawns read."""
    from ray._private import ray_constants

    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved = os.environ.get(name), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[name], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        if saved[0] is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved[0]
        ray_constants.ENABLE_RAY_CLUSTER = saved[1]


def check_fits(c: SweepConfig) -> None:
    """One trial's resources must fit on some node, or Tune waits for them forever (a
    cluster joined with --address; on one machine check() caught it already)."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    cpus = max((n.get("CPU", 0) for n in nodes), default=0)
    gpus = max((n.get("GPU", 0) for n in nodes), default=0)
    if c.cpus_per_trial > cpus:
        raise UsageError(f"--cpus-per-trial {c.cpus_per_trial:g} is more than any node has "
                         f"({cpus:g} CPUs at most)")
    if gpus and c.gpus_per_trial > gpus:
        raise UsageError(f"--gpus-per-trial {c.gpus_per_trial:g} is more than any node has "
                         f"({gpus:g} GPUs at most)")


def concurrency(c: SweepConfig) -> int:
    """How many trials fit at once; Tune also needs it told (Optuna keeps one pending)."""
    import ray

    resources = ray.cluster_resources()
    fits = resources.get("CPU", 1) / c.cpus_per_trial
    if resources.get("GPU"):
        fits = min(fits, resources.get("GPU", 0) / c.gpus_per_trial)
    return max(1, min(c.trials, math.floor(fits + 1e-9)))


def name_trial_dir(trial) -> str:
    from sweep.trainable import trial_dir_name  # where trials look for their checkpoints

    return trial_dir_name(trial.trial_id)


def build_tuner(c: SweepConfig):
    """The sweep's Tuner: restored from the experiment if there is one, else a new one."""
    # Snapshot the experiment every 2 s (Tune's default: 10 s or more). A killed driver
    # resumes from the last snapshot; trials also pick up newer checkpoints from disk.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    # ... and, at that rate, without Tune's warning that snapshots come often.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's own console output off (its experiment table, and a TensorBoard path into
    # Ray's temp folder): our progress lines say what happens and where the results are.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import ray
    from ray import tune

    from sweep.trainable import tune_trial

    # GPUs only where Ray has some (real, or logical ones declared with --gpus).
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    resources = {"cpu": c.cpus_per_trial, "gpu": c.gpus_per_trial if has_gpus else 0}
    trainable = tune.with_resources(
        tune.with_parameters(tune_trial, experiment=c.experiment_uri), resources)
    if tune.Tuner.can_restore(c.experiment_uri):
        print(f"resuming the sweep in {c.experiment_uri}")
        # The search space, the Optuna study, the trial count and the run config (the
        # progress callback too) come back from the experiment's tuner.pkl; finished trials
        # are kept, interrupted ones continue from their checkpoints.
        return tune.Tuner.restore(c.experiment_uri, trainable, resume_errored=True)
    return new_tuner(c, trainable)


def new_tuner(c: SweepConfig, trainable):
    """A new sweep's Tuner (the search, ASHA, the budget, the progress callback), and its
    settings file, which a resume is checked against (check_same_sweep)."""
    from ray import tune

    n_concurrent = concurrency(c)
    search, scheduler, param_space = (long_run_search(c) if c.from_experiment
                                      else optuna_search(c))
    tune_config = tune.TuneConfig(
        search_alg=search, scheduler=scheduler, num_samples=c.trials,
        # (Tune lifts Optuna's one pending trial by it; a list of configs needs no limit)
        max_concurrent_trials=None if c.from_experiment else n_concurrent,
        time_budget_s=c.time_budget,
        # A worker goes on to the next trial: no new process, torch import or data load.
        reuse_actors=True, trial_dirname_creator=name_trial_dir)
    run_config = tune.RunConfig(
        name=c.name,
        storage_path=storage.normalize(c.storage),  # Tune writes to object storage itself
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),  # a worker died
        callbacks=[make_progress(c)],
        verbose=0,
    )
    settings = json.dumps(sweep_settings(c), indent=1).encode()
    storage.write_bytes(storage.join(c.experiment_uri, SETTINGS_FILE), settings)
    print(f"new sweep in {c.experiment_uri}: {c.trials} trials, up to {n_concurrent} at once")
    return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config,
                      param_space=param_space)


def objective(c: SweepConfig) -> dict:
    """The searcher's metric and mode for --objective."""
    if c.objective == "pareto":
        return dict(metric=["val_mse", "params"], mode=["min", "min"])
    return dict(metric="val_mse", mode="min")


def optuna_search(c: SweepConfig):
    """Optuna's search over the space, its study in real storage; ASHA (or FIFO); the
    space is Optuna's (define-by-run), so Tune's param_space is empty."""
    import optuna
    from ray.tune.schedulers import ASHAScheduler

    constants = {"epochs": c.max_epochs, "samples_per_epoch": c.samples_per_epoch,
                 "val_pairs": c.val_pairs, "test_pairs": c.test_pairs, "seed": c.seed}
    define_by_run = functools.partial(space, constants=constants)
    max_params = c.max_params or None
    if c.search == "random":  # the baseline the search-efficiency bench compares with
        # Suggestions over the budget are refused (StudySearch): uniform over those within.
        sampler = optuna.samplers.RandomSampler(seed=c.seed)
    else:
        # Few random start-up trials: in parallel they are overrun anyway (ray #52535).
        # multivariate: learning rate, batch size and width interact; constant_liar: trials
        # still running count as bad guesses, so parallel suggestions spread out. Points over
        # --max-params, refused unrun, carry a constraint (StudySearch) that TPE ranks below
        # every feasible point.
        sampler = optuna.samplers.TPESampler(seed=c.seed, multivariate=True, constant_liar=True,
                                             n_startup_trials=max(2, min(5, c.trials // 4)))
    # Metric and mode go on the searcher and the scheduler, not on TuneConfig: with the
    # concurrency limit Tune wraps the searcher and would not pass them on. The study is
    # in real storage, named after the experiment, for optuna-dashboard.
    search = study.StudySearch(define_by_run, sampler=sampler, **objective(c),
                               max_params=max_params,
                               points_to_evaluate=(start_points(max_params)
                                                   if c.warm_start else None),
                               study_name=c.name, storage=study.open_storage(study.url_of(c)),
                               own_file=not c.study_storage)
    scheduler = None  # FIFO: every trial runs all its epochs
    if c.early_stop:
        # A rung whose trials all ended in error or divergence holds only NaN: ASHA's
        # cutoff (numpy's nanpercentile) then warns, and there is nothing to cut.
        warnings.filterwarnings("ignore", "All-NaN slice", RuntimeWarning)
        # The trial's own epoch, not Tune's count of its results: after a killed driver
        # that count restarts from Tune's last snapshot while the trial goes on from its
        # newest checkpoint on disk.
        scheduler = ASHAScheduler(metric="val_mse", mode="min", time_attr="epoch",
                                  max_t=c.max_epochs, reduction_factor=2,
                                  grace_period=first_rung(c.samples_per_epoch, c.max_epochs,
                                                          c.first_rung_samples))
    return search, scheduler, {}


def long_run_search(c: SweepConfig):
    """The chosen configs, one trial each, every one run to its end: no search, FIFO.
    Tune takes a trial's config from its point only for keys its param_space names."""
    from ray.tune.search import BasicVariantGenerator

    configs = long_run_configs(c)
    print(f"long runs of {len(configs)} configs of {c.from_experiment}'s front, "
          f"{c.samples:,} samples each")
    keys = dict.fromkeys(k for config in configs for k in config)
    return BasicVariantGenerator(points_to_evaluate=configs), None, keys



# --- progress and the live report ---------------------------------------------------------

def source_trials(c: SweepConfig) -> list:
    """The trials of the sweep long runs come from: in their report too, so that
    pareto.png draws both (the long runs' full-protocol test scores apart)."""
    if not c.from_experiment:
        return []
    from sweep.report import load_trials

    try:
        return load_trials(c.from_experiment)
    except (OSError, ValueError, KeyError) as e:  # gone since (another machine): say so
        print(f"warning: the report leaves out {c.from_experiment} ({e})", flush=True)
        return []


def make_progress(c: SweepConfig):
    from ray import tune

    from sweep.report import error_line, trial_status, write_report

    source_rows = source_trials(c)

    class Progress(tune.Callback):
        """Prints a line on each trial's news (at most every 10 s for results) and rewrites
        the report whenever a trial ends."""

        earlier = 0.0  # seconds the sweep ran under the drivers before this one

        def setup(self, **info) -> None:  # Tune calls it after set_state on a resume
            self.started = time.monotonic()
            self.last_print = self.last_plot = 0.0

        # Saved with each experiment snapshot and given back on a resume, so the clock and
        # the budget's time left go on where they were, as Tune's own budget clock does.
        def get_state(self) -> dict:
            return {"elapsed": self.elapsed()}

        def set_state(self, state: dict) -> None:
            self.earlier = state["elapsed"]

        def elapsed(self) -> float:
            return self.earlier + time.monotonic() - self.started

        def line(self, trials, news: str, ending=None) -> None:
            done = [t for t in trials if t.status in ("TERMINATED", "ERROR") or t is ending]
            running = sum(t.status == "RUNNING" and t is not ending for t in trials)
            scores = [t.last_result.get("val_mse") for t in trials if t.last_result]
            scores = [s for s in scores if s is not None and math.isfinite(s)]
            best = f"{min(scores):.3e}" if scores else "-"
            elapsed = self.elapsed()
            if c.time_budget:
                left = f"{max(0.0, c.time_budget - elapsed) / 60:.1f} min left (budget)"
            elif done:
                per_trial = elapsed / len(done)
                left = f"~{per_trial * (c.trials - len(done)) / 60:.1f} min left"
            else:
                left = "time left: after the first trial"
            print(f"[{elapsed / 60:5.1f} min] {len(done)}/{c.trials} done, {running} running, "
                  f"best val_mse {best}, {left} | {news}", flush=True)

        def report(self, trials, ending=None) -> None:
            # The CSV every time; the plot at most once a minute: drawing it takes ~0.35 s
            # of the driver's loop, which starts no trial meanwhile. The sweep's end draws it.
            plot = time.monotonic() - self.last_plot > PLOT_EVERY_S
            if plot:
                self.last_plot = time.monotonic()
            try:
                write_report(trials, c.report, ending=ending.trial_id if ending else None,
                             plot=plot, others=source_rows)
            except OSError as e:  # a full disk must not end the sweep; the old file stays
                print(f"warning: {e}; the sweep goes on and tries again when the next "
                      "trial ends", flush=True)

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            if result.get("resume_note"):  # a retried or resumed trial: say from where
                self.line(trials, f"{trial.trial_id}: {result['resume_note']}")
            if time.monotonic() - self.last_print > 10:
                self.last_print = time.monotonic()
                self.line(trials, f"{trial.trial_id} epoch {result.get('epoch')}: "
                                  f"val_mse {result.get('val_mse', math.nan):.3e}")

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            result = trial.last_result or {}
            status = trial_status("TERMINATED", result)  # Tune sets it after this call
            why = f": {result['reason']}" if status == "error" and result.get("reason") else ""
            # Tune marks the trial TERMINATED after this callback: count it as ended.
            self.line(trials, f"{trial.trial_id} ended ({status}){why}", ending=trial)
            self.report(trials, ending=trial)

        def on_trial_recover(self, iteration, trials, trial, **info) -> None:
            failures = trial.run_metadata.num_failures
            self.line(trials, f"{trial.trial_id} failed ({error_line(trial)}); retry "
                              f"{failures} of {MAX_FAILURES} from its newest checkpoint")

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            where = storage.uri_of(trial.storage.storage_filesystem, f"{trial.path}/"
                                   f"{trial.run_metadata.error_filename or 'error.txt'}")
            self.line(trials, f"{trial.trial_id} failed for good ({error_line(trial)}; "
                              f"see {where})")
            self.report(trials)

    return Progress()


# --- main ----------------------------------------------------------------------------------

def fill_data_cache() -> None:
    """Load (and on first use cache) both datasets here, once, with a clear error, before
    any trial starts; trials then read the verified cache."""
    for load in (load_mnist, load_fashion_mnist):
        images = load()
        print(f"data: {images.name} from {images.source}")


def fit_noting_ctrl_c(tuner):
    """tuner.fit(), and whether a Ctrl-C (SIGINT) ended it. Tune catches the signal itself:
    it stops the trials, saves the experiment once more, returns, and puts back the
    handler it found; a fit that ends on its own leaves Tune's handler in place. Telling
    the two apart matters between trials, where nothing is left running to show it."""
    # Tune's graceful stop is what makes Ctrl-C resumable; with it off, Ctrl-C would
    # raise out of fit() with no final snapshot.
    os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
    before = signal.getsignal(signal.SIGINT)
    grid = tuner.fit()
    return grid, signal.getsignal(signal.SIGINT) is before


def sweep(c: SweepConfig) -> int:
    with lock_experiment(c.experiment):  # first: a second driver must change nothing
        return sweep_under_lock(c)


def sweep_under_lock(c: SweepConfig) -> int:
    import ray
    from ray import tune

    from sweep.report import load_trials, write_report

    experiment = c.experiment_uri
    if c.fresh and storage.exists(experiment):
        print(f"--fresh: moved the previous experiment to {move_aside(experiment, c.name)}")
    check_same_sweep(c)
    resuming = tune.Tuner.can_restore(experiment)
    # Long runs search nothing: no study. First: a study that cannot be resumed (locked,
    # damaged, another sweep's) is refused before anything in the experiment changes.
    study_url = None if c.from_experiment else study.prepare(c, new=not resuming)
    if resuming:
        # Trials a killed driver's last snapshot does not know: kept if they ended, else
        # aside; then Tune's search state pointed at where the experiment is now.
        ended_unknown = reconcile(experiment).adopted
        storage.relocate_search_state(experiment)
        if study_url and ended_unknown:
            tell_study(study_url, c.name, objective(c)["metric"], ended_unknown)
    fill_data_cache()
    start_ray(c)
    signals.handle_sigterm_as_ctrl_c()  # again: ray.init put in handlers of its own
    try:
        check_fits(c)
        tuner = build_tuner(c)
        print(f"settings: {as_flags(c)}")
        if study_url:
            print(f"study: {c.name!r} in {study.shown(study_url)}; watch it live with "
                  f"{study.dashboard_command(study_url)}")
        grid, ctrl_c = fit_noting_ctrl_c(tuner)
        # The trials as the driver saw them end; the saved experiment can lag (below).
        # After a Ctrl-C, not: Tune marks the trials it stopped TERMINATED in memory only,
        # and its snapshot, where they are still running, is what a resume must see.
        trials = getattr(getattr(grid, "_experiment_analysis", None), "trials", None)
        if trials and not ctrl_c:
            save_final_states(experiment, trials)
        else:
            trials = load_trials(experiment)
    finally:
        ray.shutdown()
    try:
        df = write_report(trials, c.report, others=source_trials(c))
    except OSError as e:  # the results are all in the experiment; only the summary failed
        print(f"error: {e}\n  every trial's results are kept in {experiment}; when there is "
              f"room: python sweep/report.py {experiment} --out {c.report}", file=sys.stderr)
        return 1
    df = df[df["trial_id"].isin({t.trial_id for t in trials})]  # a long run's source aside
    unfinished = df["status"].isin(["running", "pending", "paused"]).sum()
    if study_url and not ctrl_c and not unfinished:
        study.close_study(study_url, c.name)
    print(df["status"].value_counts().to_string())
    best = df[df["val_mse"].notna()].sort_values("val_mse").head(1)
    if len(best):
        row = best.iloc[0]
        print(f"best: trial {row.trial_id}, val_mse {row.val_mse:.3e}, "
              f"{int(row.params)} params\n  checkpoint: {row.checkpoint}\n"
              f"  evaluate:   python sweep/evaluate.py {row.checkpoint}")
    print(f"report: {c.report} (and {c.report.with_name('pareto.png')})\n"
          f"tensorboard: tensorboard --logdir {experiment}")
    if study_url:
        print(f"study: {study.dashboard_command(study_url)}")
    if not ctrl_c and c.time_budget and not unfinished and len(df) < c.trials:
        # Tune stopped the running trials and started no more. Its clock is saved with
        # the experiment, so the same command would end at once: say what would go on.
        print(f"time budget used up ({c.time_budget:g} s): {len(df)} of {c.trials} trials "
              "ran; --fresh or another --name starts a new sweep")
    elif ctrl_c or unfinished or len(df) < c.trials:
        print(f"interrupted: {len(df) - unfinished}/{c.trials} trials ended; run the same "
              "command to continue")
        return signals.interrupted_exit_code()  # 130 after a Ctrl-C, 143 after a SIGTERM
    return 0


def main(argv: list[str] | None = None) -> int:
    signals.handle_sigterm_as_ctrl_c()  # a scheduler's SIGTERM: the same as a Ctrl-C
    try:
        config = parse_args(argv)
        return sweep(config)
    except (UsageError, DataError, study.StudyError, long_runs.SourceError, StateError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside Tune's graceful stop: start-up, or a second Ctrl-C
        print("\ninterrupted: run the same command to continue (from the experiment's last "
              "snapshot, if it has one)", file=sys.stderr)
        return signals.interrupted_exit_code()


if __name__ == "__main__":
    sys.exit(main())
