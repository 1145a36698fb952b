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
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a plain checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweep import run


@dataclass
class TrialTimes:
    start: float  # time.time() when the trial began in its worker
    end: float  # its last report
    train: float  # seconds in training steps
    evaluation: float  # seconds scoring (val each epoch, test at the end)


def trial_times(experiment: Path) -> list[TrialTimes]:
    """Each trial's span and busy seconds, from its own result lines."""
    trials = []
    for result_file in experiment.glob("trial_*/result.json"):
        lines = [json.loads(x) for x in result_file.read_text().splitlines() if x.strip()]
        if lines:
            trials.append(TrialTimes(
                # A trial that ended in error reports no start: its report is its span.
                start=min(r.get("started_at", r["reported_at"]) for r in lines),
                end=lines[-1]["reported_at"],
                train=max(r.get("train_seconds", 0.0) for r in lines),  # cumulative
                evaluation=sum(r.get("eval_seconds", 0.0) for r in lines)))
    return trials


def idle_slot_seconds(trials: list[TrialTimes], slots: int, t0: float, t1: float
                      ) -> tuple[float, float, float]:
    """Slot-seconds with no trial in them over [t0, t1], split into before the first trial
    began (Ray and the first workers starting), between trials while more were still to
    start (scheduling, worker reuse or start), and after the last one began (the tail:
    nothing left to run)."""
    first, last = min(t.start for t in trials), max(t.start for t in trials)
    events = sorted([(t.start, 1) for t in trials] + [(t.end, -1) for t in trials]
                    + [(last, 0), (t1, 0)])
    between = tail = 0.0
    running, now = 0, first
    for when, change in events:  # each interval lies wholly before or after `last`
        idle = (slots - min(running, slots)) * (when - now)
        if when <= last:
            between += idle
        else:
            tail += idle
        running, now = running + change, when
    return slots * (first - t0), between, tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
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
        t0 = time.time()
        code = run.sweep(config)
        t1 = time.time()
        if code != 0:
            print(f"the sweep did not finish (exit {code})", file=sys.stderr)
            return 1
        trials = trial_times(config.experiment)
    # The default sweep here: one CPU per trial, as many at once as the machine has cores.
    slots = min(args.trials, math.floor((config.cpus or os.cpu_count()) / config.cpus_per_trial))
    wall, slot_time = t1 - t0, (t1 - t0) * slots
    train = sum(t.train for t in trials)
    evaluation = sum(t.evaluation for t in trials)
    inside = sum(t.end - t.start for t in trials) - train - evaluation
    start_up, between, tail = idle_slot_seconds(trials, slots, t0, t1)
    print(f"\n{len(trials)} trials, {slots} at once, wall {wall:.0f} s, "
          f"slot time {slot_time:.0f} s:")
    print(f"  training steps     {train:6.0f} s")
    print(f"  scoring            {evaluation:6.0f} s  ({evaluation / (train + evaluation):.1%} "
          f"of trial compute)")
    print(f"  harness            {slot_time - train - evaluation:6.0f} s:")
    print(f"    in trials        {inside:6.0f} s  (set-up, checkpoints, images, reports)")
    print(f"    start-up         {start_up:6.0f} s  (Ray, the first workers)")
    print(f"    between trials   {between:6.0f} s  (scheduling, worker reuse)")
    print(f"    tail             {tail:6.0f} s  (slots idle: nothing left to start)")
    print(f"eval_share: {evaluation / (train + evaluation):.3f}")
    print(f"overhead_share: {1 - (train + evaluation) / slot_time:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
