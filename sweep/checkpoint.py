"""Checkpoint files: written atomically, read without executing pickled code."""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from model.unet import UNet, UNetConfig

if TYPE_CHECKING:
    import pandas as pd

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = "unet-sweep/1"  # refuse checkpoints that are not ours
REQUIRED_KEYS = {"format", "model_config", "train_config", "epoch", "train_seconds", "model",
                 "optimizer", "schedule", "rng", "metrics"}


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and why."""


# Read once, at import: os.umask can only be read by setting it. Files we write get the
# mode a plain open() gives, so reports on shared storage are readable by the team.
UMASK = os.umask(0o022)
os.umask(UMASK)


def atomic_write(path: Path, write) -> None:
    """Call write(file) on a temp file beside `path`, fsync it, then rename over `path`.

    A crash or a full disk leaves the previous `path` intact. The temp file is removed on
    an error; one left by a killed process (its pid is in the name) goes on the next write.
    An OSError (disk full, no permission) names the file and says the old one is unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.",
                               suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~UMASK)  # as open() would make it, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        kept = "the previous file is unchanged" if path.exists() else "nothing was written"
        raise OSError(e.errno, f"could not write {path} ({e.strerror or e}); {kept}") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_csv(df: pd.DataFrame, path: Path) -> None:
    """A table (report.csv, metrics.csv) written whole or not at all."""
    atomic_write(path, lambda f: f.write(df.to_csv(index=False).encode()))


def remove_stale_temps(path: Path) -> None:
    """Delete temp files of `path` whose writer is dead (SIGKILL between write and rename)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


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
    torch.save writes has a CRC-32 per record, so check them all. Files that are no zip are
    left to torch.load to refuse. CRCs catch damage, not forgery: safety is weights_only."""
    if not zipfile.is_zipfile(path):
        return
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
