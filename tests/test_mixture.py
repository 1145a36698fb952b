"""Tests of data.mixture on the real images: padding, the train/val split, batches and
the seeded index sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data.mixture import (
    Sources,
    fixed_indices,
    make_batch,
    mix,
    pad_to_32,
    random_indices,
    split_train_val,
)
from data.sources import load_fashion_mnist, load_mnist


def test_pad_to_32_centres_the_image_in_a_two_pixel_zero_border() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, (5, 28, 28), dtype=np.uint8)  # no zero inside
    padded = pad_to_32(images)
    assert padded.shape == (5, 32, 32) and padded.dtype == torch.uint8
    assert torch.equal(padded[:, 2:30, 2:30], torch.from_numpy(images))
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert border.sum() == 32 * 32 - 28 * 28
    assert (padded[:, border] == 0).all()
    assert (padded[:, ~border] > 0).all()  # the image is not shifted into the border


def test_pad_to_32_accepts_a_non_contiguous_view() -> None:
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    view = images[:, :, ::-1]
    assert torch.equal(pad_to_32(view)[:, 2:30, 2:30], torch.from_numpy(view.copy()))


def test_split_train_val_sizes_and_order(sources: Sources, data_cache: Path) -> None:
    for images in sources.train:
        assert images.shape == (54_000, 32, 32) and images.dtype == torch.uint8
    for images in sources.val:
        assert images.shape == (6_000, 32, 32) and images.dtype == torch.uint8
    for images in sources.test:
        assert images.shape == (10_000, 32, 32) and images.dtype == torch.uint8
    # The validation images are the last tenth of each original training split, in order.
    for loaded, train, val in zip(
        (load_mnist(cache_dir=data_cache), load_fashion_mnist(cache_dir=data_cache)),
        sources.train, sources.val, strict=True,
    ):
        assert torch.equal(train[:, 2:30, 2:30], torch.from_numpy(loaded.train[:54_000]))
        assert torch.equal(val[:, 2:30, 2:30], torch.from_numpy(loaded.train[54_000:]))
    assert [len(part) for part in split_train_val(torch.zeros(10, 1))] == [9, 1]


@pytest.fixture(scope="module")
def batch_indices() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([0, 1, 2, 53_999, 7]), torch.tensor([5, 0, 53_999, 3, 7])


@pytest.mark.parametrize("mixture", ["mean", "sum"])
def test_make_batch_mixture_and_scaling(sources: Sources, batch_indices, mixture: str) -> None:
    pair = sources.train
    idx1, idx2 = batch_indices
    x, y = make_batch(pair, idx1, idx2, mixture)
    assert x.shape == (5, 1, 32, 32) and y.shape == (5, 2, 32, 32)
    assert x.dtype == y.dtype == torch.float32
    assert torch.equal(y[:, 0], pair[0][idx1].float() / 255)
    assert torch.equal(y[:, 1], pair[1][idx2].float() / 255)
    total = y[:, 0:1] + y[:, 1:2]
    assert torch.equal(x, total / 2 if mixture == "mean" else total)
    assert y.min() >= 0 and y.max() <= 1
    assert x.min() >= 0 and x.max() <= (1 if mixture == "mean" else 2)
    assert y.max() == 1  # real digits reach full white
    if mixture == "sum":
        assert x.max() > 1  # some digit and item overlap: the sum leaves [0, 1]


def test_make_batch_scales_a_known_pixel_exactly(sources: Sources) -> None:
    pair = sources.train
    image = pair[0][0]
    row, col = (image == image[image > 0].min()).nonzero()[0].tolist()
    value = int(image[row, col])
    assert 0 < value < 255
    _, y = make_batch(pair, torch.tensor([0]), torch.tensor([0]), "mean")
    assert y[0, 0, row, col].item() == float(np.float32(value) / np.float32(255))
    assert y[0, 0, 0, 0] == 0  # the padding
    bright = (image == 255).nonzero()[0].tolist()
    assert y[0, 0, bright[0], bright[1]] == 1.0


def test_mix_of_components() -> None:
    c = torch.tensor([[[[0.2]], [[0.6]]]])
    assert torch.allclose(mix(c, "mean"), torch.tensor([[[[0.4]]]]))
    assert torch.allclose(mix(c, "sum"), torch.tensor([[[[0.8]]]]))


def test_fixed_indices_are_deterministic_per_seed() -> None:
    a1, a2 = fixed_indices(54_000, 6_000, 1_000, seed=3)
    b1, b2 = fixed_indices(54_000, 6_000, 1_000, seed=3)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert a1.shape == a2.shape == (1_000,) and a1.dtype == a2.dtype == torch.int64
    assert 0 <= a1.min() and a1.max() < 54_000 and 0 <= a2.min() and a2.max() < 6_000
    assert len(set(a1.tolist())) > 900  # spread out, not a constant
    c1, c2 = fixed_indices(54_000, 6_000, 1_000, seed=4)
    assert not torch.equal(a1, c1) and not torch.equal(a2, c2)
    # Prefixes agree: a smaller set of the same seed is the start of the larger one.
    d1, _ = fixed_indices(54_000, 6_000, 10, seed=3)
    assert torch.equal(d1, a1[:10])


def test_fixed_indices_are_numpy_pcg64_and_ignore_torch_seed() -> None:
    torch.manual_seed(123)
    a1, a2 = fixed_indices(10_000, 10_000, 50, seed=0)
    torch.manual_seed(456)
    b1, b2 = fixed_indices(10_000, 10_000, 50, seed=0)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    rng = np.random.Generator(np.random.PCG64(0))
    assert a1.tolist() == rng.integers(0, 10_000, 50).tolist()
    assert a2.tolist() == rng.integers(0, 10_000, 50).tolist()


def test_random_indices_reproducible_from_a_seeded_generator(sources: Sources) -> None:
    pair = sources.train
    g1 = torch.Generator().manual_seed(11)
    g2 = torch.Generator().manual_seed(11)
    first = random_indices(pair, 256, g1)
    assert all(torch.equal(a, b) for a, b in zip(first, random_indices(pair, 256, g2),
                                                  strict=True))
    second = random_indices(pair, 256, g1)
    assert not torch.equal(first[0], second[0])  # the generator advances
    other = random_indices(pair, 256, torch.Generator().manual_seed(12))
    assert not torch.equal(first[0], other[0])
    # The two datasets are drawn independently, not with the same index.
    assert not torch.equal(first[0], first[1])
    for idx, images in zip(first, pair, strict=True):
        assert idx.shape == (256,) and idx.dtype == torch.int64
        assert 0 <= idx.min() and idx.max() < len(images)
    # Restoring the generator state replays the draws (what an exact resume relies on).
    g3 = torch.Generator().manual_seed(11)
    state = g3.get_state()
    replay = random_indices(pair, 256, g3)
    g3.set_state(state)
    assert torch.equal(random_indices(pair, 256, g3)[1], replay[1])
