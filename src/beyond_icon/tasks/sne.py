"""The ``sne`` task: parametric SNE on a dataset's train split, measured on its test split.

It composes :class:`beyond_icon.parametric_sne.ParametricSNE` (which composes the fitted
affinity, the neighbour batch sampler and the SNE/TSNE presets) with the metrics and the run
folder. The I-Con pair is documented on the estimator.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from beyond_icon import metrics, report
from beyond_icon.distributed import is_main
from beyond_icon.parametric_sne import KERNELS, RECIPE, ParametricSNE
from beyond_icon.tasks.common import TaskConfig, begin, claim_run, finish, option
from beyond_icon.train import SCHEDULE_HELP, write_csv

__all__ = ["KERNELS", "ParametricSNE", "SNEConfig", "SNEResult", "grad_norm_summary", "run"]


# ------------------------------------------------------------------------------------ the task


@dataclass
class SNEConfig(TaskConfig):
    """Settings of one ``beyond-icon sne`` run: every parameter of :class:`ParametricSNE`
    (``seed`` is its ``random_state``)."""

    task: ClassVar[str] = "sne"
    recipe: ClassVar[int] = RECIPE
    # not what the run is (the estimator's checkpoint leaves out the first two as well): where
    # p's neighbour table is cached, bf16 autocast on CUDA, and the evaluation's k values
    not_identity: ClassVar[tuple[str, ...]] = TaskConfig.not_identity + (
        "cache_dir",
        "amp",
        "knn_k",
    )
    renamed: ClassVar[dict[str, str]] = {
        "epochs": "the budget is counted in optimiser steps, use n_steps (--n-steps; default "
        "clip(32 n / batch_size, 3000, 20000))"
    }
    divergence: str = option(
        "kl",
        "kl, tv, jsd, hellinger, chi2, jeffreys, reverse_kl, alpha:A or a registered name "
        "(jeffreys, reverse_kl and alpha:A with A <= 0 are infinite where p = 0: --affinity "
        "batch)",
    )
    kernel: str = option("student_t", "q on the embedding: student_t (t-SNE) or gaussian (SNE)")
    affinity: str = option(
        "global",
        "p: global (fitted once over the train split) or batch (calibrated per batch, the paper's)",
    )
    q_scope: str = option(
        "auto",
        "with --affinity global, q normalised over the batch (batch) or for the whole train split "
        "(global: each negative weighted by the training points it stands for); auto: global "
        "for kl, batch for the other divergences",
    )
    n_components: int = option(2, "embedding dimension")
    perplexity: float = option(30.0, "perplexity of p")
    pca_components: int | None = option(
        50, "PCA dimension of the inputs for p and the MLP (none: raw inputs)"
    )
    input_noise: float = option(
        0.3,
        "std of the Gaussian noise on the network's standardised inputs while training (its root "
        "mean square over the features with --input-noise-power)",
    )
    input_noise_power: float = option(
        0.5,
        "with the MLP, the noise on each input feature ~ its std to this power, at the same "
        "total power (0: the same noise on every feature)",
    )
    backbone: str = option(
        "auto", "auto (the MLP on the PCA features, for images too), mlp, cnn, resnet18"
    )
    n_cells: int | None = option(
        None,
        "k-means cells of the MLP's input, each with a learned offset in its first layer "
        "(none: n / 5, at most 2048; 0: the plain MLP)",
    )
    local_dims: int = option(
        5,
        "with the cells, each cell also maps its points linearly along its own top principal "
        "directions, this many (0: none)",
    )
    hidden: list[int] = option(
        default_factory=lambda: [128, 128],
        help="widths of the MLP's hidden layers, comma separated",
    )
    n_steps: int | None = option(
        None,
        "optimiser steps, rounded up to whole passes (none: clip(32 n / batch_size, 3000, 20000))",
    )
    batch_size: int = option(
        256,
        "anchors per batch (global; each brings one sampled neighbour) or points per batch (batch)",
    )
    lr: float = option(4e-3, "Adam learning rate")
    schedule: str = option("cosine", SCHEDULE_HELP)
    exaggeration: float = option(
        12.0, "early exaggeration: the negatives' weight in q is divided by it (global only)"
    )
    exaggeration_fraction: float = option(0.25, "fraction of the steps under early exaggeration")
    sigma: float = option(1.0 / math.sqrt(2.0), "bandwidth of the gaussian q")
    dof: float = option(1.0, "degrees of freedom of the student_t q (1: t-SNE's Cauchy)")
    n_neighbors: int | None = option(None, "neighbours per point for p (none: 3 x perplexity)")
    neighbor_method: str = option(
        "auto", "neighbour search: auto, exact or nndescent (approximate, pynndescent)"
    )
    cache_dir: str | None = option(
        None, "where the neighbour table is cached (none: ~/.cache/beyond-icon)"
    )
    amp: bool = option(True, "bf16 autocast on CUDA (kernels stay float32)")
    knn_k: list[int] = option(
        default_factory=lambda: [5, 10], help="k values for the k-NN accuracy, comma separated"
    )

    def estimator(self, verbose: bool = False) -> ParametricSNE:
        """The estimator these settings describe (every shared name is passed on)."""
        names = set(inspect.signature(ParametricSNE).parameters)
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        given = {k: v for k, v in values.items() if k in names}
        return ParametricSNE(**given, random_state=self.seed, verbose=verbose)


@dataclass
class SNEResult:
    """What :func:`run` returns.

    Attributes
    ----------
    metrics : dict
        What ``metrics.json`` holds.
    embedding_train, embedding_test : arrays
        The 2-D (``n_components``) embeddings of the splits.
    history : list of dict
        One row per optimiser step.
    estimator : ParametricSNE
        The fitted estimator (``transform`` embeds new points).
    """

    metrics: dict
    embedding_train: np.ndarray
    embedding_test: np.ndarray
    history: list[dict]
    estimator: ParametricSNE


def grad_norm_summary(history: list[dict]) -> dict:
    """Early-training gradient spikes: max over the first epoch against the median of all steps.

    Parameters
    ----------
    history : list of dict
        The per-step rows of :func:`beyond_icon.train.fit`.

    Returns
    -------
    dict
        ``grad_norm_first_epoch_max``, ``grad_norm_median`` and their ratio
        ``grad_norm_peak_ratio``.
    """
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
    """Train on the train split, embed the test split, measure, and write the run folder.

    Parameters
    ----------
    config : SNEConfig
        The run's settings (``beyond-icon sne --help`` lists them).
    out : path, optional
        The run folder: config.yaml, checkpoints, history.csv, figures, metrics.json (last).
    resume : bool
        Continue from ``out``'s checkpoint (the same settings; a larger budget extends the run).
    verbose : bool
        Progress bars and the metrics line.

    Returns
    -------
    SNEResult
        Empty metrics on ranks other than 0 under torchrun.
    """
    ks = config.knn_k
    if (
        not isinstance(ks, (list, tuple))
        or not ks
        or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks)
    ):
        raise ValueError(f"knn_k must be a non-empty list of positive integers, got {ks!r}")
    _, dataset, out, verbose = begin(config, out, verbose)  # checked before training
    if max(ks) >= len(dataset.x_train):
        raise ValueError(
            f"knn_k must be below the {len(dataset.x_train)} training points, got {max(ks)}"
        )
    classes = len(np.unique(dataset.y_test))
    if len(dataset.x_test) < 4 or not 2 <= classes < len(dataset.x_test):
        raise ValueError(
            f"the test split needs at least 4 points (trustworthiness), of 2 classes or more "
            f"and more points than classes (silhouette); got {len(dataset.x_test)} points of "
            f"{classes} classes; raise --n-test"
        )
    estimator = config.estimator(verbose)
    estimator._check_params(len(dataset.x_train))  # before the folder is touched
    claim_run(config, out, resume)
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
    test_inputs = estimator.input_features(dataset.x_test)
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
    result["n_steps"] = estimator.n_steps_
    started = time.perf_counter()
    estimator.transform(dataset.x_test)
    result["transform_time_s"] = time.perf_counter() - started
    result.update(grad_norm_summary(estimator.history_))

    def write(out: Path) -> None:
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

    finish(result, out, verbose, write, config)
    return SNEResult(result, emb_train, emb_test, estimator.history_, estimator)
