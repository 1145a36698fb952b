"""The front on one GPU in at most 9 minutes: the check's fast parts, then three designs
trained for as long as the minutes allow, each scored on the full test protocol.

    python bench/gpu_check.py --write-idx runs/gpu-data   # here: the images, 40 MB to carry
    python3 bench/gpu_front.py --mnist-dir runs/gpu-data/mnist \
        --fashion-dir runs/gpu-data/fashion-mnist --out runs/gpu-front  # on the GPU machine
    python bench/gpu_front.py --device cpu --quick        # a dry run without a GPU (the tests)

Like bench/gpu_check.py (whose code it shares) it needs torch, numpy, pandas and matplotlib,
never Ray or Optuna. Three parts, each under a hard deadline, each caught on its own so a
failed part leaves the others and the files already written:

1. the check's fast parts, under 2 minutes: the fast path's training throughput of each
   design at a few batch sizes; a run of 2 epochs against 1 epoch + resume from its
   checkpoint file (same weights, or within the noise of a repeat); the device's score of
   a checkpoint against the CPU's on 10 small test sets;
2. the front: each design trained by sweep/train.py (its TrainConfig, its checkpoints,
   metrics.csv and curve.png), all at once on the device by default, at the batch size
   part 1 found keeps the device busy, for as many samples as the window allows. Each
   trainer first measures its own rate beside the others, then sizes its epochs so that
   the schedule ends inside the window;
3. each scored on the full test protocol (10 x 20,000 pairs) on the device, by train.py's
   --test-pairs at the end of its last epoch.

It prints one line per design and ends with `gpu_front: ok` (exit 0) or `gpu_front:
FAILED: <what failed>` (exit 1); bad input is one line and exit 2. docs/gpu-check.md says
what to carry and where the files land.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a plain checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# gpu_check says in one line which of torch, numpy, pandas, matplotlib is missing.
import torch  # noqa: E402

from bench.gpu_check import (  # noqa: E402
    CheckFailed,
    add_device_and_data_flags,
    check_scores_agree,
    cuda_view,
    describe_machine,
    device_to_check,
    last_line,
    one_line,
    rate,
    resume_verdict,
)
from bench.train_throughput import Mode, real_training_step, samples_per_second, warm_up  # noqa: E402
from data.mixture import Sources, load_sources  # noqa: E402
from data.sources import DataError, default_cache_dir  # noqa: E402
from model.unet import ConfigError, UNetConfig, params_of, preset  # noqa: E402
from sweep.checkpoint import (  # noqa: E402
    CHECKPOINT_FILE,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from sweep.device import choose_fast_path, pick_device  # noqa: E402
from sweep.scoring import TEST_PAIRS, TEST_SEEDS, test_score  # noqa: E402
from sweep.train import TrainConfig, run_trial  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TRAIN_PY = REPO / "sweep" / "train.py"
FRONT_CSV = "front.csv"  # one row per design, rewritten as each one ends
READY_DIR = "ready"  # where the trainers of one group meet before measuring their rate


@dataclass(frozen=True)
class Design:
    """A model of the front: a preset with overrides, and the lr its sweep chose (None:
    RECIPE's)."""

    preset: str
    overrides: dict = field(default_factory=dict)
    lr: float | None = None
    why: str = ""

    @property
    def model(self) -> UNetConfig:
        return preset(self.preset, **self.overrides)


DESIGNS = {
    "front117k": Design("small", {"base_filters": 16},
                        why="best within 157,410 params (2026-12-02-sweep157k; 6.12e-4 "
                            "after 4M samples)"),
    "small263k": Design("small", why="best within 368,421 params trained long (4.95e-4 "
                                     "after 6M samples, 2026-11-26-long-small)"),
    # At equal samples this NAF design led `small` (2026-12-02-sweep400k, 500k samples);
    # on the CPU it is 3.5x the FLOPs: a GPU decides between them.
    "naf189k": Design("small", {"base_filters": 32, "depth": 1, "enc_convs": 3,
                                "dec_convs": 2, "block": "naf", "upsample": "bilinear"},
                      lr=6.6e-3, why="led small at equal samples (2026-12-02-sweep400k)"),
    "reference": Design("reference", why="aimed at 3.0e-4: the published reference "
                                         "(3.68e-4 after ~19.4M samples)"),
    "tiny": Design("tiny", why="dry runs"),
}
# Today's recipe, the one the front's CPU runs train with (Muon on the hidden conv filters,
# AdamW on the rest, linear decay to 0; results/2026-12-03-time-to-quality).
RECIPE = TrainConfig()
# Both learning rates (Muon's and AdamW's) of a design with batch norm are scaled with the
# batch by sqrt(batch / RECIPE's batch), at most by this factor: a larger batch takes fewer,
# surer steps (a guess; `small` trained well so at batch 4,096 on an H200). A design without
# batch norm keeps the recipe's: the reference diverged at 2x there (results/2026-12-04-gpu).
MAX_LR_SCALE = 2.0
# A trainer sizes its run to this share of the rate it measured: each epoch's validation,
# checkpoint and curve.png, and the first epoch's warm-up, are outside the probe. On an
# H200 they cost under a second an epoch and the rate held: 0.85 left 15% of the window idle.
SAFETY = 0.95
FAST_PATH_SHARE = 0.8  # the smallest batch within this share of the best rate measured


@dataclass(frozen=True)
class Plan:
    """How big each part is; --quick only changes this."""

    total_s: float  # the whole script's wall time
    fast_parts_s: float  # part 1's hard deadline
    designs: tuple[str, ...]
    batches: tuple[int, ...]  # measured in part 1; the front's batch is chosen among them
    seconds: float  # per throughput measurement
    warmup_steps: int
    resume_design: str
    resume_args: dict  # RECIPE's fields that part 1's resume run changes
    compare_pairs: int  # pairs per test set of the device-against-CPU score
    probe_s: float  # each trainer's own rate measurement, beside the others
    epoch_s: float  # about this long an epoch of the front (a checkpoint each)
    val_pairs: int
    test_pairs: int  # per test set, 10 sets: the protocol's 20,000
    score_s: float  # what scoring is given where part 1 measured no rate
    threads: int  # torch CPU threads per trainer (0: torch's default)


FULL = Plan(
    total_s=9 * 60, fast_parts_s=120, designs=("front117k", "small263k", "reference"),
    # A small model keeps an H200 busy only at thousands of samples a step.
    batches=(256, 1024, 4096), seconds=1.5, warmup_steps=3,
    resume_design="small263k",
    resume_args={"epochs": 2, "samples_per_epoch": 65_536, "batch_size": 256,
                 "val_pairs": 1_000},
    compare_pairs=1_000, probe_s=4.0, epoch_s=30.0, val_pairs=2_000, test_pairs=TEST_PAIRS,
    score_s=60.0,
    threads=0,
)
# 60 s: at 45 the front found no time left to train where a busy CPU halved part 1's rates.
QUICK = Plan(
    total_s=60, fast_parts_s=15, designs=("front117k", "tiny"),
    batches=(4, 8), seconds=0.2, warmup_steps=0,
    resume_design="tiny",
    resume_args={"epochs": 2, "samples_per_epoch": 128, "batch_size": 16, "val_pairs": 50},
    compare_pairs=50, probe_s=0.5, epoch_s=2.0, val_pairs=50, test_pairs=50, score_s=5.0,
    threads=1,
)


class PartTimeout(Exception):
    """A part ran past its deadline."""


@contextlib.contextmanager
def deadline(seconds: float):
    """PartTimeout in this (the main) thread once `seconds` have passed: an in-process
    part cannot overrun the script's minutes. A CUDA call in progress ends first."""
    def expire(*_):
        raise PartTimeout(f"past its {seconds:.3g} s deadline")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def say(line: str = "") -> None:
    print(line, flush=True)


@dataclass
class Context:
    device: torch.device
    plan: Plan
    out: Path
    cache: Path  # the verified images, for the trainers ($UNET_SWEEP_CACHE)
    started: float  # time.monotonic() at the start
    started_fast: float  # ... and at the start of part 1
    designs: tuple[str, ...]
    together: bool
    failures: list[str] = field(default_factory=list)
    rates: dict[str, dict[int, float]] = field(default_factory=dict)  # design -> batch -> /s

    def left(self) -> float:
        return self.plan.total_s - (time.monotonic() - self.started)

    def env(self) -> dict[str, str]:
        view = cuda_view(self.device) if self.device.type == "cuda" else ""
        return {**os.environ, "UNET_SWEEP_CACHE": str(self.cache), "PYTHONUNBUFFERED": "1",
                "CUDA_VISIBLE_DEVICES": view}


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)


# --- part 1: the check's fast parts --------------------------------------------------------

def part_fast(ctx: Context, sources: Sources) -> None:
    say(f"\n[1/3] the fast parts on {ctx.device} (at most {ctx.plan.fast_parts_s:.0f} s)")
    for name, part in (("throughput", fast_throughput), ("resume", fast_resume),
                       ("device against cpu", fast_against_cpu)):
        budget = ctx.plan.fast_parts_s - (time.monotonic() - ctx.started_fast)
        run_part(ctx, name, budget, part, ctx, sources)


def fast_throughput(ctx: Context, sources: Sources) -> None:
    """The fast path's samples/s of each design at each batch size, into throughput.csv."""
    mode = Mode("fast default", choose_fast_path(ctx.device))
    rows = []
    for name in ctx.designs:
        for batch in ctx.plan.batches:
            try:
                step = real_training_step(DESIGNS[name].model, batch, mode, sources.train)
                warm_up(step, ctx.plan.warmup_steps)
                per_s = samples_per_second(step, batch, ctx.plan.seconds, ctx.device)
            except torch.OutOfMemoryError:
                say(f"  {name} batch {batch}: out of memory")
                continue
            finally:
                step = None
                if ctx.device.type == "cuda":
                    torch.cuda.empty_cache()
            ctx.rates.setdefault(name, {})[batch] = per_s
            rows.append({"design": name, "batch_size": batch, "samples_per_s": per_s})
            say(f"  {name} batch {batch} {mode.path}: {rate(per_s)} samples/s")
            with (ctx.out / "throughput.csv").open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)


def fast_resume(ctx: Context, sources: Sources) -> None:
    """2 epochs straight, twice (the repeat is the device's noise), against epoch 1 saved
    to a file and resumed from it: run_trial's own resume, as train.py does it."""
    design = DESIGNS[ctx.plan.resume_design]
    cfg = replace(RECIPE, **ctx.plan.resume_args, device=str(ctx.device))
    fast = cfg.fast_path()
    folder = ctx.out / "resume-check"
    folder.mkdir(exist_ok=True)

    def train(name: str, resume: dict | None = None, stop_after: int | None = None) -> dict:
        path = folder / f"{name}.pt"
        for metrics, state, _ in run_trial(design.model, cfg, sources, fast, resume):
            save_checkpoint(state, path)  # now: the state shares the live weights
            if metrics["epoch"] == stop_after:
                break
        return load_checkpoint(path)

    start = time.perf_counter()
    straight, repeat = train("straight"), train("repeat")
    resumed = train("resumed", resume=train("epoch1", stop_after=1))
    say(f"  resume ({ctx.plan.resume_design}, {cfg.epochs} x {cfg.epoch_samples:,} samples, "
        f"batch {cfg.batch_size}): {resume_verdict(straight, resumed, [repeat])} "
        f"({time.perf_counter() - start:.0f} s)")


def fast_against_cpu(ctx: Context, sources: Sources) -> None:
    """part 1's straight checkpoint scored on 10 x compare_pairs test pairs here and on
    the CPU (fp32 or the CPU's bf16 there): within bf16's noise."""
    state = load_checkpoint(ctx.out / "resume-check" / "straight.pt")
    pairs, mixture = ctx.plan.compare_pairs, state["model_config"]["mixture"]
    scores = {}
    for device, pair_source in ((ctx.device, sources), (torch.device("cpu"), None)):
        fast = choose_fast_path(device)
        model = model_from_checkpoint(state, device).to(memory_format=fast.memory_format())
        test = (pair_source or load_sources("cpu", cache_dir=ctx.cache)).test
        start = time.perf_counter()
        scores[device.type] = test_score(model, test, mixture, fast, pairs)[0]
        say(f"  {device}: test_mse {scores[device.type]:.4e} on {len(TEST_SEEDS)} x {pairs} "
            f"pairs ({'bf16' if fast.bf16 else 'fp32'}, {time.perf_counter() - start:.1f} s)")
    say(f"  {check_scores_agree(scores[ctx.device.type], scores['cpu'])}")


# --- part 2 and 3: the front, trained and scored by sweep/train.py ------------------------

def chosen_batch(rates: dict[int, float], fallback: int) -> int:
    """The smallest batch within FAST_PATH_SHARE of the best rate measured: as busy a
    device as the larger ones, with more steps per sample."""
    if not rates:
        return fallback
    best = max(rates.values())
    return min(b for b, r in rates.items() if r >= FAST_PATH_SHARE * best)


def lr_scale(design: Design, batch: int) -> float:
    if not design.model.batch_norm:
        return 1.0
    return min(MAX_LR_SCALE, math.sqrt(batch / RECIPE.batch_size))


def scaled_lr(design: Design, batch: int) -> float:
    return (design.lr or RECIPE.lr) * lr_scale(design, batch)


def train_flags(design: Design) -> list[str]:
    """train.py's flags for a design: --preset and one flag per override."""
    flags = ["--preset", design.preset]
    for key, value in design.overrides.items():
        flag = key.replace("_", "-")
        flags += [f"--{flag}" if value else f"--no-{flag}"] if isinstance(value, bool) \
            else [f"--{flag}", str(value)]
    return flags


@dataclass(frozen=True)
class Sizing:
    """A trainer's run, sized from the rate it measured beside the others."""

    probe_samples_per_s: float
    seconds: float  # the training window left after the probe
    epochs: int
    samples_per_epoch: int


def size_run(per_s: float, seconds: float, batch: int, epoch_s: float) -> Sizing:
    """Epochs of about epoch_s whose samples, at SAFETY x the measured rate, end within
    `seconds`: the schedule ends at the budget, not cut off by the deadline."""
    samples = per_s * max(seconds, 0.0) * SAFETY
    epochs = max(1, round(seconds / epoch_s))
    per_epoch = max(batch, int(samples / epochs) // batch * batch)
    return Sizing(per_s, seconds, epochs, per_epoch)


def wait_for_the_others(folder: Path, name: str, sharing: int, most_s: float = 30) -> None:
    """Every trainer measures its rate while all of them train: each says it is ready in
    `folder` and waits (at most most_s) for the rest. A trainer that measured alone, while
    the others were still starting, would size its run too long for the shared device."""
    folder.mkdir(exist_ok=True)
    (folder / name).touch()
    until = time.monotonic() + most_s
    while len(list(folder.iterdir())) < sharing and time.monotonic() < until:
        time.sleep(0.05)


def trainer(args: argparse.Namespace) -> int:
    """One design, in its own process: measure its rate now (beside the others), size the
    run to end by --train-until, then sweep/train.py's main does the rest."""
    plan = QUICK if args.quick else FULL
    design = DESIGNS[args.design]
    if plan.threads:
        torch.set_num_threads(plan.threads)
    device = pick_device(args.device)
    # Fixed shapes for the whole run: cuDNN may pick each convolution's fastest kernel once
    # (in the warm-up). It makes runs differ in the last bits; part 1's resume check is
    # the place for exactness, not here.
    torch.backends.cudnn.benchmark = device.type == "cuda"
    sources = load_sources(device)
    lr = scaled_lr(design, args.batch_size)
    muon_lr = RECIPE.muon_lr * lr_scale(design, args.batch_size)
    mode = Mode("fast default", choose_fast_path(device))
    step = real_training_step(design.model, args.batch_size, mode, sources.train,
                              replace(RECIPE, lr=lr, muon_lr=muon_lr))
    warm_up(step, plan.warmup_steps)
    wait_for_the_others(args.out.parent / READY_DIR, args.design, args.sharing)
    per_s = samples_per_second(step, args.batch_size, plan.probe_s, device)
    del step, sources
    if device.type == "cuda":
        torch.cuda.empty_cache()
    sizing = size_run(per_s, args.train_until - time.time(), args.batch_size, plan.epoch_s)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "plan.json", {"design": args.design, **asdict(design),
                                        "batch_size": args.batch_size, "lr": lr,
                                        "muon_lr": muon_lr,
                                        **asdict(sizing)})
    print(f"probe: {per_s:,.0f} samples/s at batch {args.batch_size}; {sizing.epochs} "
          f"epochs of {sizing.samples_per_epoch:,} samples in {sizing.seconds:.0f} s",
          flush=True)
    from sweep import train  # its main handles Ctrl-C, checkpoints, the history, the test

    return train.main([*train_flags(design), "--out", str(args.out),
                       "--device", device.type if device.type == "cuda" else str(device),
                       "--epochs", str(sizing.epochs),
                       "--samples-per-epoch", str(sizing.samples_per_epoch),
                       "--batch-size", str(args.batch_size), "--lr", repr(lr),
                       "--muon-lr", repr(muon_lr), "--optimizer", RECIPE.optimizer,
                       "--schedule", RECIPE.schedule,
                       "--val-pairs", str(plan.val_pairs), "--test-pairs", str(plan.test_pairs),
                       *(["--threads", str(plan.threads)] if plan.threads else [])])


@dataclass
class Trainer:
    name: str
    folder: Path
    batch: int
    deadline: float  # time.monotonic() past which it is killed
    proc: subprocess.Popen | None = None
    started: float = 0.0


def start_trainer(ctx: Context, t: Trainer, train_until: float, sharing: int,
                  quick: bool) -> None:
    t.folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--trainer", t.name,
           "--batch-size", str(t.batch), "--train-until", f"{train_until:.3f}",
           "--sharing", str(sharing),
           "--device", "cuda" if ctx.device.type == "cuda" else "cpu", "--out", str(t.folder),
           *(["--quick"] if quick else [])]
    log = (t.folder / "log.txt").open("w")
    # Its own session: at the deadline the whole process group goes.
    t.proc = subprocess.Popen(cmd, env=ctx.env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    t.started = time.monotonic()
    log.close()


def stop(t: Trainer) -> None:
    if t.proc and t.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(t.proc.pid, signal.SIGKILL)
        t.proc.wait()


def score_reserve(ctx: Context, name: str, batch: int, sharing: int) -> float:
    """Seconds the test protocol may take at the end: a forward pass costs about a third
    of a training sample; the rate is the one part 1 measured alone, shared."""
    per_s = max(ctx.rates.get(name, {}).values(), default=None)  # scoring's batches are large
    pairs = len(TEST_SEEDS) * ctx.plan.test_pairs
    estimate = pairs / (2 * per_s) * sharing if per_s else ctx.plan.score_s
    return max(ctx.plan.epoch_s, 1.5 * estimate) + 5  # + the final checkpoint and curve


def part_front(ctx: Context, quick: bool) -> None:
    names = ctx.designs
    batches = {n: chosen_batch(ctx.rates.get(n, {}), ctx.plan.batches[0]) for n in names}
    sharing = len(names) if ctx.together else 1
    reserve = max(score_reserve(ctx, n, batches[n], sharing) for n in names)
    grace = 10.0 if not quick else 20.0  # start-up of a process: imports, CUDA, the data
    groups = [list(names)] if ctx.together else [[n] for n in names]
    # Each group trains for its share, then scores; one at a time: equal shares.
    share = (ctx.left() - 5) / len(groups) - reserve - grace
    if share < 2 * ctx.plan.probe_s:
        raise CheckFailed(f"no time left to train ({ctx.left():.0f} s left, {reserve:.0f} s "
                          "to score)")
    say(f"\n[2/3] the front, then [3/3] each scored: {', '.join(names)}, "
        f"{'all at once' if ctx.together else 'one at a time'}, "
        f"{share:.0f} s of training {'' if ctx.together else 'each '}+ {reserve:.0f} s to "
        f"score (full protocol: {len(TEST_SEEDS)} x {ctx.plan.test_pairs:,} pairs)")
    for group in groups:
        begin = time.monotonic()
        train_until = time.time() + share
        trainers = [Trainer(n, ctx.out / n, batches[n], begin + share + reserve + grace)
                    for n in group]
        try:
            for t in trainers:
                start_trainer(ctx, t, train_until, len(group), quick)
            wait_for(ctx, trainers)
        finally:
            for t in trainers:
                stop(t)


def wait_for(ctx: Context, trainers: list[Trainer]) -> None:
    """Each trainer until it ends or its deadline, whichever first; its line as it ends."""
    running = list(trainers)
    while running:
        for t in list(running):
            code = t.proc.poll()
            late = code is None and time.monotonic() > t.deadline
            if code is None and not late:
                continue
            if late:
                stop(t)
                ctx.failures.append(f"{t.name}: killed at its deadline")
            elif code != 0:
                ctx.failures.append(f"{t.name}: exit {code}: "
                                    f"{last_line((t.folder / 'log.txt').read_text())}")
            running.remove(t)
            report_design(ctx, t, time.monotonic() - t.started)
        time.sleep(0.2)


def report_design(ctx: Context, t: Trainer, seconds: float) -> None:
    """One line, figures.json beside its checkpoint, and its row of front.csv: whatever it
    finished (a killed trainer leaves its last epoch's checkpoint)."""
    ckpt = t.folder / CHECKPOINT_FILE
    plan = json.loads((t.folder / "plan.json").read_text()) if \
        (t.folder / "plan.json").exists() else {}
    if not ckpt.exists():
        say(f"  {t.name}: no checkpoint ({seconds:.0f} s); see {t.folder / 'log.txt'}")
        return
    state = load_checkpoint(ckpt)
    m = state["metrics"]
    cfg = state["train_config"]
    figures = {
        "design": t.name, "params": m["params"], "status": m["status"],
        "epoch": state["epoch"], "epochs": cfg["epochs"], "batch_size": cfg["batch_size"],
        "lr": cfg["lr"], "samples": state["epoch"] * (cfg["samples_per_epoch"]
                                                      // cfg["batch_size"] * cfg["batch_size"]),
        "train_seconds": state["train_seconds"], "samples_per_s": m["samples_per_s"],
        "probe_samples_per_s": plan.get("probe_samples_per_s"),
        "val_mse": m["val_mse"], "test_mse_mean": m.get("test_mse_mean"),
        "test_mse_std": m.get("test_mse_std"), "test_pairs": m.get("test_pairs"),
        "wall_seconds": seconds, "device": str(ctx.device), "checkpoint": str(ckpt),
    }
    write_json(t.folder / "figures.json", figures)
    rows = [] if not (ctx.out / FRONT_CSV).exists() else \
        list(csv.DictReader((ctx.out / FRONT_CSV).open()))
    rows.append({k: "" if v is None else v for k, v in figures.items()})
    with (ctx.out / FRONT_CSV).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(figures))
        writer.writeheader()
        writer.writerows(rows)
    test = (f"test {m['test_mse_mean']:.3e} ± {m['test_mse_std']:.1e} "
            f"({len(TEST_SEEDS)} x {m['test_pairs']:,})" if "test_mse_mean" in m
            else "test: not scored")
    say(f"  {t.name}: {m['params']:,} params, batch {cfg['batch_size']}, lr {cfg['lr']:.2e} "
        f"(Muon {cfg['muon_lr']:.2e}), {figures['samples']:,} samples in "
        f"{state['train_seconds']:.0f} s "
        f"({rate(figures['samples'] / max(state['train_seconds'], 1e-9))} samples/s), "
        f"epoch {state['epoch']}/{cfg['epochs']} {m['status']}, val {m['val_mse']:.3e}, "
        f"{test} -> {ckpt}")


# --- the script ------------------------------------------------------------------------------

def run_part(ctx: Context, name: str, seconds: float, part, *args) -> None:
    """A part under its deadline; its failure is said and kept, and the script goes on."""
    if seconds <= 0:
        ctx.failures.append(f"{name}: no time left")
        say(f"  {name}: skipped, no time left")
        return
    start = time.perf_counter()
    try:
        with deadline(seconds):
            part(*args)
    except Exception as e:  # noqa: BLE001 - any part's failure is said, and the rest runs
        ctx.failures.append(f"{name}: {one_line(e)}")
        say(f"  {name}: FAILED: {one_line(e)}")
    say(f"  ({name}: {time.perf_counter() - start:.0f} s)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_and_data_flags(parser, dry_run="in about a minute")
    parser.add_argument("--out", type=Path, default=None,
                        help="where everything goes; absent or empty (default "
                             "runs/gpu-front-<date>-<time>)")
    parser.add_argument("--designs", default=None,
                        help=f"comma-separated, of {', '.join(DESIGNS)} (default: "
                             f"{','.join(FULL.designs)}; --quick: {','.join(QUICK.designs)})")
    parser.add_argument("--one-at-a-time", action="store_true",
                        help="train the designs one after another, each with an equal share "
                             "of the window (default: all at once on the device)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="the whole script's wall time (default 9; --quick 1.5)")
    # A trainer: one design in its own process (the script starts these).
    parser.add_argument("--trainer", choices=sorted(DESIGNS), dest="design",
                        help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--train-until", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--sharing", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.designs is not None:
        args.designs = tuple(d for d in args.designs.split(",") if d)
        if unknown := [d for d in args.designs if d not in DESIGNS] or not args.designs:
            parser.error(f"--designs: unknown {unknown!r}; choose from {', '.join(DESIGNS)}")
    if args.minutes is not None and not 0 < args.minutes <= 60:
        parser.error(f"--minutes must be in (0, 60], got {args.minutes:g}")
    return args


def idx_cache(args: argparse.Namespace) -> Path:
    """Where images read from IDX files are cached for the trainers: beside them."""
    return (args.mnist_dir or args.fashion_dir).resolve().parent / "cache"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.design:
        return trainer(args)
    try:
        device = device_to_check(args.device)
    except ConfigError as e:
        print(f"gpu_front: {e}", file=sys.stderr)
        return 2
    out = args.out or REPO / "runs" / f"gpu-front-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and any(out.iterdir()):
        print(f"gpu_front: {out} is not empty; name an absent or empty --out", file=sys.stderr)
        return 2
    plan = QUICK if args.quick else FULL
    if plan.threads:
        torch.set_num_threads(plan.threads)
    if args.minutes:
        plan = replace(plan, total_s=args.minutes * 60)
    idx_given = args.mnist_dir is not None or args.fashion_dir is not None
    ctx = Context(device=device, plan=plan, out=out,
                  # Beside the IDX files, not under --out: 100 MB no one needs back.
                  cache=idx_cache(args) if idx_given else default_cache_dir(),
                  started=time.monotonic(), started_fast=math.nan,
                  designs=args.designs or plan.designs,
                  together=not args.one_at_a_time)
    out.mkdir(parents=True, exist_ok=True)
    say(f"gpu_front {time.strftime('%Y-%m-%d %H:%M')} on {device}"
        f"{' (--quick)' if args.quick else ''}, {plan.total_s:.0f} s in all, into {out}")
    for line in describe_machine(device):
        say(line)
    try:
        sources = load_sources(device, args.mnist_dir, args.fashion_dir, cache_dir=ctx.cache)
    except DataError as e:  # the images given are not the ones: bad input
        print(f"gpu_front: {e}", file=sys.stderr)
        return 2
    say(f"data: verified, on {device} ({time.monotonic() - ctx.started:.0f} s)")
    for name in ctx.designs:
        say(f"  {name}: {params_of(DESIGNS[name].model):,} params, {DESIGNS[name].why}")
    try:
        ctx.started_fast = time.monotonic()
        part_fast(ctx, sources)
        del sources  # the trainers are other processes on this device
        if device.type == "cuda":
            torch.cuda.empty_cache()
        run_part(ctx, "front", ctx.left(), part_front, ctx, args.quick)
    except KeyboardInterrupt:
        print("\ngpu_front: interrupted", file=sys.stderr)
        return 130
    took = time.monotonic() - ctx.started
    say(f"\n{FRONT_CSV}, figures.json and checkpoints under {out}; {took:.0f} s in all"
        f"{', over the budget' if took > plan.total_s else ''}")
    if ctx.failures:
        say(f"gpu_front: FAILED: {'; '.join(ctx.failures)}")
        return 1
    say("gpu_front: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
