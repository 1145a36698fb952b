"""Figures, where a person would rather look than read: a sweep's MSE against model size
(pareto.png), ours against the published points (front.png), a run's learning curve
(curve.png), a model's separations (evaluate.py's PNG). Written atomically, like the rest."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

from sweep.files import atomic_write
from sweep.scoring import PUBLISHED, TEST_PAIRS

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def new_figure(figsize: tuple[float, float] = (7, 4.5),
               tight: bool = False) -> tuple[Figure, Axes]:
    # matplotlib is imported here, on the first draw: it costs 0.75 s, and Ray workers
    # import this package's trial code without ever drawing. A Figure without pyplot keeps
    # no global state and needs no display.
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="tight" if tight else None)
    if not tight:
        # Fixed margins for the charts: a tight layout measured every tick label, 0.47 s of
        # a 1.1 s draw, while the sweep's driver starts no trial.
        fig.subplots_adjust(left=0.13, right=0.97, bottom=0.12, top=0.92)
    return fig, fig.subplots()


def save_png(fig: Figure, path: Path, dpi: int = 110) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def plot_pareto(df: pd.DataFrame, path: Path) -> None:
    """val MSE (and test MSE where scored) against parameters, log-log, front drawn. Test
    scores on the full protocol (the long runs') are drawn apart from the sweep's shorter
    ones, beside the published points, numbered and listed in a box."""
    fig, ax = new_figure(figsize=(10, 5))
    ok = df[df["val_mse"].notna()]
    ax.scatter(ok["params"], ok["val_mse"], s=18, c="tab:blue", alpha=0.5, label="trials (val)")
    front = ok[ok["pareto"]].sort_values("params")
    ax.step(front["params"], front["val_mse"], where="post", c="tab:blue", lw=1.5)
    ax.scatter(front["params"], front["val_mse"], s=40, facecolors="none",
               edgecolors="tab:blue", lw=1.5, label="Pareto front (val)")
    tested = df[df["test_mse_mean"].notna()]
    full = tested["test_pairs"] >= TEST_PAIRS
    if (~full).any():
        ax.scatter(tested.loc[~full, "params"], tested.loc[~full, "test_mse_mean"], s=22,
                   marker="x", c="tab:green", label="trials (test, fewer pairs)")
    if full.any():
        ax.scatter(tested.loc[full, "params"], tested.loc[full, "test_mse_mean"], s=70,
                   marker="D", c="darkgreen", zorder=4, label="ours, full test protocol")
    draw_published(fig, ax, [(*point, False) for point in PUBLISHED], "published (test)")
    ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel="MSE",
           title="Separation MSE against model size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_png(fig, path)


def plot_front(ours: list[tuple[int, float]], published: list[tuple[str, int, float, bool]],
               path: Path) -> None:
    """Our full-protocol test scores (params, test MSE) against the published points
    (label, params, test MSE, dominated by one of ours), log-log, our front drawn: the
    picture of front.md's table."""
    fig, ax = new_figure(figsize=(10, 5))
    front, best = [], float("inf")
    for params, mse in sorted(ours):
        if mse < best:  # no smaller model of ours scores as well: on our front
            front.append((params, mse))
            best = mse
    if front:
        xs, ys = zip(*front, strict=True)
        ax.step(xs, ys, where="post", c="darkgreen", lw=1.2)
    if ours:
        xs, ys = zip(*ours, strict=True)
        ax.scatter(xs, ys, marker="D", s=50, c="darkgreen", zorder=4,
                   label="ours, full test protocol")
    draw_published(fig, ax, published, "published (filled: none of ours beats it)")
    ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel="test MSE",
           title="Ours against the published solutions")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_png(fig, path)


def draw_published(fig, ax, published: list[tuple[str, int, float, bool]], legend: str) -> None:
    """The published points (label, params, test MSE, dominated by one of ours) as numbered
    red stars, hollow where one of ours beats them, listed by number right of the axes."""
    listing = []
    for i, (label, params, mse, dominated) in enumerate(published, start=1):
        ax.scatter([params], [mse], marker="*", s=140, zorder=3,
                   facecolors="none" if dominated else "tab:red", edgecolors="tab:red",
                   label=legend if i == 1 else None)
        ax.annotate(str(i), (params, mse), textcoords="offset points", xytext=(5, 3),
                    fontsize=8, color="tab:red")
        listing.append(f"{i} {label}: {params / 1e6:.3g}M, {mse:.2e}"
                       f"{' (beaten)' if dominated else ''}")
    fig.subplots_adjust(left=0.09, right=0.64)  # the listing goes right of the axes
    ax.text(1.03, 0.0, "published (test MSE)\n" + "\n".join(listing), transform=ax.transAxes,
            fontsize=7, va="bottom", color="tab:red")


def plot_curve(history: pd.DataFrame, planned_samples: int, path: Path,
               title: str = "Learning curve", annealed: pd.DataFrame | None = None) -> None:
    """A run's val MSE and train loss against samples seen, log-log (a power law is a
    line) up to the samples it is planned for, with the published test scores for scale
    and the run's own test score if it has one; `annealed` (samples, val_mse): the
    scores of its checkpoints with the learning rate brought down (anneal_forecast.py)."""
    fig, ax = new_figure()
    ax.set_xlim(history["samples"].min() / 1.3, planned_samples * 1.3)
    ax.plot(history["samples"], history["train_loss"], c="tab:gray", lw=1, label="train loss")
    ax.plot(history["samples"], history["val_mse"], "o-", c="tab:blue", ms=3, lw=1.2,
            label="val MSE")
    if "test_mse_mean" in history and history["test_mse_mean"].notna().any():
        tested = history[history["test_mse_mean"].notna()]
        ax.scatter(tested["samples"], tested["test_mse_mean"], marker="x", s=60, c="tab:green",
                   zorder=3, label="test MSE")
    if annealed is not None and len(annealed):
        ax.scatter(annealed["samples"], annealed["val_mse"], marker="D", s=22, c="tab:orange",
                   zorder=3, label="val MSE, learning rate annealed (probe)")
    # Several published scores lie within 5% of each other: their labels take turns, left
    # and right, so that none covers another; the highest goes left, where a falling curve
    # is still far above it (at the right, a long run's end closes in on it).
    for i, (label, _, mse) in enumerate(sorted(PUBLISHED, key=lambda p: -p[2])):
        ax.axhline(mse, c="tab:red", lw=0.8, ls="--", alpha=0.6)
        ax.annotate(f"{label}: {mse:.2e} (test)", (0.01 + 0.5 * (i % 2), mse),
                    xycoords=("axes fraction", "data"), xytext=(0, 2),
                    textcoords="offset points", fontsize=7, color="tab:red")
    ax.set(xscale="log", yscale="log", xlabel="training samples seen", ylabel="MSE",
           title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    save_png(fig, path)


def plot_separations(rows: torch.Tensor, path: Path, title: str) -> None:
    """Image rows from scoring.separation_rows: mixture, truths, predictions."""
    n = rows.shape[0] // 32
    fig, ax = new_figure(figsize=(7.5, 1.5 * n + 0.6), tight=True)
    ax.imshow(rows.numpy(), cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([32 * i + 16 for i in range(5)],
                  ["mixture", "true digit", "true item", "predicted digit", "predicted item"],
                  fontsize=8)
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    save_png(fig, path, dpi=120)
