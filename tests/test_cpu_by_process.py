"""bench/cpu_by_process.py: a command's CPU time by kind of process, read from /proc."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # bench/ holds scripts, not an installed package
from bench.cpu_by_process import kind_of  # noqa: E402

# A child that burns 1.2 s of CPU under a name the table knows, then idles for a read or
# two (a process's last half second is not seen); the command exits 3 (passed on).
BUSY = ("import time\nend = time.process_time() + 1.2\n"
        "while time.process_time() < end: pass\ntime.sleep(1.2)\n")
# The child's path is put together in the parent, so that the parent's own command line
# does not name it (it would count as one too).
PARENT = ("import subprocess, sys\n"
          "subprocess.run([sys.executable, sys.argv[1] + '/sweep/' + 'train.py'], check=True)\n"
          "sys.exit(3)\n")


def test_a_childs_cpu_is_counted_under_its_kind_and_the_exit_code_passed_on(tmp_path):
    child = tmp_path / "sweep" / "train.py"
    child.parent.mkdir()
    child.write_text(BUSY)
    result = subprocess.run([sys.executable, str(REPO / "bench" / "cpu_by_process.py"), "--",
                             sys.executable, "-c", PARENT, str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr
    row = re.search(r"^ +(\d+\.\d) +(\d+)  sweep/train\.py$", result.stdout, re.M)
    assert row, result.stdout
    assert 1.1 <= float(row[1]) <= 2.0 and row[2] == "1", result.stdout
    assert re.search(r"total; wall \d+ s on \d+ cores; the machine \d+% busy", result.stdout)


def test_ray_processes_are_told_apart_by_their_command_lines():
    site = "/venv/lib/python3.11/site-packages/ray"
    assert kind_of(f"{site}/_private/log_monitor.py --session-dir=/tmp/ray") == \
        "Ray log monitor"
    assert kind_of(f"python -u {site}/autoscaler/_private/monitor.py --logs-dir=x") == \
        "Ray autoscaler monitor"
    assert kind_of("ray::IDLE") == "Ray worker, idle"
    assert kind_of("ray::ImplicitFunc.train") == "Ray worker running a task or actor (trials)"
    assert kind_of(f"{site}/core/src/ray/raylet/raylet --raylet_socket_name=x") == "Ray raylet"
    assert kind_of("/usr/bin/python3 -u -c import sys;exec(eval(sys.stdin.readline()))") == \
        "pytest-xdist workers"
    assert kind_of("/bin/sleep 5") == "other: sleep"


def test_without_a_command_it_says_so_and_exits_2():
    result = subprocess.run([sys.executable, str(REPO / "bench" / "cpu_by_process.py")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "give the command to run after --" in result.stderr
