"""Training throughput of the U-Net on this machine, fp32 eager against the fast default.

    python bench/train_throughput.py              # about 3 minutes (more on a busy machine)
    python bench/train_throughput.py --quick      # about 30-40 s, a smoke run
    python bench/train_throughput.py --compile    # adds a torch.compile row (slow warm-up)
    python bench/train_throughput.py --candidates # adds the lever candidates of levers_ab.py

What it measures, in one run:

* the machine: CPU model, whether it has native bf16 (avx512_bf16 / amx_bf16), torch's
  version and threads, and the fast path `choose_fast_path` picks here, with its reason;
* the machine's fp32 matmul GFLOP/s (2048x2048, the fastest of those run in ~2 s, at
  the start and again at the end): a ceiling that says what "fast" can mean on this CPU;
* for the `reference` preset (batch 32, its training setting) and the `small` preset
  (batch 64): training samples/s of the REAL training step (build_trial + make_step_fn,
  batches drawn by random_indices + make_batch from the real images), after a warm-up,
  in plain fp32 eager (no autocast, NCHW) and in the fast default. The modes are
  interleaved (fp32, fast, fp32, fast, ...) over a few rounds and the median is taken,
  because the machine is shared and noisy: only figures measured side by side compare.

How to read the table:

* samples/s is the median over rounds; the per-round figures show how noisy it was.
* GFLOP/s = samples/s * train_flops_per_sample / 1e9 (torch's FLOP count of forward +
  backward); "of matmul" is that over the matmul GFLOP/s, i.e. how much of the CPU's
  practical peak the training step uses. The matmul figure is a best case and the
  training figures are medians, so on a busy machine "of matmul" reads low; above 100%
  means both matmul measurements fell into busy moments.
* "vs fp32" is the median over rounds of (this mode / fp32 eager in the same round).
* The last line, `speedup_vs_fp32: X`, is that ratio for the fast default on `reference`.
* With --candidates, a second table: the fast default for each design that
  bench/levers_ab.py compares (one lever each, about 300k parameters), interleaved the
  same way, with "vs small" the median ratio to `small` in the same rounds.

Where the CPU lacks native bf16 the fast default is channels_last fp32: bf16 autocast there
is emulated and measured 17x slower than fp32, so it is never chosen. The project's >= 2x
target for the fast path therefore applies only to CPUs with native bf16; on an AVX2-only
CPU channels_last alone measured 1.14x (sweep/device.py), so expect about 1.1x there.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script from a plain checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.mixture import load_sources
from data.sources import DataError
from model.unet import PRESETS, UNetConfig, params_of, train_flops_per_sample
from sweep.device import FastPath, choose_fast_path, cpu_flags, pick_device
from sweep.recipe import make_step_fn
from sweep.train import TrainConfig, build_trial

# (preset, batch size): the reference at its training batch, small at the sweep's default.
MODELS = (("reference", 32), ("small", 64))
# Per-measurement time of `small` relative to `reference`: small runs ~10x more samples/s,
# so a shorter window still holds many steps.
SMALL_TIME_FRACTION = 0.4
MATMUL_SIZE = 2048
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


@dataclass(frozen=True)
class Budget:
    """How long each part runs; --seconds and --quick only change this."""

    seconds: float  # per measurement of the reference model
    rounds: int  # interleaved rounds; the median is over these
    warmup_steps: int
    matmul_seconds: float

    def seconds_for(self, preset_name: str) -> float:
        return self.seconds if preset_name == "reference" else self.seconds * SMALL_TIME_FRACTION


@dataclass(frozen=True)
class Mode:
    name: str
    fast: FastPath
    compile: bool = False

    @property
    def path(self) -> str:
        layout = "channels_last" if self.fast.channels_last else "NCHW"
        return f"{'bf16' if self.fast.bf16 else 'fp32'} {layout}"


@dataclass
class Row:
    preset: str  # a preset's or a candidate's name
    batch_size: int
    mode: Mode
    samples_per_s: list[float]  # one per round
    error: str = ""  # set when the mode could not run (e.g. torch.compile without a compiler)


# --- the machine ----------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def describe_machine(fast: FastPath) -> list[str]:
    native = sorted(cpu_flags() & NATIVE_BF16_FLAGS)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"cpu: {cpu_model()} ({os.cpu_count()} logical cores, "
        f"torch capability {torch.backends.cpu.get_cpu_capability()})",
        f"native bf16: {'yes (' + ', '.join(native) + ')' if native else 'no'}",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads "
        f"({torch.get_num_interop_threads()} inter-op)",
        f"fast default: bf16={fast.bf16} channels_last={fast.channels_last} "
        f"on {fast.device} (reason: {fast.reason})",
        f"load average at start: {load} (others share this machine: expect noise)",
    ]


def sync(device: torch.device) -> None:
    # CUDA runs asynchronously; a timer must wait for the queued work.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, seconds: float) -> float:
    """fp32 matmul GFLOP/s of the fastest of the matmuls run in ~`seconds`: others' load
    only ever slows a matmul down, so the fastest is closest to what the CPU can do."""
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device)
    torch.mm(a, b)  # the first call pays for the thread pool and kernel selection
    sync(device)
    best, n, start = math.inf, 0, time.perf_counter()
    while n < 3 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t)
        n += 1
    return 2 * MATMUL_SIZE**3 / best / 1e9


# --- the training step ----------------------------------------------------------------------

def real_training_step(model_cfg: UNetConfig, batch_size: int, mode: Mode,
                       train_pair: tuple[torch.Tensor, torch.Tensor],
                       base: TrainConfig | None = None) -> Callable[[], torch.Tensor]:
    """sweep/train.py's own training step (draw pairs, batch, step, schedule, EMA)."""
    cfg = replace(base or TrainConfig(), batch_size=batch_size, compile=mode.compile)
    trial = build_trial(model_cfg, cfg, mode.fast)
    trial.model.train()
    return make_step_fn(trial, train_pair, model_cfg, cfg, mode.fast)


def warm_up(step: Callable[[], torch.Tensor], steps: int) -> None:
    # The first steps create oneDNN primitives, grow the allocator and (with compile)
    # compile forward and backward; none of that is throughput.
    for _ in range(steps):
        step()


def samples_per_second(step: Callable[[], torch.Tensor], batch_size: int, seconds: float,
                       device: torch.device) -> float:
    steps, start = 0, time.perf_counter()
    while steps < 2 or time.perf_counter() - start < seconds:
        loss = step()
        steps += 1
    sync(device)
    elapsed = time.perf_counter() - start
    final_loss = loss.item()
    if not math.isfinite(final_loss):
        # NaN/inf arithmetic can run at another speed than real training does.
        print(f"  warning: the loss diverged ({final_loss}); this figure may be off")
    return steps * batch_size / elapsed


def measure_model(preset_name: str, batch_size: int, modes: list[Mode], budget: Budget,
                  train_pair: tuple[torch.Tensor, torch.Tensor]) -> list[Row]:
    """Warm every mode up, then measure them interleaved, round after round, so slow
    phases of the shared machine hit all modes alike."""
    runs = [(preset_name, PRESETS[preset_name], TrainConfig(), mode) for mode in modes]
    return measure_interleaved(runs, batch_size, budget, budget.seconds_for(preset_name),
                               train_pair)


def measure_interleaved(runs: list[tuple[str, UNetConfig, TrainConfig, Mode]], batch_size: int,
                        budget: Budget, seconds: float,
                        train_pair: tuple[torch.Tensor, torch.Tensor]) -> list[Row]:
    """Each (name, model, train settings, mode) warmed up, then all measured round after
    round."""
    rows, steps = [], []
    for name, model_cfg, base, mode in runs:
        row = Row(name, batch_size, mode, [])
        try:
            step = real_training_step(model_cfg, batch_size, mode, train_pair, base)
            warm_up(step, budget.warmup_steps)
        except Exception as e:  # only the optional compile row may fail (no C++ compiler...)
            if not mode.compile:
                raise
            row.error = str(e).strip().splitlines()[0][:100] if str(e).strip() else repr(e)
            step = None
        rows.append(row)
        steps.append(step)
    for round_no in range(1, budget.rounds + 1):
        for row, step in zip(rows, steps, strict=True):
            if step is None:
                continue
            rate = samples_per_second(step, batch_size, seconds, row.mode.fast.device)
            row.samples_per_s.append(rate)
            print(f"  {row.preset} round {round_no}/{budget.rounds}: "
                  f"{row.mode.name:<14} {rate:8.1f} samples/s", flush=True)
    return rows


# --- the report -----------------------------------------------------------------------------

def ratio_vs(row: Row, baseline: Row) -> float:
    """Median of per-round ratios: each ratio compares two measurements taken side by side."""
    if not row.samples_per_s or not baseline.samples_per_s:
        return math.nan
    ratios = [a / b for a, b in zip(row.samples_per_s, baseline.samples_per_s, strict=True)]
    return statistics.median(ratios)


def table(rows: list[Row], flops: dict[str, int], matmul: float) -> str:
    header = ("model", "batch", "mode", "path", "samples/s", "per round", "GFLOP/s",
              "of matmul", "vs fp32")
    lines = [header]
    baseline = {r.preset: r for r in rows if r.mode.name == "fp32 eager"}
    for r in rows:
        if r.error:
            lines.append((r.preset, str(r.batch_size), r.mode.name, r.mode.path,
                          "failed", r.error, "", "", ""))
            continue
        rate = statistics.median(r.samples_per_s)
        gflops = rate * flops[r.preset] / 1e9
        lines.append((r.preset, str(r.batch_size), r.mode.name, r.mode.path, f"{rate:.1f}",
                      " ".join(f"{x:.1f}" for x in r.samples_per_s), f"{gflops:.1f}",
                      f"{gflops / matmul:.1%}", f"{ratio_vs(r, baseline[r.preset]):.2f}x"))
    return aligned(lines, numeric={1, 4, 6, 7, 8})


def aligned(lines: list[tuple[str, ...]], numeric: set[int]) -> str:
    """A plain-text table, a column's cells padded to its widest; the `numeric` columns
    right-aligned."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                  for i, (c, w) in enumerate(zip(line, widths, strict=True))).rstrip()
        for line in lines)


# --- command line ---------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0,
                        help="seconds per measurement of the reference model; everything "
                             "else scales with it (default 15: about 3 minutes in all, more "
                             "on a busy machine)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds; figures are medians over them (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="a ~30-40 s smoke run: 2 s windows, 1 round, 1 warm-up step "
                             "(overrides --seconds and --rounds)")
    parser.add_argument("--compile", action="store_true",
                        help="add a row: torch.compile on top of the fast default")
    parser.add_argument("--candidates", action="store_true",
                        help="add a table: the fast default of every design that "
                             "bench/levers_ab.py compares")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.rounds < 1:
        parser.error("--seconds must be > 0 and --rounds >= 1")
    return args


def budget_from_args(args: argparse.Namespace) -> Budget:
    if args.quick:
        # One round, one warm-up step: the first reference step alone takes several seconds.
        return Budget(seconds=2.0, rounds=1, warmup_steps=1, matmul_seconds=0.5)
    # ~2 s of matmul at the default 15 s, and never so short that a window is one matmul.
    return Budget(seconds=args.seconds, rounds=args.rounds, warmup_steps=3,
                  matmul_seconds=max(0.5, args.seconds * 2 / 15))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = budget_from_args(args)
    started = time.perf_counter()
    device = pick_device("auto")
    fast = choose_fast_path(device)
    modes = [Mode("fp32 eager", choose_fast_path(device, precision="fp32", channels_last="off")),
             Mode("fast default", fast)]
    if args.compile:
        modes.append(Mode("fast + compile", fast, compile=True))

    print("\n".join(describe_machine(fast)))
    matmul_start = matmul_gflops(device, budget.matmul_seconds)
    print(f"fp32 matmul {MATMUL_SIZE}x{MATMUL_SIZE}: {matmul_start:.1f} GFLOP/s "
          f"(fastest in ~{budget.matmul_seconds:g} s; measured again at the end)")
    try:
        sources = load_sources(device)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    flops = {name: train_flops_per_sample(PRESETS[name]) for name, _ in MODELS}
    for name, batch_size in MODELS:
        print(f"{name}: {params_of(PRESETS[name]):,} params, "
              f"{flops[name] / 1e6:.1f} MFLOP per training sample, batch {batch_size}")
    print(f"measuring: {budget.rounds} rounds x {len(modes)} modes, {budget.seconds:g} s "
          f"(reference) / {budget.seconds_for('small'):g} s (small) each, "
          f"{budget.warmup_steps} warm-up steps", flush=True)

    rows: list[Row] = []
    for name, batch_size in MODELS:
        rows += measure_model(name, batch_size, modes, budget, sources.train)

    # Measured again after the training: a busy moment at the start alone would make
    # "of matmul" read above 100%.
    matmul_end = matmul_gflops(device, budget.matmul_seconds)
    matmul = max(matmul_start, matmul_end)
    print(f"fp32 matmul at the end: {matmul_end:.1f} GFLOP/s; using the better, {matmul:.1f}")
    print()
    print(table(rows, flops, matmul))
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nload average at end: {load}; total {time.perf_counter() - started:.0f} s")
    reference = {r.mode.name: r for r in rows if r.preset == "reference"}
    speedup = ratio_vs(reference["fast default"], reference["fp32 eager"])
    if args.candidates:
        print()
        print(candidates_table(measure_candidates(fast, budget, sources.train)))
    print(f"speedup_vs_fp32: {speedup:.2f}")
    return 0


def levers_ab():
    """The candidate designs, beside this script; imported only when asked for (it needs
    pandas, which a bare GPU machine may lack)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import levers_ab

    return levers_ab


def measure_candidates(fast: FastPath, budget: Budget,
                       train_pair: tuple[torch.Tensor, torch.Tensor]) -> list[Row]:
    """The fast default of each levers_ab.py design at its batch size, interleaved."""
    ab = levers_ab()
    runs = [(name, *ab.configs(name), Mode("fast default", fast)) for name in ab.VARIANTS]
    print(f"candidates: {len(runs)} designs, {budget.rounds} rounds", flush=True)
    return measure_interleaved(runs, ab.RECIPE.batch_size, budget,
                               budget.seconds_for("small"), train_pair)


def candidates_table(rows: list[Row]) -> str:
    baseline = next(r for r in rows if r.preset == "baseline")
    lines = ["design        params  MFLOP/sample  samples/s  GFLOP/s  vs small"]
    for r in rows:
        model_cfg, _ = levers_ab().configs(r.preset)
        flops = train_flops_per_sample(model_cfg)
        rate = statistics.median(r.samples_per_s)
        lines.append(f"{r.preset:<12} {params_of(model_cfg):>7,}  {flops / 1e6:>12.1f}  "
                     f"{rate:>9.1f}  {rate * flops / 1e9:>7.1f}  "
                     f"{ratio_vs(r, baseline):>7.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
