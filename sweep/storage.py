"""Where an experiment is kept: a directory, or object storage (`s3://bucket/prefix`, and the
other URIs pyarrow understands: `gs://`, `hdfs://`, ...).

Ray Tune keeps the experiment there itself (`RunConfig(storage_path=URI)`): checkpoints,
experiment state, results. The few files of ours (the settings a resume is checked against,
TensorBoard images, a fixed-up final state) go through pyarrow.fs, as Tune's do. What needs
a real filesystem stays on the local disk, in `local_dir`: the driver's lock (object stores
have no locks), and the copy of a trial's checkpoints it resumes from. Locations are plain
strings: a directory's absolute path, or the URI as given (its `?query` kept).
"""

from __future__ import annotations

import fnmatch
import posixpath
import shutil
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from data.sources import default_cache_dir
from sweep.files import atomic_write

# pyarrow's filesystem names, back to the URI schemes a user types.
SCHEMES = {"gcs": "gs"}


class StorageError(Exception):
    """Storage that cannot be used: one line naming the location, why, and the fix."""


def is_uri(location: str) -> bool:
    """An object-store URI; `file://` is a directory, and so is anything without `://`."""
    return "://" in location and urlsplit(location).scheme != "file"


def normalize(text: str) -> str:
    """--storage as a location: a URI as given, without a trailing slash; `file://` URIs and
    plain paths as an absolute directory path."""
    if is_uri(text):
        parts = urlsplit(text)
        return urlunsplit(parts._replace(path=parts.path.rstrip("/")))
    if "://" in text:  # file:///abs/path
        text = urlsplit(text).path
    return str(Path(text).expanduser().resolve())


def join(location: str, *names: str) -> str:
    """`location/name/...`; a URI keeps its query (`?endpoint_override=...`) at the end."""
    if not is_uri(location):
        return str(Path(location, *names))
    parts = urlsplit(location)
    return urlunsplit(parts._replace(path=posixpath.join(parts.path or "/", *names)))


def filesystem(location: str):
    """(pyarrow filesystem, path on it: bucket/key for a URI). Made anew each time (a few
    ms): credentials and endpoint are read from the environment then, as Tune reads them."""
    import pyarrow.fs

    if not is_uri(location):
        return pyarrow.fs.LocalFileSystem(), location
    return pyarrow.fs.FileSystem.from_uri(location)


def uri_of(fs, path: str) -> str:
    """A pyarrow (filesystem, path), such as Tune's `Checkpoint.path`, as a location. An
    endpoint given in the --storage URI's query is not in it: use $AWS_ENDPOINT_URL."""
    if fs.type_name == "local":
        return path
    return f"{SCHEMES.get(fs.type_name, fs.type_name)}://{path}"


def local_dir(location: str) -> Path:
    """The local directory for `location`: the directory itself, or for a URI a folder of
    the same name in the cache ($UNET_SWEEP_CACHE/experiments/s3/bucket/prefix/...)."""
    if not is_uri(location):
        return Path(location)
    parts = urlsplit(location)
    return default_cache_dir() / "experiments" / parts.scheme / parts.netloc / \
        parts.path.strip("/")


def exists(location: str) -> bool:
    import pyarrow.fs

    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def names(location: str, pattern: str = "*") -> list[str]:
    """The names in a directory that match `pattern`, sorted; none if it does not exist."""
    import pyarrow.fs

    fs, path = filesystem(location)
    found = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    return sorted(n for n in (posixpath.basename(f.path) for f in found)
                  if fnmatch.fnmatch(n, pattern))


def read_bytes(location: str) -> bytes:
    """The file's bytes; FileNotFoundError if there is none."""
    if not is_uri(location):
        return Path(location).read_bytes()
    if not exists(location):
        raise FileNotFoundError(location)
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(location: str, data: bytes) -> None:
    """Whole or not at all: a directory's file via atomic_write; an object store's PUT only
    makes the object visible once it is complete."""
    if not is_uri(location):
        atomic_write(Path(location), lambda f: f.write(data))
        return
    fs, path = filesystem(location)
    with fs.open_output_stream(path) as f:
        f.write(data)


def remove(location: str) -> None:
    """Delete a file."""
    fs, path = filesystem(location)
    fs.delete_file(path)


def move(location: str, to: str) -> None:
    """Move a directory, into a parent made if missing (an object store has no directories
    to make or rename: copy, then delete)."""
    if not is_uri(location):
        Path(to).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(location, to)
        return
    import pyarrow.fs

    fs, path = filesystem(location)
    _, target = filesystem(to)
    pyarrow.fs.copy_files(path, target, source_filesystem=fs, destination_filesystem=fs,
                          use_threads=False)  # Ray's workaround for uploads (arrow #32372)
    fs.delete_dir(path)


def download(location: str, pattern: str) -> Path:
    """The subdirectories of `location` that match `pattern` (a trial's `checkpoint_*`),
    fresh in local_dir(location), which is returned; a directory is returned as it is.
    Copies left from an earlier download go first: the store is the truth."""
    local = local_dir(location)
    if not is_uri(location):
        return local
    import pyarrow.fs

    fs, path = filesystem(location)
    for old in local.glob(pattern):
        shutil.rmtree(old, ignore_errors=True)
    for name in names(location, pattern):
        (local / name).mkdir(parents=True, exist_ok=True)
        pyarrow.fs.copy_files(posixpath.join(path, name), str(local / name),
                              source_filesystem=fs)
    return local


def download_file(location: str) -> Path:
    """A local copy of one file (a checkpoint for evaluate.py); a local path as it is."""
    if not is_uri(location):
        return Path(location)
    local = local_dir(location)
    atomic_write(local, lambda f: f.write(read_bytes(location)))
    return local


def upload(local: Path, location: str) -> None:
    """Copy a local directory's files to `location` (TensorBoard images of a trial)."""
    if not is_uri(location):
        return
    import pyarrow.fs

    fs, path = filesystem(location)
    fs.create_dir(path)
    pyarrow.fs.copy_files(str(local), path, destination_filesystem=fs, use_threads=False)


def check_usable(location: str) -> None:
    """Reach the object store, find the bucket and write there now, not after an hour of
    training; a StorageError with one line otherwise. A directory is checked by config.py."""
    if not is_uri(location):
        return
    import pyarrow.fs

    bucket = urlsplit(location).netloc
    try:
        fs, path = filesystem(location)
        if fs.get_file_info(bucket).type == pyarrow.fs.FileType.NotFound:
            raise StorageError(f"{location}: there is no bucket {bucket!r}; create it (for "
                               f"S3: aws s3 mb s3://{bucket}) or fix the name")
        probe = posixpath.join(path, ".unet-sweep-write-check")
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow's errors are OSError, ArrowInvalid, ...
        raise StorageError(f"{location}: {why(e)}") from None


def why(e: Exception) -> str:
    """pyarrow's error (the AWS SDK's words) as the cause and the fix, in one line."""
    text = " ".join(str(e).split())
    if "NETWORK_CONNECTION" in text or "connect" in text.lower():
        return ("no object store answers (" + text.rsplit("; ", 1)[-1][:160] + "); check "
                "the endpoint: $AWS_ENDPOINT_URL, or ?endpoint_override= in the URI")
    if any(s in text for s in ("ACCESS_DENIED", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                               "403", "credentials")):
        return ("access denied; check the credentials ($AWS_ACCESS_KEY_ID and "
                "$AWS_SECRET_ACCESS_KEY, or ~/.aws/credentials) and that they may write there")
    if "Unrecognized filesystem type" in text or "Unknown" in text:
        return ("pyarrow cannot open this kind of URI; give a directory, or s3://, gs://, "
                "hdfs:// ...")
    return f"cannot use it ({text[:200]})"


def damaged_snapshot(location: str, pattern: str, experiment: str, e: Exception) -> str:
    """The one line for a snapshot file (named by `pattern`, Tune's <prefix>*<suffix>) that
    is cut short or damaged: a driver killed while Tune copied it into the experiment. Tune
    names all of one snapshot's files by its driver's start time, so the fix moves them all."""
    stamp = snapshot_stamp(location, pattern)
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return (f"{location} is cut short or damaged ({type(e).__name__}: {reason}); the sweep "
            f"cannot resume from it. Move that snapshot's files (*-{stamp}.*) out of "
            f"{experiment} to resume from the one before, or start over with --fresh")


def snapshot_stamp(location: str, pattern: str) -> str:
    """The driver start time that names a snapshot file (`pattern`: <prefix>*<suffix>)."""
    prefix, _, suffix = pattern.partition("*")
    return location.rsplit("/", 1)[-1].removeprefix(prefix).removesuffix(suffix)


def sibling(location: str, name: str) -> str:
    """The location `name` beside `location` (in the same directory or prefix)."""
    if not is_uri(location):
        return str(Path(location).with_name(name))
    parts = urlsplit(location)
    return urlunsplit(parts._replace(path=posixpath.join(posixpath.dirname(parts.path),
                                                         name)))


def relocate_search_state(experiment: str) -> None:
    """Point Tune's pickled search state at where the experiment is now.

    Tune's search generator pickles its Experiment with each snapshot, and with it the
    storage the experiment had when it began. A resumed Tune re-points its restored trials
    at the new place but not that Experiment (Ray 2.60), so a trial it starts after a move
    writes to the old place and fails ("Unable to set up cluster storage"). Rewritten
    whole (write_bytes), only where the place differs."""
    import ray.cloudpickle as cloudpickle

    fs, path = filesystem(experiment)
    parent, name = posixpath.split(path.rstrip("/"))
    # The newest only: Tune restores from it, and an older one may be cut short (a kill
    # while a resumed Tune copied it back into the experiment with a snapshot).
    for snapshot in names(experiment, "search_gen_state-*.json")[-1:]:
        location = join(experiment, snapshot)
        state = cloudpickle.loads(read_bytes(location))
        stored = state["experiment"].storage
        if (stored.storage_fs_path, stored.experiment_dir_name) == (parent, name):
            continue
        stored.storage_filesystem, stored.storage_fs_path = fs, parent
        stored.experiment_dir_name = name
        write_bytes(location, cloudpickle.dumps(state))
