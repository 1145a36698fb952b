"""A/B of each model and training lever against today's best design, at equal compute.

    python bench/levers_ab.py                     # 8 runs of 20 CPU-minutes, 2 at a time
    python bench/levers_ab.py --minutes 2 --only baseline,ema   # a quick look
    python bench/levers_ab.py --report-only       # redraw the table and curves from disk

"Equal wall time" is measured in CPU time, one torch thread per run: each variant's
training rate (samples per CPU-second of the real training step, after a warm-up) is
probed first, and its run gets rate x minutes samples, as `sweep/train.py` runs with a
cosine schedule over exactly that budget. CPU time, unlike wall time, does not stretch
when other work shares the machine, so runs made side by side, or while tests run,
compare as if each had had a core to itself for the same minutes.

Each run is a plain `sweep/train.py` run in results/<out>/<variant>/ (resumed if cut off:
commit an unfinished one's checkpoint.pt to go on elsewhere; finished ones keep their
metrics.csv, curve.png and log.txt); the plan (budgets), the table (final val MSE,
params, rate) and the curves (val MSE against CPU-minutes and against samples) go to
results/<out>/.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

if __package__ in (None, ""):  # run as a script from a plain checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.mixture import load_sources
from model.unet import UNetConfig, params_of, preset
from sweep.files import atomic_write, write_csv
from sweep.recipe import make_step_fn
from sweep.train import LEGACY_LR, LEGACY_RECIPE, TrainConfig, build_trial

ROOT = Path(__file__).resolve().parents[1]
BASELINE = preset("small")  # today's best design: 262,822 parameters
# The recipe of results/2026-12-01-levers (AdamW, cosine), spelled out to stay reproducible.
RECIPE = TrainConfig(batch_size=64, lr=LEGACY_LR, threads=1, **LEGACY_RECIPE)
# name -> (model overrides, train overrides). Each changes one thing; widths stay the
# baseline's except where a lever alone would move the parameter count far (NAF).
VARIANTS: dict[str, tuple[dict, dict]] = {
    "baseline": ({}, {}),
    "residual": ({"block": "residual"}, {}),
    "naf": ({"block": "naf", "base_filters": 20}, {}),
    "bilinear": ({"upsample": "bilinear"}, {}),
    "attention": ({"attention_gates": True}, {}),
    "one_output": ({"output": "one"}, {}),
    "ema": ({}, {"ema_decay": 0.999}),
    "l1": ({}, {"loss": "l1"}),
}
EPOCHS = 6  # points on each curve


def configs(name: str) -> tuple[UNetConfig, TrainConfig]:
    model, train = VARIANTS[name]
    return replace(BASELINE, **model), replace(RECIPE, **train)


def cpu_rates(names: list[str], sources, rounds: int = 5, steps: int = 20) -> dict[str, float]:
    """Training samples per CPU-second of each variant's real step: after a warm-up, the
    best of `rounds` rounds of `steps` steps, the variants interleaved round by round.
    The best, not the median: others' load (caches, memory bandwidth) only ever slows a
    round down, and a median of three still differed by 30% between two variants whose
    steps do the same work (measured beside a test run)."""
    steppers = {}
    for name in names:
        model_cfg, cfg = configs(name)
        fast = cfg.fast_path()
        trial = build_trial(model_cfg, cfg, fast)
        steppers[name] = make_step_fn(trial, sources.train, model_cfg, cfg, fast)
        for _ in range(10):
            steppers[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        for name, step in steppers.items():
            start = time.process_time()
            for _ in range(steps):
                step()
            seconds[name].append(time.process_time() - start)
    return {name: steps * RECIPE.batch_size / min(s) for name, s in seconds.items()}


def plan(names: list[str], minutes: float, plan_file: Path, probe: bool = True
         ) -> pd.DataFrame:
    """Each variant's budget, probed once and kept: a resumed A/B trains what it planned.
    Without `probe`, only what the plan already holds."""
    known = pd.read_csv(plan_file) if plan_file.exists() else pd.DataFrame(
        columns=["variant", "minutes", "params", "samples_per_cpu_s", "samples_per_epoch"])
    todo = [n for n in names if not ((known.variant == n) & (known.minutes == minutes)).any()]
    if todo and probe:
        torch.set_num_threads(1)
        sources = load_sources(torch.device("cpu"))
        rows = []
        for name, rate in cpu_rates(todo, sources).items():
            model_cfg, cfg = configs(name)
            per_epoch = int(rate * minutes * 60 / EPOCHS) // cfg.batch_size * cfg.batch_size
            rows.append({"variant": name, "minutes": minutes, "params": params_of(model_cfg),
                         "samples_per_cpu_s": round(rate, 1), "samples_per_epoch": per_epoch})
            print(f"plan {name}: {params_of(model_cfg):,} params, {rate:.0f} samples/CPU-s, "
                  f"{per_epoch * EPOCHS:,} samples", flush=True)
        known = pd.concat([known, pd.DataFrame(rows)], ignore_index=True)
        write_csv(known, plan_file)
    return known[known.variant.isin(names) & (known.minutes == minutes)]


def train_command(name: str, samples_per_epoch: int, out: Path) -> list[str]:
    model_cfg, cfg = configs(name)
    flags = []
    for key, value in {**model_cfg.to_dict(), "batch_size": cfg.batch_size, "lr": cfg.lr,
                       "ema_decay": cfg.ema_decay, "loss": cfg.loss,
                       "optimizer": cfg.optimizer, "schedule": cfg.schedule}.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return [sys.executable, str(ROOT / "sweep/train.py"), *flags, "--threads", "1",
            "--epochs", str(EPOCHS), "--samples-per-epoch", str(samples_per_epoch),
            "--out", str(out)]


def run_one(name: str, samples_per_epoch: int, runs: Path) -> int:
    out = runs / name
    history = out / "metrics.csv"
    if history.exists() and pd.read_csv(history).epoch.max() >= EPOCHS:
        print(f"{name}: finished before", flush=True)  # its checkpoint need not be kept
        return 0
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "log.txt", "a") as log:
        done = subprocess.run(train_command(name, samples_per_epoch, out), stdout=log,
                              stderr=subprocess.STDOUT, cwd=ROOT)
    print(f"{name}: exit {done.returncode}", flush=True)
    return done.returncode


def report(budgets: pd.DataFrame, runs: Path, results: Path) -> pd.DataFrame:
    """The table and the curves of the runs on disk, finished or not."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, curves, fig, (by_time, by_samples) = [], {}, *plt.subplots(1, 2, figsize=(12, 4.5))
    for b in budgets.itertuples():
        history = runs / b.variant / "metrics.csv"
        if not history.exists():
            continue
        df = pd.read_csv(history)
        curves[b.variant] = df.set_index("epoch").val_mse
        cpu_minutes = df.samples / b.samples_per_cpu_s / 60
        by_time.plot(cpu_minutes, df.val_mse, marker=".", label=b.variant)
        by_samples.plot(df.samples, df.val_mse, marker=".", label=b.variant)
        rows.append({"variant": b.variant, "params": b.params,
                     "samples_per_cpu_s": b.samples_per_cpu_s, "epochs": int(df.epoch.iloc[-1]),
                     "samples": int(df.samples.iloc[-1]),
                     "val_mse": float(df.val_mse.iloc[-1])})
    for ax, xlabel in ((by_time, "CPU-minutes (one thread)"), (by_samples, "samples")):
        ax.set(xlabel=xlabel, ylabel="val MSE", yscale="log")
        ax.grid(True, which="both", alpha=0.3)
    by_time.legend()
    fig.suptitle(f"levers vs baseline (`small`), {budgets.minutes.iloc[0]:g} CPU-min a side")
    fig.tight_layout()
    atomic_write(results / "curves.png", lambda f: fig.savefig(f, format="png", dpi=110))
    table = pd.DataFrame(rows)
    if len(table) and (table.variant == "baseline").any():
        base = table.loc[table.variant == "baseline", "val_mse"].iloc[0]
        table["vs_baseline"] = (table.val_mse / base - 1).map(lambda r: f"{r:+.1%}")
    write_csv(table, results / "table.csv")
    if agreement := rank_agreement(pd.DataFrame(curves)):
        print("ranking after each epoch vs the final one (Kendall tau): "
              + ", ".join(f"epoch {e}: {tau:.2f}" for e, tau in agreement.items()))
    return table


def rank_agreement(val_by_epoch: pd.DataFrame) -> dict[int, float]:
    """How far the variants' ranking after each epoch agrees with the final one (Kendall's
    tau over the finished runs): how long a sweep's trials must run for their ranking to
    mean something. Rows: epochs; columns: variants."""
    finished = val_by_epoch.dropna(axis=1)
    if finished.shape[1] < 3:
        return {}
    final = finished.iloc[-1].to_numpy()
    return {int(epoch): kendall_tau(row.to_numpy(), final)
            for epoch, row in finished.iterrows()}


def kendall_tau(a, b) -> float:
    """(concordant - discordant pairs) / all pairs; ties count as neither."""
    n, score = len(a), 0.0
    for i in range(n):
        for j in range(i + 1, n):
            score += float(np.sign(a[i] - a[j]) * np.sign(b[i] - b[j]))
    return score / (n * (n - 1) / 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--minutes", type=float, default=20.0, help="CPU-minutes per run")
    parser.add_argument("--only", default=",".join(VARIANTS),
                        help=f"comma-separated variants (default all: {','.join(VARIANTS)})")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one core each)")
    parser.add_argument("--out", default="2026-12-01-levers",
                        help="the results/ folder (default %(default)s)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    names = args.only.split(",")
    if unknown := sorted(set(names) - set(VARIANTS)):
        print(f"error: unknown variant(s) {unknown}; known: {list(VARIANTS)}", file=sys.stderr)
        return 2
    runs = results = ROOT / "results" / args.out
    results.mkdir(parents=True, exist_ok=True)
    budgets = plan(names, args.minutes, results / "plan.csv", probe=not args.report_only)
    if not args.report_only:
        with ThreadPoolExecutor(args.jobs) as pool:
            codes = list(pool.map(lambda b: run_one(b.variant, b.samples_per_epoch, runs),
                                  budgets.itertuples()))
        if any(codes):
            print(f"some runs failed: see {runs}/<variant>/log.txt", file=sys.stderr)
    print(report(budgets, runs, results).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
