"""Does Optuna TPE + ASHA find good models sooner than random search without early stopping?

    python bench/search_efficiency.py [--budget 480] [--seeds 0 1] [--cold]

Runs real sweeps one after the other on this machine, each with the same wall-clock budget
(`--time-budget`) and the same space, trial length and sampler seed, once per seed:

    ours      TPE sampler, ASHA early stopping, the first trial the small preset (the default)
    baseline  random sampler, every trial runs all its epochs, no warm start
    cold      ours without the warm start (with `--cold`): what TPE and ASHA bring on
              their own

From each trial's results it traces the best val MSE found so far against the time since
its sweep started, takes the best of the final values, and reports when each sweep first
came within 10% of it. Ends with `time_to_mark_ratio: X` = baseline time / our
time (> 1: ours is faster), the geometric mean over the seeds, since one pair of sweeps is
one draw of a noisy comparison. A sweep that never gets there counts as getting there at
the end of its budget, so each ratio stays finite and errs against whichever sweep got
there (a median of 0 and inf, which two seeds can give, says nothing). Goal: >= 2.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a plain checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweep import run, stored_study, study

VARIANTS = {"ours": [], "baseline": ["--search", "random", "--no-early-stop", "--no-warm-start"],
            "cold": ["--no-warm-start"]}


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


def time_to(trace: list[tuple[float, float]], mark: float, budget: float) -> float:
    """When the trace first reached the mark; never: the budget (a lower bound)."""
    return next((t for t, best in trace if best <= mark), budget)


def refused(config: run.SweepConfig) -> tuple[int, int]:
    """(suggestions refused over --max-params, trials run) in the sweep's stored study."""
    import optuna

    trials = optuna.load_study(study_name=config.name,
                               storage=study.url_of(config)).get_trials(deepcopy=False)
    over = sum(t.user_attrs.get("status") == stored_study.OVER_BUDGET for t in trials)
    return over, len(trials) - over


def run_variant(name: str, extra: list[str], args, seed: int, root: Path
                ) -> list[tuple[float, float]]:
    argv = ["--name", f"{name}-{seed}", "--storage", str(root / "runs"),
            "--report", str(root / f"{name}-{seed}.csv"), "--trials", "500",
            "--time-budget", str(args.budget), "--max-epochs", str(args.max_epochs),
            "--samples-per-epoch", str(args.samples_per_epoch),
            "--max-params", str(args.max_params), "--val-pairs", "1000",
            "--test-pairs", "0", "--seed", str(seed), *extra]
    config = run.parse_args(argv)
    started = time.time()
    code = run.sweep(config)  # ends by the time budget, trials still queued: exit 0
    if code != 0:  # a failed or interrupted sweep would count as one that never got there
        sys.exit(f"error: the {name} sweep (seed {seed}) failed, exit {code}: no figures")
    over, ran = refused(config)
    print(f"{name} (seed {seed}): {ran} trials run, {over} suggestions refused over "
          f"--max-params {args.max_params}")
    return best_so_far(config.experiment, started)


def compare(traces: dict[str, list[tuple[float, float]]], budget: float
            ) -> tuple[float, dict, dict]:
    """(mark, best final value per variant, time to the mark per variant)."""
    finals = {name: trace[-1][1] if trace else math.inf for name, trace in traces.items()}
    mark = 1.1 * min(finals.values())
    return mark, finals, {name: time_to(trace, mark, budget) for name, trace in traces.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--budget", type=float, default=480,
                        help="seconds per sweep (default %(default)s; 240 halves the run)")
    parser.add_argument("--max-epochs", type=int, default=8)
    parser.add_argument("--samples-per-epoch", type=int, default=2048)
    parser.add_argument("--max-params", type=int, default=100_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                        help="one set of sweeps per seed (sampler seed)")
    parser.add_argument("--cold", action="store_true",
                        help="also run TPE + ASHA without the warm start, per seed")
    args = parser.parse_args(argv)
    variants = ["ours", "baseline", "cold"] if args.cold else ["ours", "baseline"]

    ratios, lines = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            traces = {name: run_variant(name, VARIANTS[name], args, seed, Path(tmp))
                      for name in variants}
            mark, finals, times = compare(traces, args.budget)
            ratios.append(times["baseline"] / times["ours"])
            lines.append(f"seed {seed}: mark = 1.1 x best final = {mark:.3e}")
            lines += [f"  {name:9s} best val_mse {finals[name]:.3e}, within 10% "
                      + (f"after {times[name]:.0f} s" if finals[name] <= mark else
                         f"never (counted as the budget, {args.budget:.0f} s)")
                      + f", {len(traces[name])} improvements" for name in variants]
            lines += [f"  ratio baseline / {name}: {times['baseline'] / times[name]:.2f}"
                      for name in variants if name != "baseline"]
    print(f"\nsame budget: {args.budget:.0f} s per sweep, trials of {args.max_epochs} x "
          f"{args.samples_per_epoch} samples, <= {args.max_params} params")
    print("\n".join(lines))
    print(f"time_to_mark_ratio: {statistics.geometric_mean(ratios):.2f}  "
          f"(geometric mean of {len(ratios)} seeds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
