"""Score a checkpoint on the task's test protocol and draw a few separations.

    python sweep/evaluate.py CHECKPOINT [--pairs 20000] [--png separation.png]
    python sweep/evaluate.py CHECKPOINT --first-seed 100   # ten other test sets

Test MSE over 10 seeded sets of 20,000 test pairs (the protocol every published score
uses), computed in fp32 on every machine, printed as mean and std, and on the full protocol
kept beside the checkpoint in test_score.json (front.py reads it); the PNG shows mixture,
true and predicted components. A score near a line is worth scoring on other sets too
(--first-seed): which ten sets are drawn moves it by about 1% (docs/protocol.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script from a plain checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.mixture import load_sources
from data.sources import DataError
from model.unet import ConfigError
from sweep import storage
from sweep.checkpoint import (
    CHECKPOINT_FILE,
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
)
from sweep.device import choose_fast_path, pick_device
from sweep.files import atomic_write
from sweep.plots import plot_separations
from sweep.scoring import (
    SCORE_FILE,
    SCORED_IN,
    TEST_PAIRS,
    TEST_SEEDS,
    separation_rows,
    test_score,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("checkpoint", help="checkpoint.pt or its directory, or its URI in "
                        "object storage (s3://...: scored from a local copy, beside which the "
                        "PNG goes)")
    parser.add_argument("--pairs", type=int, default=TEST_PAIRS,
                        help="pairs per test set (default %(default)s, the protocol)")
    parser.add_argument("--png", type=Path, default=None,
                        help="separation grid (default: separation.png beside the checkpoint)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--first-seed", type=int, default=TEST_SEEDS[0],
                        help="score the sets seeded FIRST to FIRST+9 instead of the "
                             "protocol's (%(default)s-9); not kept in " + SCORE_FILE)
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error(f"--pairs must be >= 1, got {args.pairs}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    if args.first_seed < 0:
        parser.error(f"--first-seed must be >= 0, got {args.first_seed}")
    seeds = tuple(range(args.first_seed, args.first_seed + len(TEST_SEEDS)))
    if args.png and args.png.is_dir():  # found now, not after minutes of scoring
        parser.error(f"--png {args.png} is a directory; give a file path")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        args.checkpoint = local_copy(args.checkpoint)
        state = load_checkpoint(args.checkpoint)
        fast = choose_fast_path(pick_device())
        model = model_from_checkpoint(state, fast.device)
        mixture = state["model_config"]["mixture"]
        sources = load_sources(fast.device)
    except (CheckpointError, ConfigError, DataError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.checkpoint}: epoch {state['epoch']}, {params} params, mixture {mixture}")
    start = time.perf_counter()
    mean, std = test_score(model, sources.test, mixture, fast, args.pairs, seeds)
    other = "" if seeds == TEST_SEEDS else f", seeded {seeds[0]}-{seeds[-1]}, not the protocol's"
    print(f"test_mse: {mean:.4e} ± {std:.1e} (in {SCORED_IN}; std over {len(seeds)} sets of "
          f"{args.pairs} pairs{other}; {time.perf_counter() - start:.0f}s)")
    beside = args.checkpoint if args.checkpoint.is_dir() else args.checkpoint.parent
    if args.pairs == TEST_PAIRS and seeds == TEST_SEEDS:  # the protocol's: front.py reads it
        record = {"test_mse_mean": mean, "test_mse_std": std, "test_pairs": args.pairs,
                  "scored_in": SCORED_IN, "scored_on": cpu_name(),
                  "date": time.strftime("%Y-%m-%d", time.gmtime())}
        try:
            atomic_write(beside / SCORE_FILE,
                         lambda f: f.write(json.dumps(record, indent=1).encode()))
            print(f"score: {beside / SCORE_FILE}")
        except OSError as e:  # the score is printed above
            print(f"error: {e}", file=sys.stderr)
            return 1
    png = args.png or beside / "separation.png"
    rows = separation_rows(model, sources.test, mixture, fast, n=6)
    try:
        plot_separations(rows, png, f"{params:,} params, test MSE {mean:.2e}")
    except OSError as e:  # the score is printed above; only the picture is missing
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"png: {png}")
    return 0


def cpu_name() -> str:
    """This machine's CPU model, as /proc/cpuinfo names it (else the architecture)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def local_copy(checkpoint: str) -> Path:
    """The checkpoint file on this disk: a local path as it is, an object's copy."""
    if not storage.is_uri(checkpoint):
        return Path(checkpoint)
    if not checkpoint.endswith(".pt"):  # its directory, as for a local one
        checkpoint = storage.join(checkpoint, CHECKPOINT_FILE)
    try:
        return storage.download_file(checkpoint)
    except Exception as e:  # noqa: BLE001 - pyarrow's errors: missing, unreachable, denied
        reason = "no such checkpoint" if isinstance(e, FileNotFoundError) else storage.why(e)
        raise storage.StorageError(f"{checkpoint}: {reason}") from None


if __name__ == "__main__":
    sys.exit(main())
