"""Parametric SNE with any divergence: a scikit-learn style estimator and the ``sne`` task.

I-Con pair: p = perplexity-calibrated Gaussian on the inputs (optionally after PCA), computed
per batch; q = Gaussian (SNE) or Student-t (t-SNE) kernel on the network's output. The network
(an MLP for vectors, a small CNN for images, or a CIFAR ResNet-18) maps new points too.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from beyond_icon import divergences, metrics, report
from beyond_icon.data import as_float
from beyond_icon.distributed import is_main
from beyond_icon.methods import SNE, TSNE
from beyond_icon.models import Standardize, build_backbone
from beyond_icon.tasks.common import TaskConfig, begin
from beyond_icon.train import TrainConfig, fit, resolve_device, seed_everything, write_csv

__all__ = ["ParametricSNE", "SNEConfig", "SNEResult", "grad_norm_summary", "run"]

KERNELS = ("gaussian", "student_t")


def _as_array(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype != np.uint8:
        x = x.astype(np.float32, copy=False)
    return x


class ParametricSNE:
    """Parametric (t-)SNE with any divergence, scikit-learn style.

    ``fit(X)`` trains a network ``f`` so that the kernel ``q`` on ``f(X)`` matches the
    perplexity-calibrated ``p`` on ``X`` under ``divergence``, batch by batch;
    ``transform(X)`` embeds new points with ``f``. ``X`` is (n, D) vectors or (n, C, H, W)
    images (uint8 images are scaled to [0, 1]).

    Fitted attributes: ``model_``, ``embedding_`` (of the training data), ``history_`` (loss
    and gradient norm per step), ``pca_`` (the PCA used for p, or None), ``n_features_in_``.
    """

    def __init__(
        self,
        n_components: int = 2,
        perplexity: float = 30.0,
        kernel: str = "gaussian",
        divergence: str = "kl",
        backbone: str = "auto",
        epochs: int = 50,
        batch_size: int = 256,
        lr: float = 1e-3,
        pca_components: int | None = 50,
        sigma: float = 1.0 / math.sqrt(2.0),
        dof: float = 1.0,
        random_state: int = 0,
        device: str = "auto",
        verbose: bool = False,
    ):
        self.n_components = n_components
        self.perplexity = perplexity
        self.kernel = kernel
        self.divergence = divergence
        self.backbone = backbone
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.pca_components = pca_components
        self.sigma = sigma
        self.dof = dof
        self.random_state = random_state
        self.device = device
        self.verbose = verbose

    # -- scikit-learn protocol -----------------------------------------------------------------
    def get_params(self, deep: bool = True) -> dict:
        return {
            k: getattr(self, k)
            for k in (
                "n_components",
                "perplexity",
                "kernel",
                "divergence",
                "backbone",
                "epochs",
                "batch_size",
                "lr",
                "pca_components",
                "sigma",
                "dof",
                "random_state",
                "device",
                "verbose",
            )
        }

    def set_params(self, **params) -> ParametricSNE:
        for key, value in params.items():
            if key not in self.get_params():
                raise ValueError(f"ParametricSNE has no parameter {key!r}")
            setattr(self, key, value)
        return self

    def _check_params(self, n: int) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        divergences.get(self.divergence)
        if not isinstance(self.n_components, int) or self.n_components < 1:
            raise ValueError(f"n_components must be a positive integer, got {self.n_components!r}")
        if n < 3:
            raise ValueError(f"parametric SNE needs at least 3 samples, got {n}")
        batch = min(self.batch_size, n)
        if not 1 <= self.perplexity < batch - 1:
            raise ValueError(
                f"perplexity {self.perplexity:g} needs batches of more than {self.perplexity + 1:g} "
                f"points, but a batch holds {batch} (n = {n}, batch_size = {self.batch_size}); "
                "lower the perplexity or raise the batch size"
            )

    def fit(
        self, X, y=None, *, out_dir: str | Path | None = None, resume: bool = False
    ) -> ParametricSNE:
        x = _as_array(X)
        if x.ndim not in (2, 4):
            raise ValueError(
                f"X must be (n, D) vectors or (n, C, H, W) images, got shape {x.shape}"
            )
        if x.dtype != np.uint8 and not np.all(np.isfinite(x)):
            rows = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(1))
            raise ValueError(f"X contains NaN or Inf in row(s) {rows[:5].tolist()}")
        self._check_params(len(x))
        seed_everything(self.random_state)
        device = resolve_device(self.device)
        xf = torch.as_tensor(as_float(x))
        flat = xf.reshape(len(xf), -1)
        self.n_features_in_ = flat.shape[1]
        self.input_shape_ = tuple(x.shape[1:])
        # p lives in input space, after PCA when the input is wide
        self.pca_ = None
        p_space = flat
        if self.pca_components and flat.shape[1] > self.pca_components:
            from sklearn.decomposition import PCA

            self.pca_ = PCA(self.pca_components, random_state=self.random_state).fit(flat.numpy())
            p_space = torch.as_tensor(self.pca_.transform(flat.numpy()), dtype=torch.float32)
        backbone = build_backbone(self.backbone, self.input_shape_)
        self.model_ = nn.Sequential(
            Standardize.fit(xf), backbone, nn.Linear(backbone.feature_dim, self.n_components)
        ).to(device)
        xf, p_space = xf.to(device), p_space.to(device)
        n, batch = len(xf), min(self.batch_size, len(xf))

        def batches(generator):
            order = torch.randperm(n, generator=generator)
            return torch.tensor_split(order, max(1, n // batch))  # every batch >= batch_size

        if self.kernel == "gaussian":
            loss = SNE(self.divergence, perplexity=self.perplexity, sigma=self.sigma)
        else:
            loss = TSNE(self.divergence, perplexity=self.perplexity, dof=self.dof)

        def loss_fn(index):
            index = index.to(device)
            return loss(p_space[index], self.model_(xf[index]).float())

        config = TrainConfig(epochs=self.epochs, lr=self.lr, seed=self.random_state)
        started = time.perf_counter()
        self.history_ = fit(
            self.model_,
            batches,
            loss_fn,
            config,
            device=device,
            out_dir=out_dir,
            resume=resume,
            desc=f"sne[{self.divergence}]",
            verbose=self.verbose,
        )
        self.fit_time_ = time.perf_counter() - started
        self.embedding_ = self.transform(x)
        return self

    @torch.no_grad()
    def transform(self, X) -> np.ndarray:
        """Embed new points with the trained network."""
        if not hasattr(self, "model_"):
            raise RuntimeError("ParametricSNE is not fitted yet: call fit(X) first")
        x = _as_array(X)
        if tuple(x.shape[1:]) != self.input_shape_:
            raise ValueError(
                f"X has sample shape {x.shape[1:]}, the model was fitted on {self.input_shape_}"
            )
        device = next(self.model_.parameters()).device
        self.model_.eval()
        out = [
            self.model_(torch.as_tensor(as_float(x[i : i + 4096])).to(device)).float().cpu()
            for i in range(0, len(x), 4096)
        ]
        return torch.cat(out).numpy()

    def fit_transform(self, X, y=None) -> np.ndarray:
        return self.fit(X, y).embedding_


# ------------------------------------------------------------------------------------ the task


@dataclass
class SNEConfig(TaskConfig):
    """Settings of one ``beyond-icon sne`` run."""

    task: ClassVar[str] = "sne"
    help: ClassVar[dict[str, str]] = TaskConfig.help | {
        "divergence": "kl, tv, jsd, hellinger, chi2, jeffreys, reverse_kl, alpha:A or a registered name",
        "kernel": "q on the embedding: gaussian (SNE) or student_t (t-SNE)",
        "n_components": "embedding dimension",
        "perplexity": "perplexity of p, calibrated per row within each batch",
        "pca_components": "PCA dimension of the inputs for p (none: raw inputs)",
        "backbone": "auto (cnn for images, mlp for vectors), mlp, cnn, resnet18",
        "epochs": "passes over the train split",
        "batch_size": "points per batch (p and q are computed within a batch)",
        "lr": "Adam learning rate",
        "knn_k": "k values for the k-NN accuracy, comma separated",
    }
    divergence: str = "kl"
    kernel: str = "gaussian"
    n_components: int = 2
    perplexity: float = 30.0
    pca_components: int | None = 50
    backbone: str = "auto"
    epochs: int = 50
    batch_size: int = 256
    lr: float = 1e-3
    knn_k: list[int] = field(default_factory=lambda: [5, 10])


@dataclass
class SNEResult:
    metrics: dict
    embedding_train: np.ndarray
    embedding_test: np.ndarray
    history: list[dict]
    estimator: ParametricSNE


def grad_norm_summary(history: list[dict]) -> dict:
    """Early-training gradient spikes: max over the first epoch against the median of all steps."""
    norms = np.array([h["grad_norm"] for h in history])
    first = np.array([h["grad_norm"] for h in history if h["epoch"] == 0])
    median = float(np.median(norms))
    return {
        "grad_norm_first_epoch_max": float(first.max()),
        "grad_norm_median": median,
        "grad_norm_peak_ratio": float(first.max() / median) if median > 0 else math.inf,
    }


def run(
    config: SNEConfig, out: str | Path | None = None, resume: bool = False, verbose: bool = True
) -> SNEResult:
    """Train on the train split, embed the test split, measure, and write the run folder."""
    _, dataset, out, verbose = begin(config, out, verbose)
    estimator = ParametricSNE(
        n_components=config.n_components,
        perplexity=config.perplexity,
        kernel=config.kernel,
        divergence=config.divergence,
        backbone=config.backbone,
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        pca_components=config.pca_components,
        random_state=config.seed,
        device=config.device,
        verbose=verbose,
    )
    estimator.fit(dataset.x_train, out_dir=out, resume=resume)
    if not is_main():  # the other ranks helped train; rank 0 evaluates and writes
        return SNEResult(
            {},
            estimator.embedding_,
            np.zeros((0, config.n_components)),
            estimator.history_,
            estimator,
        )
    emb_train, emb_test = estimator.embedding_, estimator.transform(dataset.x_test)
    test_inputs = as_float(dataset.x_test).reshape(len(dataset.x_test), -1)
    if estimator.pca_ is not None:
        test_inputs = estimator.pca_.transform(test_inputs)
    result = {
        f"knn_acc_{k}": metrics.knn_accuracy(
            emb_train, dataset.y_train, emb_test, dataset.y_test, k
        )
        for k in config.knn_k
    }
    result["knn_acc"] = result[f"knn_acc_{config.knn_k[0]}"]
    result["trustworthiness"] = metrics.trustworthiness(test_inputs, emb_test, k=10)
    result["silhouette"] = metrics.silhouette(emb_test, dataset.y_test)
    result["train_time_s"] = estimator.fit_time_
    result.update(grad_norm_summary(estimator.history_))
    if out is not None:
        report.save_json(result, out / "metrics.json")
        write_csv(estimator.history_, out / "history.csv")
        np.savez(
            out / "embedding.npz",
            train=emb_train,
            test=emb_test,
            y_train=dataset.y_train,
            y_test=dataset.y_test,
            classes=np.asarray(dataset.classes),
        )
        title = (
            f"{dataset.name}, {config.kernel} q, {config.divergence}: k-NN {result['knn_acc']:.3f}"
        )
        if config.n_components >= 2:
            report.plot_embedding(
                emb_test, dataset.y_test, dataset.classes, out / "embedding.png", title
            )
        report.plot_grad_norm(
            {config.divergence: estimator.history_},
            out / "grad_norm.png",
            f"{dataset.name}: gradient norm per step",
        )
    if verbose:
        print(" ".join(f"{k}={v:.4f}" for k, v in result.items()))
    return SNEResult(result, emb_train, emb_test, estimator.history_, estimator)
