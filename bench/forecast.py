"""How many training samples would a design need to reach each target? A forecast from
finished runs.

    python bench/forecast.py results/2026-11-26-long-small/checkpoint.pt \\
        results/2026-12-02-sweep400k/experiment/trial_c06f7047/checkpoint_000007/checkpoint.pt \\
        --out results/forecast.png

Each checkpoint is a run that ended its learning-rate schedule (one that did not is left
out, said so): its val MSE at the end, after N training samples. Runs of one design (the
same model config) at different lengths give that design's power law, val MSE = a N^-b,
through their end points in log-log. Carried on, it gives the N at which the design
reaches each target, on test MSE: the val target is the test target over the test/val
ratio of the design's longest run scored on the full protocol. Learning curves flatten
as they go, so a fit through short and long runs is the optimistic bound; `--late-b`
adds the forecast at a late rate measured otherwise (the annealed probes of a long run,
bench/anneal_forecast.py). Hours are at the samples/s of the design's longest run, on
the machine it ran on.

The plot: each run's val curve (thin), its end (a dot), each fit (dashed), the targets.
Ends with `samples_to_3.6e-04: N`, the fewest samples a design within 368,421 parameters
needs for target 1 by its fit.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a plain checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd

from model.unet import UNetConfig
from sweep.checkpoint import CheckpointError, load_checkpoint, samples_trained
from sweep.curve import CurveError, chain_history
from sweep.plots import new_figure, save_png
from sweep.scoring import TEST_PAIRS

# The targets of the front: (largest size in parameters, test MSE to beat, name).
TARGETS = [(157_410, 4.9e-4, "<= 157,410 params: 4.9e-4"),
           (368_421, 3.6e-4, "<= 368,421 params: 3.6e-4"),
           (8_272_130, 3.0e-4, "<= 8.27M params: 3.0e-4")]


@dataclass(frozen=True)
class RunEnd:
    path: Path
    model: UNetConfig
    params: int
    samples: int  # training samples its schedule ran over
    val_mse: float
    test_mse: float | None  # on the full protocol only
    samples_per_s: float
    curve: pd.DataFrame = field(compare=False)  # samples, val_mse per epoch


def learning_curve(path: Path, state: dict) -> pd.DataFrame:
    """Per epoch: samples seen and val MSE, from train.py's checkpoint history or, for a
    sweep trial's checkpoint, its trial's reports and those of the runs it went on from."""
    if state.get("history"):
        return pd.DataFrame(state["history"])[["samples", "val_mse"]]
    try:
        history, _ = chain_history(path.parent.parent)
    except CurveError:  # a checkpoint copied out of its trial: no curve, only its end
        return pd.DataFrame({"samples": [], "val_mse": []})
    return history[["samples", "val_mse"]]


def run_end(path: Path) -> RunEnd | None:
    """The run's end point, or None if its schedule has not ended."""
    state = load_checkpoint(path)
    train, metrics = state["train_config"], state["metrics"]
    if state["epoch"] < train["epochs"]:
        return None
    full = metrics.get("test_pairs", 0) >= TEST_PAIRS
    return RunEnd(path, UNetConfig.from_dict(state["model_config"]), int(metrics["params"]),
                  samples_trained(state), float(metrics["val_mse"]),
                  float(metrics["test_mse_mean"]) if full else None,
                  float(metrics["samples_per_s"]),
                  learning_curve(path, state))


def fit_power_law(samples: list[int], mse: list[float]) -> tuple[float, float]:
    """(a, b) of mse = a * samples**-b, least squares in log-log."""
    slope, intercept = np.polyfit(np.log(samples), np.log(mse), 1)
    return math.exp(intercept), -slope


def samples_to(a: float, b: float, mse: float) -> float:
    return (a / mse) ** (1 / b) if b > 0 else math.inf


def describe(model: UNetConfig) -> str:
    text = (f"base {model.base_filters}, depth {model.depth}, "
            f"{model.enc_convs}+{model.dec_convs} convs, {model.block}")
    return text + (f", decoder x{model.decoder_width_mult}"
                   if model.decoder_width_mult > 1 else "")


@dataclass
class Forecast:
    label: str
    runs: list[RunEnd]  # by length
    b: float
    a: float
    test_over_val: float

    def samples_for(self, test_target: float, b: float | None = None) -> float:
        """Samples to reach a test MSE: from the fit, or at rate b from the longest run."""
        val_target = test_target / self.test_over_val
        if b is None:
            return samples_to(self.a, self.b, val_target)
        longest = self.runs[-1]
        return longest.samples * (longest.val_mse / val_target) ** (1 / b)


def forecasts(ends: list[RunEnd]) -> list[Forecast]:
    """One per design with finished runs at two lengths or more."""
    out = []
    for model in dict.fromkeys(end.model for end in ends):
        runs = sorted((e for e in ends if e.model == model), key=lambda e: e.samples)
        if len({e.samples for e in runs}) < 2:
            continue
        a, b = fit_power_law([e.samples for e in runs], [e.val_mse for e in runs])
        tested = [e for e in runs if e.test_mse is not None]
        ratio = tested[-1].test_mse / tested[-1].val_mse if tested else 1.0
        out.append(Forecast(f"{describe(model)} ({runs[0].params:,})", runs, b, a, ratio))
    return out


def table(found: list[Forecast], late_b: float | None, rate: float | None) -> str:
    lines = ["| design | runs (samples: val MSE) | test/val | b | target | samples needed "
             "| samples/s | hours |", "|---|---|---:|---:|---|---:|---:|---:|"]
    for f in found:
        runs = ", ".join(f"{e.samples / 1e6:.2g}M: {e.val_mse:.3e}" for e in f.runs)
        speed = rate or f.runs[-1].samples_per_s
        rates = [(None, f"{f.b:.3f} (fit)")] + ([(late_b, f"{late_b:g} (late)")] if late_b else [])
        for size, target, name in TARGETS:
            if f.runs[0].params > size:  # the target is for smaller models
                continue
            for b, how in rates:
                n = f.samples_for(target, b)
                lines.append(f"| {f.label} | {runs} | {f.test_over_val:.3f} | {how} | {name} "
                             f"| {n / 1e6:,.0f}M | {speed:,.0f} | {n / speed / 3600:,.0f} |")
    return "\n".join(lines) + "\n"


def plot(ends: list[RunEnd], found: list[Forecast], late_b: float | None,
         path: Path) -> None:
    fig, ax = new_figure(figsize=(9, 5))
    colors = {model: f"C{i % 10}" for i, model in enumerate(dict.fromkeys(e.model for e in ends))}
    for e in ends:
        ax.plot(e.curve["samples"], e.curve["val_mse"], c=colors[e.model], lw=0.8, alpha=0.5)
        ax.scatter([e.samples], [e.val_mse], c=colors[e.model], s=30, zorder=3)
    right = 3e8
    for f in found:
        xs = np.geomspace(f.runs[0].samples, right, 50)
        ax.plot(xs, f.a * xs ** -f.b, ls="--", c=colors[f.runs[0].model],
                label=f"{f.label}: val ~ N^-{f.b:.2f}")
        if late_b:
            longest = f.runs[-1]
            xs = np.geomspace(longest.samples, right, 50)
            ax.plot(xs, longest.val_mse * (xs / longest.samples) ** -late_b, ls=":",
                    c=colors[longest.model], label=f"  from its longest run at N^-{late_b:g}")
    for _, target, name in TARGETS:
        ax.axhline(target, c="tab:red", lw=0.8, ls=":")
        ax.annotate(f"target {name} (test)", (0.01, target), xycoords=("axes fraction", "data"),
                    xytext=(0, 2), textcoords="offset points", fontsize=7, color="tab:red")
    ax.set(xscale="log", yscale="log", xlim=(5e4, right), xlabel="training samples",
           ylabel="val MSE", title="Finished runs' ends and their power laws, carried on")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    save_png(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--late-b", type=float, default=None,
                        help="a late rate of the power law measured otherwise; each design's "
                             "forecast is carried on from its longest run at it too")
    parser.add_argument("--samples-per-s", type=float, default=None,
                        help="training speed the hours are at, e.g. bench/train_throughput.py's "
                             "on the machine that would run it (default: each design's "
                             "longest run's own)")
    parser.add_argument("--out", type=Path, default=Path("forecast.png"))
    args = parser.parse_args(argv)
    for name in ("late_b", "samples_per_s"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {value}")
    ends = []
    for path in args.checkpoints:
        try:
            end = run_end(path)
        except CheckpointError as e:  # its message names the file
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyError as e:
            print(f"error: {path}: no {e} in it", file=sys.stderr)
            return 2
        if end is None:
            print(f"{path}: its schedule has not ended; left out")
        else:
            ends.append(end)
    found = forecasts(ends)
    if not found:
        print("error: no design has finished runs of two lengths", file=sys.stderr)
        return 2
    print(table(found, args.late_b, args.samples_per_s), end="")
    plot(ends, found, args.late_b, args.out)
    print(f"plot: {args.out}")
    # The headline: the fewest samples any design within target 1's size needs, by its fit.
    size, target, _ = TARGETS[1]
    fewest = min((f.samples_for(target) for f in found if f.runs[0].params <= size),
                 default=math.nan)
    print(f"samples_to_{target:.1e}: {fewest:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
