"""Shared fixtures: one data cache per session, filled once from the real sources.

Every test (and every subprocess a test starts) finds the images through $UNET_SWEEP_CACHE,
which points at a temporary directory here, never at the user's ~/.cache.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data.mixture import Sources, load_sources
from data.sources import load_fashion_mnist, load_mnist

torch.set_num_threads(1)  # the test machine is small and shared


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """$UNET_SWEEP_CACHE -> a session cache, filled once from the real sources.

    Matplotlib's font cache (evaluate.py draws a PNG) goes to the session too, not ~/.cache.
    Every Ray the tests start (in process, in a driver they start, a test cluster's nodes)
    starts no idle workers ahead of its first driver: Tune's trials never take them (they
    are started afresh for the trials' actors, and the idle ones killed as they come), so
    each of the suite's ~40 Ray start-ups spent a worker's start-up per CPU, up to two, on
    nothing, on the 2 cores its own start-up needs.
    """
    cache = tmp_path_factory.mktemp("unet-sweep-cache")
    load_mnist(cache_dir=cache)
    load_fashion_mnist(cache_dir=cache)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UNET_SWEEP_CACHE", str(cache))
        mp.setenv("MPLCONFIGDIR", str(tmp_path_factory.mktemp("matplotlib")))
        mp.setenv("RAY_prestart_worker_first_driver", "0")
        yield cache


@pytest.fixture(scope="session")
def sources(data_cache: Path) -> Sources:
    """Both datasets, padded and split, on the CPU (from the session cache)."""
    return load_sources("cpu", cache_dir=data_cache)


def pytest_configure(config: pytest.Config) -> None:
    """`make test` runs two tests at a time (pytest-xdist, --dist loadgroup); a module whose
    fixture runs a sweep or a server is one xdist_group, so that it runs once, on one
    worker. xdist groups by a suffix it writes into each item's nodeid, which pytest 9.2
    no longer takes (pytest-dev/pytest-xdist#1386): the groups then split silently and
    those fixtures run on both workers. Refused instead (pyproject.toml pins pytest)."""
    if config.getoption("dist", "no") == "loadgroup" and pytest.version_tuple[:2] >= (9, 2):
        raise pytest.UsageError(
            f"pytest {pytest.__version__} ignores xdist_group marks, so --dist loadgroup "
            "would split the modules grouped for one worker (pytest-dev/pytest-xdist#1386): "
            "install pytest<9.2 (`make setup` does)")
