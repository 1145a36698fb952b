"""Tables written whole or not at all (report.csv, metrics.csv), and `atomic_write` itself,
which lives in data/files.py: the data cache, a layer below, uses it too."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from data.files import atomic_write, process_alive, remove_stale_temps

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["atomic_write", "process_alive", "remove_stale_temps", "write_csv"]


def write_csv(df: pd.DataFrame, path: Path) -> None:
    """A table (report.csv, metrics.csv) written whole or not at all."""
    atomic_write(path, lambda f: f.write(df.to_csv(index=False).encode()))
