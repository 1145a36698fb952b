"""The sweep's report: one row per trial, MSE against parameter count, the Pareto front.

    python sweep/report.py [EXPERIMENT_DIR] [--out results/report.csv]

rebuilds `report.csv` and `pareto.png` from an experiment directory alone (Ray's own
experiment state and each trial's results), while a sweep runs or long after it.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from pathlib import Path

import pandas as pd

if __package__ in (None, ""):  # run as a script from a plain checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.unet import ConfigError, UNetConfig, params_of, train_flops_per_sample
from sweep import storage
from sweep.checkpoint import CHECKPOINT_FILE
from sweep.files import write_csv
from sweep.plots import plot_pareto
from sweep.train import split_config

AXES = ["base_filters", "depth", "enc_convs", "dec_convs", "decoder_width_mult",
        "depthwise_head", "block", "upsample", "attention_gates", "output",
        "mixture_consistent", "batch_norm", "lr", "batch_size", "loss"]
METRICS = ["params", "flops_per_sample", "epochs", "val_mse", "test_mse_mean",
           "test_mse_std", "test_pairs", "train_seconds", "samples_per_s"]
# scored_in: the precision of val_mse and test_mse (fp32; empty for trials of older runs).
COLUMNS = ["trial_id", "status", *AXES, *METRICS, "scored_in", "pareto", "checkpoint", "node",
           "error"]


def trial_status(tune_status: str, result: dict) -> str:
    """Our words for where a trial ended: Tune's status refined by what the trial said."""
    ours = result.get("status")
    if tune_status == "ERROR":
        return "error"
    if tune_status == "TERMINATED":
        # "error": the trial caught a failure that a retry cannot fix (see trainable.py)
        if ours in ("finished", "diverged", "error"):
            return ours
        return "stopped early"  # ASHA cut it, or the time budget ran out
    return {"RUNNING": "running", "PENDING": "pending", "PAUSED": "paused"}.get(
        tune_status, tune_status.lower())


def error_path(trial) -> str | None:
    """Tune's error.txt of a trial, in the experiment directory (Tune writes it in a
    staging directory under Ray's session first, and copies it at each snapshot)."""
    name = trial.run_metadata.error_filename
    if not name:
        return None
    stored = storage.uri_of(trial.storage.storage_filesystem, f"{trial.path}/{name}")
    if storage.exists(stored):
        return stored
    try:  # not copied yet: the staging copy, while Ray runs
        staged = Path(trial.error_file)
    except Exception:  # noqa: BLE001 - Ray is down: there is no staging directory
        return None
    return str(staged) if staged.exists() else None


def error_line(trial) -> str:
    """The gist of the trial's last failure: the last line of Tune's error.txt."""
    path = error_path(trial)
    lines = storage.read_bytes(path).decode().strip().splitlines() if path else []
    return lines[-1].strip()[:300] if lines else ""


@functools.cache
def cached_flops(model_cfg: UNetConfig) -> int:
    """Counted here, once per config, not in the trials: torch's FLOP counter costs ~3 s the
    first time a process uses it (it imports torch._dynamo), which every worker paid."""
    return train_flops_per_sample(model_cfg)


def config_size(config: dict) -> tuple[int | None, int | None]:
    """(parameters, training FLOPs per sample) from a trial's config, so that a trial
    stopped before its first report (by the time budget) still shows its size."""
    try:
        model = split_config(config)[0]
    except (ConfigError, TypeError, ValueError):  # an unbuildable config: no count
        return None, None
    return params_of(model), cached_flops(model)


def trial_record(trial, tune_status: str | None = None) -> dict:
    """One report row from a Ray Tune Trial (live in the driver, or restored from disk);
    `tune_status` overrides the trial's own (see write_report)."""
    result = dict(trial.last_result or {})
    tune_status = tune_status or trial.status
    error = error_line(trial) if tune_status == "ERROR" else ""
    params, flops = config_size(trial.config)
    row = {
        "trial_id": trial.trial_id,
        "status": trial_status(tune_status, result),
        **{k: trial.config.get(k) for k in AXES},
        **{k: result.get(k) for k in METRICS},
        # from the config, so that a trial stopped before its first report has them too
        "params": params,
        "flops_per_sample": flops,
        "epochs": result.get("epoch"),
        "scored_in": result.get("scored_in", ""),
        "checkpoint": checkpoint_file(trial, result),
        "node": result.get("node", ""),
        "error": error or result.get("reason", ""),
    }
    return row


def checkpoint_file(trial, result: dict) -> str:
    """The trial's newest checkpoint file. A trial that had ended when the driver was killed
    is reported again from disk without a new checkpoint, so Tune may know none of it (or
    an older one): that result names its file itself (trainable.py)."""
    if "checkpoint_file" in result:
        # Named where the experiment was then: the file (checkpoint_N/checkpoint.pt) is in
        # the trial's directory wherever the experiment is now (moved, copied).
        name = "/".join(result["checkpoint_file"].split("/")[-2:])
        return storage.uri_of(trial.storage.storage_filesystem, f"{trial.path}/{name}")
    if not trial.checkpoint:
        return ""
    stored = storage.uri_of(trial.checkpoint.filesystem, trial.checkpoint.path)
    return f"{stored}/{CHECKPOINT_FILE}"


def pareto_front(params: pd.Series, mse: pd.Series) -> pd.Series:
    """True where no other row has fewer-or-equal params and a lower-or-equal MSE (with one
    of the two strictly better). NaN MSE is never on the front."""
    valid = mse.notna() & params.notna()
    order = pd.DataFrame({"p": params[valid], "m": mse[valid]}).sort_values(["p", "m"])
    best_before = order["m"].cummin().shift(fill_value=math.inf)
    on_front = order["m"] < best_before
    return on_front.reindex(mse.index, fill_value=False)


def build_report(records: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame.from_records(records, columns=COLUMNS)
    for col in METRICS:
        df[col] = pd.to_numeric(df[col], errors="coerce")
    df["pareto"] = pareto_front(df["params"], df["val_mse"])
    return df.sort_values("trial_id", ignore_index=True)


def write_report(trials, csv_path: Path, ending: str | None = None,
                 plot: bool = True, others=()) -> pd.DataFrame:
    """Rewrite report.csv and (with `plot`) pareto.png beside it from Tune trials,
    atomically.

    `ending`: the id of a trial that has ended but that Tune marks TERMINATED only after
    its on_trial_complete callbacks, which is where the sweep rewrites the report.
    `others`: trials of another experiment reported beside these (a long run's source)."""
    df = build_report([trial_record(t, "TERMINATED" if t.trial_id == ending else None)
                       for t in trials] + [trial_record(t) for t in others])
    write_csv(df, csv_path)
    if plot and df["val_mse"].notna().any():
        plot_pareto(df, csv_path.with_name("pareto.png"))
    return df


def load_trials(experiment: str | Path) -> list:
    """The trials of an experiment, a directory or a URI (s3://...), as Ray Tune saved them."""
    from ray.tune import ExperimentAnalysis

    return ExperimentAnalysis(storage.normalize(str(experiment))).trials


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("experiment", nargs="?", type=storage.normalize, default="runs/sweep",
                        help="experiment directory, or its URI (s3://bucket/prefix/NAME); "
                             "default runs/sweep")
    parser.add_argument("--out", type=Path, default=Path("results/report.csv"))
    args = parser.parse_args(argv)
    if args.out.is_dir():
        parser.error(f"--out {args.out} is a directory; give a file path")
    try:
        states = storage.names(args.experiment, "experiment_state*.json")
    except Exception as e:  # noqa: BLE001 - pyarrow's errors: unreachable, denied, ...
        print(f"error: {args.experiment}: {storage.why(e)}", file=sys.stderr)
        return 2
    if not states:
        print(f"error: {args.experiment} is not a sweep's experiment directory "
              "(no experiment_state*.json in it)", file=sys.stderr)
        return 2
    try:
        trials = load_trials(args.experiment)
    except (KeyError, TypeError, ValueError) as e:  # Tune's state file, damaged or foreign
        print(f"error: {args.experiment}: Ray Tune cannot read its experiment state "
              f"({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    try:
        df = write_report(trials, args.out)
    except OSError as e:  # a full disk, say: the message names the file and what is kept
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{len(df)} trials -> {args.out}")
    print(df["status"].value_counts().to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
