"""One short check that the trial, its fast path and its speed hold on a real CUDA GPU.

    python bench/gpu_check.py --write-idx runs/gpu-data   # where the data is: 40 MB to carry
    python3 bench/gpu_check.py --mnist-dir runs/gpu-data/mnist \
        --fashion-dir runs/gpu-data/fashion-mnist          # on the GPU machine
    python bench/gpu_check.py --device cpu --quick        # a dry run without a GPU (the tests)

It needs torch, numpy, pandas and matplotlib, never Ray or Optuna, and takes the images from
IDX files (`--mnist-dir` / `--fashion-dir`, the compressed originals or the ones
`--write-idx` rebuilds from this project's verified sources). On the device it measures,
in about 6-8 minutes on one GPU:

* the machine: the GPU, torch and CUDA versions, and the GPU's bf16 matmul TFLOP/s;
* training throughput of `reference` and `small`, in fp32 eager, the fast default (bf16
  autocast and channels_last where the device has native bf16) and the fast default under
  torch.compile, at batch sizes up to those that keep a GPU fed: samples/s, achieved
  TFLOP/s (torch's FLOP count of forward + backward) and that as a share of the matmul's;
* `sweep/train.py` there: a run of 2 epochs equals a run stopped by Ctrl-C after its first
  epoch and resumed (same weights), and its checkpoint loads back;
* `sweep/evaluate.py` there: the full test protocol (10 x 20,000 pairs) and its time, and a
  score equal to the CPU's for the same checkpoint and pairs, within bf16 noise;
* several trials sharing the device (what `--gpus-per-trial 0.25` means): 4 `train.py`
  processes at once, each with its own CUDA_VISIBLE_DEVICES, their aggregate samples/s
  against one alone. They run the straight run's config, so they are also repeats of it:
  where CUDA's kernels are not bitwise deterministic, their spread is the noise the
  resumed run is held to.

It prints every figure as it goes and ends with `gpu_check: ok` (exit 0) or
`gpu_check: FAILED: <what failed>` (exit 1): the failure that stopped it, after any failed
compile, which lets the rest run. Without CUDA, or given images that are not the right
ones, it says so in one line and exits 2. docs/gpu-check.md says what to copy to a GPU
machine and how to read what it prints.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# sweep/train.py writes metrics.csv with pandas and curve.png with matplotlib: a GPU machine
# with torch alone deserves one line saying so, not a traceback from one of its processes.
NEEDED = ("torch", "numpy", "pandas", "matplotlib")
if missing := [name for name in NEEDED if importlib.util.find_spec(name) is None]:
    print(f"gpu_check: {', '.join(missing)} not installed; sweep/train.py needs them "
          f"(pip install {' '.join(missing)}, or carry their wheels)", file=sys.stderr)
    sys.exit(2)

import torch  # noqa: E402

if __package__ in (None, ""):  # run as a script from a plain checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.train_throughput import (  # noqa: E402
    Mode,
    aligned,
    real_training_step,
    samples_per_second,
    sync,
    warm_up,
)
from data.mixture import load_sources  # noqa: E402
from data.sources import DataError, default_cache_dir, write_idx  # noqa: E402
from model.unet import PRESETS, ConfigError, params_of, train_flops_per_sample  # noqa: E402
from sweep.checkpoint import (  # noqa: E402
    CHECKPOINT_FILE,
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
)
from sweep.device import choose_fast_path, pick_device  # noqa: E402
from sweep.scoring import TEST_PAIRS, val_mse  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TRAIN_PY = REPO / "sweep" / "train.py"
EVALUATE_PY = REPO / "sweep" / "evaluate.py"
# bf16 autocast against fp32 (or another machine's bf16): the same checkpoint's test MSE
# may differ by this share of itself. bf16 keeps 8 bits of mantissa (0.4% per rounding).
BF16_TOLERANCE = 0.05
# A resumed run may differ from the straight one by at most this many times the largest
# difference between two straight runs (only where the repeats differ at all).
NOISE_FACTOR = 2.0
TIME_BUDGET_S = 8 * 60  # what the check is sized for on one GPU; said when exceeded
# sweep/evaluate.py's score line: "test_mse: M ± S (in fp32; std over 10 sets of N pairs; Ts)".
EVAL_LINE = re.compile(r"test_mse: (\S+) ± (\S+) \(in \w+; std over (\d+) sets of (\d+) pairs; "
                       r"(\d+)s\)")
EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+): .* (\d+) samples/s")


@dataclass(frozen=True)
class Plan:
    """How big each part is; --quick only changes this."""

    seconds: float  # per throughput measurement
    warmup_steps: int
    batches: dict[str, tuple[int, ...]]  # preset -> batch sizes to measure
    compile_batches: dict[str, tuple[int, ...]]  # where the torch.compile row is measured
    matmul_size: int
    trial_args: tuple[str, ...]  # sweep/train.py's flags for every trial run
    eval_pairs: int  # pairs per test set of the device's timed score
    eval_args: tuple[str, ...]  # sweep/evaluate.py's other flags
    compare_pairs: int  # pairs per test set of the device-against-CPU comparison
    sharers: int  # train.py processes at once on the device


FULL = Plan(
    seconds=2.0,
    warmup_steps=3,
    # The training batch first (32: the reference's, 64: the sweep's default), then larger
    # ones: a small model keeps an H200 busy only at thousands of samples a step.
    batches={"reference": (32, 256, 1024, 4096), "small": (64, 512, 4096, 16384)},
    # One compile per model: each new batch size is a new compile of forward and backward.
    compile_batches={"reference": (4096,), "small": (16384,)},
    matmul_size=8192,
    # A sweep's trial as --gpus-per-trial 0.25 would run it: `small` at batch 64, epochs of
    # 2,048 steps (long enough for the interrupt to land inside epoch 2).
    trial_args=("--preset", "small", "--epochs", "2", "--samples-per-epoch", "131072",
                "--batch-size", "64", "--val-pairs", "2000"),
    eval_pairs=TEST_PAIRS,
    eval_args=(),
    compare_pairs=2_000,  # the CPU scores 10 x 2,000 pairs in seconds, the full set in minutes
    sharers=4,  # --gpus-per-trial 0.25
)
QUICK = Plan(
    seconds=0.2,
    warmup_steps=0,  # the figures of a dry run mean nothing; that the code runs does
    batches={"reference": (1,), "small": (4,)},
    compile_batches={},  # a CPU compile takes minutes: not in a dry run
    matmul_size=256,
    trial_args=("--preset", "tiny", "--epochs", "2", "--samples-per-epoch", "2048",
                "--val-pairs", "100", "--threads", "1"),
    eval_pairs=100,
    # One thread, as the trials have: two on a 2-core machine that is busy spin and wait.
    eval_args=("--threads", "1"),
    compare_pairs=100,
    sharers=2,  # each process costs seconds of a small CPU: two show the sharing works
)


class CheckFailed(Exception):
    """A check that did not hold; the message says what was seen."""


@dataclass
class Context:
    """What every part needs: the device, where runs go, how child processes see both."""

    device: torch.device
    plan: Plan
    work: Path
    cache: Path  # the verified images, for the child processes ($UNET_SWEEP_CACHE)
    view: str  # CUDA_VISIBLE_DEVICES of the child processes ("" on the CPU)
    failures: list[str] = field(default_factory=list)  # checks that failed but let us go on

    def env(self, view: str | None = None) -> dict[str, str]:
        return {**os.environ, "UNET_SWEEP_CACHE": str(self.cache), "PYTHONUNBUFFERED": "1",
                "CUDA_VISIBLE_DEVICES": self.view if view is None else view}

    def train_cmd(self, out: Path) -> list[str]:
        return [sys.executable, str(TRAIN_PY), *self.plan.trial_args,
                # "cuda", not "cuda:N": CUDA_VISIBLE_DEVICES shows them the one GPU.
                "--device", self.device.type, "--out", str(out)]


def say(line: str = "") -> None:
    print(line, flush=True)


# --- the machine ----------------------------------------------------------------------------

def describe_machine(device: torch.device) -> list[str]:
    lines = [f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}, "
             f"python {sys.version.split()[0]}"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines += [
            f"gpu: {props.name}, {props.total_memory / 2**30:.0f} GiB, "
            f"{props.multi_processor_count} SMs, compute capability {props.major}.{props.minor}",
            # fp32 convolutions on CUDA run in TF32 unless this is off: "fp32 eager" means that.
            f"cuDNN {torch.backends.cudnn.version()}, TF32 convolutions "
            f"{'on' if torch.backends.cudnn.allow_tf32 else 'off'} (torch's default: on)",
        ]
    fast = choose_fast_path(device)
    lines.append(f"fast default on {device}: bf16={fast.bf16} channels_last={fast.channels_last}"
                 f" ({fast.reason})")
    return lines


def matmul_tflops(device: torch.device, size: int, seconds: float = 1.0) -> float:
    """bf16 matmul TFLOP/s: the mean over ~`seconds` of products after a warm-up, a
    practical peak for the training figures to be read against."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b)
    sync(device)
    n, start = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - start < seconds:
        for _ in range(5):  # enqueue several per look at the clock: the GPU runs ahead
            torch.mm(a, b)
        n += 5
        sync(device)
    return 2 * size**3 * n / (time.perf_counter() - start) / 1e12


# --- training throughput --------------------------------------------------------------------

@dataclass
class Row:
    preset: str
    batch_size: int
    mode: Mode
    samples_per_s: float = math.nan
    peak_gib: float = math.nan  # the device's peak memory during the measurement
    note: str = ""  # why there is no figure (out of memory, a compile error)


def measure(preset_name: str, batch_size: int, mode: Mode, ctx: Context,
            train_pair: tuple[torch.Tensor, torch.Tensor]) -> Row:
    """sweep/train.py's own training step, warmed up, then timed for plan.seconds."""
    row = Row(preset_name, batch_size, mode)
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)
    try:
        step = real_training_step(PRESETS[preset_name], batch_size, mode, train_pair)
        warm_up(step, ctx.plan.warmup_steps)
        row.samples_per_s = samples_per_second(step, batch_size, ctx.plan.seconds, ctx.device)
    except torch.cuda.OutOfMemoryError:
        row.note = "out of memory"
    except Exception as e:
        if not mode.compile:
            raise CheckFailed(f"{preset_name} batch {batch_size} {mode.name}: {one_line(e)}"
                              ) from e
        row.note = f"failed: {one_line(e)}"  # a compile error is said, and the check goes on
        ctx.failures.append(f"torch.compile of {preset_name} at batch {batch_size}: {row.note}")
    if ctx.device.type == "cuda":
        row.peak_gib = torch.cuda.max_memory_allocated(ctx.device) / 2**30
    return row


def throughput(ctx: Context, train_pair: tuple[torch.Tensor, torch.Tensor]) -> list[Row]:
    fp32 = Mode("fp32 eager", choose_fast_path(ctx.device, "fp32", "off"))
    fast = Mode("fast default", choose_fast_path(ctx.device))
    compiled = Mode("fast + compile", fast.fast, compile=True)
    rows = []
    for name, batches in ctx.plan.batches.items():
        for batch in batches:
            modes = [fp32, fast] + ([compiled] if batch in ctx.plan.compile_batches.get(name, ())
                                    else [])
            for mode in modes:
                row = measure(name, batch, mode, ctx, train_pair)
                say(f"  {name} batch {batch} {mode.name}: "
                    + (f"{rate(row.samples_per_s)} samples/s" if not row.note else row.note))
                rows.append(row)
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()  # the trials that follow are other processes on this GPU
    return rows


def throughput_table(rows: list[Row], flops: dict[str, int], matmul: float) -> str:
    fp32 = {(r.preset, r.batch_size): r.samples_per_s for r in rows if r.mode.name == "fp32 eager"}
    header = ("model", "batch", "mode", "path", "samples/s", "TFLOP/s", "of matmul", "vs fp32",
              "peak GiB")
    lines = [header]
    for r in rows:
        if r.note:
            lines.append((r.preset, str(r.batch_size), r.mode.name, r.mode.path, r.note,
                          "", "", "", ""))
            continue
        tflops = r.samples_per_s * flops[r.preset] / 1e12
        lines.append((r.preset, str(r.batch_size), r.mode.name, r.mode.path,
                      rate(r.samples_per_s), f"{tflops:.2f}", f"{tflops / matmul:.1%}",
                      f"{r.samples_per_s / fp32[(r.preset, r.batch_size)]:.2f}x",
                      "-" if math.isnan(r.peak_gib) else f"{r.peak_gib:.1f}"))
    return aligned(lines, numeric={1, 4, 5, 6, 7, 8})


# --- sweep/train.py: a straight run, an interrupted and resumed one -------------------------

def run_child(cmd: list[str], env: dict[str, str], what: str,
              timeout: float = 600) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO,
                                timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"{what}: no end within {timeout:.0f} s") from None
    if result.returncode != 0:
        raise CheckFailed(f"{what}: exit {result.returncode}: {last_line(result.stderr)}")
    return result


def epoch_rates(stdout: str) -> dict[int, float]:
    """samples/s per epoch, from train.py's `epoch N/M: ... X samples/s` lines."""
    return {int(m[1]): float(m[3]) for m in EPOCH_LINE.finditer(stdout)}


def train_straight(ctx: Context) -> tuple[Path, dict[int, float]]:
    out = ctx.work / "straight"
    start = time.perf_counter()
    result = run_child(ctx.train_cmd(out), ctx.env(), "train.py, 2 epochs")
    rates = epoch_rates(result.stdout)
    say(f"  2 epochs straight: {fmt_rates(rates)}, {time.perf_counter() - start:.0f} s "
        "with start-up")
    return out, rates


def train_interrupted_and_resumed(ctx: Context) -> Path:
    """Ctrl-C (SIGINT) once epoch 1's checkpoint is on disk, then the same command again."""
    out = ctx.work / "resumed"
    ckpt = out / CHECKPOINT_FILE
    proc = subprocess.Popen(ctx.train_cmd(out), env=ctx.env(), cwd=REPO, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and not ckpt.exists():
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # inside epoch 2: its checkpoint is never written
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode == 0:
        raise CheckFailed("train.py finished epoch 2 before the Ctrl-C landed: the Plan's "
                          "epochs are too short for this machine")
    if proc.returncode != 130:
        raise CheckFailed(f"train.py interrupted after epoch 1: exit {proc.returncode}, "
                          f"expected 130 (Ctrl-C): {last_line(err)}")
    epoch = load_checkpoint(ckpt)["epoch"]
    if epoch != 1:
        raise CheckFailed(f"the interrupted run's checkpoint is at epoch {epoch}, expected 1")
    result = run_child(ctx.train_cmd(out), ctx.env(), "train.py resuming after epoch 1")
    if f"resuming from {ckpt} (epoch 1)" not in result.stdout:
        raise CheckFailed("train.py did not say it resumed from epoch 1")
    say(f"  1 epoch, Ctrl-C, resumed: {fmt_rates(epoch_rates(result.stdout))} (resumed part)")
    return out


def weight_difference(a: dict, b: dict) -> float:
    """Largest absolute difference between two checkpoints' weights and buffers."""
    if a["model"].keys() != b["model"].keys():
        return math.inf
    return max((x.double() - b["model"][k].double()).abs().max().item()
               for k, x in a["model"].items())


def resume_verdict(straight: dict, resumed: dict, repeats: list[dict]) -> str:
    """How the resumed run compares with the straight one; CheckFailed where it differs
    by more than two straight runs of the same config differ from each other."""
    for name, state in (("straight", straight), ("resumed", resumed)):
        if state["epoch"] != 2 or state["metrics"].get("status") != "finished":
            raise CheckFailed(f"the {name} run ended at epoch {state['epoch']}, "
                              f"status {state['metrics'].get('status')!r}")
    resume_diff = weight_difference(straight, resumed)
    repeat_diff = max((weight_difference(straight, r) for r in repeats), default=0.0)
    if resume_diff == 0:
        return "same weights bit for bit"
    if repeat_diff == 0:
        raise CheckFailed(f"resumed weights differ from the straight run's by up to "
                          f"{resume_diff:.2e}, while {len(repeats)} repeats match it bit for bit")
    if resume_diff > NOISE_FACTOR * repeat_diff:
        raise CheckFailed(f"resumed weights differ by up to {resume_diff:.2e}, more than "
                          f"{NOISE_FACTOR:g}x the {repeat_diff:.2e} between straight runs")
    return (f"weights within run-to-run noise: up to {resume_diff:.2e} from the straight run, "
            f"repeats of it up to {repeat_diff:.2e} (the device's kernels are not bitwise "
            "deterministic)")


def check_loads_back(ctx: Context, run: Path, sources) -> str:
    """The checkpoint on this device: its kind, its weights, its stored val_mse again."""
    state = load_checkpoint(run)
    kind = state["fast_path"]["device"]
    if kind != ctx.device.type:
        raise CheckFailed(f"{run}: trained on {kind}, expected {ctx.device.type}")
    model = model_from_checkpoint(state, ctx.device)
    fast = choose_fast_path(ctx.device, state["train_config"]["precision"],
                            state["train_config"]["channels_last"])
    model = model.to(memory_format=fast.memory_format())
    score = val_mse(model, sources.val, state["model_config"]["mixture"], fast,
                    state["train_config"]["val_pairs"])
    stored = state["metrics"]["val_mse"]
    if not math.isclose(score, stored, rel_tol=1e-3):
        raise CheckFailed(f"{run}: val_mse {score:.6e} after loading, {stored:.6e} stored")
    return f"loads back on {ctx.device.type}: val_mse {score:.4e} (stored {stored:.4e})"


# --- sweep/evaluate.py on the device and on the CPU -----------------------------------------

def evaluate(ctx: Context, run: Path, pairs: int, on_cpu: bool) -> tuple[float, float, float]:
    """evaluate.py's (mean, std, wall seconds); the CPU by hiding CUDA from the process."""
    where = "cpu" if on_cpu else ctx.device.type
    png = ctx.work / f"separation-{where}-{pairs}.png"
    start = time.perf_counter()
    result = run_child([sys.executable, str(EVALUATE_PY), str(run), "--pairs", str(pairs),
                        "--png", str(png), *ctx.plan.eval_args], ctx.env("" if on_cpu else None),
                       f"evaluate.py on {where}, {pairs} pairs")
    seconds = time.perf_counter() - start
    match = EVAL_LINE.search(result.stdout)
    if not match or int(match[4]) != pairs:
        raise CheckFailed(f"evaluate.py on {where}: no test_mse line for {pairs} pairs")
    say(f"  {where}: {match[0]} ({seconds:.0f} s with start-up)")
    return float(match[1]), float(match[2]), seconds


def check_scores_agree(device_mse: float, cpu_mse: float) -> str:
    gap = abs(device_mse - cpu_mse) / cpu_mse
    if gap > BF16_TOLERANCE:
        raise CheckFailed(f"test MSE {device_mse:.4e} on the device, {cpu_mse:.4e} on the CPU: "
                          f"{gap:.1%} apart, more than bf16's {BF16_TOLERANCE:.0%}")
    return f"device and CPU scores {gap:.2%} apart (allowed: {BF16_TOLERANCE:.0%})"


# --- trials sharing the device --------------------------------------------------------------

def share_device(ctx: Context) -> tuple[list[Path], list[dict[int, float]], float]:
    """plan.sharers train.py processes at once on the device; returns their runs, their
    samples/s per epoch and the wall seconds from the first start to the last end."""
    outs = [ctx.work / f"shared-{i}" for i in range(ctx.plan.sharers)]
    start = time.perf_counter()
    procs = [subprocess.Popen(ctx.train_cmd(out), env=ctx.env(), cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for out in outs]
    try:
        done = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    wall = time.perf_counter() - start
    for i, (p, (_, err)) in enumerate(zip(procs, done, strict=True)):
        if p.returncode != 0:
            raise CheckFailed(f"shared trial {i}: exit {p.returncode}: {last_line(err)}")
    return outs, [epoch_rates(out) for out, _ in done], wall


# --- command line ---------------------------------------------------------------------------

def one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def rate(samples_per_s: float) -> str:
    return f"{samples_per_s:,.0f}" if samples_per_s >= 100 else f"{samples_per_s:.2g}"


def fmt_rates(rates: dict[int, float]) -> str:
    return ", ".join(f"epoch {e} {rate(r)} samples/s" for e, r in sorted(rates.items()))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_and_data_flags(parser, dry_run="in seconds")
    parser.add_argument("--work", type=Path, default=None,
                        help="where the runs go; absent or empty (default "
                             "runs/gpu-check-<date>-<time>)")
    parser.add_argument("--write-idx", type=Path, metavar="DIR",
                        help="no check: write both datasets as gzipped IDX files under DIR "
                             "(DIR/mnist, DIR/fashion-mnist), to copy to a GPU machine")
    return parser.parse_args(argv)


def add_device_and_data_flags(parser: argparse.ArgumentParser, dry_run: str) -> None:
    """The flags gpu_check and gpu_front share: the device, the dry run, the IDX files."""
    parser.add_argument("--device", default="cuda",
                        help="cuda, cuda:N, or cpu for a dry run (default cuda)")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny sizes everywhere: a dry run of every part {dry_run}")
    parser.add_argument("--mnist-dir", type=Path, help="directory of MNIST IDX files")
    parser.add_argument("--fashion-dir", type=Path, help="directory of Fashion-MNIST IDX files")


def device_to_check(requested: str) -> torch.device:
    """The device --device names; a ConfigError in one line where it is not here (no
    CUDA: it says how to dry-run on the CPU instead)."""
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"no CUDA device: torch {torch.__version__} sees none here (run it "
                          "on a GPU machine, or --device cpu --quick for a dry run)")
    return pick_device(requested)


def cuda_view(device: torch.device) -> str:
    """The CUDA_VISIBLE_DEVICES a child process gets to see this device as its only GPU,
    as Ray gives each trial its own."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v for v in visible.split(",") if v] if visible else \
        [str(i) for i in range(torch.cuda.device_count())]
    return ids[device.index or 0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.write_idx:
        try:
            paths = write_idx(args.write_idx)
        except (DataError, OSError) as e:
            print(f"gpu_check: {e}", file=sys.stderr)
            return 2
        size = sum(p.stat().st_size for p in paths) / 2**20
        print(f"wrote {len(paths)} IDX files ({size:.0f} MB) under {args.write_idx}")
        return 0
    try:
        device = device_to_check(args.device)
    except ConfigError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    work = args.work or REPO / "runs" / f"gpu-check-{time.strftime('%Y%m%d-%H%M%S')}"
    if work.exists() and any(work.iterdir()):
        print(f"gpu_check: {work} is not empty; name an absent or empty --work",
              file=sys.stderr)
        return 2
    idx_given = args.mnist_dir is not None or args.fashion_dir is not None
    ctx = Context(device=device, plan=QUICK if args.quick else FULL, work=work,
                  # Images read from IDX files are cached in the work directory, where the
                  # child processes find them; otherwise the usual cache.
                  cache=work / "cache" if idx_given else default_cache_dir(),
                  view=cuda_view(device) if device.type == "cuda" else "")
    try:
        run_checks(ctx, args)
    except CheckFailed as e:
        ctx.failures.append(str(e))
    except DataError as e:  # the images given are not the ones: bad input, not a failure
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, OSError) as e:
        ctx.failures.append(one_line(e))
    except KeyboardInterrupt:
        print("\ngpu_check: interrupted", file=sys.stderr)
        return 130
    if ctx.failures:  # in the order they came; the last may have stopped the check
        say(f"gpu_check: FAILED: {'; '.join(ctx.failures)}")
        return 1
    say("gpu_check: ok")
    return 0


def run_checks(ctx: Context, args: argparse.Namespace) -> None:
    started = time.perf_counter()
    ctx.work.mkdir(parents=True, exist_ok=True)
    say(f"gpu_check {time.strftime('%Y-%m-%d %H:%M')} on {ctx.device}"
        f"{' (--quick)' if args.quick else ''}, runs in {ctx.work}")
    for line in describe_machine(ctx.device):
        say(line)
    matmul = matmul_tflops(ctx.device, ctx.plan.matmul_size)
    say(f"bf16 matmul {ctx.plan.matmul_size}^3: {matmul:.1f} TFLOP/s")
    t = time.perf_counter()
    sources = load_sources(ctx.device, args.mnist_dir, args.fashion_dir, cache_dir=ctx.cache)
    say(f"data: {'IDX files' if args.mnist_dir or args.fashion_dir else 'the usual sources'}, "
        f"verified, on {ctx.device} in {time.perf_counter() - t:.1f} s")

    seconds: dict[str, float] = {}

    def timed(name: str, part, *part_args):
        t = time.perf_counter()
        result = part(*part_args)
        seconds[name] = time.perf_counter() - t
        return result

    timed("throughput", part_throughput, ctx, sources, matmul)
    straight, resumed, alone = timed("train.py", part_train, ctx, sources)
    timed("sharing", part_share, ctx, straight, resumed, alone)
    timed("evaluate.py", part_evaluate, ctx, straight)

    total = time.perf_counter() - started
    over = f", over the {TIME_BUDGET_S // 60}-minute budget" if total > TIME_BUDGET_S else ""
    say(f"\ntotal {total:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}"
        f"{over})")


def part_throughput(ctx: Context, sources, matmul: float) -> None:
    say("\n[1/4] training throughput (sweep/train.py's step on real pairs)")
    # Counted once per model (on the meta device: about 0.1 s).
    flops = {name: train_flops_per_sample(PRESETS[name]) for name in ctx.plan.batches}
    for name, count in flops.items():
        say(f"  {name}: {params_of(PRESETS[name]):,} params, "
            f"{count / 1e9:.3f} GFLOP per training sample")
    say(throughput_table(throughput(ctx, sources.train), flops, matmul))


def part_train(ctx: Context, sources) -> tuple[Path, Path, dict[int, float]]:
    say(f"\n[2/4] sweep/train.py on {ctx.device.type}: {' '.join(ctx.plan.trial_args)}")
    straight, alone = train_straight(ctx)
    resumed = train_interrupted_and_resumed(ctx)
    say(f"  checkpoint {check_loads_back(ctx, straight, sources)}")
    return straight, resumed, alone


def part_share(ctx: Context, straight: Path, resumed: Path, alone: dict[int, float]) -> None:
    say(f"\n[3/4] {ctx.plan.sharers} train.py processes at once on {ctx.device} "
        f"(CUDA_VISIBLE_DEVICES={ctx.view!r} each)")
    shared, rates, wall = share_device(ctx)
    for i, r in enumerate(rates):
        say(f"  trial {i}: {fmt_rates(r)}")
    last = max(alone)  # epoch 1 pays for the warm-up; the last epoch is the steady rate
    total = sum(r[last] for r in rates)
    say(f"  aggregate epoch {last}: {rate(total)} samples/s against {rate(alone[last])} alone: "
        f"{total / alone[last]:.2f}x ({wall:.0f} s for all {ctx.plan.sharers}, with start-up)")
    # The shared trials ran the straight run's config: they are repeats of it too.
    repeats = [load_checkpoint(out) for out in shared]
    say(f"  resume: {resume_verdict(load_checkpoint(straight), load_checkpoint(resumed), repeats)}")


def part_evaluate(ctx: Context, run: Path) -> None:
    plan = ctx.plan
    say(f"\n[4/4] sweep/evaluate.py on {run}")
    device_mse, _, seconds = evaluate(ctx, run, plan.eval_pairs, on_cpu=False)
    say(f"  test protocol ({plan.eval_pairs} pairs x 10) on {ctx.device.type}: {seconds:.0f} s")
    if plan.compare_pairs != plan.eval_pairs:
        device_mse, _, _ = evaluate(ctx, run, plan.compare_pairs, on_cpu=False)
    cpu_mse, _, _ = evaluate(ctx, run, plan.compare_pairs, on_cpu=True)
    say(f"  {check_scores_agree(device_mse, cpu_mse)} "
        f"(CPU path: {describe_machine(torch.device('cpu'))[-1]})")


if __name__ == "__main__":
    sys.exit(main())
