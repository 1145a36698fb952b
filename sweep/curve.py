"""A long run's learning curve, whole, where its page can show it.

    python sweep/curve.py results/2026-12-03-front157k/extended-56m/trial_546bb_00000

draws the trial's val MSE and train loss against samples seen into `curve.png` in its
folder (or --out), and writes the points beside it as `curve.csv`. A longer run of a
checkpoint (`--extend`) goes on from another trial's epoch: the curve follows those links
back, so it runs from the first epoch of the first run. A link whose absolute path is gone
(a clone elsewhere) is looked for in this trial's storage folder, where `--extend` puts
its experiments beside each other.

    python sweep/curve.py <trial folder> --probes results/2026-12-03-front157k/probes.txt

draws beside it the annealed probes: what `bench/anneal_forecast.py` printed for the run's
checkpoints, its output kept in a file (each probe's `<checkpoint>: epoch N, ...` line and
its `annealed_val_mse:` line).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import pandas as pd

if __package__ in (None, ""):  # run as a script from a plain checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.unet import ConfigError
from sweep.files import write_csv
from sweep.plots import plot_curve
from sweep.train import split_config

RESULTS_FILE = "result.json"  # Ray Tune's: one JSON line per reported epoch
COLUMNS = ["epoch", "samples", "val_mse", "train_loss", "lr", "samples_per_s", "run"]
# anneal_forecast.py's lines: the checkpoint's epoch first, its annealed score last.
PROBE_EPOCH = re.compile(r"^\S.*: epoch (\d+), val_mse ", re.M)
PROBE_SCORE = re.compile(r"^annealed_val_mse: (\S+)$", re.M)


class CurveError(Exception):
    """The trial folder, or one it goes on from, cannot be read; the message names it."""


def epoch_rows(trial_dir: Path) -> tuple[list[dict], dict[str, int]]:
    """The trial's reported epochs, in order (an epoch trained again after a crash keeps
    its last report), and the epoch each of its checkpoints holds."""
    path = trial_dir / RESULTS_FILE
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise CurveError(f"{path}: {e.strerror or e}; give a trial's folder "
                         "(<storage>/<name>/trial_...)") from None
    by_epoch, checkpoints = {}, {}
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # the line a killed writer left half-written
            continue
        if isinstance(row.get("epoch"), int):
            by_epoch[row["epoch"]] = row
            if row.get("checkpoint_dir_name"):
                checkpoints[row["checkpoint_dir_name"]] = row["epoch"]
    return [by_epoch[e] for e in sorted(by_epoch)], checkpoints


def source_of(trial_dir: Path, config: dict) -> tuple[Path, str] | None:
    """(trial folder, checkpoint folder name) that this trial went on from, or None for a
    run that began from scratch (or from a checkpoint outside any trial)."""
    extends = config.get("extends")
    if not extends:
        return None
    checkpoint = Path(extends)
    if not checkpoint.is_file():  # moved with its storage folder: look there
        checkpoint = trial_dir.parent.parent.joinpath(*checkpoint.parts[-4:])
    source = checkpoint.parent.parent
    if not (source / RESULTS_FILE).is_file():
        return None
    return source, checkpoint.parent.name


def chain_history(trial_dir: Path) -> tuple[pd.DataFrame, int]:
    """Every epoch of the trial and of the runs it went on from, first to last, and the
    samples the newest run is planned for."""
    if not (trial_dir / "params.json").is_file():
        raise CurveError(f"{trial_dir} is not a trial's folder (no params.json in it); give "
                         "one: <storage>/<name>/trial_...")
    parts, planned = [], None
    cut = None  # the checkpoint the later run went on from: the source's epochs end there
    while trial_dir is not None:  # each link points to an earlier trial: no cycle
        try:
            config = json.loads((trial_dir / "params.json").read_text())
            _, cfg = split_config(config)
        except (OSError, ValueError, TypeError, ConfigError) as e:
            raise CurveError(f"{trial_dir / 'params.json'}: {e}") from None
        rows, checkpoints = epoch_rows(trial_dir)
        if cut is not None:  # the later run went on from this checkpoint's epoch
            if cut not in checkpoints:
                raise CurveError(f"{trial_dir} reported no epoch with {cut}")
            rows = [r for r in rows if r["epoch"] <= checkpoints[cut]]
        if planned is None:
            planned = cfg.epochs * cfg.epoch_samples
        parts.append(pd.DataFrame(
            [{"epoch": r["epoch"], "samples": r["epoch"] * cfg.epoch_samples,
              "val_mse": r.get("val_mse"), "train_loss": r.get("train_loss"),
              "lr": r.get("lr"), "samples_per_s": r.get("samples_per_s"),
              "run": trial_dir.parent.name} for r in rows], columns=COLUMNS))
        source = source_of(trial_dir, config)
        trial_dir, cut = source if source else (None, None)
    return pd.concat(parts[::-1], ignore_index=True), planned


def probe_scores(text: str) -> list[tuple[int, float]]:
    """(epoch, annealed val MSE) of each probe in anneal_forecast.py's output: a score
    belongs to the nearest epoch line above it; a probe cut short has none."""
    epochs = [(m.start(), int(m.group(1))) for m in PROBE_EPOCH.finditer(text)]
    scores = []
    for m in PROBE_SCORE.finditer(text):
        above = [epoch for at, epoch in epochs if at < m.start()]
        if above:
            scores.append((above[-1], float(m.group(1))))
    return scores


def annealed_points(path: Path, history: pd.DataFrame) -> pd.DataFrame:
    """The probes of the epochs on the curve, at their samples."""
    try:
        scores = probe_scores(path.read_text())
    except (OSError, ValueError) as e:
        raise CurveError(f"--probes {path}: {e}") from None
    samples = dict(zip(history["epoch"], history["samples"], strict=True))
    return pd.DataFrame([{"samples": samples[e], "val_mse": v} for e, v in scores
                         if e in samples], columns=["samples", "val_mse"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("trial", type=Path, help="a trial's folder: <storage>/<name>/trial_...")
    parser.add_argument("--out", type=Path, help="the PNG; default curve.png in the trial")
    parser.add_argument("--probes", type=Path,
                        help="bench/anneal_forecast.py's output for the run's checkpoints")
    args = parser.parse_args(argv)
    out = args.out or args.trial / "curve.png"
    try:
        history, planned = chain_history(args.trial)
        if history.empty:
            raise CurveError(f"{args.trial} has reported no epoch yet")
        annealed = annealed_points(args.probes, history) if args.probes else None
    except CurveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runs = list(dict.fromkeys(history["run"]))
    trial = args.trial.resolve()
    title = f"{trial.parent.parent.name}/{trial.parent.name}"
    if len(runs) > 1:
        title += ", and the runs before it"
    try:
        write_csv(history, out.with_suffix(".csv"))
        plot_curve(history, planned, out, title=title, annealed=annealed)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    probes = f", annealed probes: {len(annealed)}" if annealed is not None else ""
    print(f"{len(history)} epochs ({' -> '.join(runs)}){probes}, "
          f"{history['samples'].iloc[-1]:,} of {planned:,} samples -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
