"""Run (or resume) a sweep of the U-Net family: Ray Tune schedules, Optuna searches.

    python sweep/run.py                  # small CPU-sized default sweep, a few minutes
    python sweep/run.py --gpus 4         # 4 GPUs, one trial per GPU
    python sweep/run.py --address auto   # join a running Ray cluster
    python sweep/run.py --from runs/sweep --top 3 --samples 15000000   # train the front long

Run the same command again after an interruption and the sweep continues where it
stopped; `--fresh` starts over (the old run is moved aside, never deleted).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a plain checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.sources import DataError, load_fashion_mnist, load_mnist
from sweep import config, long_runs, signals, storage, study
from sweep.cluster import check_fits, start_ray
from sweep.config import SweepConfig, UsageError, as_flags, objective
from sweep.experiment import (
    StateError,
    check_same_sweep,
    lock_experiment,
    mend_tuner,
    move_aside,
    reconcile,
    save_final_states,
    set_aside_cut_snapshots,
    tell_study,
)
from sweep.progress import source_trials

# name_trial_dir: experiments begun before it moved to tuner.py name it sweep.run's in their
# tuner.pkl, which a resume unpickles.
from sweep.tuner import build_tuner, name_trial_dir  # noqa: F401


def parse_args(argv: list[str] | None) -> SweepConfig:
    """The command line as a SweepConfig; this docstring is its --help."""
    return config.parse_args(argv, __doc__)


def sweep(c: SweepConfig) -> int:
    with lock_experiment(c.experiment):  # first: a second driver must change nothing
        study_url = prepare_experiment(c)
        fill_data_cache()
        trials, ctrl_c = fit(c, study_url)
        return report_and_say_what_next(c, trials, ctrl_c, study_url)


def prepare_experiment(c: SweepConfig) -> str | None:
    """The experiment ready for Tune: moved aside for --fresh, checked against the settings
    it began with, its study prepared, and on a resume reconciled with the disk. Returns
    the study's URL (None for long runs: they search nothing, so they keep no study)."""
    from ray import tune

    experiment = c.experiment_uri
    if c.fresh and storage.exists(experiment):
        print(f"--fresh: moved the previous experiment to {move_aside(experiment, c.name)}")
    check_same_sweep(c)
    mend_tuner(experiment)  # before the question below: a cut-short tuner.pkl answers yes
    set_aside_cut_snapshots(experiment)  # before the study reads the searcher's snapshot
    resuming = tune.Tuner.can_restore(experiment)
    # First: a study that cannot be resumed (locked, damaged, another sweep's) is refused
    # before anything in the experiment changes.
    study_url = None if c.from_experiment else study.prepare(c, new=not resuming)
    if resuming:
        # Trials a killed driver's last snapshot does not know: kept if they ended, else
        # aside; then Tune's search state pointed at where the experiment is now.
        ended_unknown = reconcile(experiment).adopted
        storage.relocate_search_state(experiment)
        if study_url and ended_unknown:
            tell_study(study_url, c.name, objective(c)["metric"], ended_unknown)
    return study_url


def fill_data_cache() -> None:
    """Load (and on first use cache) both datasets here, once, with a clear error, before
    any trial starts; trials then read the verified cache."""
    for load in (load_mnist, load_fashion_mnist):
        images = load()
        print(f"data: {images.name} from {images.source}")


def fit(c: SweepConfig, study_url: str | None) -> tuple[list, bool]:
    """Ray started, the Tuner built and fitted, Ray shut down: the trials as they ended,
    and whether a Ctrl-C (or SIGTERM) ended the fit."""
    import ray

    from sweep.report import load_trials

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
            save_final_states(c.experiment_uri, trials)
        else:
            trials = load_trials(c.experiment_uri)
    finally:
        ray.shutdown()
    return trials, ctrl_c


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


def report_and_say_what_next(c: SweepConfig, trials: list, ctrl_c: bool,
                             study_url: str | None) -> int:
    """The report written, the best trial and where everything is printed, and what to do
    next: nothing (exit 0), or run the same command again (130 or 143)."""
    from sweep.report import write_report

    experiment = c.experiment_uri
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
