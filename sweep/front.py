"""Our models against the published points: which of those points one of ours dominates.

    python sweep/front.py results/*/checkpoint.pt results/*/*/checkpoint.pt --out results/front.md

A plot of the same goes beside the table: front.png beside front.md.

A model counts when its checkpoint holds a test score on the full protocol (10 sets of
20,000 pairs); a published point is dominated by one of ours with fewer or equal
parameters and a lower test MSE. The table lists every published point, and for each the
smallest of our models that dominates it (or our best one within its size, and by how
much it misses).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a plain checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweep.checkpoint import CheckpointError, load_checkpoint, samples_trained
from sweep.files import atomic_write
from sweep.plots import plot_front
from sweep.scoring import PUBLISHED, SCORE_FILE, TEST_PAIRS


@dataclass(frozen=True)
class Point:
    name: str  # a published solution's label, or our checkpoint's path
    params: int
    test_mse: float
    test_std: float = float("nan")
    samples: int = 0  # training samples seen (ours)
    scored_in: str = ""  # ours: "fp32", or "" for a score from before it was kept


def our_point(path: Path) -> Point | None:
    """A checkpoint's model as a point, if it was scored on the full test protocol: by
    evaluate.py (SCORE_FILE beside it, in fp32), else as the checkpoint's metrics hold it."""
    state = load_checkpoint(path)
    metrics = state["metrics"]
    if (score := path.with_name(SCORE_FILE)).exists():
        metrics = {**metrics, **json.loads(score.read_text())}
    if metrics.get("test_pairs", 0) < TEST_PAIRS:
        return None
    return Point(str(path), int(metrics["params"]), float(metrics["test_mse_mean"]),
                 float(metrics["test_mse_std"]), samples_trained(state),
                 metrics.get("scored_in", ""))


def dominates(ours: Point, theirs: Point) -> bool:
    return ours.params <= theirs.params and ours.test_mse < theirs.test_mse


def front_rows(ours: list[Point], published: list[Point]) -> list[dict]:
    """Per published point: the smallest of ours that dominates it, else our best within
    its size (None if we have none that small)."""
    rows = []
    for theirs in published:
        winners = sorted((p for p in ours if dominates(p, theirs)), key=lambda p: p.params)
        within = sorted((p for p in ours if p.params <= theirs.params),
                        key=lambda p: p.test_mse)
        best = winners[0] if winners else (within[0] if within else None)
        rows.append({"published": theirs, "ours": best, "dominated": bool(winners)})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| published solution | params | test MSE | dominated by ours | our model | "
             "params | test MSE | trained on |",
             "|---|---:|---:|---|---|---:|---:|---:|"]
    for row in rows:
        theirs, ours = row["published"], row["ours"]
        left = f"| {theirs.name} | {theirs.params:,} | {theirs.test_mse:.2e} |"
        if ours is None:
            lines.append(f"{left} no | none this small | | | |")
            continue
        verdict = "**yes**" if row["dominated"] else \
            f"no ({ours.test_mse / theirs.test_mse - 1:+.0%} MSE)"
        lines.append(f"{left} {verdict} | `{ours.name}` | {ours.params:,} | "
                     f"{ours.test_mse:.3e} ± {ours.test_std:.1e}"
                     f"{f' ({ours.scored_in})' if ours.scored_in else ''} | "
                     f"{ours.samples / 1e6:.1f}M samples |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("checkpoints", nargs="+", type=Path,
                        help="checkpoint files of our models (those without a full-protocol "
                             "test score are left out)")
    parser.add_argument("--out", type=Path, default=Path("results/front.md"))
    args = parser.parse_args(argv)
    if args.out.is_dir():
        parser.error(f"--out {args.out} is a directory; give a file path")
    try:
        points = [our_point(path) for path in args.checkpoints]
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ours = [p for p in points if p is not None]
    published = [Point(label, params, mse) for label, params, mse in PUBLISHED]
    rows = front_rows(ours, published)
    table = markdown(rows)
    png = args.out.with_suffix(".png")
    try:
        atomic_write(args.out, lambda f: f.write(table.encode()))
        plot_front([(p.params, p.test_mse) for p in ours],
                   [(r["published"].name, r["published"].params, r["published"].test_mse,
                     r["dominated"]) for r in rows], png)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(table, end="")
    print(f"{sum(r['dominated'] for r in rows)} of {len(rows)} published points dominated, "
          f"from {len(ours)} of our models -> {args.out}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
