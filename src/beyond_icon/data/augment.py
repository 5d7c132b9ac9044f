"""Batch augmentations in plain torch (no torchvision), on whatever device the batch is on.

Every random draw comes from an explicit ``torch.Generator`` (on the CPU; the few per-sample
parameters are moved to the batch's device), so a seed fixes the augmented batch exactly.
Inputs are float images (n, C, H, W) in [0, 1]; outputs have the same shape, dtype and range.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Augment",
    "color_jitter",
    "gaussian_noise",
    "horizontal_flip",
    "random_grayscale",
    "random_resized_crop",
    "random_translate",
]


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def _affine(x: Tensor, theta: Tensor) -> Tensor:
    """Resample ``x`` through per-sample 2x3 affine maps of output -> input coordinates."""
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def random_resized_crop(
    x: Tensor,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Tensor:
    """Crop a random area fraction in ``scale`` with aspect ratio in ``ratio``, resize back.

    Parameters
    ----------
    x : (n, C, H, W) tensor
        Float images in [0, 1].
    generator : torch.Generator
        The source of randomness (one per batch, for repeatable epochs).
    scale : (float, float)
        Range of the area fraction.
    ratio : (float, float)
        Range of the aspect ratio.

    Returns
    -------
    (n, C, H, W) tensor

    References
    ----------
    Szegedy, C. et al. (2015). Going deeper with convolutions. CVPR.
    """
    n = x.shape[0]
    area = _uniform(n, *scale, generator)
    log_ratio = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), generator).exp()
    width = (area * log_ratio).sqrt().clamp(max=1.0)
    height = (area / log_ratio).sqrt().clamp(max=1.0)
    cx = (1 - width) * (2 * torch.rand(n, generator=generator) - 1)
    cy = (1 - height) * (2 * torch.rand(n, generator=generator) - 1)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = width, cx
    theta[:, 1, 1], theta[:, 1, 2] = height, cy
    return _affine(x, theta)


def random_translate(x: Tensor, generator: torch.Generator, max_shift: float = 0.125) -> Tensor:
    """Shift by up to ``max_shift`` of the image size in each direction (reflected borders).

    Parameters
    ----------
    x : (n, C, H, W) tensor
        Float images in [0, 1].
    generator : torch.Generator
        The source of randomness (one per batch, for repeatable epochs).
    max_shift : float

    Returns
    -------
    (n, C, H, W) tensor
    """
    n = x.shape[0]
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = 2 * max_shift * (2 * torch.rand(n, 2, generator=generator) - 1)
    return _affine(x, theta)


def horizontal_flip(x: Tensor, generator: torch.Generator, p: float = 0.5) -> Tensor:
    """Flip each image left-right with probability ``p``.

    Parameters
    ----------
    x : (n, C, H, W) tensor
        Float images in [0, 1].
    generator : torch.Generator
        The source of randomness (one per batch, for repeatable epochs).
    p : float

    Returns
    -------
    (n, C, H, W) tensor
    """
    flip = (torch.rand(x.shape[0], generator=generator) < p).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def _grey(x: Tensor) -> Tensor:
    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype)
    return (x * weights[None, :, None, None]).sum(1, keepdim=True)


def color_jitter(
    x: Tensor,
    generator: torch.Generator,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
    p: float = 0.8,
) -> Tensor:
    """Random brightness, contrast, saturation and hue (a rotation of the YIQ chroma plane,
    ``hue`` in turns), applied with probability ``p`` per image. RGB input.

    Parameters
    ----------
    x : (n, C, H, W) tensor
        Float images in [0, 1].
    generator : torch.Generator
        The source of randomness (one per batch, for repeatable epochs).
    brightness, contrast, saturation, hue : float
        Ranges of the random factors (hue as a fraction of a turn).
    p : float
        Probability of jittering an image.

    Returns
    -------
    (n, C, H, W) tensor
    """
    n = x.shape[0]
    apply = (torch.rand(n, generator=generator) < p)[:, None, None, None].to(x.device)

    def factor(strength: float) -> Tensor:
        return _uniform(n, 1 - strength, 1 + strength, generator).to(x.device, x.dtype)[
            :, None, None, None
        ]

    b, c, s = factor(brightness), factor(contrast), factor(saturation)
    angle = (2 * math.pi * _uniform(n, -hue, hue, generator)).to(x.device, x.dtype)
    out = x * b
    mean = _grey(out).mean(dim=(2, 3), keepdim=True)
    out = (out - mean) * c + mean
    grey = _grey(out)
    out = (out - grey) * s + grey
    to_yiq = torch.tensor(
        [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
        device=x.device,
        dtype=x.dtype,
    )
    yiq = torch.einsum("ij,njhw->nihw", to_yiq, out)
    cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], dim=1)
    out = torch.einsum("ij,njhw->nihw", torch.linalg.inv(to_yiq), yiq)
    return torch.where(apply, out.clamp(0, 1), x)


def random_grayscale(x: Tensor, generator: torch.Generator, p: float = 0.2) -> Tensor:
    """Replace each colour image by its luma (on every channel) with probability ``p``.

    Parameters
    ----------
    x : (n, C, H, W) tensor
        Float images in [0, 1].
    generator : torch.Generator
        The source of randomness (one per batch, for repeatable epochs).
    p : float

    Returns
    -------
    (n, C, H, W) tensor
    """
    grey = (torch.rand(x.shape[0], generator=generator) < p).to(x.device)[:, None, None, None]
    return torch.where(grey, _grey(x).expand_as(x), x)


def gaussian_noise(x: Tensor, generator: torch.Generator, std: float = 0.05) -> Tensor:
    """Add Gaussian noise of standard deviation ``std`` and clamp to [0, 1].

    Parameters
    ----------
    x : (n, C, H, W) tensor
        Float images in [0, 1].
    generator : torch.Generator
        The source of randomness (one per batch, for repeatable epochs).
    std : float

    Returns
    -------
    (n, C, H, W) tensor
    """
    noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
    return (x + std * noise).clamp(0, 1) if x.dim() == 4 else x + std * noise


class Augment:
    """The two-view augmentation of a dataset kind.

    ``color`` (RGB photos, SimCLR-style): random resized crop (scale 0.2-1), horizontal flip,
    colour jitter (p 0.8), grayscale (p 0.2). ``grey`` (digits, Fashion-MNIST): random
    resized crop (scale 0.6-1), translation by up to 1/8, Gaussian noise; a horizontal flip
    too when ``flip``. ``vector``: Gaussian noise of ``noise`` times each feature's scale.

    Parameters
    ----------
    kind : str
        ``color``, ``grey``, ``vector`` or ``none`` (see above).
    flip : bool
        Flip grey images too.
    noise : float
        Noise level for vectors.
    """

    def __init__(self, kind: str, flip: bool = False, noise: float = 0.05):
        if kind not in ("color", "grey", "vector", "none"):
            raise ValueError(f"augmentation kind must be color, grey, vector or none, got {kind!r}")
        self.kind, self.flip, self.noise = kind, flip, noise

    @classmethod
    def for_shape(cls, input_shape: tuple[int, ...], flip: bool | None = None) -> Augment:
        if len(input_shape) != 3:
            return cls("vector")
        if input_shape[0] == 3:
            return cls("color")
        return cls("grey", flip=bool(flip))

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        if self.kind == "none":
            return x
        if self.kind == "vector":
            return gaussian_noise(x, generator, self.noise)
        if self.kind == "color":
            x = random_resized_crop(x, generator)
            x = horizontal_flip(x, generator)
            x = color_jitter(x, generator)
            return random_grayscale(x, generator).clamp(0, 1)
        x = random_resized_crop(x, generator, scale=(0.6, 1.0))
        x = random_translate(x, generator)
        if self.flip:
            x = horizontal_flip(x, generator)
        return gaussian_noise(x, generator, self.noise)

    def __repr__(self) -> str:
        return f"Augment(kind={self.kind!r}, flip={self.flip})"
