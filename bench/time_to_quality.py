"""Time to quality: recipe B given T minutes against recipe A given k*T, side by side.

    python bench/time_to_quality.py --minutes 20 --factor 3      # B = today's, A = before it
    python bench/time_to_quality.py --minutes 20 --model "--base-filters 16"  # small at base 16
    python bench/time_to_quality.py --minutes 5 --factor 1 --a "--muon-lr 0.02" --b "--muon-lr 0.05"
    python bench/time_to_quality.py --minutes 60 --factor 2 --c "--output one"  # + C after B

Does B reach in T what A reaches in k*T, on this machine? Both run at once, each in its
own process on one thread (two cores: one each), on one design (`--preset`, changed by
`--model`'s flags). Each is a train.py config given as its flags: A defaults to the
recipe every run before 2026-12-03 trained with, spelled out in full so that it stays
reproducible whatever the defaults become; B defaults to today's recipe (TrainConfig's
defaults since 2026-12-03), spelled out as well. With --factor 1 it screens two
candidates at equal time.

Each run's budget is wall time, and its schedule runs by the clock: the learning rate at
each step is the schedule at (seconds trained / seconds allowed), so every run ends its
own schedule at its own budget, whatever speed it gets (warm-up and torch.compile
included: they take training time). Evaluation stops the clock: val MSE on the same
fixed validation pairs, --evals times along the way and at the end.

Prints each run's curve (val MSE against seconds), its samples/s, and the headline

    time_to_quality: B@T=<val MSE> A@kT=<val MSE> factor>=k: yes|no

("yes": B after T is at least as good as A after k*T, so B is worth >= k in time). With
--c, a third run C (B's flags and C's, so C is B with one thing changed) starts on B's
core when B ends, with B's budget: with --factor 2 both cores stay busy until A ends, and
C meets the same neighbour as B did; `C@T against B@T` is printed after the headline.
Writes curves.csv, curves.png, summary.csv and machine.txt under --out
(results/<date>-time-to-quality/ by default).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shlex
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

if __package__ in (None, ""):  # run as a script from a plain checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.train_throughput import describe_machine
from data.mixture import load_sources
from data.sources import DataError
from model.unet import PRESETS, ConfigError, UNet, count_params
from sweep import train
from sweep.files import atomic_write, write_csv
from sweep.recipe import make_step_fn
from sweep.scoring import val_mse

ROOT = Path(__file__).resolve().parents[1]
# The recipe before 2026-12-03 (train.py's LEGACY_RECIPE, lr 3e-3) and today's, every
# field that makes each spelled out: A and B stay these when the defaults move.
RECIPE_A = ("--optimizer adamw --schedule cosine --lr 0.003 --weight-decay 0.0001 "
            "--batch-size 64 --ema-decay 0 --loss mse --no-compile --no-compile-step")
RECIPE_B = ("--optimizer muon --schedule linear --muon-lr 0.05 --muon-momentum 0.9 --lr 0.01 "
            "--weight-decay 0.0001 --batch-size 64")
CURVE_COLUMNS = ["run", "train_seconds", "samples", "lr", "val_mse"]


def configs(preset: str, model_flags: str, recipe_flags: str):
    """train.py's own parser on '--preset P <model flags> <recipe flags>'; one thread."""
    argv = ["--preset", preset, *shlex.split(model_flags), *shlex.split(recipe_flags)]
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            args = train.parse_args(argv)
    except SystemExit:
        last = (errors.getvalue().strip().splitlines() or ["bad flags"])[-1]
        raise ConfigError(f"{recipe_flags!r}: {last.partition('error: ')[2] or last}") from None
    model_cfg, cfg = train.configs_from_args(args)
    return model_cfg, replace(cfg, threads=1)


# --- one run (a child process) --------------------------------------------------------------

class Clock:
    """Training seconds: running while the run trains, stopped while it is evaluated."""

    def __init__(self) -> None:
        self.total, self.since = 0.0, None

    def start(self) -> None:
        self.since = time.perf_counter()

    def stop(self) -> None:
        self.total, self.since = self.seconds(), None

    def seconds(self) -> float:
        running = time.perf_counter() - self.since if self.since is not None else 0.0
        return self.total + running


def run_one(name: str, preset: str, model_flags: str, recipe_flags: str, seconds: float,
            evals: int, val_pairs: int, out: Path) -> None:
    """Train by the clock for `seconds` of training time; write <out>/<name>.csv."""
    model_cfg, cfg = configs(preset, model_flags, recipe_flags)
    torch.set_num_threads(1)
    fast = cfg.fast_path()
    sources = load_sources(fast.device)
    trial = train.build_trial(model_cfg, cfg, fast)
    clock = Clock()
    step = make_step_fn(trial, sources.train, model_cfg, cfg, fast,
                        progress=lambda: clock.seconds() / seconds)
    rows, steps = [], 0
    for point in range(1, evals + 1):
        trial.model.train()
        clock.start()
        while clock.seconds() < seconds * point / evals:
            loss = step()
            steps += 1
        loss.item()  # the device's queued work belongs to the training time
        clock.stop()
        rows.append({"run": name, "train_seconds": clock.total,
                     "samples": steps * cfg.batch_size,
                     "lr": trial.optimizer.param_groups[0]["lr"],
                     "val_mse": val_mse(trial.scored_model, sources.val, model_cfg.mixture,
                                        fast, val_pairs)})
        print(f"{name}: {clock.total:7.1f} s  {rows[-1]['samples']:>9,} samples  "
              f"val_mse {rows[-1]['val_mse']:.3e}", flush=True)
    write_csv(pd.DataFrame(rows, columns=CURVE_COLUMNS), out / f"{name}.csv")


# --- the comparison (the parent) ------------------------------------------------------------

def child_command(name: str, args: argparse.Namespace, seconds: float) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--run-one", name,
            "--preset", args.preset, f"--model={args.model}", f"--a={args.a}",
            f"--b={args.b}", f"--c={args.c}",
            "--run-seconds", str(seconds), "--evals", str(args.evals),
            "--val-pairs", str(args.val_pairs), "--out", str(args.out)]


def recipes(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(run, flags) of each run: A, B and, with --c, C (B's flags, then C's)."""
    runs = [("A", args.a), ("B", args.b)]
    return runs + [("C", f"{args.b} {args.c}")] if args.c else runs


def run_both(args: argparse.Namespace) -> int:
    """A and B at once, one process each, then C (if any) where B was; their output goes
    to log-<run>.txt."""
    budgets = {"A": args.minutes * 60 * args.factor, "B": args.minutes * 60,
               "C": args.minutes * 60}
    failed = 0

    def start(name: str) -> tuple[subprocess.Popen, object]:
        log = open(args.out / f"log-{name}.txt", "w")  # noqa: SIM115 - closed in finish
        return subprocess.Popen(child_command(name, args, budgets[name]),
                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), log

    def finish(name: str, proc: subprocess.Popen, log) -> None:
        nonlocal failed
        failed |= proc.wait() != 0
        log.close()
        if proc.returncode:
            print(f"run {name} failed (exit {proc.returncode}): see {log.name}", file=sys.stderr)

    a, b = start("A"), start("B")
    finish("B", *b)
    if args.c:
        finish("C", *start("C"))
    finish("A", *a)
    return int(failed)


def plot(curves: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, df in curves.groupby("run"):
        ax.plot(df.train_seconds / 60, df.val_mse, marker=".", label=name)
    ax.set(xlabel="training minutes (one thread)", ylabel="val MSE", yscale="log", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def summarize(args: argparse.Namespace) -> int:
    runs = recipes(args)
    curves = pd.concat([pd.read_csv(args.out / f"{name}.csv") for name, _ in runs])
    write_csv(curves, args.out / "curves.csv")
    summary = []
    for name, flags in runs:
        run = curves[curves.run == name]
        end = run.iloc[-1]
        summary.append({"run": name, "flags": flags, "train_seconds": end.train_seconds,
                        "samples": int(end.samples),
                        "samples_per_s": end.samples / end.train_seconds,
                        "val_mse": end.val_mse})
        print(f"{name} ({flags}):")
        for row in run.itertuples():
            print(f"  {row.train_seconds:8.1f} s  {row.samples:>10,} samples  "
                  f"lr {row.lr:.2e}  val_mse {row.val_mse:.3e}")
        print(f"  {summary[-1]['samples_per_s']:.1f} samples/s")
    write_csv(pd.DataFrame(summary), args.out / "summary.csv")
    k = f"{args.factor:g}"
    plot(curves, args.out / "curves.png",
         f"B {args.minutes:g} min vs A {args.minutes * args.factor:g} min "
         f"({f'{args.preset} {args.model}'.strip()})")
    a, b = summary[0]["val_mse"], summary[1]["val_mse"]
    print(f"time_to_quality: B@T={b:.3e} A@kT={a:.3e} factor>={k}: {'yes' if b <= a else 'no'}")
    if args.c:
        c = summary[2]["val_mse"]
        print(f"C@T={c:.3e} against B@T={b:.3e}: {c / b - 1:+.1%}")
    return 0


def write_machine(args: argparse.Namespace) -> None:
    model_cfg, cfg = configs(args.preset, args.model, args.a)
    lines = [f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
             *describe_machine(cfg.fast_path()),
             f"design: --preset {args.preset} {args.model}".rstrip()
             + f" ({count_params(UNet(model_cfg)):,} params)",
             f"A: {args.a} for {args.minutes * args.factor:g} min",
             f"B: {args.b} for {args.minutes:g} min",
             *([f"C: B and {args.c} for {args.minutes:g} min, on B's core after B"]
               if args.c else []),
             "each run one thread, A and B at once"]
    (args.out / "machine.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=15.0, help="B's budget T (default 15)")
    parser.add_argument("--factor", type=float, default=3.0,
                        help="A's budget is factor x T (default 3)")
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--model", default="",
                        help="model flags for both runs, e.g. '--base-filters 16'")
    parser.add_argument("--a", default=RECIPE_A, help=f"recipe A's flags (default {RECIPE_A!r})")
    parser.add_argument("--b", default=RECIPE_B, help=f"recipe B's flags (default {RECIPE_B!r})")
    parser.add_argument("--c", default="",
                        help="flags added to B's for a run C after B, on its core, for T")
    parser.add_argument("--evals", type=int, default=10, help="val MSE points per run (default 10)")
    parser.add_argument("--val-pairs", type=int, default=2000,
                        help="fixed validation pairs (default 2000, as train.py)")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "results" / f"{time.strftime('%Y-%m-%d')}-time-to-quality")
    parser.add_argument("--run-one", choices=["A", "B", "C"], help=argparse.SUPPRESS)
    parser.add_argument("--run-seconds", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.factor < 1 or args.evals < 1 or args.val_pairs < 1:
        parser.error("--minutes must be > 0, --factor >= 1, --evals and --val-pairs >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        for _, flags in recipes(args):
            configs(args.preset, args.model, flags)  # bad flags: refused before any run
        if args.run_one:
            flags = dict(recipes(args))[args.run_one]
            run_one(args.run_one, args.preset, args.model, flags, args.run_seconds,
                    args.evals, args.val_pairs, args.out)
            return 0
        args.out.mkdir(parents=True, exist_ok=True)
        write_machine(args)
        if run_both(args):
            return 1
        return summarize(args)
    except (ConfigError, TypeError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
