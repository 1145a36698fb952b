"""Fill and verify the image cache: python data/fetch.py [--cache-dir DIR] [--refresh] ..."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

if __package__ in (None, ""):  # run as a script: this checkout's modules, installed or not
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.sources import DataError, Images, default_cache_dir, load_images, sha256


class _UsageError(Exception):
    """A bad command line, reported like a DataError instead of argparse's exit."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line; raises _UsageError on a bad one."""
    parser = _Parser(description="Load MNIST and Fashion-MNIST, verify them, fill the cache.",
                     allow_abbrev=False)
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"cache root (default: $UNET_SWEEP_CACHE or {default_cache_dir()})",
    )
    parser.add_argument("--mnist-dir", type=Path, help="directory holding the MNIST IDX files")
    parser.add_argument("--fashion-dir", type=Path, help="same, for Fashion-MNIST")
    parser.add_argument("--refresh", action="store_true", help="ignore and rewrite the cache")
    return parser.parse_args(argv)


def describe(images: Images) -> str:
    """One line: name, source, shapes and the first 16 hex digits of each split's SHA-256."""
    splits = "  ".join(
        f"{split} {arr.shape} sha256 {sha256(arr)[:16]}"
        for split, arr in (("train", images.train), ("test", images.test))
    )
    return f"{images.name:<13}  {splits}  from {images.source}"


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; 0 on success, 2 with a one-line `error: ...` on stderr otherwise."""
    try:
        args = parse_args(argv)
        idx_dirs = {"mnist": args.mnist_dir, "fashion-mnist": args.fashion_dir}
        for name, idx_dir in idx_dirs.items():
            images = load_images(name, idx_dir, args.cache_dir, refresh=args.refresh)
            print(describe(images), flush=True)
    except (DataError, _UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
