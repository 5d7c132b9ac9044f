"""Presets: representation-learning methods as I-Con (p, q) pairs with a free divergence.

Each preset is an ``nn.Module`` whose forward returns the scalar loss
``mean_i D(p(.|i) || q(.|i))``; its docstring names the pair. With ``divergence="kl"`` each
equals the original method's loss up to an additive constant stated in the docstring (the
entropy of ``p``, which has no gradient). ``chunk_size`` switches to the row-chunked path.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from beyond_icon import divergences as _divergences
from beyond_icon import kernels
from beyond_icon._validation import (
    check_features,
    check_labels,
    check_positive,
    check_tensor,
    checking_values,
    is_int,
    is_real,
)
from beyond_icon.affinity import Q_SCOPES, PerplexityAffinity
from beyond_icon.distributed import Shard, all_gather_with_grad, world
from beyond_icon.loss import LossStats, icon_loss

__all__ = [
    "ClusterLoss",
    "CrossEntropy",
    "IConLoss",
    "PMI",
    "SNE",
    "SimCLR",
    "SupCon",
    "TSNE",
]

_SIDES = ("p", "q", "both")


class IConLoss(nn.Module):
    """Base class: holds the divergence, the chunk size and the last call's row statistics.

    Under ``torch.distributed`` (a process group of more than one rank) and with
    ``gather=True``, the batch-coupled presets gather every rank's inputs and evaluate this
    rank's rows of the global batch (see :mod:`beyond_icon.distributed`).

    Parameters
    ----------
    divergence : str, Divergence or callable
        D: any name of :func:`beyond_icon.divergences.get` (``kl``, ``tv``, ``jsd``,
        ``alpha:0.5``, a registered name) or a function ``(log_p, log_q) -> (n,)``.
    chunk_size : int, optional
        Build p and q ``chunk_size`` rows at a time under activation checkpointing: memory
        O(chunk_size x n) instead of O(n^2), the same value and gradient.
    gather : bool
        Under a process group, gather the other ranks' inputs (the global batch).
    """

    def __init__(
        self, divergence: str | Callable = "kl", chunk_size: int | None = None, gather: bool = True
    ):
        super().__init__()
        self.divergence = _divergences.get(divergence)
        self.chunk_size = chunk_size
        self.gather = gather
        self.last_stats: LossStats | None = None

    def _gather(self, *tensors: Tensor | None) -> tuple[list[Tensor | None], Shard | None]:
        """Every tensor concatenated over ranks, and this rank's rows; unchanged on one process."""
        if not self.gather or world()[1] == 1:
            return list(tensors), None
        out, shard = [], None
        for tensor in tensors:
            if tensor is None:
                out.append(None)
                continue
            gathered, shard = all_gather_with_grad(tensor)
            out.append(gathered)
        return out, shard

    def extra_repr(self) -> str:
        return f"divergence={self.divergence.name!r}, chunk_size={self.chunk_size}"

    def _icon(
        self,
        log_p: Callable[[slice], Tensor],
        log_q: Callable[[slice], Tensor],
        n_rows: int,
        shard: Shard | None = None,
        trusted: bool = True,
    ) -> Tensor:
        """``trusted``: p and q come from this library's kernels on validated inputs, so the
        per-call check of their rows (a logsumexp over each n x n matrix) is skipped; a
        user-supplied ``log_p`` passes ``trusted=False``."""
        loss, self.last_stats = icon_loss(
            log_p,
            log_q,
            self.divergence,
            chunk_size=self.chunk_size,
            n_rows=n_rows,
            return_stats=True,
            shard=shard,
            validate=not trusted,
        )
        return loss


def _unique_ids(ids: Tensor) -> Tensor:
    """Make per-rank ids (pair or sample indices) globally unique: id * world + rank."""
    rank, world_size = world()
    return ids * world_size + rank


def _check_debias(debias: object) -> float:
    """``debias`` as a float in [0, 1): at 1 the mixed distribution is uniform and carries
    nothing of the data (the loss is constant, or trains towards uniform p)."""
    if not is_real(debias) or not 0 <= debias < 1:
        raise ValueError(
            f"debias must be a number in [0, 1), got {debias!r} (at 1 the debiased side is "
            "uniform and carries nothing of the data)"
        )
    return float(debias)


def _debiased(
    build: Callable[[slice], Tensor], alpha: float, exclude_self: bool = True
) -> Callable[[slice], Tensor]:
    if alpha == 0.0:
        return build
    return lambda rows: kernels.debias(build(rows), alpha, rows=rows, exclude_self=exclude_self)


class SNE(IConLoss):
    """SNE: p = perplexity-calibrated Gaussian on the inputs, q = Gaussian on embeddings ``z``.

    ``q(j|i) ∝ exp(-|z_i - z_j|^2 / (2 sigma^2))``; the default ``sigma = 1/sqrt(2)`` gives
    SNE's ``exp(-|z_i - z_j|^2)``. With KL and p calibrated on the batch's inputs this is the
    SNE cost ``(1/n) sum_i KL(P_i || Q_i)`` of the batch.

    p comes in one of three ways:

    - ``affinity`` (a fitted :class:`~beyond_icon.affinity.PerplexityAffinity`) and
      ``forward(None, z, indices=...)``: the rows of t-SNE's symmetric P over the whole training
      set, restricted to the batch, ``p_B(j|i) = P_ij / sum_{l in B} P_il``; and q over the
      batch with each column weighted by the number of training points it stands for
      (:meth:`~beyond_icon.affinity.PerplexityAffinity.negative_log_weights`):
      ``q_B(j|i) = c_ij w_ij / sum_l c_il w_il``, whose normaliser counts the batch's
      non-neighbours of ``i`` for all the training set's (``q_scope="global"``), or with every
      column weighted 1 (``q_scope="batch"``: q normalised over the batch, as the paper does).
      ``exaggeration`` divides the negatives' weights (early exaggeration).
    - ``forward(x, z)``: p calibrated within the batch on its inputs ``x`` (the paper's and the
      official I-Con code's way).
    - ``forward(None, z, log_p=...)``: a precomputed (n, n) ``log_p``.

    Parameters
    ----------
    divergence : str, Divergence or callable
        D: any name of :func:`beyond_icon.divergences.get` (``kl``, ``tv``, ``jsd``,
        ``alpha:0.5``, a registered name) or a function ``(log_p, log_q) -> (n,)``.
    perplexity : float
        Perplexity of p (of the fitted ``affinity`` when one is given).
    sigma : float
        Bandwidth of the Gaussian q (SNE's convention ``1/sqrt 2``: ``exp(-|z_i - z_j|^2)``).
    chunk_size : int, optional
        Row-chunked evaluation (memory O(chunk_size x n)).
    affinity : PerplexityAffinity, optional
        p fitted once over the training set, for ``forward(None, z, indices=...)``.
    q_scope : {"global", "batch"}
        With ``affinity``: q's normaliser estimates the whole training set's, or is the batch's.

    References
    ----------
    Hinton, G. and Roweis, S. (2002). Stochastic neighbor embedding. NIPS.
    Alshammari, S. et al. (2025). I-Con: a unifying framework for representation learning.
    ICLR.
    """

    def __init__(
        self,
        divergence: str | Callable = "kl",
        perplexity: float = 30.0,
        sigma: float = 1.0 / math.sqrt(2.0),
        chunk_size: int | None = None,
        affinity: PerplexityAffinity | None = None,
        q_scope: str = "batch",
    ):
        super().__init__(divergence, chunk_size)
        self.perplexity = check_positive(perplexity, "perplexity")
        self.sigma = check_positive(sigma, "sigma")
        self.affinity = affinity
        if q_scope not in Q_SCOPES:
            raise ValueError(f"q_scope must be one of {Q_SCOPES}, got {q_scope!r}")
        self.q_scope = q_scope

    def log_q(self, z: Tensor, rows: slice, log_weights: Tensor | None = None) -> Tensor:
        return kernels.gaussian(z, self.sigma, rows=rows, log_weights=log_weights)

    def forward(
        self,
        x: Tensor | None,
        z: Tensor,
        log_p: Tensor | None = None,
        *,
        indices: Tensor | None = None,
        exaggeration: float = 1.0,
    ) -> Tensor:
        """The loss of a batch.

        Parameters
        ----------
        x : (n, D) tensor or None
            Inputs, for p calibrated within the batch; None with ``log_p`` or ``indices``.
        z : (n, d) tensor
            Embeddings.
        log_p : (n, n) tensor, optional
            A precomputed p.
        indices : (n,) integer tensor, optional
            The batch's indices into the fitted ``affinity`` (distinct).
        exaggeration : float
            With ``indices``: divides the weight of the non-neighbours in q.

        Returns
        -------
        Scalar tensor, ``mean_i D(p(.|i) || q(.|i))``.
        """
        check_features(z, "z", min_rows=2)
        if indices is not None:
            if x is not None or log_p is not None:
                raise ValueError("give indices (p from the fitted affinity) or x / log_p, not both")
            return self._forward_fitted(z, indices, exaggeration)
        if exaggeration != 1.0:
            raise ValueError("exaggeration applies to a fitted affinity: pass indices too")
        if log_p is not None:
            if log_p.shape != (z.shape[0], z.shape[0]):
                raise ValueError(
                    f"log_p must be ({z.shape[0]}, {z.shape[0]}), got {tuple(log_p.shape)}"
                )
            if self.gather and world()[1] > 1:
                raise ValueError("a precomputed log_p cannot be combined with a distributed batch")
            given = log_p.to(z.dtype)
            return self._icon(
                lambda rows: given[rows],
                lambda rows: self.log_q(z, rows),
                z.shape[0],
                trusted=False,
            )
        if x is None:
            raise ValueError("pass the inputs x, a precomputed log_p, or indices with an affinity")
        check_features(x, "x", min_rows=2)
        if x.shape[0] != z.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows but z has {z.shape[0]}")
        (x, z), shard = self._gather(x.detach(), z)
        return self._icon(
            lambda rows: kernels.perplexity(x, self.perplexity, rows=rows).to(z.dtype),
            lambda rows: self.log_q(z, rows),
            z.shape[0],
            shard,
        )

    def _forward_fitted(self, z: Tensor, indices: Tensor, exaggeration: float) -> Tensor:
        if self.affinity is None:
            raise ValueError("indices need a fitted affinity: SNE(..., affinity=...)")
        if self.affinity.perplexity != self.perplexity:
            raise ValueError(
                f"the affinity was fitted with perplexity {self.affinity.perplexity:g}, "
                f"the preset has {self.perplexity:g}"
            )
        check_labels(indices, "indices", n=z.shape[0])
        (z, indices), shard = self._gather(z, indices.to(z.device))
        if checking_values() and bool((indices.sort().values.diff() == 0).any()):
            raise ValueError("indices of a batch must be distinct")
        dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
        log_p = self.affinity.get_batch(indices, dtype=dtype, device=z.device)
        log_c = self.affinity.negative_log_weights(
            indices, exaggeration, scope=self.q_scope, dtype=dtype, device=z.device
        )
        return self._icon(
            lambda rows: log_p[rows],
            lambda rows: self.log_q(z, rows, log_c[rows]),
            z.shape[0],
            shard,
        )


class TSNE(SNE):
    """t-SNE as I-Con writes it: p as in :class:`SNE`, q = Student-t on ``z``.

    ``q(j|i) ∝ (1 + |z_i - z_j|^2 / dof)^(-(dof + 1)/2)`` (Cauchy for ``dof = 1``), row
    normalised (conditional), as in I-Con; van der Maaten's t-SNE normalises jointly instead.

    Parameters
    ----------
    divergence : str, Divergence or callable
        D: any name of :func:`beyond_icon.divergences.get` (``kl``, ``tv``, ``jsd``,
        ``alpha:0.5``, a registered name) or a function ``(log_p, log_q) -> (n,)``.
    perplexity : float
        Perplexity of p.
    dof : float
        Degrees of freedom of the Student-t q.
    chunk_size : int, optional
        Row-chunked evaluation.
    affinity : PerplexityAffinity, optional
        p fitted once over the training set.
    q_scope : {"global", "batch"}
        See :class:`SNE`.

    References
    ----------
    van der Maaten, L. and Hinton, G. (2008). Visualizing data using t-SNE. JMLR 9.
    """

    def __init__(
        self,
        divergence: str | Callable = "kl",
        perplexity: float = 30.0,
        dof: float = 1.0,
        chunk_size: int | None = None,
        affinity: PerplexityAffinity | None = None,
        q_scope: str = "batch",
    ):
        super().__init__(
            divergence, perplexity, chunk_size=chunk_size, affinity=affinity, q_scope=q_scope
        )
        self.dof = check_positive(dof, "dof")

    def log_q(self, z: Tensor, rows: slice, log_weights: Tensor | None = None) -> Tensor:
        return kernels.student_t(z, self.dof, rows=rows, log_weights=log_weights)


class SimCLR(IConLoss):
    """SimCLR / NT-Xent: p = the other view of the same image, q = cosine kernel / temperature.

    ``forward(z1, z2)`` with the two views' (n, d) embeddings. With KL, p is one-hot, so the
    loss is exactly NT-Xent ``-log q(partner | i)`` averaged over the 2n anchors.

    Parameters
    ----------
    divergence : str, Divergence or callable
        D: any name of :func:`beyond_icon.divergences.get` (``kl``, ``tv``, ``jsd``,
        ``alpha:0.5``, a registered name) or a function ``(log_p, log_q) -> (n,)``.
    temperature : float
        Of the cosine kernel.
    chunk_size : int, optional
        Row-chunked evaluation.

    References
    ----------
    Chen, T. et al. (2020). A simple framework for contrastive learning of visual
    representations. ICML.
    """

    def __init__(
        self,
        divergence: str | Callable = "kl",
        temperature: float = 0.5,
        chunk_size: int | None = None,
    ):
        super().__init__(divergence, chunk_size)
        self.temperature = check_positive(temperature, "temperature")

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        check_features(z1, "z1")
        check_features(z2, "z2")
        if z1.shape != z2.shape:
            raise ValueError(f"z1 {tuple(z1.shape)} and z2 {tuple(z2.shape)} must match")
        z = torch.cat([z1, z2])
        index = _unique_ids(torch.arange(z1.shape[0], device=z.device).repeat(2))
        (z, index), shard = self._gather(z, index)
        return self._icon(
            lambda rows: kernels.views(index, rows=rows, dtype=z.dtype),
            lambda rows: kernels.cosine(z, self.temperature, rows=rows),
            z.shape[0],
            shard,
        )


class SupCon(IConLoss):
    """Supervised contrastive: p = uniform over same-label others, q = a kernel on features.

    ``metric="cosine"``: ``q(j|i) ∝ exp(cos(z_i, z_j) / temperature)`` (Khosla et al.); with KL
    the loss equals the SupCon "L_out" loss (base temperature = temperature) minus the entropy
    of p, ``mean_i log |P(i)|``. ``metric="euclidean"``: ``q(j|i) ∝ exp(-|z_i - z_j|^2 /
    (2 sigma^2))`` on the features (optionally L2-normalised first), the kernel of Beyond I-Con.
    ``forward(z, labels)`` takes ``z`` of shape (N, d) with ``labels`` (N,), or (n, V, d) with
    ``labels`` (n,) for V views per sample (as SupContrast). ``debias`` mixes p with uniform.

    Parameters
    ----------
    divergence : str, Divergence or callable
        D: any name of :func:`beyond_icon.divergences.get` (``kl``, ``tv``, ``jsd``,
        ``alpha:0.5``, a registered name) or a function ``(log_p, log_q) -> (n,)``.
    metric : {"cosine", "euclidean"}
        The kernel of q.
    temperature : float
        Of the cosine kernel.
    sigma : float
        Bandwidth of the Euclidean (Gaussian) kernel. It is 1, not SNE's ``1/sqrt 2``: the
        paper's kernel ``exp(-|z_i - z_j|^2 / 2)`` on projections.
    normalize : bool
        L2-normalise the features before the Euclidean kernel.
    debias : float
        Mix p with the uniform distribution over ``j != i`` (0: off).
    chunk_size : int, optional
        Row-chunked evaluation.

    References
    ----------
    Khosla, P. et al. (2020). Supervised contrastive learning. NeurIPS.
    Shone, J. et al. (2025). Beyond I-Con: exploring new dimension of distance measures in
    representation learning. arXiv:2509.04734.
    """

    def __init__(
        self,
        divergence: str | Callable = "kl",
        metric: str = "cosine",
        temperature: float = 0.1,
        sigma: float = 1.0,
        normalize: bool = False,
        debias: float = 0.0,
        chunk_size: int | None = None,
    ):
        super().__init__(divergence, chunk_size)
        if metric not in ("cosine", "euclidean"):
            raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
        self.metric = metric
        self.temperature = check_positive(temperature, "temperature")
        self.sigma = check_positive(sigma, "sigma")
        self.normalize = normalize
        self.debias = _check_debias(debias)

    def log_q(self, z: Tensor, rows: slice) -> Tensor:
        if self.metric == "cosine":
            return kernels.cosine(z, self.temperature, rows=rows)
        if self.normalize:
            z = F.normalize(z, dim=-1)
        return kernels.gaussian(z, self.sigma, rows=rows)

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        check_tensor(z, "z")
        if z.dim() == 3:
            n, n_views, d = z.shape
            check_labels(labels, "labels", n=n)
            z = z.transpose(0, 1).reshape(n * n_views, d)
            labels = labels.repeat(n_views)
        check_features(z, "z")
        check_labels(labels, "labels", n=z.shape[0])
        (z, labels), shard = self._gather(z, labels)
        if z.shape[0] < 2:
            raise ValueError("SupCon needs a batch of at least 2 samples")
        log_p = _debiased(
            lambda rows: kernels.labels(labels, rows=rows, dtype=z.dtype), self.debias
        )
        return self._icon(log_p, lambda rows: self.log_q(z, rows), z.shape[0], shard)


class CrossEntropy(IConLoss):
    """Classification: p(c|i) = one-hot of the label (data-to-class), q(c|i) = softmax(logits).

    With KL this is exactly ``F.cross_entropy(logits, labels)``. ``debias`` is label smoothing
    (``(1 - alpha) onehot + alpha / C``).

    Parameters
    ----------
    divergence : str, Divergence or callable
        D: any name of :func:`beyond_icon.divergences.get` (``kl``, ``tv``, ``jsd``,
        ``alpha:0.5``, a registered name) or a function ``(log_p, log_q) -> (n,)``.
    debias : float
        Label smoothing.
    chunk_size : int, optional
        Row-chunked evaluation.
    """

    def __init__(
        self, divergence: str | Callable = "kl", debias: float = 0.0, chunk_size: int | None = None
    ):
        super().__init__(divergence, chunk_size)
        self.debias = debias

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        check_features(logits, "logits")
        check_labels(labels, "labels", n=logits.shape[0])
        n_classes = logits.shape[1]
        if checking_values() and bool(((labels < 0) | (labels >= n_classes)).any()):
            raise ValueError(f"labels must be in [0, {n_classes}) for {n_classes} logits")

        def log_p(rows: slice) -> Tensor:
            onehot = F.one_hot(labels[rows], n_classes).bool()
            out = torch.where(onehot, 0.0, -math.inf).to(logits.dtype)
            return kernels.debias(out, self.debias, exclude_self=False) if self.debias else out

        return self._icon(
            log_p, lambda rows: torch.log_softmax(logits[rows], dim=-1), logits.shape[0]
        )


class ClusterLoss(IConLoss):
    """Clustering: p = views over pairs (anchor and mined neighbour), q = cluster-sharing kernel.

    ``q(j|i) = sum_c a_ic b_jc / sum_l b_lc`` with ``a = softmax(logits)`` and ``b`` the
    teacher's assignments (default ``a``). ``p(j|i)`` is uniform over the columns that share
    ``i``'s pair id (its pair-mate) or, when ``sample_index`` is given, hold the same training
    sample as ``i`` (a sample drawn twice into a batch is never a negative of itself).
    ``exclude_self`` drops ``j = i`` from q as every p here does (consistent self-pairs).
    ``debias`` alpha mixes p, q or both (``debias_side``) with uniform over q's support:
    ``j != i`` with ``exclude_self``, every ``j`` without it (so p > 0 wherever q > 0).
    ``neighbor_mix`` w spreads part of each row over the batch's own ``n_neighbors`` nearest
    points in ``features`` (Euclidean), the k-NN kernel of the inputs that I-Con's k-means and
    SNE rows use: ``p(j|i) = (1 - w) [j shares i's pair] / s_i + w [j in kNN_B(i)] / k`` (rows
    without a positive put all their mass on the k-NN). It gives every divergence a pull
    toward clusters of the data's shape and size; TV, whose loss with pairs alone is
    indifferent to cluster sizes, needs it most. ``propagate_steps > 1`` then walks p along
    that mixed graph (:func:`~beyond_icon.kernels.propagate`). Every row is an anchor, so the
    loss is symmetric in the pair.

    Speed: p of pairs is zero on all but a few columns of each row, and an f-divergence does
    not change when those columns are merged into one (their q summed). With ``compress``
    (default) and an f-divergence (every built-in one), q is evaluated at the positive columns
    and the merged rest only (:func:`~beyond_icon.kernels.clusters_at`): O(n k) per head
    instead of O(n^2 k), with the dense path's value and gradient. A p-side debias, an explicit
    ``log_p``, propagation or a divergence that is not marked ``f_family`` use the dense path.

    ``forward(logits, pair_index, teacher_logits=None, log_p=None, sample_index=None,
    features=None)``.

    Parameters
    ----------
    divergence : str, Divergence or callable
        D: any name of :func:`beyond_icon.divergences.get` (``kl``, ``tv``, ``jsd``,
        ``alpha:0.5``, a registered name) or a function ``(log_p, log_q) -> (n,)``.
    debias : float
        Mix with uniform over ``j != i`` (0: off).
    debias_side : {"p", "q", "both"}
        Which distribution ``debias`` mixes.
    exclude_self : bool
        Drop ``j = i`` from q.
    chunk_size : int, optional
        Row-chunked evaluation (dense path).
    neighbor_mix : float
        w in [0, 1): the mass of each row of p on the batch's k-NN graph of ``features`` (0:
        pairs only).
    propagate_steps : int
        Walk p along the mixed graph (1: no walk; more needs ``neighbor_mix > 0``).
    n_neighbors : int
        k of that graph.
    compress : bool
        Take the merged-columns path when it is exact.

    References
    ----------
    Alshammari et al., "I-Con: A Unifying Framework for Representation Learning", ICLR 2025.
    """

    def __init__(
        self,
        divergence: str | Callable = "kl",
        debias: float = 0.0,
        debias_side: str = "p",
        exclude_self: bool = False,
        chunk_size: int | None = None,
        propagate_steps: int = 1,
        n_neighbors: int = 20,
        compress: bool = True,
        neighbor_mix: float = 0.0,
    ):
        super().__init__(divergence, chunk_size)
        if debias_side not in _SIDES:
            raise ValueError(f"debias_side must be one of {_SIDES}, got {debias_side!r}")
        _check_debias(debias)
        if not is_int(propagate_steps) or propagate_steps < 1:
            raise ValueError(f"propagate_steps must be an integer >= 1, got {propagate_steps!r}")
        if not is_int(n_neighbors) or n_neighbors < 1:
            raise ValueError(f"n_neighbors must be an integer >= 1, got {n_neighbors!r}")
        if not is_real(neighbor_mix) or not 0 <= neighbor_mix < 1:
            raise ValueError(f"neighbor_mix must be a number in [0, 1), got {neighbor_mix!r}")
        if propagate_steps > 1 and neighbor_mix == 0:
            raise ValueError("propagate_steps > 1 walks the k-NN graph: set neighbor_mix > 0")
        self.neighbor_mix = float(neighbor_mix)
        self.debias = debias
        self.debias_side = debias_side
        self.exclude_self = exclude_self
        self.propagate_steps = propagate_steps
        self.n_neighbors = n_neighbors
        self.compress = compress

    def forward(
        self,
        logits: Tensor,
        pair_index: Tensor | None,
        teacher_logits: Tensor | None = None,
        log_p: Tensor | None = None,
        sample_index: Tensor | None = None,
        features: Tensor | None = None,
    ) -> Tensor:
        """``pair_index`` gives p = views over pairs; or pass ``log_p`` (n, n) directly.

        ``logits`` (n, k) gives the loss; (h, n, k), ``h`` heads on one batch (``teacher_logits``
        alike), gives the (h,) losses of the heads, computed together.
        """
        if isinstance(logits, Tensor) and logits.dim() == 3:
            return self._heads(logits, pair_index, teacher_logits, log_p, sample_index, features)
        if isinstance(logits, Tensor) and logits.dim() == 2 and self._merged(log_p):
            teacher = teacher_logits[None] if isinstance(teacher_logits, Tensor) else None
            return self._heads(logits[None], pair_index, teacher, None, sample_index, features)[0]
        check_features(logits, "logits", min_rows=2)
        n = logits.shape[0]
        if log_p is None:
            check_labels(pair_index, "pair_index", n=n)
            if sample_index is not None:
                check_labels(sample_index, "sample_index", n=n)
        elif log_p.shape != (n, n):
            raise ValueError(f"log_p must be ({n}, {n}), got {tuple(log_p.shape)}")
        graph = self.neighbor_mix > 0 and log_p is None
        if graph:
            self._check_graph_features(features, n)
        log_a = torch.log_softmax(logits, dim=-1)
        log_b = None
        if teacher_logits is not None:
            check_features(teacher_logits, "teacher_logits")
            if teacher_logits.shape != logits.shape:
                raise ValueError("teacher_logits must have the shape of logits")
            log_b = torch.log_softmax(teacher_logits, dim=-1)
        if log_p is not None and self.gather and world()[1] > 1:
            raise ValueError("an explicit log_p cannot be combined with a distributed batch")
        if log_p is None:
            pair_index = _unique_ids(pair_index)
        (log_a, log_b, pair_index, sample_index, features), shard = self._gather(
            log_a, log_b, pair_index, sample_index, features.detach() if graph else None
        )
        alpha_p = self.debias if self.debias_side in ("p", "both") else 0.0
        alpha_q = self.debias if self.debias_side in ("q", "both") else 0.0
        n = log_a.shape[0]
        if log_p is None:
            columns, mask, weights = self._positives(pair_index, sample_index, features)
            given = _scatter_log(columns, mask, weights.to(log_a.dtype), n)
            if self.propagate_steps > 1:
                given = kernels.propagate(given, self.propagate_steps)
        else:
            given = log_p
        user_p = log_p is not None
        # p's uniform part covers q's support: the self pair too unless it is excluded
        log_p = _debiased(lambda rows: given[rows], alpha_p, exclude_self=self.exclude_self)
        log_q = _debiased(
            lambda rows: kernels.clusters(log_a, log_b, rows=rows, exclude_self=self.exclude_self),
            alpha_q,
            exclude_self=self.exclude_self,
        )
        return self._icon(log_p, log_q, n, shard, trusted=not user_p)

    def _check_graph_features(self, features: Tensor | None, n: int) -> None:
        if features is None:
            raise ValueError("neighbor_mix > 0 needs the batch's features (features=...)")
        check_features(features, "features")
        if features.shape[0] != n:
            raise ValueError(f"features must have {n} rows, got {features.shape[0]}")

    def _positives(
        self,
        pair_index: Tensor,
        sample_index: Tensor | None,
        features: Tensor | None,
        rows: slice | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """p's support and values on the (gathered) batch: ``(columns, mask, log_p)``, (n, s).

        The pair-mates (and same-sample columns) share ``1 - w``, the batch's k nearest points
        in ``features`` share ``w`` (a column that is both adds both); a row without a positive
        gives the k-NN all its mass. ``rows``: only these rows are read (this process's share
        of a gathered batch), so only their nearest points are searched; the other rows keep
        their pair-mates alone.
        """
        keys = [pair_index] + ([sample_index] if sample_index is not None else [])
        columns, mask = kernels.positive_columns(*keys)
        count = mask.sum(dim=1, keepdim=True)
        mix = self.neighbor_mix
        if mix == 0:
            return columns, mask, torch.where(mask, -count.clamp_min(1).double().log(), -math.inf)
        n = features.shape[0]
        k = min(self.n_neighbors, n - 1)
        searched = torch.ones(n, dtype=torch.bool, device=columns.device)
        if rows is None or (rows.start, rows.stop) == (0, n):
            nearest = kernels.knn_indices(features, k).to(columns.device)
        else:  # under torchrun each process searches its own rows among the whole batch
            nearest = torch.zeros(n, k, dtype=torch.int64, device=columns.device)
            nearest[rows] = kernels.knn_indices(features, k, rows=rows).to(columns.device)
            searched.zero_()[rows] = True
        listed = (nearest[:, :, None] == columns[:, None, :]) & mask[:, None, :]  # (n, k, s)
        listed &= searched[:, None, None]
        f64 = torch.float64
        own_mass = (count > 0).to(f64) * (1.0 - mix) / count.clamp_min(1).to(f64)
        weights = mask.to(f64) * own_mass + listed.sum(dim=1).to(f64) * (mix / k)
        new = ~listed.any(dim=2) & searched[:, None]
        columns = torch.cat([columns, nearest], dim=1)
        mask = torch.cat([mask, new], dim=1)
        weights = torch.cat([weights, new.to(f64) * (mix / k)], dim=1)
        # rows without a positive; an unsearched one without a mate is 0 / 0, masked just below
        weights = weights / weights.sum(dim=1, keepdim=True)
        return columns, mask, torch.where(mask, weights.log(), -math.inf)

    def _merged(self, log_p: Tensor | None) -> bool:
        """Whether p is pairs (plus same-sample columns) and the merged-columns path is exact."""
        alpha_p = self.debias if self.debias_side in ("p", "both") else 0.0
        return (
            log_p is None
            and self.compress
            and self.divergence.f_family
            and alpha_p == 0.0
            and self.propagate_steps == 1
        )

    def _heads(
        self,
        logits: Tensor,
        pair_index: Tensor | None,
        teacher_logits: Tensor | None,
        log_p: Tensor | None,
        sample_index: Tensor | None,
        features: Tensor | None,
    ) -> Tensor:
        """(h,) losses of ``h`` heads; one vectorised pass on the merged-columns path."""
        h, n, k = logits.shape
        if teacher_logits is not None and teacher_logits.shape != logits.shape:
            raise ValueError("teacher_logits must have the shape of logits")
        if not self._merged(log_p):
            return torch.stack(
                [
                    self.forward(
                        logits[i],
                        pair_index,
                        None if teacher_logits is None else teacher_logits[i],
                        log_p,
                        sample_index,
                        features,
                    )
                    for i in range(h)
                ]
            )
        check_features(logits.transpose(0, 1).reshape(n, h * k), "logits", min_rows=2)
        check_labels(pair_index, "pair_index", n=n)
        if sample_index is not None:
            check_labels(sample_index, "sample_index", n=n)
        log_a = torch.log_softmax(logits, dim=-1).transpose(0, 1)  # rows first, for the gather
        log_b = None
        if teacher_logits is not None:
            check_features(teacher_logits.transpose(0, 1).reshape(n, h * k), "teacher_logits")
            log_b = torch.log_softmax(teacher_logits, dim=-1).transpose(0, 1)
        if self.neighbor_mix > 0:
            self._check_graph_features(features, n)
            features = features.detach()
        else:
            features = None  # not part of p: never gathered
        (log_a, log_b, pair_index, sample_index, features), shard = self._gather(
            log_a, log_b, _unique_ids(pair_index), sample_index, features
        )
        log_a = log_a.transpose(0, 1)
        log_b = None if log_b is None else log_b.transpose(0, 1)
        rows = None if shard is None else shard.rows
        columns, mask, log_p = self._positives(pair_index, sample_index, features, rows)
        alpha_q = self.debias if self.debias_side in ("q", "both") else 0.0
        return self._compressed(log_a, log_b, columns, mask, log_p.to(log_a.dtype), alpha_q, shard)

    def _compressed(
        self,
        log_a: Tensor,
        log_b: Tensor | None,
        columns: Tensor,
        mask: Tensor,
        log_p: Tensor,
        alpha_q: float,
        shard: Shard | None,
    ) -> Tensor:
        """The (h,) losses of ``log_a`` (h, n, k) on rows ``[listed columns..., rest]``, p's
        values ``log_p`` (n, s) on the listed columns: exact for f-divergences (see the
        class). A single head is h = 1."""
        n = log_a.shape[-2]
        count = mask.sum(dim=1, keepdim=True)
        log_p = torch.cat([log_p, torch.full_like(log_p[:, :1], -math.inf)], dim=1)
        allowed = n - 1 if self.exclude_self else n

        def log_q(rows: slice) -> Tensor:
            out = kernels.clusters_at(
                log_a, columns, mask, log_b, rows=rows, exclude_self=self.exclude_self
            )
            if alpha_q == 0.0:
                return out
            # (1 - alpha) q + alpha / m on each listed column, alpha (m - s_i) / m on the rest
            block_count = count[rows].to(out.dtype)
            listed = torch.full(mask[rows].shape, -math.log(allowed), dtype=out.dtype)
            uniform = torch.cat(
                [
                    listed.to(out.device).masked_fill(~mask[rows], -math.inf),
                    torch.log((allowed - block_count) / allowed),
                ],
                dim=1,
            ).expand_as(out)
            kept = out + math.log1p(-alpha_q) if alpha_q < 1.0 else torch.full_like(out, -math.inf)
            some = (kept > -math.inf) | (uniform > -math.inf)  # logaddexp(-inf, -inf): nan grad
            mixed = torch.logaddexp(
                torch.where(some, kept, 0.0), torch.where(some, uniform + math.log(alpha_q), 0.0)
            )
            return torch.where(some, mixed, -math.inf)

        rows = slice(0, n) if shard is None else shard.rows
        block_q, block_p = log_q(rows), log_p[rows]
        has_mass = mask[rows].any(dim=1)
        if not checking_values():
            return self._compressed_unchecked(block_p, block_q, has_mass, n, shard)
        block_q, block_p = block_q[:, has_mass], block_p[has_mass]
        heads, width = block_q.shape[0], block_q.shape[-1]
        if block_p.shape[0] == 0:  # still part of the graph (the all-gather's backward)
            sums = block_q.masked_fill(~torch.isfinite(block_q), 0.0).sum(dim=(1, 2)) * 0.0
        else:
            values = self.divergence(
                block_p.expand(heads, -1, -1).reshape(-1, width), block_q.reshape(-1, width)
            )
            if not _divergences.is_builtin(self.divergence):  # a user's f-divergence
                from beyond_icon.loss import _check_user_values

                _check_user_values(values.detach(), self.divergence.name)
            sums = values.view(heads, -1).sum(dim=1)
        count, n_global, world_size = int(has_mass.sum()), n, 1
        if shard is not None:
            from beyond_icon.distributed import all_reduce_sum

            count = int(all_reduce_sum(torch.tensor(count, device=sums.device)))
            world_size = shard.world_size
        if count == 0:
            raise ValueError(f"no row of the {n_global} has a positive (pair-mate); loss undefined")
        self.last_stats = LossStats(n_rows=count, n_empty=n_global - count)
        losses = sums / count * world_size
        if not bool(torch.isfinite(losses.detach()).all()):
            raise ValueError(
                f"the '{self.divergence.name}' cluster loss overflowed {losses.dtype}: q gives a "
                "pair-mate a tiny probability. Debias q or use a bounded divergence"
            )
        return losses

    def _compressed_unchecked(self, block_p, block_q, has_mass, n, shard) -> Tensor:
        """The merged-columns loss without reading values back (value checks off): rows with
        no positive are evaluated as they are (or with p := q) and masked out, the count stays
        on the device; none of them gives 0 / 0 = NaN, which the training loop reports."""
        from beyond_icon.loss import _masked_values

        heads, width = block_q.shape[0], block_q.shape[-1]
        values = _masked_values(
            self.divergence,
            block_p.expand(heads, -1, -1).reshape(-1, width),
            block_q.reshape(-1, width),
            has_mass.expand(heads, -1).reshape(-1),
        ).view(heads, -1)
        count, world_size = has_mass.sum(), 1
        if shard is not None:
            from beyond_icon.distributed import all_reduce_sum

            count, world_size = all_reduce_sum(count), shard.world_size
        self.last_stats = LossStats(n_rows=count, n_empty=n - count)
        return values.sum(dim=1) / count * world_size


def _scatter_log(columns: Tensor, mask: Tensor, values: Tensor, n: int) -> Tensor:
    """Dense (n, n) log p: ``values`` at each row's listed (distinct) columns, -inf elsewhere."""
    out = torch.full((n, n + 1), -math.inf, dtype=values.dtype, device=columns.device)
    values = torch.where(mask, values, -math.inf)
    return out.scatter(1, torch.where(mask, columns, n), values)[:, :n]  # padding -> column n


class PMI(nn.Module):
    """TEMI's beta-PMI clustering loss (Adaloglou et al., 2023), the KL-family reference.

    For a pair (x, x') with student probabilities ``s``, ``s'`` and teacher probabilities
    ``t``, ``t'``: ``pmi(s, t') = log sum_c (s_c t'_c)^beta / pi_c`` with ``pi`` the EMA of the
    teacher's mean assignment, weighted by ``w = sum_c t_c t'_c`` (no gradient):
    ``L = -1/2 mean_pairs w (pmi(s, t') + pmi(s', t))``. Without a teacher, ``t = s`` detached.

    Parameters
    ----------
    n_clusters : int
        K.
    beta : float
        TEMI's exponent on the joint probability.
    momentum : float
        EMA momentum of the cluster prior ``pi``.
    weighted : bool
        Weight each pair by the teachers' agreement ``w``.

    References
    ----------
    Adaloglou, N. et al. (2023). Exploring the limits of deep image clustering using pretrained
    models. BMVC.
    """

    def __init__(
        self,
        n_clusters: int,
        beta: float = 0.6,
        momentum: float = 0.9,
        weighted: bool = True,
    ):
        super().__init__()
        if not is_int(n_clusters) or n_clusters < 2:
            raise ValueError(f"n_clusters must be an integer >= 2, got {n_clusters!r}")
        self.beta = check_positive(beta, "beta")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.weighted = weighted
        self.register_buffer("prior", torch.full((n_clusters,), 1.0 / n_clusters))

    def pmi(self, log_s: Tensor, log_t: Tensor) -> Tensor:
        """``log sum_c (s_c t_c)^beta / pi_c`` per row, in log space."""
        return torch.logsumexp(self.beta * (log_s + log_t) - self.prior.log(), dim=-1)

    def forward(
        self,
        logits_a: Tensor,
        logits_b: Tensor,
        teacher_logits_a: Tensor | None = None,
        teacher_logits_b: Tensor | None = None,
    ) -> Tensor:
        for name, value in (("logits_a", logits_a), ("logits_b", logits_b)):
            check_features(value, name)
        if logits_a.shape != logits_b.shape or logits_a.shape[1] != self.prior.shape[0]:
            raise ValueError(
                f"logits must both be (n, {self.prior.shape[0]}), got {tuple(logits_a.shape)} "
                f"and {tuple(logits_b.shape)}"
            )
        log_sa = torch.log_softmax(logits_a, dim=-1)
        log_sb = torch.log_softmax(logits_b, dim=-1)
        ta = logits_a if teacher_logits_a is None else teacher_logits_a
        tb = logits_b if teacher_logits_b is None else teacher_logits_b
        for name, value in (
            ("teacher_logits_a", teacher_logits_a),
            ("teacher_logits_b", teacher_logits_b),
        ):
            if value is not None:  # a NaN teacher would corrupt the prior for good
                check_features(value, name)
                if value.shape != logits_a.shape:
                    raise ValueError(
                        f"{name} must have the students' shape {tuple(logits_a.shape)}, got "
                        f"{tuple(value.shape)}"
                    )
        log_ta = torch.log_softmax(ta.detach(), dim=-1)
        log_tb = torch.log_softmax(tb.detach(), dim=-1)
        weight = (log_ta + log_tb).exp().sum(-1) if self.weighted else torch.ones_like(log_ta[:, 0])
        pmi = self.pmi(log_sa, log_tb) + self.pmi(log_sb, log_ta)
        loss = -(0.5 * weight * pmi).mean()
        if self.training:  # the prior moves after the loss is taken, as in TEMI
            with torch.no_grad():
                batch_prior = torch.cat([log_ta, log_tb]).exp().mean(0).to(self.prior.dtype)
                self.prior.mul_(self.momentum).add_((1 - self.momentum) * batch_prior)
        return loss
