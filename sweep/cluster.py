"""Ray for a sweep: one of its own on this machine, listening on loopback only, or a
cluster joined with --address; and what fits there: a trial's resources, how many trials
at once."""

from __future__ import annotations

import contextlib
import logging
import math
import os

from sweep.config import SweepConfig, UsageError


def start_ray(c: SweepConfig) -> None:
    import ray
    import torch

    # Ray's start-up lines off the console (its token-authentication notice among them):
    # warnings and errors still show.
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    if c.address:
        ray.init(address=c.address, log_to_driver=False, logging_level=logging.WARNING)
        return
    if c.gpus and not torch.cuda.is_available():
        # Logical GPUs on a CPU machine (for testing the scheduling): ray.init refuses when
        # CUDA_VISIBLE_DEVICES lists fewer devices than declared.
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    with loopback_only():
        # address="local": a Ray of our own, even where someone ran `ray start --head` on
        # this machine; without it ray.init joins theirs (and refuses num_cpus there).
        ray.init(address="local", num_cpus=c.cpus, num_gpus=c.gpus, include_dashboard=False,
                 dashboard_host="127.0.0.1", log_to_driver=False,
                 object_store_memory=200 * 1024**2, logging_level=logging.WARNING)


@contextlib.contextmanager
def loopback_only():
    """Ray's processes listen on the node's address: on Linux the machine's network
    address, on every interface (GCS, raylet, workers, agents; seen with Ray 2.60), unless
    Ray's cluster mode is off. Off, the node address is 127.0.0.1 and every port listens on
    loopback only (tests/test_faults.py checks). A cluster is `ray start` + --address.
    The switch is read when ray is imported, hence the module flag besides the variable
    the processes Ray spawns read."""
    from ray._private import ray_constants

    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved = os.environ.get(name), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[name], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        if saved[0] is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved[0]
        ray_constants.ENABLE_RAY_CLUSTER = saved[1]


def check_fits(c: SweepConfig) -> None:
    """One trial's resources must fit on some node, or Tune waits for them forever (a
    cluster joined with --address; on one machine check() caught it already)."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    cpus = max((n.get("CPU", 0) for n in nodes), default=0)
    gpus = max((n.get("GPU", 0) for n in nodes), default=0)
    if c.cpus_per_trial > cpus:
        raise UsageError(f"--cpus-per-trial {c.cpus_per_trial:g} is more than any node has "
                         f"({cpus:g} CPUs at most)")
    if gpus and c.gpus_per_trial > gpus:
        raise UsageError(f"--gpus-per-trial {c.gpus_per_trial:g} is more than any node has "
                         f"({gpus:g} GPUs at most)")


def concurrency(c: SweepConfig) -> int:
    """How many trials fit at once; Tune also needs it told (Optuna keeps one pending)."""
    import ray

    resources = ray.cluster_resources()
    fits = resources.get("CPU", 1) / c.cpus_per_trial
    if resources.get("GPU"):
        fits = min(fits, resources.get("GPU", 0) / c.gpus_per_trial)
    return max(1, min(c.trials, math.floor(fits + 1e-9)))
