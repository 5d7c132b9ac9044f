"""Supervised contrastive learning with any divergence: images in, linear probe and k-NN out.

I-Con pair: p = uniform over the other samples of the same class in the batch (two augmented
views of each image, so every sample has a positive); q = a Gaussian kernel on the projection
head's outputs (``metric="euclidean"``, Beyond I-Con's setup) or the cosine kernel with a
temperature (``metric="cosine"``, Khosla et al.). Evaluation uses the backbone's features.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from beyond_icon import metrics, report
from beyond_icon.data import Dataset, as_float
from beyond_icon.data.augment import Augment
from beyond_icon.distributed import is_main
from beyond_icon.divergences import rules_compiled
from beyond_icon.methods import SupCon
from beyond_icon.models import ProjectionHead, Standardize, build_backbone
from beyond_icon.tasks.common import (
    TaskConfig,
    begin,
    check_finite_where_p_is_zero,
    claim_run,
    finish,
    identity,
    option,
)
from beyond_icon.train import SCHEDULE_HELP, TrainConfig, fit, seed_everything, split_batches

__all__ = ["SupConConfig", "SupConResult", "embed", "run"]


@dataclass
class SupConConfig(TaskConfig):
    """Settings of one ``beyond-icon supcon`` run."""

    task: ClassVar[str] = "supcon"
    # evaluation only: changing them on --resume re-evaluates the same training
    not_identity: ClassVar[tuple[str, ...]] = TaskConfig.not_identity + (
        "knn_k",
        "probe_epochs",
        "compile",  # how the loss executes, not what it is
    )
    divergence: str = option(
        "jsd", "kl, tv, jsd, hellinger, chi2, alpha:A, ... or a registered name"
    )
    metric: str = option(
        "euclidean",
        "q kernel: euclidean (Gaussian on distances, the paper's) or cosine (temperature)",
    )
    temperature: float = option(0.1, "cosine kernel temperature")
    sigma: float = option(1.0, "Gaussian kernel width for the euclidean metric")
    normalize: bool = option(False, "L2-normalise projections before the euclidean kernel")
    debias: float = option(0.0, "mix p with uniform (0 = off)")
    backbone: str = option(
        "auto", "auto (cnn for images, mlp for vectors), cnn, mlp, resnet18, resnet50"
    )
    projection_dim: int = option(128, "output size of the projection head fed to the loss")
    epochs: int = option(20, "passes over the train split")
    batch_size: int = option(
        256,
        "images per batch (two views each); an epoch's n // batch_size batches share the "
        "remainder, so a batch holds up to twice this minus one",
    )
    lr: float = option(1e-3, "Adam learning rate")
    weight_decay: float = option(0.0, "Adam weight decay")
    schedule: str = option("none", SCHEDULE_HELP + "; after warmup_epochs")
    warmup_epochs: int = option(0, "linear warm-up epochs")
    flip: bool = option(False, "horizontal flips for grey images (colour images always flip)")
    knn_k: int = option(7, "k of the k-NN evaluation (cosine on backbone features)")
    probe_epochs: int = option(100, "epochs of the linear probe")
    amp: bool = option(True, "bf16 autocast on CUDA")
    chunk_size: int | None = option(None, "row-chunked loss (memory O(chunk x batch))")
    compile: bool = option(
        False,
        "torch.compile the divergence's elementwise rule (fused; about 20 s to compile once)",
    )


@dataclass
class SupConResult:
    """What :func:`run` returns.

    Attributes
    ----------
    metrics : dict
        What ``metrics.json`` holds.
    history : list of dict
        One row per optimiser step.
    model : nn.Module
        The trained encoder (backbone and projection head).
    """

    metrics: dict
    history: list[dict]
    model: nn.Module


class Encoder(nn.Module):
    """Standardisation, backbone (features for evaluation) and projection head (for the loss)."""

    def __init__(self, standardize: Standardize, backbone: nn.Module, projection_dim: int):
        super().__init__()
        self.standardize, self.backbone = standardize, backbone
        self.head = ProjectionHead(backbone.feature_dim, projection_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.standardize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@torch.no_grad()
def embed(
    model: Encoder, x: np.ndarray, device: torch.device, batch_size: int = 1024
) -> np.ndarray:
    """Backbone features of ``x`` (eval mode), in batches.

    Parameters
    ----------
    model : Encoder
    x : array
    device : torch.device
    batch_size : int

    Returns
    -------
    (n, d) float32 array
    """
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        batch = torch.as_tensor(as_float(x[i : i + batch_size])).to(device)
        out.append(model.features(batch).float().cpu())
    return torch.cat(out).numpy()


def _augmentation(dataset: Dataset, config: SupConConfig, device: torch.device) -> Augment:
    augment = Augment.for_shape(dataset.input_shape, flip=config.flip)
    if config.flip and augment.kind == "vector":
        raise ValueError(
            f"flip applies to grey images; {dataset.name} holds vectors of "
            f"{dataset.input_shape[0]} features (augmented by Gaussian noise): drop --flip"
        )
    if augment.kind == "vector":  # noise relative to each feature's spread
        spread = torch.as_tensor(as_float(dataset.x_train)).std(0).to(device)
        augment.noise = 0.1 * spread
    return augment


def _train(config: SupConConfig, dataset, device, out, resume: bool, verbose: bool):
    """The encoder trained with two augmented views per sample; (model, history)."""
    seed_everything(config.seed)
    x_train = torch.as_tensor(as_float(dataset.x_train))
    model = Encoder(
        Standardize.fit(x_train),
        build_backbone(config.backbone, dataset.input_shape),
        config.projection_dim,
    ).to(device)
    x_train, y_train = x_train.to(device), torch.as_tensor(dataset.y_train).to(device)
    loss = SupCon(
        config.divergence,
        metric=config.metric,
        temperature=config.temperature,
        sigma=config.sigma,
        normalize=config.normalize,
        debias=config.debias,
        chunk_size=config.chunk_size,
    )
    augment = _augmentation(dataset, config, device)
    n = len(x_train)
    if n < 2:
        raise ValueError("supervised contrastive learning needs at least 2 training samples")
    if config.batch_size < 2:
        raise ValueError(
            f"batch_size must be at least 2 (with one image a view's only other point is its "
            f"positive: nothing to contrast), got {config.batch_size}"
        )
    batch = min(config.batch_size, n)

    def batches(generator):  # each batch with the seed of its augmentations
        order = torch.randperm(n, generator=generator)
        seeds = torch.randint(0, 2**62, (max(1, n // batch),), generator=generator)
        return [
            (index, seed) for (index,), seed in zip(split_batches(batch, order), seeds.tolist())
        ]

    def loss_fn(item):
        index, seed = item
        generator = torch.Generator().manual_seed(seed)
        x = x_train[index.to(device)]
        views = torch.cat([augment(x, generator), augment(x, generator)])
        z = model(views).float()
        return loss(z.view(2, len(index), -1).transpose(0, 1), y_train[index.to(device)])

    train_config = TrainConfig(
        epochs=config.epochs,
        lr=config.lr,
        weight_decay=config.weight_decay,
        schedule=config.schedule,
        warmup_epochs=config.warmup_epochs,
        amp=config.amp,
        seed=config.seed,
    )
    train_config.check()  # lr, schedule, warmup: before the folder is touched
    claim_run(config, out, resume)  # every option checked: the folder is the run's now
    with rules_compiled(config.compile):
        history = fit(
            model,
            batches,
            loss_fn,
            train_config,
            device=device,
            out_dir=out,
            resume=resume,
            desc=f"supcon[{config.divergence}]",
            verbose=verbose,
            identity=identity(config, dataset),
        )
    return model, history


def run(
    config: SupConConfig, out: str | Path | None = None, resume: bool = False, verbose: bool = True
) -> SupConResult:
    """Train with two views per sample, then evaluate frozen backbone features on the test split.

    Parameters
    ----------
    config : SupConConfig
        The run's settings (``beyond-icon supcon --help`` lists them).
    out : path, optional
        The run folder: config.yaml, checkpoints, history.csv, figures, metrics.json (last).
    resume : bool
        Continue from ``out``'s checkpoint (the same settings; a larger budget extends the run).
    verbose : bool
        Progress bars and the metrics line.

    Returns
    -------
    SupConResult
        Empty metrics on ranks other than 0 under torchrun.
    """
    for name in ("knn_k", "probe_epochs", "epochs", "batch_size", "projection_dim"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    # checked before any training
    device, dataset, out, verbose = begin(config, out, verbose)
    if not config.debias > 0:
        check_finite_where_p_is_zero(
            config.divergence,
            "between samples of different classes",
            "use --debias A > 0 (p mixed with uniform)",
        )
    if config.knn_k >= len(dataset.x_train):
        raise ValueError(
            f"knn_k must be below the {len(dataset.x_train)} training points, got {config.knn_k}"
        )
    model, history = _train(config, dataset, device, out, resume, verbose)
    if not is_main():  # the other ranks helped train; rank 0 evaluates and writes
        return SupConResult({}, history, model)
    # the loop's clock, carried across --resume segments; the last epoch's images per second
    last_epoch = history[-1]["epoch"]
    before = [h["time"] for h in history if h["epoch"] < last_epoch]
    epoch_seconds = history[-1]["time"] - (before[-1] if before else 0.0)
    train_features = embed(model, dataset.x_train, device)
    test_features = embed(model, dataset.x_test, device)
    result = {
        **_evaluate(config, dataset, train_features, test_features, device),
        "train_time_s": history[-1]["time"],
        # source images (2 views each) per second in the last epoch
        "images_per_s": len(dataset.x_train) / max(epoch_seconds, 1e-9),
    }

    def write(out: Path) -> None:
        title = f"supcon on {dataset.name}, {config.divergence}, {config.metric}"
        report.plot_training(history, out / "training.png", title)
        np.savez(
            out / "features.npz",
            train=train_features,
            test=test_features,
            y_train=dataset.y_train,
            y_test=dataset.y_test,
        )

    finish(result, out, verbose, write, config)
    return SupConResult(result, history, model)


def _evaluate(config: SupConConfig, dataset, train_features, test_features, device) -> dict:
    """Linear probe and k-NN (cosine) accuracy of frozen features on the test split."""
    splits = (train_features, dataset.y_train, test_features, dataset.y_test)
    return {
        "linear_probe_acc": metrics.linear_probe_accuracy(
            *splits, epochs=config.probe_epochs, device=device, seed=config.seed
        ),
        "knn_acc": metrics.knn_accuracy(*splits, k=config.knn_k, metric="cosine"),
    }
