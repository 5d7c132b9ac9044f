"""Parametric (t-)SNE with any divergence: a scikit-learn estimator.

The pieces, each in its own module: :class:`~beyond_icon.affinity.PerplexityAffinity` (p,
fitted once over the training set), :class:`~beyond_icon.sampling.NeighborBatchSampler`
(batches that carry each anchor's neighbours), the :class:`~beyond_icon.methods.TSNE` /
:class:`~beyond_icon.methods.SNE` presets (p and q of a batch, the divergence) and
:func:`beyond_icon.train.fit` (the loop). This module composes them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_array, check_is_fitted
from torch import Tensor, nn

from beyond_icon import divergences
from beyond_icon import models as _models
from beyond_icon._validation import check_positive, is_int, is_real
from beyond_icon.affinity import Q_SCOPES, PerplexityAffinity
from beyond_icon.data import as_float, fingerprint
from beyond_icon.distributed import world
from beyond_icon.methods import SNE, TSNE
from beyond_icon.models import MLP, CellMLP, Standardize, build_backbone
from beyond_icon.sampling import NeighborBatchSampler
from beyond_icon.train import (
    SCHEDULES,
    TrainConfig,
    fit,
    resolve_device,
    seed_everything,
    split_batches,
)

__all__ = [
    "AFFINITIES",
    "KERNELS",
    "Q_SCOPE_CHOICES",
    "ParametricSNE",
    "noise_weights",
    "resolve_q_scope",
]

KERNELS = ("student_t", "gaussian")
AFFINITIES = ("global", "batch")
Q_SCOPE_CHOICES = ("auto", *Q_SCOPES)


def resolve_q_scope(q_scope: str, divergence: str | divergences.Divergence | Callable) -> str:
    """The q scope a ParametricSNE of ``divergence`` uses: ``auto`` is ``global`` for KL and
    ``batch`` for every other divergence.

    KL's pull on a neighbour, ``p - q``, does not vanish with q, so KL can take q normalised
    for the whole training set (t-SNE's own loss, estimated on the batch); a bounded
    divergence's pull scales with q at the neighbour, of order ``1 / n`` then, and it needs q
    normalised over the batch. Measured on Fashion-MNIST (``benchmarks/bench_sne.py``, test
    5-NN, seeds 0, 1, 2): KL with the global scope 0.778, 0.781, 0.776 at 10k against 0.768,
    0.767, 0.768 with the batch scope, and 0.810, 0.799, 0.802 against 0.794, 0.786, 0.793 at
    60k; TV under the global scope lost 5 to 14 points (0.663 against 0.715 at 10k, 0.587
    against 0.727 at 60k, before the cells).

    Parameters
    ----------
    q_scope : {"auto", "global", "batch"}
    divergence : str, Divergence or callable
        Anything :func:`beyond_icon.divergences.get` takes; KL is recognised by its function
        (``"kl"``, ``"alpha:1"``, ``divergences.kl``), not by its name.

    Returns
    -------
    str
        ``"global"`` or ``"batch"``.
    """
    if q_scope not in Q_SCOPE_CHOICES:
        raise ValueError(f"q_scope must be one of {Q_SCOPE_CHOICES}, got {q_scope!r}")
    if q_scope != "auto":
        return q_scope
    # a change of this rule changes what a run of "auto" is: bump RECIPE with it, so that runs
    # and checkpoints of the earlier rule are refused rather than mixed or resumed
    return "global" if divergences.get(divergence).fn is divergences.kl else "batch"


# the version of the recipe beyond the parameters, stored with every run and checkpoint (a run
# of another recipe is not resumed): 1 before it was recorded (the cells' MLP 256-256, at most
# 2,048 cells, at least 4,000 steps, k-means++ over all rows, the full cell lookup while
# training); 2 (the MLP 128-128, at most 4,096 cells, at least 3,000 steps, 40 passes); 3 (32
# passes); 4 (at most 2,048 cells: the same as 3 up to 10,240 points); 5 the current one (the
# two-level cell lookup from 1,024 cells, CellMLP's ``coarse``). A change that a parameter
# describes is not a recipe: ``input_noise_power=0`` is the noise of before that parameter
# existed, so its runs are refused as made with other settings and continue with it.
RECIPE = 5
# passes of the anchors over the data by default (see n_steps)
PASSES = 32
CELLS_PER_POINT = 0.2
# at most this many cells: on Fashion-MNIST 60k (recipe 3, bench_sne, one run each) 2,048
# cells gave the test 5-NN of 4,096 within the spread between seeds (KL +0.3 points, TV -0.5,
# JSD -0.4 and -0.5, Hellinger 0 and -0.1 over seeds 0 and 1) and a higher trustworthiness for
# every divergence (+0.002 to +0.006; TV 0.974 against 0.941), in 1.3 to 14.5 s less fit time
# and half the transform time; 8,192 lost 0.7 (Hellinger) and 0.9 (JSD) points on seed 1
MAX_CELLS = 2048
# while training, the cell of a noisy input is the nearest among the NEAR_CELLS cells nearest
# its clean input's cell: on Fashion-MNIST with the default noise (0.3, input_noise_power 0.5)
# that is the nearest of all cells for 98.6% of the noisy inputs at 10k (2,000 cells) and 97.5%
# at 60k (2,048 cells), where the noise moves the nearest cell for 17% and 30% of them
# (benchmarks/sne_cell_lookup.py; with the same noise on every component: 99.6% at 10k and
# 98.5% at 60k with 4,096 cells), and a 10k step took 0.5 ms less (6.0 against 6.6 ms, 2 cores)
NEAR_CELLS = 32
STEPS_FLOOR = 3000  # the least default number of steps (see n_steps)
POINTS_PER_CELL = 128  # the k-means of the cells sees at most this many rows per centroid
SEEDS_PER_CELL = 2  # k-means++ picks its starting centroids among this many rows per centroid
LLOYD_STEPS = 10  # then at most this many Lloyd iterations


def _kmeans_centres(z: Tensor, m: int, seed: int) -> Tensor:
    """At most ``m`` distinct k-means centroids of the rows of ``z``; fewer when the rows hold
    fewer distinct points.

    At most ``LLOYD_STEPS`` of Lloyd's iterations (scikit-learn) run on at most
    ``POINTS_PER_CELL * m`` rows drawn at random, from k-means++ centroids chosen among
    ``SEEDS_PER_CELL * m`` of them. On the 60k Fashion-MNIST PCA inputs, 4,096 cells took 6.0 s
    (2 cores) to an inertia 0.8% above that of k-means++ among 4 rows per cell and 20
    iterations (11.4 s); k-means++ over all 60k rows took 9 of the 12 s of a k-means of 2,048
    cells to convergence.
    """
    import warnings

    from sklearn.cluster import KMeans, kmeans_plusplus
    from sklearn.exceptions import ConvergenceWarning

    seed %= 2**32  # scikit-learn's seeds are 32-bit; the tasks' may be up to 2^63
    rng = np.random.default_rng(seed)
    points = z.detach().cpu().numpy().astype(np.float32, copy=False)
    if len(points) > POINTS_PER_CELL * m:  # 524k rows for 4,096 cells: minutes, not hours
        rows = rng.choice(len(points), POINTS_PER_CELL * m, replace=False)
        points = points[np.sort(rows)]
    seeds = points
    if len(points) > SEEDS_PER_CELL * m:
        seeds = points[np.sort(rng.choice(len(points), SEEDS_PER_CELL * m, replace=False))]
    with warnings.catch_warnings():  # fewer distinct points than m: duplicates dropped below
        warnings.simplefilter("ignore", ConvergenceWarning)
        start, _ = kmeans_plusplus(seeds, m, random_state=seed)
        kmeans = KMeans(m, init=start, n_init=1, max_iter=LLOYD_STEPS, random_state=seed).fit(
            points
        )
    centres = kmeans.cluster_centers_
    scale = float(np.abs(points).max()) or 1.0  # centres equal up to rounding are one cell
    _, first = np.unique(np.round(centres / scale, 5), axis=0, return_index=True)
    return torch.as_tensor(centres[np.sort(first)], dtype=torch.float32)


def _validate(X) -> np.ndarray:
    """(n, D) vectors through scikit-learn's ``check_array`` (dense, finite, numeric), or
    (n, C, H, W) images; uint8 is kept (``as_float`` scales it to [0, 1]), the rest is float32,
    which must hold every value (the network computes in float32)."""
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().numpy()
    images = getattr(X, "ndim", None) == 4
    dtype = None if getattr(X, "dtype", None) == np.uint8 else (np.float32, np.float64)
    x = check_array(X, accept_sparse=False, dtype=dtype, allow_nd=images, input_name="X")
    if x.dtype == np.uint8 or x.dtype == np.float32:
        return x
    with np.errstate(over="ignore"):
        out = x.astype(np.float32)
    if not np.isfinite(out).all():  # finite in float64, beyond float32's 3.4e38
        rows = np.flatnonzero(~np.isfinite(out.reshape(len(out), -1)).all(1))
        raise ValueError(
            f"X has values beyond float32's range (|x| > 3.4e38) in rows {rows[:5].tolist()}"
            f"{' and more' if len(rows) > 5 else ''}: the network computes in float32; "
            "rescale X"
        )
    return out


def _float32_safe(x: Tensor) -> Tensor:
    """``x`` times a power of two when its spread (rounded to a power of two) is so far from 1,
    beyond ``2^-16`` or ``2^16``, that squared distances in float32 would lose their digits
    (below about 1e-38) or overflow; else ``x`` itself, unchanged. The product is exact but for
    values that were subnormal in float32 (below 2^-126), which gain no digits. p does not
    depend on the scale of its space: the perplexity calibration finds each point's
    bandwidth."""
    spread = float(x.std())
    if not (spread > 0 and math.isfinite(spread)):
        return x
    exponent = round(math.log2(spread))
    if abs(exponent) <= 16:
        return x
    # in float64: the factor itself may be beyond float32 (2^128 for a spread of 1e-39)
    return (x.double() * 2.0**-exponent).float()


def _float_tensor(x: np.ndarray, device: torch.device) -> Tensor:
    """``as_float(x)`` as a tensor on ``device``; uint8 is scaled in torch (multi-threaded, the
    same float32 values as numpy's division)."""
    if x.dtype == np.uint8:
        return torch.from_numpy(x).to(device, torch.float32).div_(255.0)
    return torch.as_tensor(as_float(x)).to(device)


class Projection(nn.Module):
    """A fixed linear map ``(x - mean) @ components.T / scale``: PCA as the network's first layer.

    ``scale`` is one number (the overall standard deviation of the projected training data), so
    the leading components keep their larger spread instead of being drowned by noise ones.
    """

    def __init__(self, mean: Tensor, components: Tensor, scale: float):
        super().__init__()
        self.register_buffer("mean", mean.float().reshape(1, -1))
        self.register_buffer("components", components.float())
        self.scale = float(scale)

    def forward(self, x: Tensor, input_scale: float = 1.0) -> Tensor:
        """Project ``input_scale * x``: ``transform`` passes uint8 pixels as they are with
        ``input_scale = 1 / 255``, so the scaling is folded into the (k, D) weight instead of
        a pass over the (n, D) inputs."""
        # x @ W.T - b with W = components / scale and b = mean @ W.T: one matmul and a bias on
        # the narrow side, instead of a pass over the wide inputs to centre them first (W and b
        # are (k, D) and (1, k): rebuilt per call, so they follow the buffers)
        weight = self.components / self.scale
        bias = self.mean @ weight.T
        if input_scale != 1.0:
            weight = weight * input_scale
        return torch.addmm(bias, x.reshape(len(x), -1), weight.T, beta=-1.0)


@dataclass(frozen=True)
class _BatchRows:
    """The number of rows of a whole batch, carried beside its indices: ``shard_batch``
    splits the indices over torchrun's processes and hands this to each of them whole."""

    total: int


class InputNoise(nn.Module):
    """Gaussian noise added to the inputs in training mode only, a regulariser that makes the
    map smoother between training points: standard deviation ``std`` on every feature, or
    ``std * weight_j`` on feature ``j`` with a ``(k,)`` ``weight`` (see
    :func:`noise_weights`)."""

    def __init__(self, std: float, weight: Tensor | None = None):
        super().__init__()
        self.std = float(std)
        self.register_buffer("weight", None if weight is None else weight.float().reshape(1, -1))

    def forward(self, x: Tensor, rows: tuple[int, int] | None = None) -> Tensor:
        """``x`` plus the noise in training mode.

        ``rows = (total, start)``: ``x`` holds rows ``start, start + 1, ...`` of a batch of
        ``total`` rows spread over processes (torchrun); the noise of the whole batch is
        drawn and this part of it added, so that every process, seeded alike, adds the noise
        one process would add to those rows, and their generators stay in step."""
        if self.training and self.std > 0:
            if rows is None:
                noise = torch.randn_like(x)
            else:
                total, start = rows
                noise = torch.randn((total, *x.shape[1:]), dtype=x.dtype, device=x.device)
                noise = noise[start : start + len(x)]
            weight = getattr(self, "weight", None)  # an InputNoise pickled before it had none
            if weight is not None:
                noise = noise * weight
            return x + self.std * noise
        return x

    def extra_repr(self) -> str:
        weighted = getattr(self, "weight", None) is not None
        return f"std={self.std}" + (", weighted per feature" if weighted else "")


def noise_weights(z: Tensor, power: float) -> Tensor | None:
    """Per-feature weights of the input noise: ``w_j`` proportional to ``sd_j ** power``.

    ``sd_j`` is the standard deviation of feature ``j`` over the rows of ``z`` (the MLP's
    training inputs, e.g. the scaled PCA components), and the weights are scaled so that
    ``mean_j w_j^2 = 1``: the noise has the total power of the unweighted noise of the same
    ``std``, shared out by the features' spread. A feature that never varies gets none.

    Parameters
    ----------
    z : (n, k) tensor
    power : float
        0 gives every feature the same noise (returns None), 1 noise proportional to spread.

    Returns
    -------
    (k,) tensor or None
        None for power 0 (the same noise on every feature) or where no feature varies.
    """
    if power == 0:
        return None
    spread = z.double().std(0)
    top = float(spread.max())
    if not (math.isfinite(top) and top > 0):
        return None
    weight = (spread / top).pow(float(power))  # in (0, 1]: no overflow for a large power
    return (weight / weight.pow(2).mean().sqrt()).float()


class ParametricSNE(TransformerMixin, BaseEstimator):
    """Parametric (t-)SNE with any divergence, scikit-learn style.

    ``fit(X)`` trains a network ``f`` so that the kernel q on ``f(X)`` matches t-SNE's p on
    ``X`` under ``divergence``; ``transform(X)`` embeds new points with ``f`` in one forward
    pass. The loss of a batch ``B`` is the I-Con equation ``mean_{i in B} D(p_B(.|i) ||
    q_B(.|i))`` with (``affinity="global"``, the default)

    - ``p_B(j|i) = P_ij / sum_{l in B} P_il``: the rows of t-SNE's symmetric perplexity
      affinities ``P``, fitted once over the whole training set (PCA-50 inputs, ``3 *
      perplexity`` exact nearest neighbours), restricted to the batch;
    - ``q_B(j|i) = c_ij w_ij / sum_{l in B, l != i} c_il w_il``: the Student-t (``w_ij = (1 +
      |f(x_i) - f(x_j)|^2 / dof)^(-(dof+1)/2)``) or Gaussian kernel over the batch. With
      ``q_scope="batch"`` every column weighs ``c_ij = 1``: q is normalised over the batch, as
      in the paper. With ``q_scope="global"`` each column is weighted by the number of
      training points it stands for (1 for a neighbour of ``i``, ``(n - 1 - k_i) / m_i`` for
      each of the ``m_i`` other points), so that the batch's repulsion estimates that of all
      ``n`` points whatever the batch size: for KL, t-SNE's loss. Either way the negatives'
      weight is divided by ``exaggeration`` during the first ``exaggeration_fraction`` of the
      steps. The default, ``q_scope="auto"``, is the global scope for KL and the batch scope
      for every other divergence (:func:`resolve_q_scope`): a bounded divergence needs the
      batch scope (on Fashion-MNIST 60k before the cells, test 5-NN 0.727 for TV against
      0.587 with the global scope), while KL gains from the global one with the cells (before
      ``input_noise_power``; test 5-NN, mean of seeds 0, 1, 2: 0.778 against 0.768 at 10k,
      0.804 against 0.791 at 60k);

    and batches of ``batch_size`` anchors plus one neighbour of each drawn from ``p(.|i)``.
    With ``affinity="batch"``, p is calibrated within random batches of ``batch_size`` points
    (the paper's and the official I-Con code's way) and q is the plain kernel over the batch.

    Parameters
    ----------
    n_components : int
        Embedding dimension.
    perplexity : float
        Perplexity of p.
    kernel : {"student_t", "gaussian"}
        q on the embedding: t-SNE's Student-t or SNE's Gaussian.
    divergence : str
        Any name of :func:`beyond_icon.divergences.get` (``kl``, ``tv``, ``jsd``, ...).
    affinity : {"global", "batch"}
        p fitted once over the training set, or calibrated within each batch.
    q_scope : {"auto", "global", "batch"}
        With ``affinity="global"``: each non-neighbour of a batch weighted by the training
        points it stands for, so q estimates the whole training set's normaliser, or every
        point weighted 1, q normalised over the batch (see above). ``auto`` (default): global
        for KL, batch for every other divergence (:func:`resolve_q_scope`).
    backbone : {"auto", "mlp", "cnn", "resnet18"}
        ``auto`` (default): the library's choice, the MLP (``hidden``) on the PCA features,
        for vectors and images alike, on any device; ``mlp`` names it. Until the measurements
        below, ``auto`` took the small CNN for images on a GPU (``cnn`` still does). The CNN
        was measured not to pay on Fashion-MNIST 10k (KL, test 5-NN): on an H200 the
        full-width CNN gave 0.720 against the MLP's 0.717 at twice the fit time (51 s against
        24 s) and a transform 9 times slower (0.041 s against 0.0045 s for 10k points, only 53
        times faster than openTSNE's, short of the 100 the MLP clears); with batches of 1,024
        anchors 0.725 against the MLP's 0.730. Narrower CNNs trained on the CPU (8 and 16
        channels in the first stage instead of 32) gave 0.716 and 0.719 against 0.716
        (``benchmarks/sne_train_gap.py --cnn-width``, ``benchmarks/gpu_sne_cluster.sh``).
    n_cells : int, optional
        With the MLP: cells of its input space (the PCA features), the k-means centroids of the
        training inputs, each with a learned vector added to the first layer
        (:class:`beyond_icon.models.CellMLP`), so that the map can be sharp between cells and
        smooth within them; the cell of a new point is its nearest centroid, so ``transform``
        stays one forward pass. Default (None): ``CELLS_PER_POINT`` of the training points,
        at most ``MAX_CELLS`` (n / 5, at most 2,048); 0 or 1: the plain MLP. While training,
        the cell of a noisy input is searched among the ``NEAR_CELLS`` (32) cells nearest its
        clean input's cell (the nearest of all cells for 98.6% of the noisy inputs on
        Fashion-MNIST 10k with 2,000 cells and 97.5% at 60k with 2,048, under the default
        noise; ``benchmarks/sne_cell_lookup.py``). On Fashion-MNIST
        (``benchmarks/bench_sne.py``, test 5-NN, one run, against the plain 256-256 MLP;
        ``input_noise_power=0.5``) the cells lift KL from 0.719 to 0.785 at 10k and from 0.730 to
        0.807 at 60k; the best divergence reaches 0.785 (KL, JSD) and 0.808 (TV; KL 0.807)
        against openTSNE's 0.788 and 0.816. The fits took 1.12 to 1.24 and 1.07 to 1.12 times
        the plain MLP's, and the transforms (medians of 5 calls) 19 to 21 and 18 to 21 ms for
        the 10k test points against 20 and 22 ms, on 2 CPU cores. From 1,024 cells the lookup
        has two levels (:class:`beyond_icon.models.CellMLP`'s ``coarse``).
    local_dims : int
        With the cells: each cell also maps its points linearly along its own
        ``local_dims`` principal directions (the top right singular vectors of its
        training inputs' offsets from its centroid): the output gains ``B A_c U_c (x -
        mu_c)`` (``A_c``: 2 x ``local_dims`` per cell, starting at zero; ``B`` shared;
        :class:`beyond_icon.models.CellMLP`). 0: none. Why: on Fashion-MNIST 60k the
        embedding is a vote inside the cells. For 97% of the test points all 5 embedding
        neighbours lie in the point's own cell, and the MLP alone, as smooth inside a
        cell as everywhere, orders a cell's points barely better than chance (seed 1: a
        vote of the 5 nearest inside the cell 0.802 against 0.791 for 5 drawn at random
        and 0.816 for the 5 nearest in the plane of the cell's top two directions; 0.809
        with these maps; ``benchmarks/sne_cells.py``). Default 5: KL's test 5-NN on
        Fashion-MNIST 60k rose on each of five seeds (0.809, 0.807, 0.807, 0.815, 0.807
        against 0.807, 0.799, 0.805, 0.814, 0.804; mean 0.809 against 0.806; openTSNE
        0.817), trustworthiness 0.989 to 0.990; Hellinger's rose on each seed by 0.5 to
        0.8 points, to a mean of 0.812 (0.805 before), within 0.8 of openTSNE on every
        seed; at 10k the four divergences gave 0.779 to 0.784 (openTSNE 0.788). On seed 1
        (0.807), 10 directions gave 0.803, the maps 4 times larger 0.806 and the coordinates of
        the clean input rather than the noisy one 0.808 (one run each).
    hidden : tuple of int
        Widths of the MLP's hidden layers (``backbone`` ``auto`` or ``mlp``). Default (128,
        128): with the cells, two layers of 128 reached the test 5-NN of two of 256 on
        Fashion-MNIST 10k (KL 0.775 against 0.776, Hellinger 0.780 against 0.778) in 4/5 of
        the fit time; at 60k with 2,048 cells, Hellinger 0.801 against 0.802 and KL 0.783
        against 0.790 (one run each). It was (256, 256) in the earlier recipe (``RECIPE``),
        whose runs are not resumed.
    n_steps : int, optional
        Optimiser steps; default ``clip(32 * n / batch_size, 3000, 20000)``: at least 3,000
        steps (a floor for small data), 32 passes (``PASSES``) of the anchors over the data
        from 24k points, at most 20,000 steps; rounded up to whole passes of the anchors (an
        epoch, the unit of checkpoints). On Fashion-MNIST 60k (one run each, probes with the
        cells' k-means started from a tree), 32, 36 and 40 passes gave Hellinger test 5-NN
        0.810, 0.808 and 0.811 (trustworthiness 0.9876, 0.9888, 0.9892) and KL 0.786, 0.796
        and 0.794; recipe 4's bench run (32 passes, 2,048 cells), Hellinger 0.808 / 0.9904 in
        51 s (openTSNE 0.816 / 0.9907 in 62 s). 40 passes was recipe 2 (``RECIPE``).
        On Fashion-MNIST 10k with the cells (one run each), 3,000 steps gave test 5-NN 0.767
        (KL) and 0.781 (Hellinger) in 17 to 18 s against 0.773 and 0.782 for the earlier
        floor of 4,000 in 23 to 26 s (openTSNE 0.788 in 21.6 s; lr 6e-3 gave 0.770 and
        0.780). Before the cells, 4,000 steps at lr 4e-3 gave 0.723 against
        0.708 for 6,000 steps at 1e-3 and 0.724 for 6,000 at 2e-3 (KL, with
        ``q_scope="global"``, the default then).
    batch_size : int
        Anchors per batch (``affinity="global"``; ``n // batch_size`` equal chunks of a
        permutation, each anchor with one sampled neighbour, so a batch holds at most twice its
        anchors) or points per batch (``"batch"``).
    lr : float
        Adam learning rate.
    schedule : {"cosine", "step", "none"}
        Learning-rate schedule over the steps (:data:`beyond_icon.train.SCHEDULES`; the same
        names in every task).
    exaggeration : float
        Early exaggeration (``global`` only): the negatives' weight is divided by it.
    exaggeration_fraction : float
        Fraction of the steps under early exaggeration.
    pca_components : int or None
        PCA dimension of the inputs of p and of the MLP (None or 0: raw inputs; inputs with no
        more features are taken raw, and fewer points than this give as many components as
        points). p's space is rescaled by a power of two, which leaves p as it is, when its
        spread is so far from 1 that float32 distances would underflow or overflow.
    input_noise : float
        Standard deviation of the Gaussian noise added to the network's (standardised) inputs
        while training (its root mean square over the features when ``input_noise_power`` shares
        it out), a regulariser: +0.9 points of test 5-NN accuracy on Fashion-MNIST 10k (KL,
        ``q_scope="global"``, the plain MLP). With the cells it is also what sends a new point
        onto its cell's training points, and what draws the embedding as tight clumps: at 10k
        (Hellinger, one run) 0 gave a test 5-NN of 0.721 with the test points scattered
        between the train points' clumps (108 pieces, the largest holding 55% of the points),
        0.1 gave 0.759 (152), the default 0.784 (338 pieces, the largest 5%).
    input_noise_power : float
        With the MLP, how the noise is shared out among the input features (the PCA
        components): ``input_noise * w_j`` on feature ``j``, ``w_j`` proportional to its
        standard deviation over the training inputs raised to this power, with ``mean_j w_j^2 =
        1`` (:func:`noise_weights`; the same total noise power). 0: the same noise on every
        feature (the default before 2026-11-30), so the low-variance components, where near
        points differ, are drowned and the leading ones barely perturbed; 1: noise
        proportional to each feature's spread. Default 0.5 (weights 0.65 to 2.41 on
        Fashion-MNIST 10k's PCA-50): in probes on Fashion-MNIST (test 5-NN, one run each), KL
        0.778 -> 0.788 at 10k (power 1: 0.779) and 0.799 -> 0.806 and 0.802 -> 0.807 at 60k
        on seeds 1 and 2, Hellinger 0.800 -> 0.804 and 0.804 -> 0.807, trustworthiness up by
        0.0002 to 0.0015; through the estimator itself (bench runs, paired with power 0), +0.5
        points on average over ten divergence-seed pairs at 10k and +0.1 over eight at 60k.
    sigma : float
        Bandwidth of the Gaussian q.
    dof : float
        Degrees of freedom of the Student-t q (1: Cauchy, t-SNE's). Lighter tails join the
        cells' clumps (see ``input_noise``): on Fashion-MNIST 60k (``bench_sne.py``, one run
        each) 1.5 cut the test embedding's pieces (``metrics.embedding_pieces``) from 405 to
        86 to 119 for Hellinger (seeds 0 to 2) at a test 5-NN of 0.808, 0.806, 0.809 against
        0.810, 0.811, 0.811, and KL's from 279 to 147 and 96 at 0.808 and 0.800 against 0.809
        and 0.807; 2 made the map continuous at 0.4 to 1.0 points less (Hellinger, five
        seeds). openTSNE's falls into 7 pieces.
    n_neighbors : int, optional
        Neighbours searched per point for p (default ``3 * perplexity``).
    neighbor_method : {"auto", "exact", "nndescent"}
        Neighbour search (``auto``: exact up to 200k points).
    cache_dir : str, optional
        Where the neighbour table is cached (default ``~/.cache/beyond-icon``).
    amp : bool
        bf16 autocast on CUDA (kernels and distances stay in float32).
    random_state : int
        Seed (an integer; None is refused, since a fit is made repeatable by it): the same
        seed gives the same embedding on the CPU.
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    verbose : bool
        Progress bars.

    Attributes
    ----------
    model_ : torch.nn.Module
        The trained network (inputs as given to ``fit`` -> ``n_components``).
    embedding_ : (n, n_components) array
        ``transform`` of the training data.
    uint8_input_ : bool
        Whether ``fit`` saw uint8 inputs (scaled by 1/255 to [0, 1]).
    input_range_ : (float, float)
        The least and largest value of the training inputs (after that scaling): ``transform``
        refuses uint8 for a model fitted on floats outside [0, 1], and floats outside [0, 1]
        for a model fitted on uint8.
    affinity_ : PerplexityAffinity or None
        The fitted p (``affinity="global"``).
    q_scope_ : {"global", "batch"}
        The q scope used: ``q_scope`` with ``auto`` resolved (``batch`` with
        ``affinity="batch"``, whose q is the batch's plain kernel).
    history_ : list of dict
        Loss, gradient norm and learning rate of every step.
    n_steps_ : int
        Steps taken.
    fit_time_ : float
        Seconds of ``fit``.

    References
    ----------
    van der Maaten, L. (2009). Learning a parametric embedding by preserving local structure.
    AISTATS.
    Damrich, S. et al. (2023). From t-SNE to UMAP with contrastive learning. ICLR.
    """

    _TRANSFORM_ROWS = 2048  # rows per block of ``transform`` on the CPU

    def __init__(
        self,
        n_components: int = 2,
        perplexity: float = 30.0,
        kernel: str = "student_t",
        divergence: str = "kl",
        affinity: str = "global",
        q_scope: str = "auto",
        backbone: str = "auto",
        n_cells: int | None = None,
        local_dims: int = 5,
        hidden: tuple[int, ...] = (128, 128),
        n_steps: int | None = None,
        batch_size: int = 256,
        lr: float = 4e-3,
        schedule: str = "cosine",
        exaggeration: float = 12.0,
        exaggeration_fraction: float = 0.25,
        pca_components: int | None = 50,
        input_noise: float = 0.3,
        input_noise_power: float = 0.5,
        sigma: float = 1.0 / math.sqrt(2.0),
        dof: float = 1.0,
        n_neighbors: int | None = None,
        neighbor_method: str = "auto",
        cache_dir: str | None = None,
        amp: bool = True,
        random_state: int = 0,
        device: str = "auto",
        verbose: bool = False,
    ):
        self.n_components = n_components
        self.perplexity = perplexity
        self.kernel = kernel
        self.divergence = divergence
        self.affinity = affinity
        self.q_scope = q_scope
        self.backbone = backbone
        self.n_cells = n_cells
        self.local_dims = local_dims
        self.hidden = hidden
        self.n_steps = n_steps
        self.batch_size = batch_size
        self.lr = lr
        self.schedule = schedule
        self.exaggeration = exaggeration
        self.exaggeration_fraction = exaggeration_fraction
        self.pca_components = pca_components
        self.input_noise = input_noise
        self.input_noise_power = input_noise_power
        self.sigma = sigma
        self.dof = dof
        self.n_neighbors = n_neighbors
        self.neighbor_method = neighbor_method
        self.cache_dir = cache_dir
        self.amp = amp
        self.random_state = random_state
        self.device = device
        self.verbose = verbose

    # ------------------------------------------------------------------------------- checks
    def _check_params(self, n: int) -> None:
        def positive_int(name: str, value: object) -> None:
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"
            )
        if self.affinity not in AFFINITIES:
            raise ValueError(f"affinity must be one of {AFFINITIES}, got {self.affinity!r}")
        divergences.get(self.divergence)
        resolve_q_scope(self.q_scope, self.divergence)
        positive_int("n_components", self.n_components)
        positive_int("batch_size", self.batch_size)
        if self.n_steps is not None:
            positive_int("n_steps", self.n_steps)
        widths = self.hidden if isinstance(self.hidden, (tuple, list)) else None
        if not widths or any(not is_int(w) or w < 1 for w in widths):
            raise ValueError(
                f"hidden must be a non-empty sequence of positive integers, got {self.hidden!r}"
            )
        if self.n_cells is not None:
            if not is_int(self.n_cells) or self.n_cells < 0:
                raise ValueError(f"n_cells must be an integer >= 0, got {self.n_cells!r}")
            if self.n_cells > n:
                raise ValueError(
                    f"n_cells = {self.n_cells} is more than the {n} training points; lower it"
                )
            if self.n_cells > 1 and self.backbone not in ("auto", "mlp"):
                raise ValueError(
                    f"n_cells applies to the MLP, not backbone={self.backbone!r}; "
                    "set n_cells=0 or backbone='mlp'"
                )
        if not is_int(self.local_dims) or self.local_dims < 0:
            raise ValueError(f"local_dims must be an integer >= 0, got {self.local_dims!r}")
        for name in ("lr", "exaggeration", "sigma", "dof", "perplexity"):
            check_positive(getattr(self, name), name)
        for name in ("input_noise", "input_noise_power"):
            value = getattr(self, name)
            if not (is_real(value) and 0 <= value < math.inf):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if not (is_real(self.exaggeration_fraction) and 0 <= self.exaggeration_fraction <= 1):
            raise ValueError(
                f"exaggeration_fraction must be a number in [0, 1], got "
                f"{self.exaggeration_fraction!r}"
            )
        if self.pca_components is not None and not (
            is_int(self.pca_components) and self.pca_components >= 0
        ):
            raise ValueError(
                f"pca_components must be an integer >= 0 or None (0 or None: raw inputs), got "
                f"{self.pca_components!r}"
            )
        self._seed()  # random_state
        divergence = divergences.get(self.divergence)
        # the library's own divergences are known; a user's may handle p = 0 its own way
        known = divergences.is_builtin(divergence)
        if self.affinity == "global" and known and not divergence.finite_where_p_is_zero:
            raise ValueError(
                f"divergence {self.divergence!r} is infinite where p = 0 < q, and with "
                "affinity='global' p is zero outside each point's nearest neighbours, so no "
                "step could be taken; use a divergence finite there (kl, tv, jsd, hellinger, "
                "chi2, alpha:A with A > 0) or affinity='batch'"
            )
        if self.perplexity < 1:
            raise ValueError(
                f"perplexity must be >= 1 (an effective number of neighbours), got "
                f"{self.perplexity!r}"
            )
        if n < 3:
            raise ValueError(f"parametric SNE needs at least 3 samples, got n_samples = {n}")
        if self.n_neighbors is not None and self.affinity == "global":
            k = self.n_neighbors
            if not is_int(k) or k < 1:
                raise ValueError(f"n_neighbors must be a positive integer or None, got {k!r}")
            if k > n - 1:
                raise ValueError(
                    f"n_neighbors = {k} needs more than {k} training points, got n = {n}; "
                    "lower n_neighbors"
                )
            if k < self.perplexity:
                raise ValueError(
                    f"n_neighbors = {k} is below the perplexity {self.perplexity:g}: p needs at "
                    "least as many neighbours as its perplexity; raise n_neighbors or lower "
                    "the perplexity"
                )
        if self.affinity == "batch":
            batch = min(self.batch_size, n)
            if not 1 <= self.perplexity < batch - 1:
                raise ValueError(
                    f"perplexity {self.perplexity:g} needs batches of more than "
                    f"{self.perplexity + 1:g} points, but a batch holds {batch} (n = {n}, "
                    f"batch_size = {self.batch_size}); lower the perplexity or raise the batch size"
                )
        elif not 1 <= self.perplexity < n - 1:
            raise ValueError(
                f"perplexity {self.perplexity:g} needs more than {self.perplexity + 1:g} "
                f"points, got n = {n}; lower the perplexity"
            )

    def _seed(self) -> int:
        """``random_state`` as the int every random draw of a fit derives from."""
        if not is_int(self.random_state):
            raise ValueError(
                "random_state must be an integer (the same seed gives the same embedding on the "
                f"CPU), got {self.random_state!r}"
            )
        return int(self.random_state)

    def _cells(self, n: int) -> int:
        """Cells of the MLP's input space (0: the plain MLP)."""
        if self.backbone not in ("auto", "mlp"):
            return 0
        m = int(min(n * CELLS_PER_POINT, MAX_CELLS)) if self.n_cells is None else int(self.n_cells)
        return m if m >= 2 else 0

    def _steps(self, n: int) -> int:
        if self.n_steps is not None:
            return int(self.n_steps)
        return int(np.clip(PASSES * n / self.batch_size, STEPS_FLOOR, 20000))

    # ------------------------------------------------------------------------------- fitting
    def _input_space(self, flat: Tensor) -> tuple[nn.Module | None, Tensor]:
        """PCA of wide inputs (the space of p, and the MLP's input) as a fixed layer."""
        if not self.pca_components or flat.shape[1] <= self.pca_components:
            return None, flat
        from sklearn.decomposition import PCA

        seed = self._seed() % 2**32  # scikit-learn's seeds are 32-bit, the tasks' 63
        # fewer points than components: as many components as points (PCA's most)
        components = min(int(self.pca_components), len(flat))
        pca = PCA(components, random_state=seed).fit(flat.numpy())
        mean = torch.as_tensor(pca.mean_, dtype=torch.float32)
        components = torch.as_tensor(pca.components_, dtype=torch.float32)
        projected = (flat - mean) @ components.T
        scale = float(projected.std())
        return Projection(mean, components, scale), projected

    def _network(self, xf: Tensor, projection: nn.Module | None, device: torch.device):
        name = "mlp" if self.backbone == "auto" else self.backbone
        if name == "mlp":
            if projection is not None:
                stem = projection
                width = projection.components.shape[0]
            else:
                flat = xf.reshape(len(xf), -1)
                stem = Standardize(flat.mean(0, keepdim=True), flat.std().expand(1, flat.shape[1]))
                width = flat.shape[1]
            m = self._cells(len(xf))
            weight = None
            if m or self.input_noise_power:
                with torch.no_grad():  # the MLP's inputs: where the cells are drawn, the noise
                    flat = xf.reshape(len(xf), -1)
                    z = torch.cat([stem(flat[s : s + 16384]) for s in range(0, len(flat), 16384)])
                weight = noise_weights(z, float(self.input_noise_power))
            if m:
                landmarks = _kmeans_centres(z, m, self._seed())
            if m and len(landmarks) >= 2:
                body = CellMLP(
                    width,
                    landmarks,
                    hidden=tuple(self.hidden),
                    batch_norm=False,
                    local_dims=int(self.local_dims),
                    inputs=z if self.local_dims else None,
                )
            else:
                body = MLP(width, hidden=tuple(self.hidden), batch_norm=False)
        else:
            stem, body = Standardize.fit(xf), build_backbone(name, tuple(xf.shape[1:]))
            weight = None  # images: the same noise on every pixel
        noise = InputNoise(float(self.input_noise), weight)
        last = nn.Linear(body.feature_dim, int(self.n_components))
        return nn.Sequential(stem, noise, body, last)

    def fit(
        self, X, y=None, *, out_dir: str | Path | None = None, resume: bool = False
    ) -> ParametricSNE:
        """Fit p, train the network, embed the training data.

        Parameters
        ----------
        X : (n, D) vectors or (n, C, H, W) images
            uint8 images are scaled to [0, 1].
        y : ignored
        out_dir : path, optional
            Checkpoints and ``history.csv`` go there (``resume`` continues from them).
        resume : bool

        Returns
        -------
        self
        """
        x = _validate(X)
        self._check_params(len(x))
        started = time.perf_counter()
        seed = self._seed()
        seed_everything(seed)
        device = resolve_device(self.device)
        xf = _float_tensor(x, torch.device("cpu"))
        flat = xf.reshape(len(xf), -1)
        if not float(flat.std(0).max()) > 0:
            raise ValueError(
                f"X has no spread: all {len(x)} rows are the same point; parametric SNE needs "
                "distinct points"
            )
        self.n_features_in_ = flat.shape[1]
        self.input_shape_ = tuple(x.shape[1:])
        self.uint8_input_ = x.dtype == np.uint8
        self.input_range_ = (float(flat.min()), float(flat.max()))
        projection, p_space = self._input_space(flat)
        p_space = _float32_safe(p_space)
        self.projection_ = projection
        self.model_ = self._network(xf, projection, device).to(device)
        n = len(xf)
        n_steps = self._steps(n)
        if self.affinity == "global":
            self.affinity_ = PerplexityAffinity(
                float(self.perplexity),
                n_neighbors=None if self.n_neighbors is None else int(self.n_neighbors),
                neighbor_method=self.neighbor_method,
                cache_dir=self.cache_dir,
                device=str(device),
                verbose=self.verbose,
                random_state=seed % 2**32,  # pynndescent's seeds are 32-bit
            ).fit(p_space)
            sampler = NeighborBatchSampler(self.affinity_, int(self.batch_size))
            steps_per_epoch = sampler.steps_per_epoch
            exaggerated = self.exaggeration_fraction * n_steps

            def batches(generator: torch.Generator, epoch: int) -> list:
                steps = range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
                return [
                    (
                        index,
                        float(self.exaggeration if step < exaggerated else 1.0),
                        _BatchRows(len(index)),
                    )
                    for index, step in zip(sampler.epoch(generator), steps)
                ]

        else:
            self.affinity_ = None
            batch = min(int(self.batch_size), n)
            steps_per_epoch = max(1, n // batch)

            def batches(generator: torch.Generator, epoch: int) -> list:
                order = torch.randperm(n, generator=generator)
                return [
                    (index, 1.0, _BatchRows(len(index))) for (index,) in split_batches(batch, order)
                ]

        kernel_args = (self.divergence, float(self.perplexity))
        # with p per batch the scope does not apply: q is the batch's plain kernel
        resolved = resolve_q_scope(self.q_scope, self.divergence)
        self.q_scope_ = resolved if self.affinity == "global" else "batch"
        scope = {"affinity": self.affinity_, "q_scope": self.q_scope_}
        if self.kernel == "gaussian":
            loss = SNE(*kernel_args, sigma=float(self.sigma), **scope)
        else:
            loss = TSNE(*kernel_args, dof=float(self.dof), **scope)
        xf, p_space = xf.to(device), p_space.to(device)
        stem, noise, body, head = self.model_[0], self.model_[1], self.model_[2], self.model_[3:]
        if isinstance(body, _models.MLP):  # any MLP, benchmarks' subclasses too
            # the MLP's fixed first layer (PCA or standardisation), applied once, not every step
            flat = flat.to(device)
            with torch.no_grad():
                inputs = torch.cat([stem(flat[s : s + 16384]) for s in range(0, n, 16384)])
            stem = nn.Identity()
        else:
            inputs = xf
        rank, world_size = world()

        def noisy(index: Tensor, batch: _BatchRows) -> Tensor:
            """The rows' inputs with their noise: under torchrun, this rank's part of the
            noise of the whole batch (``shard_batch`` cut it into consecutive parts)."""
            x = stem(inputs.index_select(0, index))
            if world_size == 1:
                return noise(x)
            part, longer = divmod(batch.total, world_size)  # tensor_split's cut
            return noise(x, rows=(batch.total, rank * part + min(rank, longer)))

        if isinstance(body, CellMLP):
            # a noisy input's cell is looked up among the NEAR_CELLS cells nearest its clean
            # input's cell, not among all m; both found at the first step, after a --resume
            # has restored the landmarks
            cells = {}

            def network(index: Tensor, batch: _BatchRows) -> Tensor:
                if not cells:
                    cells["near"] = body.neighbouring_cells(NEAR_CELLS)
                    cells["clean"] = body.cells(inputs)
                x = noisy(index, batch)
                clean = cells["clean"].index_select(0, index)
                return head(body(x, cells=body.cells_near(x, clean, cells["near"])))
        else:

            def network(index: Tensor, batch: _BatchRows) -> Tensor:
                return head(body(noisy(index, batch)))

        def loss_fn(item: tuple[Tensor, float, _BatchRows]) -> Tensor:
            index, exaggeration, batch = item
            index = index.to(device)
            z = network(index, batch).float()
            if self.affinity_ is None:
                return loss(p_space[index], z)
            return loss(None, z, indices=index, exaggeration=exaggeration)

        epochs = math.ceil(n_steps / steps_per_epoch)
        config = TrainConfig(
            epochs=epochs,
            lr=float(self.lr),
            schedule=self.schedule,
            amp=self.amp,
            fused=True,  # the cells' table makes the optimiser step count
            seed=seed,
        )
        self.history_ = fit(
            self.model_,
            batches,
            loss_fn,
            config,
            device=device,
            out_dir=out_dir,
            resume=resume,
            desc=f"sne[{divergences.get(self.divergence).name}]",
            verbose=self.verbose,
            identity={  # what the run is; where it runs and what it prints may change
                k: v
                for k, v in self.get_params().items()
                if k not in ("verbose", "cache_dir", "device", "amp")
            }
            | {"n_samples": n, "recipe": RECIPE, "data_fingerprint": fingerprint(x)},
        )
        self.n_steps_ = len(self.history_)
        self.embedding_ = self.transform(x)
        # this segment's wall time plus the training time of the segments before a --resume
        last = self.history_[-1]["segment"] if self.history_ else 0
        before = [h["time"] for h in self.history_ if h["segment"] < last]
        self.fit_time_ = time.perf_counter() - started + (before[-1] if before else 0.0)
        return self

    def _check_new(self, X) -> np.ndarray:
        """``X`` validated against what ``fit`` saw: sample shape and uint8 or not."""
        check_is_fitted(self, "model_")
        x = _validate(X)
        if x.ndim == 2 and len(self.input_shape_) == 1 and x.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {x.shape[1]} features, but ParametricSNE is expecting "
                f"{self.n_features_in_} features as input (the sample shape it was fitted on)"
            )
        if tuple(x.shape[1:]) != self.input_shape_:
            raise ValueError(
                f"X has sample shape {x.shape[1:]}, the model was fitted on {self.input_shape_}"
            )
        # uint8 is scaled by 1/255 to [0, 1]: refuse a mix that cannot be the same scale
        fitted = getattr(self, "input_range_", None)  # None: pickled before it existed
        if fitted is not None and x.dtype == np.uint8 and not self.uint8_input_:
            if fitted[0] < 0 or fitted[1] > 1:
                raise ValueError(
                    "X is uint8, which is scaled by 1/255 to [0, 1], but the model was fitted on "
                    f"float inputs in [{fitted[0]:.4g}, {fitted[1]:.4g}]; pass X as floats on "
                    "that scale"
                )
        elif fitted is not None and x.dtype != np.uint8 and self.uint8_input_:
            low, high = float(x.min()), float(x.max())
            if low < 0 or high > 1:
                raise ValueError(
                    "the model was fitted on uint8 inputs, scaled by 1/255 to [0, 1], but X is "
                    f"float in [{low:.4g}, {high:.4g}]; pass X as uint8 or scaled to [0, 1]"
                )
        return x

    @torch.no_grad()
    def input_features(self, X) -> np.ndarray:
        """The space p is defined on: ``X`` flattened, after the fitted PCA if any."""
        x = self._check_new(X)
        flat = _float_tensor(x, torch.device("cpu")).reshape(len(x), -1)
        if self.projection_ is None:
            return flat.numpy()
        return (self.projection_(flat) * self.projection_.scale).numpy()

    @torch.inference_mode()
    def transform(self, X) -> np.ndarray:
        """Embed points with the trained network.

        Parameters
        ----------
        X : array of the sample shape seen in ``fit``

        Returns
        -------
        (n, n_components) float32 array
        """
        x = self._check_new(X)
        device = next(self.model_.parameters()).device
        self.model_.eval()
        # the fixed first layer in blocks of rows small enough that a block's float inputs
        # stay in cache and are not a fresh mapping per call (10k Fashion-MNIST points, the
        # first call in a fresh process: 36 -> 27 to 30 ms with blocks of 2,048 rows instead
        # of 16,384; 2 cores); an MLP's narrow rest then in large blocks, where the two-level
        # cell lookup pays its per-centre steps once (10k points, later calls: 32 -> 21 to 23
        # ms on 2 cores)
        rows = self._TRANSFORM_ROWS if device.type == "cpu" else 16384
        if isinstance(self.model_[2], _models.MLP):
            stem, rest = self.model_[:1], self.model_[1:]
            body, head = self.model_[2], self.model_[3:]
            folds = len(head) == 1 and isinstance(head[0], nn.Linear)
            if (
                isinstance(body, CellMLP)
                and folds
                and head[0].out_features <= getattr(body, "local_dims", 0)
            ):
                # the cells' maps folded through the linear head (CellMLP.embed; the noise is
                # off in eval mode), where that gathers fewer numbers per row: 10k
                # Fashion-MNIST points, the whole transform 29.5 -> 24.3 ms (medians of 37
                # alternating calls, 2 cores), the same embedding up to float rounding
                def rest(z: Tensor) -> Tensor:
                    return body.embed(z, head[0])

            chunk = 65536 if device.type == "cpu" else 16384  # the rest's rows at once
        else:
            stem, rest, chunk = self.model_, None, rows
        if x.dtype == np.uint8 and rest is not None and isinstance(self.model_[0], Projection):
            # uint8 pixels go to the PCA layer unscaled, 1 / 255 folded into its weight: 10k
            # Fashion-MNIST points in blocks of 2,048 rows, the conversion 2.1 to 2.6 -> 1.2 to
            # 1.4 ms (medians of 30 calls, 2 cores). Not bitwise the fit's (x / 255) @ W: a point on
            # a boundary between two cells may take the other one (none of Fashion-MNIST's 70k
            # points did with a 10k fit's 2,000 cells; embeddings within 6e-5)
            def first(block: np.ndarray) -> Tensor:
                raw = torch.from_numpy(block).to(device, torch.float32)
                return self.model_[0](raw, input_scale=1.0 / 255.0)

        else:

            def first(block: np.ndarray) -> Tensor:
                return stem(_float_tensor(block, device))

        out = []
        for start in range(0, len(x), chunk):
            part = x[start : start + chunk]
            blocks = [first(part[i : i + rows]) for i in range(0, len(part), rows)]
            out.append(
                (torch.cat(blocks) if rest is None else rest(torch.cat(blocks))).float().cpu()
            )
        embedding = torch.cat(out).numpy()
        if not np.isfinite(embedding).all():
            if not all(bool(torch.isfinite(w).all()) for w in self.model_.parameters()):
                raise ValueError("the network's weights are not finite: its training diverged")
            # finite float32 inputs whose projection overflows
            rows = np.flatnonzero(~np.isfinite(embedding).all(1))
            raise ValueError(
                f"the network's float32 arithmetic overflowed on rows {rows[:5].tolist()}"
                f"{' and more' if len(rows) > 5 else ''} of X (largest |x| = "
                f"{float(np.abs(x[rows[:5]]).max()):.3g}); rescale X"
            )
        return embedding

    def __setstate__(self, state: dict) -> None:
        # an estimator pickled before n_cells existed trained the plain MLP
        state.setdefault("n_cells", 0)
        state.setdefault("hidden", (256, 256))  # and before hidden existed, 256-256
        state.setdefault("q_scope", "global")  # and before q_scope existed, q for the train split
        state.setdefault("input_noise_power", 0.0)  # and before the noise was weighted, none
        state.setdefault("local_dims", 0)  # and before the cells' own maps, none
        super().__setstate__(state)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float32"]  # the network computes in float32
        tags.non_deterministic = self.device != "cpu"  # CUDA kernels are not bitwise repeatable
        return tags

    def fit_transform(self, X, y=None, **fit_params) -> np.ndarray:
        """``fit(X).embedding_``."""
        return self.fit(X, y, **fit_params).embedding_
