"""sweep/front.py: which published points our committed models dominate."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import pytest
import torch

from sweep import front
from sweep.checkpoint import load_checkpoint, save_checkpoint
from sweep.front import Point, dominates, front_rows

REPO = Path(__file__).resolve().parents[1]
LONG_SMALL = REPO / "results" / "2026-11-26-long-small" / "checkpoint.pt"
# A long run by the harness (sweep/run.py --from): a trial's checkpoint, which keeps no history.
LONG_117K = (REPO / "results" / "2026-12-02-long-117k" / "experiment" / "trial_3152f_00000"
             / "checkpoint_000039" / "checkpoint.pt")


def test_dominance_needs_no_more_params_and_a_strictly_lower_mse():
    theirs = Point("them", 1000, 4e-4)
    assert dominates(Point("a", 1000, 3.9e-4), theirs)  # equal size is allowed
    assert not dominates(Point("b", 1000, 4e-4), theirs)  # equal MSE is not lower
    assert not dominates(Point("c", 1001, 1e-4), theirs)  # one parameter too many


def test_each_published_point_gets_the_smallest_winner_or_our_best_within_its_size():
    ours = [Point("big", 900, 2e-4), Point("mid", 500, 3e-4), Point("tiny", 100, 9e-4)]
    rows = front_rows(ours, [Point("P", 1000, 3.5e-4), Point("Q", 600, 2.5e-4),
                             Point("R", 50, 1e-3)])
    assert [(r["dominated"], r["ours"] and r["ours"].name) for r in rows] == [
        (True, "mid"),  # mid and big both dominate P: the smaller one is named
        (False, "mid"),  # nothing dominates Q: our best within 600 params, and by how much
        (False, None),  # nothing of ours is that small
    ]
    assert "no (+20% MSE)" in front.markdown(rows)


def test_cli_reads_committed_checkpoints_and_skips_those_without_the_full_protocol(
        tmp_path: Path, capsys):
    short = load_checkpoint(LONG_SMALL)
    short["metrics"] = {**short["metrics"], "test_pairs": 2_000}  # a sweep's shorter score
    save_checkpoint({k: v for k, v in short.items() if k != "format"},
                    tmp_path / "short.pt")
    out = tmp_path / "front.md"
    assert front.main([str(LONG_SMALL), str(tmp_path / "short.pt"), "--out", str(out)]) == 0
    table = out.read_text()
    assert table.count("\n") == 2 + 8  # header, rule, one row per published point
    # the committed long run: 262,822 params, 4.95e-4; the reference 3.68e-4 -> +34%
    assert "| reference (customized U-Net) | 3,684,214 | 3.68e-04 | no (+34% MSE) |" in table
    assert "short.pt" not in table
    assert "0 of 8 published points dominated, from 1 of our models" in capsys.readouterr().out
    # The table's picture beside it: a PNG that decodes whole.
    png = out.with_suffix(".png")
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert matplotlib.image.imread(png).shape[:2] == (550, 1100)  # 10 x 5 in at 110 dpi


def test_a_harness_long_runs_checkpoint_counts_with_the_samples_it_trained_on(
        tmp_path: Path):
    out = tmp_path / "front.md"
    assert front.main([str(LONG_117K), "--out", str(out)]) == 0
    row = out.read_text().splitlines()[-1]  # the smallest published point, 157,410 params
    assert row.startswith("| smallest good one (two-branch) | 157,410 | 4.90e-04 | no (+25% MSE)")
    # The fp32 re-score evaluate.py kept beside the checkpoint (test_score.json), over the
    # 6.119e-4 the run scored itself under bf16 autocast.
    assert row.endswith("| 117,110 | 6.125e-04 ± 3.4e-06 (fp32) | 4.0M samples |")


def test_cli_refuses_a_file_that_is_no_checkpoint(tmp_path: Path, capsys):
    bad = tmp_path / "x.pt"
    torch.save({"weights": 1}, bad)
    assert front.main([str(bad), "--out", str(tmp_path / "f.md")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {bad}: not a unet-sweep checkpoint")
    with pytest.raises(SystemExit):
        front.main([str(LONG_SMALL), "--out", str(tmp_path)])
