"""What share of a sweep's wall time is harness, not training or evaluation?

    python bench/harness_overhead.py [--trials 16] [--samples-per-epoch 4096]

Runs a real sweep (`sweep/run.py`, a fresh Ray instance, Optuna, ASHA) of short trials in a
temporary directory, then adds up, from each trial's own results, the seconds spent in
training steps (`train_seconds`) and in scoring (`eval_seconds`). The rest of the trial
slots' time is overhead: Ray start, worker start, data loading in the worker, checkpoint
writes, reporting, the driver's bookkeeping, idle slots while Optuna waits.

    overhead_share = 1 - (train + eval seconds) / (wall seconds * concurrent slots)

Ends with the line `overhead_share: X`. Goal: under 0.10.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a plain checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweep import run


def busy_seconds(experiment: Path) -> tuple[float, float, float, int]:
    """(train seconds, eval seconds, seconds inside trials, trials) summed over every
    trial's result lines. Inside a trial = from its start in the worker to its last report;
    what is not training or scoring in there is the trial's own set-up, checkpoint writes,
    images and reports."""
    train = evaluation = inside = 0.0
    trials = 0
    for result_file in experiment.glob("trial_*/result.json"):
        lines = [json.loads(x) for x in result_file.read_text().splitlines() if x.strip()]
        if not lines:
            continue
        trials += 1
        train += max(r.get("train_seconds", 0.0) for r in lines)  # cumulative per trial
        evaluation += sum(r.get("eval_seconds", 0.0) for r in lines)
        inside += lines[-1]["reported_at"] - min(r["started_at"] for r in lines)
    return train, evaluation, inside, trials


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--samples-per-epoch", type=int, default=4096)
    parser.add_argument("--max-epochs", type=int, default=2)
    parser.add_argument("--max-params", type=int, default=50_000)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        sweep_argv = ["--storage", f"{tmp}/runs", "--report", f"{tmp}/report.csv",
                      "--trials", str(args.trials), "--max-epochs", str(args.max_epochs),
                      "--samples-per-epoch", str(args.samples_per_epoch),
                      "--max-params", str(args.max_params)]  # default scoring sizes
        config = run.parse_args(sweep_argv)
        start = time.perf_counter()
        code = run.sweep(config)
        wall = time.perf_counter() - start
        if code != 0:
            print(f"the sweep did not finish (exit {code})", file=sys.stderr)
            return 1
        train, evaluation, inside, trials = busy_seconds(config.experiment)
    # The default sweep here: one CPU per trial, as many at once as the machine has cores.
    slots = min(args.trials, math.floor((config.cpus or os.cpu_count()) / config.cpus_per_trial))
    share = 1 - (train + evaluation) / (wall * slots)
    print(f"\n{trials} trials, {slots} at once, wall {wall:.0f} s")
    print(f"training steps {train:.0f} s, evaluation {evaluation:.0f} s "
          f"(evaluation = {evaluation / (train + evaluation):.1%} of trial compute)")
    harness = wall * slots - train - evaluation
    print(f"slot time {wall * slots:.0f} s, of which harness {harness:.0f} s: "
          f"{inside - train - evaluation:.0f} s inside trials (set-up, checkpoints, images, "
          f"reports), {wall * slots - inside:.0f} s between them (Ray and worker start, "
          f"scheduling, slots idle at the end)")
    print(f"eval_share: {evaluation / (train + evaluation):.3f}")
    print(f"overhead_share: {share:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
