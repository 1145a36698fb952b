"""The sweep's progress: a line on each trial's news, and the report rewritten whenever a
trial ends (a Tune callback, saved with the experiment so its clock goes on after a
resume)."""

from __future__ import annotations

import math
import time

from sweep import long_runs, storage
from sweep.config import MAX_FAILURES, SweepConfig

PLOT_EVERY_S = 60  # pareto.png is redrawn at most this often while the sweep runs


def source_trials(c: SweepConfig) -> list:
    """The trials of the sweep long runs come from: in their report too, so that
    pareto.png draws both (the long runs' full-protocol test scores apart). A checkpoint
    has no sweep's trials."""
    if not c.from_experiment or long_runs.is_checkpoint(c.from_experiment):
        return []
    from sweep.report import load_trials

    try:
        return load_trials(c.from_experiment)
    except (OSError, ValueError, KeyError) as e:  # gone since (another machine): say so
        print(f"warning: the report leaves out {c.from_experiment} ({e})", flush=True)
        return []


def duration(seconds: float) -> str:
    """'~12 min' or, from two hours on, '~6.3 h': the grain a long run's reader needs."""
    return f"~{seconds / 60:.0f} min" if seconds < 7200 else f"~{seconds / 3600:.1f} h"


def epoch_news(result: dict, planned_epochs: int | None) -> str:
    """A trial's epoch for the progress line: 'epoch 50/140: val_mse 5.293e-04, ~6.9 h to
    epoch 140', the time at this epoch's pace (the first after a start also pays for it).
    A scheduler may stop a sweep's trial sooner; a long run goes the whole way."""
    epoch = result.get("epoch")
    news = f"epoch {epoch}"
    if planned_epochs:
        news += f"/{planned_epochs}"
    news += f": val_mse {result.get('val_mse', math.nan):.3e}"
    pace = result.get("time_this_iter_s")
    if isinstance(epoch, int) and planned_epochs and planned_epochs > epoch and pace:
        news += f", {duration((planned_epochs - epoch) * pace)} to epoch {planned_epochs}"
    return news


def best_val_mse(trials: list, newest: dict[str, dict] | None = None) -> str:
    """The lowest of the trials' newest val_mse ('-' before any), as Tune ranks trials: by
    their last result. Tune calls on_trial_result before the result becomes the trial's
    last_result, so the one being reported comes in `newest` (trial_id -> result)."""
    newest = newest or {}
    results = [newest.get(t.trial_id, t.last_result) for t in trials]
    scores = [r.get("val_mse") for r in results if r]
    scores = [s for s in scores if s is not None and math.isfinite(s)]
    return f"{min(scores):.3e}" if scores else "-"


def make_progress(c: SweepConfig):
    from ray import tune

    from sweep.report import error_line, trial_status, write_report

    source_rows = source_trials(c)

    class Progress(tune.Callback):
        """Prints a line on each trial's news (at most every 10 s for results) and rewrites
        the report whenever a trial ends."""

        earlier = 0.0  # seconds the sweep ran under the drivers before this one

        def setup(self, **info) -> None:  # Tune calls it after set_state on a resume
            self.started = time.monotonic()
            self.last_print = self.last_plot = 0.0

        # Saved with each experiment snapshot and given back on a resume, so the clock and
        # the budget's time left go on where they were, as Tune's own budget clock does.
        def get_state(self) -> dict:
            return {"elapsed": self.elapsed()}

        def set_state(self, state: dict) -> None:
            self.earlier = state["elapsed"]

        def elapsed(self) -> float:
            return self.earlier + time.monotonic() - self.started

        def line(self, trials, news: str, ending=None, newest: dict | None = None) -> None:
            done = [t for t in trials if t.status in ("TERMINATED", "ERROR") or t is ending]
            running = sum(t.status == "RUNNING" and t is not ending for t in trials)
            best = best_val_mse(trials, newest)
            elapsed = self.elapsed()
            if c.time_budget:
                left = f"{max(0.0, c.time_budget - elapsed) / 60:.1f} min left (budget)"
            elif done:
                per_trial = elapsed / len(done)
                left = f"~{per_trial * (c.trials - len(done)) / 60:.1f} min left"
            else:
                left = "time left: after the first trial"
            print(f"[{elapsed / 60:5.1f} min] {len(done)}/{c.trials} done, {running} running, "
                  f"best val_mse {best}, {left} | {news}", flush=True)

        def report(self, trials, ending=None) -> None:
            # The CSV every time; the plot at most once a minute: drawing it takes ~0.35 s
            # of the driver's loop, which starts no trial meanwhile. The sweep's end draws it.
            plot = time.monotonic() - self.last_plot > PLOT_EVERY_S
            if plot:
                self.last_plot = time.monotonic()
            try:
                write_report(trials, c.report, ending=ending.trial_id if ending else None,
                             plot=plot, others=source_rows)
            except OSError as e:  # a full disk must not end the sweep; the old file stays
                print(f"warning: {e}; the sweep goes on and tries again when the next "
                      "trial ends", flush=True)

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            newest = {trial.trial_id: result}  # not yet the trial's last_result
            if result.get("resume_note"):  # a retried or resumed trial: say from where
                self.line(trials, f"{trial.trial_id}: {result['resume_note']}", newest=newest)
            if time.monotonic() - self.last_print > 10:
                self.last_print = time.monotonic()
                news = epoch_news(result, trial.config.get("epochs"))
                self.line(trials, f"{trial.trial_id} {news}", newest=newest)

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            result = trial.last_result or {}
            status = trial_status("TERMINATED", result)  # Tune sets it after this call
            why = f": {result['reason']}" if status == "error" and result.get("reason") else ""
            # Tune marks the trial TERMINATED after this callback: count it as ended.
            self.line(trials, f"{trial.trial_id} ended ({status}){why}", ending=trial)
            self.report(trials, ending=trial)

        def on_trial_recover(self, iteration, trials, trial, **info) -> None:
            failures = trial.run_metadata.num_failures
            self.line(trials, f"{trial.trial_id} failed ({error_line(trial)}); retry "
                              f"{failures} of {MAX_FAILURES} from its newest checkpoint")

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            where = storage.uri_of(trial.storage.storage_filesystem, f"{trial.path}/"
                                   f"{trial.run_metadata.error_filename or 'error.txt'}")
            self.line(trials, f"{trial.trial_id} failed for good ({error_line(trial)}; "
                              f"see {where})")
            self.report(trials)

    return Progress()
