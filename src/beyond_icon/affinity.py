"""Affinities fitted once over a whole training set, and the rows of p for any batch.

A kernel computed inside a random batch only sees the neighbours that happen to be in the batch
(for SNE on 10k points in batches of 256, a row's p keeps 0.19 of its mass on the point's 30
true nearest neighbours instead of 0.88). :class:`PerplexityAffinity` fits t-SNE's p once,
sparse, over all points, as openTSNE's ``PerplexityBasedNN`` and TorchDR's affinities do;
:meth:`PerplexityAffinity.get_batch` gives its rows restricted to a batch, and
:meth:`PerplexityAffinity.sample_neighbors` draws the neighbours that a batch must carry so
that those rows keep their mass (:class:`beyond_icon.sampling.NeighborBatchSampler`).

References
----------
van der Maaten, L. and Hinton, G. (2008). Visualizing data using t-SNE. JMLR 9.
Poličar, P. G., Stražar, M. and Zupan, B. (2024). openTSNE: a modular Python library for t-SNE
dimensionality reduction and embedding. JSS 109(3).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from beyond_icon._validation import is_int, is_real
from beyond_icon.neighbors import cached_neighbor_table

__all__ = ["Q_SCOPES", "PerplexityAffinity", "calibrate_perplexity"]

# What the normaliser of q over a batch stands for (see PerplexityAffinity.negative_log_weights).
Q_SCOPES = ("global", "batch")


def calibrate_perplexity(
    sq_distances: np.ndarray | Tensor, perplexity: float, n_iter: int = 64, tol: float = 1e-10
) -> np.ndarray:
    """Per-row Gaussian conditionals over given neighbours, calibrated to a perplexity.

    Parameters
    ----------
    sq_distances : (n, k) array
        Squared distances from each point to its ``k`` neighbours.
    perplexity : float
        Target ``exp(H(p(.|i)))`` (natural log) of every row, ``1 <= perplexity <= k``.
    n_iter : int
        At most this many steps on ``u_i = log beta_i`` (64 bisections exhaust float64's
        resolution in [-50, 50]).
    tol : float
        A row is done when its entropy is within ``tol`` nats of ``log(perplexity)`` (or when
        its bracket on ``u`` is narrower than 1e-12, e.g. a row of equal distances).

    Returns
    -------
    (n, k) float64 array
        ``p(j|i) = exp(-beta_i d_ij) / sum_l exp(-beta_i d_il)`` with ``beta_i`` such that
        each row's perplexity equals ``perplexity``.

    Notes
    -----
    Safeguarded Newton on ``u = log beta``: the entropy ``H(u)`` falls as ``u`` grows, with
    ``dH/du = -beta^2 Var_p(d)``; each step narrows a bracket ``[lo, hi]`` (from ``[-50,
    50]``) by the sign of ``H - log(perplexity)`` and takes the Newton step where it lands
    inside the bracket and at least halves the last step, the bisection otherwise (Press et al.,
    Numerical Recipes, ``rtsafe``). On Fashion-MNIST 60k (90 neighbours) every
    row met ``tol`` in a handful of steps, where plain bisection took 64.
    """
    d2 = torch.as_tensor(np.asarray(sq_distances), dtype=torch.float64)
    if d2.dim() != 2 or d2.shape[1] < 1:
        raise ValueError(f"sq_distances must be (n, k), got {tuple(d2.shape)}")
    if not 1.0 <= perplexity <= d2.shape[1]:
        raise ValueError(
            f"perplexity {perplexity:g} needs at least as many neighbours; got k = {d2.shape[1]}"
        )
    # shift by the nearest and scale by the median neighbour: entropy is shift-invariant and
    # beta absorbs the scale, so beta ~ 1 (u = 0) is a sensible start whatever the data's units
    d2 = d2 - d2.min(dim=1, keepdim=True).values
    d2 = d2 / d2.median(dim=1, keepdim=True).values.clamp_min(1e-12)
    target = math.log(perplexity)
    lo = torch.full((d2.shape[0], 1), -50.0, dtype=torch.float64)
    hi = torch.full_like(lo, 50.0)
    u = torch.zeros_like(lo)
    last = hi - lo  # each row's last step
    for _ in range(n_iter):
        beta = u.exp()
        log_p = torch.log_softmax(-beta * d2, dim=1)
        p = log_p.exp()
        gap = -(p * log_p).sum(1, keepdim=True) - target
        done = (gap.abs() <= tol) | (hi - lo <= 1e-12)  # hit, or as close as beta allows
        if bool(done.all()):
            break
        too_flat = gap > 0  # entropy falls as beta grows: raise u
        lo = torch.where(too_flat, u, lo)
        hi = torch.where(too_flat, hi, u)
        mean = (p * d2).sum(1, keepdim=True)
        variance = (p * (d2 - mean).pow(2)).sum(1, keepdim=True)
        slope = -beta.pow(2) * variance
        step = gap / torch.where(slope < 0, slope, -1.0)
        newton = u - step
        # Newton where it stays inside the bracket and at least halves the last step (no
        # two-cycles), else bisection (Press et al., Numerical Recipes, rtsafe)
        take = (slope < 0) & (newton > lo) & (newton < hi) & (2 * step.abs() < last.abs())
        bisection = (lo + hi) / 2
        last = torch.where(take, step, u - bisection)
        u = torch.where(done, u, torch.where(take, newton, bisection))
    return torch.softmax(-u.exp() * d2, dim=1).numpy()


class PerplexityAffinity:
    """t-SNE's p, fitted once over the whole training set: sparse, symmetric, cached.

    ``fit(x)`` finds the ``n_neighbors`` (default ``3 * perplexity``) nearest neighbours of
    every point (Euclidean; exact and blocked, or approximate for very large ``n``), calibrates
    each point's Gaussian over them to the perplexity (``p_{j|i}``), and symmetrises::

        P_ij = (p_{j|i} + p_{i|j}) / (2 n)          (the joint P of t-SNE)
        p(j|i) = P_ij / sum_l P_il                  (its rows: the I-Con p)

    ``get_batch(indices)`` returns ``log p_B(j|i) = log P_ij - log sum_{l in B} P_il`` for the
    batch ``B``: the global rows restricted to the batch and renormalised, ``-inf`` at
    non-neighbours and on the diagonal, a row with no neighbour in the batch entirely ``-inf``.

    Parameters
    ----------
    perplexity : float
        Effective number of neighbours of each point.
    n_neighbors : int, optional
        Neighbours searched per point (default ``min(n - 1, 3 * perplexity)``, as in openTSNE).
    neighbor_method : {"auto", "exact", "nndescent"}
        See :func:`beyond_icon.neighbors.cached_neighbor_table`.
    cache_dir : path, optional
        Where the neighbour table is cached (default ``~/.cache/beyond-icon``).
    device : str
        Where the exact neighbour search runs.
    verbose : bool
        Progress bar for the neighbour search.
    random_state : int
        Seed of the approximate search.

    Attributes
    ----------
    P_ : scipy.sparse.csr_matrix (n, n)
        The symmetric joint affinities (sum 1), sorted indices.
    row_mass_ : (n,) array
        ``sum_l P_il``.
    n_nonzero_ : (n,) int array
        Neighbours of each point in the symmetrised graph.
    from_cache_ : bool
        Whether the neighbour table came from the cache.
    """

    def __init__(
        self,
        perplexity: float = 30.0,
        n_neighbors: int | None = None,
        neighbor_method: str = "auto",
        cache_dir: str | Path | None = None,
        device: str = "cpu",
        verbose: bool = False,
        random_state: int = 0,
    ):
        self.perplexity = perplexity
        self.n_neighbors = n_neighbors
        self.neighbor_method = neighbor_method
        self.cache_dir = cache_dir
        self.device = device
        self.verbose = verbose
        self.random_state = random_state

    def fit(self, x: np.ndarray | Tensor) -> PerplexityAffinity:
        """Search the neighbours, calibrate and symmetrise.

        Parameters
        ----------
        x : (n, d) array
            The points p is defined on (t-SNE's input space, e.g. PCA-50).

        Returns
        -------
        self
        """
        if isinstance(x, Tensor):
            x = x.detach().cpu().numpy()
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2:
            raise ValueError(f"x must be (n, d), got shape {x.shape}")
        n = len(x)
        if not (
            is_real(self.perplexity) and math.isfinite(self.perplexity) and self.perplexity >= 1
        ):
            raise ValueError(f"perplexity must be a finite number >= 1, got {self.perplexity!r}")
        if self.n_neighbors is not None and not (
            is_int(self.n_neighbors) and self.n_neighbors >= 1
        ):
            raise ValueError(
                f"n_neighbors must be a positive integer or None, got {self.n_neighbors!r}"
            )
        if n < 2:
            raise ValueError(f"a perplexity affinity needs at least 2 points, got {n}")
        if self.n_neighbors is not None and self.n_neighbors > n - 1:
            raise ValueError(
                f"n_neighbors = {self.n_neighbors} needs more than {self.n_neighbors} points, "
                f"got {n}: at most n - 1 = {n - 1}"
            )
        k = self.n_neighbors or min(n - 1, int(math.ceil(3 * self.perplexity)))
        if not self.perplexity <= k <= n - 1:
            raise ValueError(
                f"perplexity {self.perplexity:g} needs more than {self.perplexity:g} neighbours "
                f"among {n} points (n_neighbors = {k}); lower the perplexity"
            )
        indices, sq_distances, self.from_cache_ = cached_neighbor_table(
            x,
            k,
            self.cache_dir,
            metric="euclidean",
            method=self.neighbor_method,
            device=self.device,
            verbose=self.verbose,
            seed=self.random_state,
        )
        # the search ranks in float32; the distances that p is made of are recomputed in float64
        chunk = max(1, 2**24 // (k * x.shape[1]))  # 128 MiB of float64 differences at a time
        sq_distances = np.concatenate(
            [
                (
                    (x[s : s + chunk, None, :].astype(np.float64) - x[indices[s : s + chunk]]) ** 2
                ).sum(-1)
                for s in range(0, n, chunk)
            ]
        )
        conditional = calibrate_perplexity(sq_distances, self.perplexity)
        rows = np.repeat(np.arange(n), k)
        p = sp.csr_matrix((conditional.ravel(), (rows, indices.ravel())), shape=(n, n))
        joint = ((p + p.T) / (2.0 * n)).tocsr()
        joint.sort_indices()
        self.P_ = joint
        self.row_mass_ = np.asarray(joint.sum(axis=1)).ravel()
        self.n_nonzero_ = np.diff(joint.indptr)
        self._cumulative = np.cumsum(joint.data)
        self.n_samples_ = n
        self._last_batch: tuple[bytes, sp.coo_matrix, dict] | None = None
        return self

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_last_batch"] = None  # a cache, with tensors on whatever device used it
        return state

    def _check_fitted(self) -> None:
        if not hasattr(self, "P_"):
            raise RuntimeError("PerplexityAffinity is not fitted yet: call fit(x) first")

    def _indices(self, indices: np.ndarray | Tensor, distinct: bool = True) -> np.ndarray:
        self._check_fitted()
        if isinstance(indices, Tensor):
            indices = indices.detach().cpu().numpy()
        indices = np.asarray(indices)
        if indices.ndim != 1 or indices.dtype.kind not in "iu":
            raise ValueError(
                f"indices must be a 1-D integer array, got {indices.dtype} {indices.shape}"
            )
        if len(indices) and (indices.min() < 0 or indices.max() >= self.n_samples_):
            raise ValueError(f"indices must be in [0, {self.n_samples_}), the fitted points")
        if distinct and len(np.unique(indices)) != len(indices):  # P counted twice otherwise
            raise ValueError("indices must be distinct: a batch holds each fitted point once")
        return indices.astype(np.int64, copy=False)

    def _batch_block(self, indices: np.ndarray | Tensor) -> sp.coo_matrix:
        """``P`` restricted to the batch, sparse; p and q of one batch share the slice."""
        indices = self._indices(indices)
        key = indices.tobytes()
        if self._last_batch is None or self._last_batch[0] != key:
            self._last_batch = (key, self.P_[indices][:, indices].tocoo(), {})
        return self._last_batch[1]

    def _batch_entries(
        self, indices: np.ndarray | Tensor, device: str | torch.device
    ) -> tuple[sp.coo_matrix, Tensor, Tensor]:
        """The batch's block and its entries' rows and columns as long tensors on ``device``,
        sent there once for p and q of the batch."""
        block = self._batch_block(indices)
        sent = self._last_batch[2]
        where = str(torch.device(device))
        if where not in sent:
            sent[where] = tuple(
                torch.as_tensor(v, dtype=torch.long).to(device) for v in (block.row, block.col)
            )
        return (block, *sent[where])

    def dense_batch(self, indices: np.ndarray | Tensor) -> np.ndarray:
        """``P_ij`` for ``i, j`` in the batch, a dense (b, b) float64 array."""
        return self._batch_block(indices).toarray()

    def get_batch(
        self,
        indices: np.ndarray | Tensor,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> Tensor:
        """Rows of p restricted to a batch, as log-probabilities.

        Parameters
        ----------
        indices : (b,) integer array
            The batch, indices into the fitted points (distinct).
        dtype, device
            Of the returned tensor.

        Returns
        -------
        (b, b) tensor
            ``log p_B(j|i) = log P_ij - log sum_{l in B} P_il``; ``-inf`` where ``P_ij = 0``
            (always on the diagonal); a row without neighbours in the batch is all ``-inf``
            (:func:`beyond_icon.icon_loss` leaves it out of the mean). The logarithms are
            taken in float64 on the stored entries only.
        """
        block, rows, cols = self._batch_entries(indices, device)
        total = np.bincount(block.row, weights=block.data, minlength=block.shape[0])
        values = np.log(block.data) - np.log(total[block.row])
        # the dense (b, b) matrix is made where it is used: only the stored entries travel
        # (at b = 8192 the dense float32 matrix is 268 MB, the entries about 9 MB)
        log_p = torch.full(block.shape, -math.inf, dtype=dtype, device=device)
        log_p[rows, cols] = torch.as_tensor(values, dtype=dtype).to(device)
        return log_p

    def batch_mass(self, indices: np.ndarray | Tensor) -> np.ndarray:
        """Fraction of each batch row's global mass ``sum_j p(j|i)`` that lies in the batch."""
        indices = self._indices(indices)
        return self.dense_batch(indices).sum(axis=1) / self.row_mass_[indices]

    def sample_neighbors(
        self, anchors: np.ndarray | Tensor, n_samples: int, rng: np.random.Generator
    ) -> np.ndarray:
        """Draw ``n_samples`` neighbours of each anchor from its row ``p(.|i)`` (with replacement).

        Parameters
        ----------
        anchors : (a,) integer array
        n_samples : int
        rng : numpy.random.Generator

        Returns
        -------
        (a, n_samples) int64 array of point indices.
        """
        anchors = self._indices(anchors, distinct=False)
        starts, stops = self.P_.indptr[anchors], self.P_.indptr[anchors + 1]
        offset = np.where(starts > 0, self._cumulative[np.maximum(starts - 1, 0)], 0.0)
        target = (
            offset[:, None] + rng.random((len(anchors), n_samples)) * self.row_mass_[anchors, None]
        )
        position = np.searchsorted(self._cumulative, target, side="right")
        position = np.clip(position, starts[:, None], stops[:, None] - 1)
        return self.P_.indices[position].astype(np.int64)

    def negative_log_weights(
        self,
        indices: np.ndarray | Tensor,
        exaggeration: float = 1.0,
        *,
        scope: str = "global",
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> Tensor:
        """How many points of the training set each column of a batch stands for, in log.

        A batch holds row ``i``'s neighbours present in it and ``m_i`` other points. A
        neighbour stands for itself (weight 1); each other point stands for
        ``(n - 1 - k_i) / m_i`` points, the non-neighbours of ``i`` it was drawn among
        (``k_i`` is the number of neighbours of ``i``). With these weights the batch sum
        ``sum_j c_ij w_ij`` over the non-neighbours is, for a uniformly drawn batch, an
        unbiased estimate of the row's sum over all its non-neighbours in the training set,
        whatever the batch size, so the repulsion of a batch does not weaken as ``n`` grows.
        The batches of :class:`~beyond_icon.sampling.NeighborBatchSampler` are uniform in
        their anchors only (the sampled neighbours favour points that many others pick), so
        there it is an approximation. The batch's neighbours count once; absent neighbours
        are not represented.
        ``exaggeration`` divides the negatives' weights (t-SNE's early exaggeration: the
        neighbours' pull against ``1 / exaggeration`` of the repulsion). With ``scope="batch"``
        every point stands for itself (weight ``1 / exaggeration`` for the negatives): q is
        normalised over the batch, as in the paper and the I-Con code.

        Parameters
        ----------
        indices : (b,) integer array
            The batch.
        exaggeration : float
            Divides the weight of the non-neighbours (1: none).
        scope : {"global", "batch"}
            What q's normaliser stands for: the whole training set, or the batch.
        dtype, device
            Of the returned tensor.

        Returns
        -------
        (b, b) tensor
            ``log c_ij``: 0 at neighbours and on the diagonal, ``log((n - 1 - k_i) /
            (m_i * exaggeration))`` elsewhere (``-log(exaggeration)`` with ``scope="batch"``).
        """
        if not (is_real(exaggeration) and math.isfinite(exaggeration) and exaggeration > 0):
            raise ValueError(f"exaggeration must be a positive finite number, got {exaggeration!r}")
        if scope not in Q_SCOPES:
            raise ValueError(f"scope must be one of {Q_SCOPES}, got {scope!r}")
        indices = self._indices(indices)
        block, rows, cols = self._batch_entries(indices, device)
        b = block.shape[0]
        others = b - 1 - np.bincount(block.row, minlength=b)  # P has no diagonal entries
        represented = self.n_samples_ - 1 - self.n_nonzero_[indices]
        if scope == "batch":
            log_weight = np.full(b, -math.log(exaggeration))
        else:
            log_weight = np.log(np.maximum(represented, 1) / np.maximum(others, 1) / exaggeration)
        # made on the target device, as get_batch's matrix: b weights and the entries travel
        out = torch.as_tensor(log_weight, dtype=dtype).to(device)[:, None].expand(b, b).clone()
        out[rows, cols] = 0.0
        out.fill_diagonal_(0.0)
        return out
