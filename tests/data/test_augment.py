"""Batch augmentations: shape, dtype, range, repeatability, identities."""

from __future__ import annotations

import pytest
import torch

from beyond_icon.data import augment as A


def _images(channels=3, n=6, size=16):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind, channels", [("color", 3), ("grey", 1), ("grey", 3)])
def test_shape_dtype_range_and_repeatable(kind, channels):
    x = _images(channels)
    aug = A.Augment(kind, flip=True)
    a = aug(x, torch.Generator().manual_seed(1))
    b = aug(x, torch.Generator().manual_seed(1))
    c = aug(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a, x)


def test_vector_noise_and_none():
    x = torch.randn(5, 4)
    noisy = A.Augment("vector", noise=0.1)(x, torch.Generator().manual_seed(0))
    assert noisy.shape == x.shape and 0 < (noisy - x).abs().max() < 1
    assert A.Augment("none")(x, torch.Generator()) is x
    with pytest.raises(ValueError, match="augmentation kind"):
        A.Augment("sepia")


def test_identities():
    x, g = _images(), torch.Generator().manual_seed(0)
    same = A.random_resized_crop(x, g, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(same, x, atol=1e-5)
    assert torch.allclose(A.color_jitter(x, g, 0.0, 0.0, 0.0, 0.0, p=1.0), x, atol=1e-5)
    assert torch.equal(A.horizontal_flip(x, g, p=1.0), x.flip(-1))
    assert torch.equal(A.horizontal_flip(x, g, p=0.0), x)
    grey = A.random_grayscale(x, g, p=1.0)
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 1], grey[:, 2])
    assert torch.allclose(A.random_translate(x, g, max_shift=0.0), x, atol=1e-5)


def test_crop_zooms_in():
    """A crop of a quarter of the area magnifies: a checkerboard's period doubles."""
    board = ((torch.arange(16)[:, None] // 2 + torch.arange(16)[None, :] // 2) % 2).float()
    x = board.expand(1, 3, 16, 16).contiguous()
    out = A.random_resized_crop(
        x, torch.Generator().manual_seed(0), scale=(0.25, 0.25), ratio=(1, 1)
    )
    changes = (out[0, 0, 8, 1:] - out[0, 0, 8, :-1]).abs().gt(0.5).sum()
    assert changes < (x[0, 0, 8, 1:] - x[0, 0, 8, :-1]).abs().gt(0.5).sum()


def test_hue_rotation_keeps_luma():
    x, g = _images(), torch.Generator().manual_seed(3)
    out = A.color_jitter(x * 0.5 + 0.25, g, 0.0, 0.0, 0.0, hue=0.1, p=1.0)
    luma = lambda t: (t * torch.tensor([0.299, 0.587, 0.114])[None, :, None, None]).sum(1)  # noqa: E731
    assert torch.allclose(luma(out), luma(x * 0.5 + 0.25), atol=1e-4)
