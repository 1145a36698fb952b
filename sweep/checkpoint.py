"""Checkpoint files: written atomically, read without executing pickled code."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = "unet-sweep/1"  # refuse checkpoints that are not ours
REQUIRED_KEYS = {"format", "model_config", "train_config", "epoch", "train_seconds", "model",
                 "optimizer", "schedule", "rng", "metrics"}


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and why."""


def atomic_write(path: Path, write) -> None:
    """Call write(file) on a temp file beside `path`, fsync it, then rename over `path`.

    A crash or a full disk leaves the previous `path` intact and no half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(state: dict, path: Path) -> None:
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint with weights_only=True: tensors and plain data, never code."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, disallowed global, ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{path}: unreadable or unsafe checkpoint ({reason})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a unet-sweep checkpoint")
    missing = REQUIRED_KEYS - set(state)
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {sorted(missing)}")
    return state


def load_weights(model: torch.nn.Module, state: dict) -> None:
    """Weights into `model`, or a CheckpointError if they belong to another architecture."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not fit the model: "
                              f"{str(e).splitlines()[0][:200]}") from e
