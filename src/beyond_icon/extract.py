"""``beyond-icon extract``: embeddings of a dataset from a frozen encoder, saved for clustering.

Encoders: ``dinov2_vits14`` / ``dinov2_vitb14`` / ``dinov2_vitl14`` / ``dinov2_vitg14`` through
``torch.hub`` (needs the hub reachable, or its cache filled), or ``module:factory`` /
``path/to/file.py:factory``, a callable returning an ``nn.Module`` that maps float images in
[0, 1] (or vectors) to (n, d) features. The output .npz holds x_train, y_train, x_test, y_test
and classes, and loads with ``--data embeddings:FILE.npz``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from beyond_icon import data as data_registry
from beyond_icon._imports import load_object
from beyond_icon.data import as_float
from beyond_icon.train import resolve_device

__all__ = ["extract", "load_encoder", "run_extract"]

DINO = ("dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _DinoInput(nn.Module):
    """Grey to RGB, resize to ``size`` (a multiple of 14), ImageNet normalisation."""

    def __init__(self, encoder: nn.Module, size: int = 224):
        super().__init__()
        self.encoder, self.size = encoder, size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError("DINOv2 encoders need images (n, C, H, W)")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        return self.encoder((x.clamp(0, 1) - self.mean) / self.std)


def load_encoder(name: str, image_size: int = 224) -> nn.Module:
    """An encoder by name (see the module docstring)."""
    if name in DINO:
        try:
            encoder = torch.hub.load("facebookresearch/dinov2", name, trust_repo=True)
        except Exception as error:  # network, missing cache, or hub errors all end here
            raise RuntimeError(
                f"could not load {name} through torch.hub ({type(error).__name__}: {error}). It needs "
                "the network or a filled hub cache ($TORCH_HOME/hub); offline, pass your own encoder "
                "as module:factory"
            ) from error
        return _DinoInput(encoder, image_size)
    if ":" not in name:
        raise ValueError(
            f"unknown encoder {name!r}: use one of {', '.join(DINO)} or module:factory"
        )
    factory = load_object(name, "encoder")
    if not callable(factory):
        raise ValueError(f"{name} is not callable")
    encoder = factory()
    if not isinstance(encoder, nn.Module):
        raise ValueError(f"{name} must return a torch.nn.Module, got {type(encoder).__name__}")
    return encoder


@torch.no_grad()
def extract(
    encoder: nn.Module,
    x: np.ndarray,
    *,
    batch_size: int = 256,
    device: torch.device,
    desc: str = "extract",
    verbose: bool = True,
) -> np.ndarray:
    """Features (n, d) of ``x`` in batches, with a progress bar."""
    encoder = encoder.to(device).eval()
    out = []
    for start in tqdm(range(0, len(x), batch_size), desc=desc, disable=not verbose, leave=False):
        batch = torch.as_tensor(as_float(x[start : start + batch_size])).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            features = encoder(batch)
        if features.dim() != 2 or len(features) != len(batch):
            raise ValueError(
                f"the encoder must return (n, d) features, got {tuple(features.shape)}"
            )
        out.append(features.float().cpu().numpy())
    features = np.concatenate(out)
    if not np.isfinite(features).all():
        raise ValueError("the encoder produced NaN or Inf features")
    return features


def run_extract(
    encoder_name: str,
    spec: str,
    out: str | Path,
    *,
    data_dir=None,
    download=False,
    batch_size: int = 256,
    device: str = "auto",
    image_size: int = 224,
    verbose: bool = True,
) -> Path:
    dataset = data_registry.load(spec, data_dir=data_dir, download=download)
    encoder = load_encoder(encoder_name, image_size)
    dev = resolve_device(device)
    started = time.perf_counter()
    train = extract(
        encoder, dataset.x_train, batch_size=batch_size, device=dev, desc="train", verbose=verbose
    )
    test = extract(
        encoder, dataset.x_test, batch_size=batch_size, device=dev, desc="test", verbose=verbose
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.npz")
    np.savez(
        tmp,
        x_train=train,
        y_train=dataset.y_train,
        x_test=test,
        y_test=dataset.y_test,
        classes=np.asarray(dataset.classes),
    )
    tmp.replace(out)
    if verbose:
        print(
            f"{dataset.describe()} -> {train.shape[1]}-d features in {time.perf_counter() - started:.1f} s: {out}"
        )
    return out
