"""Files written whole or not at all: a crash, a kill or a full disk leaves the previous
version, never half of one. Checkpoints, reports, plots and the data cache all go through
`atomic_write`. Here, in the lowest layer, because the data cache uses it (sweep/files.py
adds the tables); no torch: the data cache uses it before torch is needed."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

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
