"""Does Optuna TPE + ASHA find good models sooner than random search without early stopping?

    python bench/search_efficiency.py [--budget 420]

Runs two real sweeps one after the other on this machine, each with the same wall-clock
budget (`--time-budget`) and the same space, trial length and seed:

    ours      TPE sampler, ASHA early stopping (the default)
    baseline  random sampler, every trial runs all its epochs

From each trial's results it traces the best val MSE found so far against the time since
its sweep started, takes the better of the two final values, and reports when each sweep
first came within 10% of it. Ends with `time_to_mark_ratio: X` = baseline time / our
time (> 1: ours is faster; inf when the baseline never gets there). Goal: >= 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a plain checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweep import run

VARIANTS = {"ours": [], "baseline": ["--search", "random", "--no-early-stop"]}


def best_so_far(experiment: Path, started: float) -> list[tuple[float, float]]:
    """(seconds since start, best val MSE so far) at each improvement, over all trials."""
    points = []
    for result_file in experiment.glob("trial_*/result.json"):
        for line in result_file.read_text().splitlines():
            r = json.loads(line)
            if math.isfinite(r.get("val_mse", math.nan)):
                points.append((r["reported_at"] - started, r["val_mse"]))
    trace, best = [], math.inf
    for t, mse in sorted(points):
        if mse < best:
            best = mse
            trace.append((t, best))
    return trace


def time_to(trace: list[tuple[float, float]], mark: float) -> float:
    return next((t for t, best in trace if best <= mark), math.inf)


def run_variant(name: str, extra: list[str], args, root: Path) -> list[tuple[float, float]]:
    argv = ["--name", name, "--storage", str(root / "runs"),
            "--report", str(root / f"{name}.csv"), "--trials", "500",
            "--time-budget", str(args.budget), "--max-epochs", str(args.max_epochs),
            "--samples-per-epoch", str(args.samples_per_epoch),
            "--max-params", str(args.max_params), "--val-pairs", "1000",
            "--test-pairs", "0", "--seed", str(args.seed), *extra]
    config = run.parse_args(argv)
    started = time.time()
    run.sweep(config)  # ends by the time budget with trials still queued: exit 130 is fine
    return best_so_far(config.experiment, started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=420, help="seconds per sweep")
    parser.add_argument("--max-epochs", type=int, default=4)
    parser.add_argument("--samples-per-epoch", type=int, default=2048)
    parser.add_argument("--max-params", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    traces = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in VARIANTS.items():
            traces[name] = run_variant(name, extra, args, Path(tmp))
    finals = {name: trace[-1][1] if trace else math.inf for name, trace in traces.items()}
    mark = 1.1 * min(finals.values())
    times = {name: time_to(trace, mark) for name, trace in traces.items()}
    print(f"\nsame budget: {args.budget:.0f} s each; mark = 1.1 x best final = {mark:.3e}")
    for name in VARIANTS:
        print(f"{name:9s} best val_mse {finals[name]:.3e}, within 10% after "
              f"{times[name]:.0f} s, {len(traces[name])} improvements")
    ratio = times["baseline"] / times["ours"] if times["ours"] > 0 else math.nan
    print(f"time_to_mark_ratio: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
