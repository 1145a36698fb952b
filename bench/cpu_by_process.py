"""Where a command's CPU time goes, by kind of process: Ray's daemons, trial workers,
drivers, train.py runs, pytest's workers.

    python bench/cpu_by_process.py -- make test
    python bench/cpu_by_process.py -- python sweep/run.py --trials 4

Runs the command and reads every process's CPU time from /proc twice a second until the
command ends; a process counts if it started after the command did (its children, the
Ray processes they start, and anything else the machine started meanwhile). What a
process spends in its last half second is missed. Prints CPU-seconds per kind, the wall
time and how busy the cores were. Linux only.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# The first pattern found in a process's command line names its kind; order matters
# ("monitor.py" is also the end of "log_monitor.py", "ray::" the start of "ray::IDLE").
KINDS = (
    ("gcs_server", "Ray GCS"),
    ("raylet", "Ray raylet"),
    ("log_monitor", "Ray log monitor"),
    ("monitor.py", "Ray autoscaler monitor"),
    ("dashboard.py", "Ray dashboard (API server)"),
    ("DashboardAgent", "Ray dashboard agent"),
    ("RuntimeEnvAgent", "Ray runtime-env agent"),
    ("ray::IDLE", "Ray worker, idle"),
    ("ray::", "Ray worker running a task or actor (trials)"),
    ("default_worker.py", "Ray worker, starting"),
    ("sweep/run.py", "driver (sweep/run.py)"),
    ("sweep/train.py", "sweep/train.py"),
    ("sweep/evaluate.py", "sweep/evaluate.py"),
    ("bench/", "bench scripts"),
    ("exec(eval(sys.stdin", "pytest-xdist workers"),
    ("pytest", "pytest"),
    ("moto.server", "S3 server (moto)"),
    ("optuna-dashboard", "optuna-dashboard"),
)
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Seen:
    cpu: float  # seconds, user + system, at the last read
    kind: str  # from the command line at the last read (a Ray worker changes its name)


def kind_of(command: str) -> str:
    return next((kind for pattern, kind in KINDS if pattern in command),
                f"other: {Path(command.split()[0]).name}")


def read_process(pid: str) -> tuple[int, float, str] | None:
    """(start time in ticks since boot, CPU seconds, command line), or None if it is gone
    or is a kernel thread (no command line)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace").strip()
    except OSError:
        return None
    if not command:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after the name, which may hold spaces
    return int(fields[19]), (int(fields[11]) + int(fields[12])) / TICKS, command


def ticks_since_boot() -> int:
    return int(float(Path("/proc/uptime").read_text().split()[0]) * TICKS)


def sample(after: int, seen: dict[int, Seen]) -> None:
    """One read of every process that started at or after tick `after`."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        read = read_process(pid)
        if read and read[0] >= after:
            seen[int(pid)] = Seen(read[1], kind_of(read[2]))


def cpu_times() -> list[int]:
    """The machine's CPU ticks so far: user, nice, system, idle, ..."""
    return [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]


def table(seen: dict[int, Seen]) -> list[tuple[str, float, int]]:
    """(kind, CPU seconds, processes), the costliest kind first."""
    cpu, count = Counter(), Counter()
    for s in seen.values():
        cpu[s.kind] += s.cpu
        count[s.kind] += 1
    return [(kind, seconds, count[kind]) for kind, seconds in cpu.most_common()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="the command to run, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    start, machine_before, began = ticks_since_boot(), cpu_times(), time.monotonic()
    seen: dict[int, Seen] = {}
    try:
        proc = subprocess.Popen(command)
    except OSError as e:
        print(f"cpu_by_process: cannot run {command[0]}: {e.strerror}", file=sys.stderr)
        return 2
    try:
        while proc.poll() is None:
            sample(start, seen)
            time.sleep(0.5)
    except KeyboardInterrupt:  # the command got the Ctrl-C too: let it end, then report
        proc.wait()
    wall = time.monotonic() - began
    machine = [b - a for a, b in zip(machine_before, cpu_times(), strict=True)]
    rows = table(seen)
    print(f"\n{'CPU s':>9}  {'procs':>5}  kind")
    for kind, seconds, count in rows:
        print(f"{seconds:9.1f}  {count:5d}  {kind}")
    total = sum(seconds for _, seconds, _ in rows)
    user, nice, system, idle = (ticks / sum(machine) for ticks in machine[:4])
    print(f"{total:9.1f}  total; wall {wall:.0f} s on {os.cpu_count()} cores; the machine "
          f"{1 - idle:.0%} busy (user {user:.0%}, niced {nice:.0%}, system {system:.0%})")
    return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode  # as a shell


if __name__ == "__main__":
    sys.exit(main())
