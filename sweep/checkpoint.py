"""Checkpoint files: written atomically, read without executing pickled code."""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from model.unet import UNet, UNetConfig
from sweep.files import atomic_write

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = "unet-sweep/1"  # refuse checkpoints that are not ours
REQUIRED_KEYS = {"format", "model_config", "train_config", "epoch", "train_seconds", "model",
                 "optimizer", "schedule", "rng", "metrics"}


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and why."""


def save_checkpoint(state: dict, path: Path) -> None:
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint with weights_only=True: tensors and plain data, never code."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    check_crcs(path)
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


def check_crcs(path: Path) -> None:
    """torch.load reads an altered tensor silently (seen with torch 2.13); the zip archive
    torch.save writes has a CRC-32 per record, so check them all; a file that is no zip
    archive (a text file, torch's legacy pickle format) was not written by save_checkpoint.
    CRCs catch damage, not forgery: safety is weights_only."""
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: unreadable or unsafe checkpoint (not the zip archive "
                              "torch.save writes: is it a checkpoint.pt?)")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: unreadable or unsafe checkpoint ({e})") from e
    if bad is not None:
        raise CheckpointError(f"{path}: unreadable or unsafe checkpoint (record {bad} fails "
                              "its CRC check: the file was altered or damaged)")


def load_weights(model: torch.nn.Module, state: dict) -> None:
    """Weights into `model`, or a CheckpointError if they belong to another architecture."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not fit the model: "
                              f"{str(e).splitlines()[0][:200]}") from e


def model_from_checkpoint(state: dict, device: torch.device) -> UNet:
    """The checkpoint's network with its weights, on `device`, in eval mode."""
    model = UNet(UNetConfig.from_dict(state["model_config"])).to(device)
    load_weights(model, state)
    return model.eval()


def samples_trained(state: dict) -> int:
    """Training samples a checkpoint's model has seen: train.py's checkpoints keep a history
    (whole batches counted); a sweep trial's keeps none, so its epochs times their size."""
    history = state.get("history")
    if history:
        return int(history[-1]["samples"])
    return int(state["epoch"] * state["train_config"]["samples_per_epoch"])
