"""The task's pairs: padded source images, mixtures and fixed evaluation sets.

Images stay uint8 on the training device; a batch is gathered and scaled there, so no
DataLoader worker sits in the hot path (task protocol: pad 28 -> 32, divide by 255).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data.sources import load_fashion_mnist, load_mnist

VAL_FRACTION = 0.1  # held out from each training split, as the reference does


@dataclass(frozen=True)
class Sources:
    """Both datasets' images as uint8 (N, 32, 32) tensors, one pair per split."""

    train: tuple[torch.Tensor, torch.Tensor]  # (MNIST, Fashion-MNIST)
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]


def pad_to_32(images: np.ndarray) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, 32, 32) uint8, zero-padded by 2 pixels on each side."""
    return F.pad(torch.from_numpy(np.ascontiguousarray(images)), (2, 2, 2, 2))


def split_train_val(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The last VAL_FRACTION of the training images are the validation split."""
    n_val = round(len(images) * VAL_FRACTION)
    return images[:-n_val], images[-n_val:]


def load_sources(
    device: torch.device | str = "cpu",
    mnist_dir: Path | None = None,
    fashion_dir: Path | None = None,
    cache_dir: Path | None = None,
) -> Sources:
    mnist = load_mnist(mnist_dir, cache_dir)
    fashion = load_fashion_mnist(fashion_dir, cache_dir)
    m_train, m_val = split_train_val(pad_to_32(mnist.train))
    f_train, f_val = split_train_val(pad_to_32(fashion.train))
    m_test, f_test = pad_to_32(mnist.test), pad_to_32(fashion.test)
    to = lambda a, b: (a.to(device), b.to(device))  # noqa: E731
    return Sources(train=to(m_train, f_train), val=to(m_val, f_val), test=to(m_test, f_test))


def mix(components: torch.Tensor, mixture: str) -> torch.Tensor:
    """(B, 2, H, W) components in [0, 1] -> (B, 1, H, W) network input."""
    total = components.sum(dim=1, keepdim=True)
    return total / 2 if mixture == "mean" else total


def make_batch(
    pair: tuple[torch.Tensor, torch.Tensor],
    idx1: torch.Tensor,
    idx2: torch.Tensor,
    mixture: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the indexed images -> (mixture (B,1,32,32), components (B,2,32,32)) floats."""
    components = torch.stack([pair[0][idx1], pair[1][idx2]], dim=1).float() / 255
    return mix(components, mixture), components


def random_indices(
    pair: tuple[torch.Tensor, torch.Tensor], batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent uniform draws with replacement, on the generator's device."""
    device = generator.device
    idx1 = torch.randint(len(pair[0]), (batch_size,), generator=generator, device=device)
    idx2 = torch.randint(len(pair[1]), (batch_size,), generator=generator, device=device)
    return idx1, idx2


def fixed_indices(n1: int, n2: int, n_pairs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded set of pairs, identical on every machine (numpy's PCG64, not torch's)."""
    rng = np.random.default_rng(seed)
    return (torch.from_numpy(rng.integers(0, n1, n_pairs)),
            torch.from_numpy(rng.integers(0, n2, n_pairs)))
