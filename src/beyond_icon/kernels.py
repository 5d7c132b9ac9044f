"""Neighbourhood distributions p(j|i) and q(j|i) as row-normalised log-probabilities.

Every kernel returns a tensor of shape ``(n_rows, n)`` whose rows are log-probabilities
(``logsumexp`` of each row is 0) with ``-inf`` at impossible neighbours (the anchor itself for
pairwise kernels, other classes for the label kernel).

``rows`` (a ``slice`` of anchor indices, default: all) asks for just that block of rows. Row
normalisation is per row, so a block equals the same rows of the full matrix; this is what lets
:func:`beyond_icon.icon_loss` work in row chunks with O(chunk x n) memory.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from beyond_icon._validation import (
    check_features,
    check_labels,
    check_log_distributions,
    check_positive,
    checking_values,
    is_int,
    is_real,
    under_torch_func,
)

__all__ = [
    "autograd_chain",
    "clusters",
    "clusters_at",
    "cosine",
    "debias",
    "gaussian",
    "knn",
    "knn_indices",
    "labels",
    "perplexity",
    "positive_columns",
    "propagate",
    "squared_distances",
    "student_t",
    "views",
]


def _row_slice(n: int, rows: slice | None) -> slice:
    if rows is None:
        return slice(0, n)
    if not isinstance(rows, slice) or rows.step not in (None, 1):
        raise ValueError(f"rows must be a contiguous slice, got {rows!r}")
    start, stop, _ = rows.indices(n)
    if start >= stop:
        raise ValueError(f"rows {rows!r} selects no row of a batch of {n}")
    return slice(start, stop)


def _self_entries(block: Tensor, rows: slice) -> Tensor:
    """The view of a (len(rows), n) block at each anchor's own column, ``(i, rows.start + i)``:
    O(len(rows)) to write, where a boolean self mask costs two passes over the block."""
    return block.diagonal(offset=rows.start)


def _masked_log_softmax(logits: Tensor, rows: slice, exclude_self: bool) -> Tensor:
    """Row log-softmax; ``exclude_self`` sets the self entries of ``logits`` to ``-inf`` in
    place first (``logits`` must be a fresh tensor that no backward formula saved)."""
    if exclude_self:
        _self_entries(logits, rows).fill_(-math.inf)
    return torch.log_softmax(logits, dim=-1)


def squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """``|a_i - b_j|^2`` as ``|a|^2 + |b|^2 - 2 a.b``, clamped at 0 (exact 0 on the diagonal).

    No square root is taken, so the gradient is finite at distance 0. Callers centre both sets
    on a common point first to limit cancellation for features far from the origin.

    Parameters
    ----------
    a : (n, d) tensor
    b : (m, d) tensor

    Returns
    -------
    (n, m) tensor
        Squared Euclidean distances, >= 0.
    """
    sq = a.pow(2).sum(-1)[:, None] + b.pow(2).sum(-1)[None, :] - 2.0 * (a @ b.T)
    return sq.clamp_min(0.0)


def _block_distances(z: Tensor, rows: slice) -> Tensor:
    centre = z.detach().mean(dim=0, keepdim=True)
    centred = z - centre
    if _autocast_on(z.device.type) and z.dtype in (torch.float32, torch.float64):
        # autocast would run the matmul in bf16/fp16: a same-class squared distance of 0.47
        # moves by 0.23 on projections of norm 10. Distances stay in the input's precision.
        with torch.autocast(z.device.type, enabled=False):
            return squared_distances(centred[rows], centred)
    return squared_distances(centred[rows], centred)


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no argument (and only knows CUDA autocast)
        return device_type == "cuda" and torch.is_autocast_enabled()


def _autocast_off(z: Tensor):
    """A context without autocast on ``z``'s device (a no-op context when it is off)."""
    import contextlib

    if _autocast_on(z.device.type):
        return torch.autocast(z.device.type, enabled=False)
    return contextlib.nullcontext()


def _at_least_float32(z: Tensor) -> Tensor:
    """Half-precision embeddings (a network under autocast) are promoted to float32.

    Their gradient goes back in half precision: where it would overflow (cosine on features of
    norm ~1e-6 in float16, whose gradient is ~1/norm), backward raises a one-line
    ``ValueError`` instead of handing back inf.
    """
    if z.dtype not in (torch.float16, torch.bfloat16):
        return z
    wide = z.float()
    if wide.requires_grad and z.dtype == torch.float16:  # bfloat16 has float32's range
        limit = torch.finfo(z.dtype).max
        dtype = z.dtype

        def guard(grad: Tensor) -> Tensor:
            largest = float(grad.detach().abs().max()) if grad.numel() else 0.0
            if not largest < limit:  # also nan
                raise ValueError(
                    f"the gradient with respect to the {dtype} embeddings overflows {dtype} "
                    f"(largest entry {largest:.3g}); compute the embeddings in float32"
                )
            return grad

        wide.register_hook(guard)
    return wide


def _work_dtype(z: Tensor) -> torch.dtype:
    """The dtype the distance kernels compute in: float64 for float64 input, else float32."""
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def _check_pairwise(z: Tensor, name: str) -> float | None:
    """:func:`check_features` (two rows at least), and that squared distances between the rows
    of ``z`` cannot overflow the dtype the kernels compute in (:func:`_work_dtype`).

    Returns
    -------
    float or None
        ``4 d max|z - mean(z)|^2``, a bound on every squared distance between the rows;
        None with value checks off (:func:`beyond_icon.value_checks`).
    """
    if not checking_values() or z.numel() == 0:
        check_features(z, name, min_rows=2)
        return None
    check_features(z, name, min_rows=2, values=False)
    values = z.detach()
    # the spread about the mean, which the kernels centre on: a large common offset is fine
    top = float((values - values.mean(dim=0, keepdim=True)).abs().amax())  # one sync
    if not math.isfinite(top):  # NaN or Inf in z (or a mean that overflows)
        check_features(z, name, min_rows=2)  # names the rows
        raise ValueError(f"{name}'s mean overflows {z.dtype}; scale the features down")
    work = _work_dtype(z)
    bound = 4.0 * z.shape[1] * top * top
    if bound > torch.finfo(work).max:
        raise ValueError(
            f"{name}'s entries reach {top:.3g}: squared distances between its rows can overflow "
            f"{work} (the kernels compute in it); scale the features down"
        )
    return bound


class _DistanceKernel(torch.autograd.Function):
    """``log_softmax_j(g(|c_i - c_j|^2) + log w_ij)`` over a block of rows in one function,
    with ``c = z - mean(z)`` (the mean held fixed, as :func:`_block_distances` does), the self
    entries ``-inf`` when asked, and ``g(s) = -(dof + 1) / 2 log(1 + s / dof)`` (Student-t) or
    ``-s / (2 sigma^2)`` (Gaussian, ``dof=None``).

    Its backward is written out: with ``G`` the gradient of the log-probabilities, ``S = (G -
    q rowsum(G)) g'(s)`` on the block (zero on the self entries), ``dL/dc_j = 2 (colsum(S)_j
    c_j - (S^T c_B)_j)`` for every point, plus ``2 (rowsum(S)_i c_i - (S c)_i)`` for the
    block's rows. Autograd's chain of the same ops ran more passes over the (rows, n) block
    and kept more of them (the unchunked loss of ``tests/test_loss.py`` peaked above 4 n x n
    float32 matrices, 2.5 with this function). On 2 cores, the Student-t kernel and Hellinger
    loss of a 512-point batch, forward and backward, took 3.6 instead of 5.4 ms (medians of 8
    alternating rounds), and a ParametricSNE step on Fashion-MNIST 10k 5.2 instead of 5.6 ms.
    The clamp of rounding-negative squared distances at 0 is not differentiated (its gradient
    is taken as 1 there; autograd's chain took 0, which differs only for duplicate points), nor
    is the centring (the distances do not move when every point does).
    """

    @staticmethod
    def forward(ctx, z, start, stop, dof, sigma, log_weights, exclude_self):  # noqa: D102
        with _autocast_off(z):
            centred = z - z.mean(dim=0, keepdim=True)
            block = centred[start:stop]
            norms = centred.pow(2).sum(-1)
            sq = torch.addmm(norms[None, :], block, centred.T, alpha=-2.0)
            sq.add_(norms[start:stop, None]).clamp_min_(0.0)
            if dof is None:
                slope = None
                if exclude_self:
                    # shifted by each row's nearest other point (log_softmax is invariant to it):
                    # a sigma tiny against the distances leaves that neighbour's logit at 0
                    # instead of every logit -inf and a NaN row
                    sq.diagonal(offset=start).fill_(math.inf)
                    sq.sub_(sq.amin(dim=1, keepdim=True))
                logits = sq.mul_(-0.5 / (sigma * sigma))
            else:
                scaled = sq.div_(dof)
                slope = scaled.add(1.0).reciprocal_()  # g'(s) dof / (-(dof + 1) / 2)
                logits = scaled.log1p_().mul_(-0.5 * (dof + 1.0))
            if log_weights is not None:
                logits.add_(log_weights.to(logits.dtype))
            if exclude_self:
                logits.diagonal(offset=start).fill_(-math.inf)
            log_q = torch.log_softmax(logits, dim=-1)
        ctx.save_for_backward(centred, log_q, slope)
        ctx.block = (start, stop, dof, sigma, exclude_self)
        return log_q

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        if torch.is_grad_enabled():  # create_graph=True: a graph of this backward is asked for
            raise RuntimeError(
                "beyond_icon's Student-t and Gaussian kernels have a first-order backward "
                "only: compute higher-order gradients (create_graph=True) inside "
                "beyond_icon.kernels.autograd_chain()"
            )
        centred, log_q, slope = ctx.saved_tensors
        start, stop, dof, sigma, exclude_self = ctx.block
        with _autocast_off(centred):
            grad = grad.to(log_q.dtype)
            total = grad.sum(dim=-1, keepdim=True)
            s = torch.addcmul(grad, log_q.exp(), total, value=-1.0)  # through the log-softmax
            if exclude_self:
                s.diagonal(offset=start).zero_()
            if slope is None:
                s.mul_(-0.5 / (sigma * sigma))
            else:
                s.mul_(slope).mul_(-0.5 * (dof + 1.0) / dof)
            block = centred[start:stop]
            grad_z = centred * s.sum(dim=0)[:, None] - s.T @ block
            grad_z[start:stop] += block * s.sum(dim=-1)[:, None] - s @ centred
            grad_z.mul_(2.0)
        return grad_z, None, None, None, None, None, None


def _distance_kernel(
    z: Tensor,
    block: slice,
    dof: float | None,
    sigma: float,
    log_weights: Tensor | None,
    exclude_self: bool,
) -> Tensor:
    z = _at_least_float32(z)
    if log_weights is not None:
        expected = (block.stop - block.start, z.shape[0])
        if tuple(log_weights.shape) != expected:
            raise ValueError(
                f"log_weights must have the block's shape {expected}, "
                f"got {tuple(log_weights.shape)}"
            )
    # a learned weight, higher-order gradients asked for, or a torch.func transform (which
    # admits no old-style autograd.Function): autograd's chain
    learned = log_weights is not None and log_weights.requires_grad
    if _CHAIN.on or learned or under_torch_func(z):
        if dof is None:
            distances = _block_distances(z, block)
            if exclude_self:  # as in _DistanceKernel: the row's nearest other point at 0
                nearest = distances.detach().clone()
                _self_entries(nearest, block).fill_(math.inf)
                distances = distances - nearest.amin(dim=1, keepdim=True)
            logits = distances / (-2.0 * sigma * sigma)
        else:
            logits = -0.5 * (dof + 1.0) * torch.log1p(_block_distances(z, block) / dof)
        return _masked_log_softmax(_with_weights(logits, log_weights), block, exclude_self)
    return _DistanceKernel.apply(z, block.start, block.stop, dof, sigma, log_weights, exclude_self)


class _ChainSwitch(threading.local):
    on = False


_CHAIN = _ChainSwitch()


@contextlib.contextmanager
def autograd_chain() -> Iterator[None]:
    """Build :func:`gaussian` and :func:`student_t` from autograd's elementary ops inside
    this context, instead of their one function with a written-out first-order backward.

    The default is faster and lighter but differentiable once only: a backward with
    ``create_graph=True`` (gradient penalties, Hessians) raises a ``RuntimeError`` that names
    this context; inside it they work, with the same values. ``torch.func`` transforms
    (``grad``, ``vmap``) take autograd's chain by themselves. Per thread.

    Returns
    -------
    A context manager.

    Examples
    --------
    >>> import torch
    >>> from beyond_icon import kernels
    >>> z = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    >>> with kernels.autograd_chain():
    ...     hessian = torch.autograd.functional.hessian(
    ...         lambda z: kernels.student_t(z).diagonal(1).sum(), z
    ...     )
    >>> hessian.shape
    torch.Size([5, 2, 5, 2])
    """
    before, _CHAIN.on = _CHAIN.on, True
    try:
        yield
    finally:
        _CHAIN.on = before


# --------------------------------------------------------------------------------------------
# Kernels on embeddings (learned q, or p from input space)
# --------------------------------------------------------------------------------------------


def _with_weights(logits: Tensor, log_weights: Tensor | None) -> Tensor:
    if log_weights is None:
        return logits
    if log_weights.shape != logits.shape:
        raise ValueError(
            f"log_weights must have the block's shape {tuple(logits.shape)}, "
            f"got {tuple(log_weights.shape)}"
        )
    return logits + log_weights.to(logits.dtype)


def gaussian(
    z: Tensor,
    sigma: float = 1.0,
    *,
    rows: slice | None = None,
    exclude_self: bool = True,
    log_weights: Tensor | None = None,
) -> Tensor:
    """Gaussian kernel: ``q(j|i) ∝ c_ij exp(-|z_i - z_j|^2 / (2 sigma^2))``, ``j != i``.

    ``log_weights`` (``log c``, the block's shape, default 0) lets a column stand for
    ``c_ij`` points, as the negatives of a sampled batch do
    (:meth:`beyond_icon.affinity.PerplexityAffinity.negative_log_weights`). Distances are
    computed in float32 or wider, also under autocast. The gradient is first-order only
    (higher-order ones: :func:`autograd_chain`; ``torch.func`` takes it by itself).

    Parameters
    ----------
    z : (n, d) tensor
        Embeddings.
    sigma : float
        Bandwidth. SNE's convention is ``sigma = 1 / sqrt(2)`` (``exp(-|z_i - z_j|^2)``); the
        SupCon preset's Euclidean kernel uses 1.
    rows : slice, optional
        Build only these rows (anchors) against all n columns: the block the chunked and the
        distributed losses ask for. Default all rows.
    exclude_self : bool
        Give ``j = i`` probability 0 (the I-Con convention for neighbour distributions).
    log_weights : tensor, optional
        ``log c``, the block's shape: each column stands for ``c_ij`` points.

    Returns
    -------
    (len(rows), n) tensor
        Row-normalised log-probabilities, ``-inf`` at impossible neighbours.

    References
    ----------
    Hinton, G. and Roweis, S. (2002). Stochastic neighbor embedding. NeurIPS.
    """
    _check_pairwise(z, "z")
    sigma = check_positive(sigma, "sigma")
    work = _work_dtype(z)
    if not sigma * sigma > 0.5 / torch.finfo(work).max:
        raise ValueError(f"sigma={sigma:g} is too small for {work}: 1 / (2 sigma^2) overflows it")
    block = _row_slice(z.shape[0], rows)
    return _distance_kernel(z, block, None, sigma, log_weights, exclude_self)


def student_t(
    z: Tensor,
    dof: float = 1.0,
    *,
    rows: slice | None = None,
    exclude_self: bool = True,
    log_weights: Tensor | None = None,
) -> Tensor:
    """Student-t kernel: ``q(j|i) ∝ c_ij (1 + |z_i - z_j|^2 / dof)^(-(dof + 1) / 2)``, ``j != i``.

    ``dof = 1`` is the Cauchy kernel of t-SNE; ``log_weights`` as in :func:`gaussian`.
    Distances are computed in float32 or wider, also under autocast. The gradient is
    first-order only (higher-order ones: :func:`autograd_chain`; ``torch.func`` takes it by
    itself).

    Parameters
    ----------
    z : (n, d) tensor
        Embeddings.
    dof : float
        Degrees of freedom; smaller is heavier-tailed.
    rows : slice, optional
        Build only these rows (anchors) against all n columns: the block the chunked and the
        distributed losses ask for. Default all rows.
    exclude_self : bool
        Give ``j = i`` probability 0 (the I-Con convention for neighbour distributions).
    log_weights : tensor, optional
        ``log c``, the block's shape: each column stands for ``c_ij`` points.

    Returns
    -------
    (len(rows), n) tensor
        Row-normalised log-probabilities, ``-inf`` at impossible neighbours.

    References
    ----------
    van der Maaten, L. and Hinton, G. (2008). Visualizing data using t-SNE. JMLR 9.
    """
    bound = _check_pairwise(z, "z")
    dof = check_positive(dof, "dof")
    work = _work_dtype(z)
    if bound is not None and bound / dof > torch.finfo(work).max:
        raise ValueError(
            f"dof={dof:g} is too small for these distances in {work}: |z_i - z_j|^2 / dof can "
            "overflow it (every neighbour's probability would be 0); raise dof or scale z down"
        )
    block = _row_slice(z.shape[0], rows)
    return _distance_kernel(
        z, block, float(dof), sigma=1.0, log_weights=log_weights, exclude_self=exclude_self
    )


def cosine(
    z: Tensor, temperature: float = 0.1, *, rows: slice | None = None, exclude_self: bool = True
) -> Tensor:
    """Cosine kernel: ``q(j|i) ∝ exp(cos(z_i, z_j) / temperature)``, ``j != i``.

    Computed in float32 or wider (half-precision norms of ~1e-6 underflow and give infinite
    gradients), also under autocast.

    Parameters
    ----------
    z : (n, d) tensor
        Embeddings (normalised inside).
    temperature : float
        Softmax temperature.
    rows : slice, optional
        Build only these rows (anchors) against all n columns: the block the chunked and the
        distributed losses ask for. Default all rows.
    exclude_self : bool
        Give ``j = i`` probability 0 (the I-Con convention for neighbour distributions).

    Returns
    -------
    (len(rows), n) tensor
        Row-normalised log-probabilities, ``-inf`` at impossible neighbours.

    References
    ----------
    Chen, T. et al. (2020). A simple framework for contrastive learning of visual
    representations. ICML.
    """
    check_features(z, "z", min_rows=2)  # no distances: finite values are enough
    temperature = check_positive(temperature, "temperature")
    block = _row_slice(z.shape[0], rows)
    with _autocast_off(z):
        unit = F.normalize(_at_least_float32(z), dim=-1, eps=1e-12)
        logits = (unit[block] / temperature) @ unit.T  # the scale on (b, d), not on (b, n)
    return _masked_log_softmax(logits, block, exclude_self)


@torch.no_grad()
def perplexity(
    x: Tensor,
    perplexity: float = 30.0,
    *,
    rows: slice | None = None,
    n_iter: int = 50,
) -> Tensor:
    """Perplexity-calibrated Gaussian: ``p(j|i) ∝ exp(-beta_i |x_i - x_j|^2)``, ``j != i``.

    Each row's precision ``beta_i`` is found by bisection (in log space) so that the row's
    perplexity ``exp(H(p(.|i)))`` (natural log) equals ``perplexity``. No gradient flows: this
    is a supervisory distribution. Computed in float64 for float64 input, else in float32 (50
    bisection steps exhaust float32's resolution of log beta in [-50, 50]).

    Parameters
    ----------
    x : (n, D) tensor
        Inputs.
    perplexity : float
        Target perplexity, an effective number of neighbours (``1 <= perplexity < n - 1``).
    rows : slice, optional
        Build only these rows (anchors) against all n columns: the block the chunked and the
        distributed losses ask for. Default all rows.
    n_iter : int
        Bisection steps.

    Returns
    -------
    (len(rows), n) tensor
        Row-normalised log-probabilities, ``-inf`` at impossible neighbours.

    References
    ----------
    van der Maaten, L. and Hinton, G. (2008). Visualizing data using t-SNE. JMLR 9.
    """
    _check_pairwise(x, "x")
    if not (is_int(n_iter) and n_iter >= 1):
        raise ValueError(f"n_iter must be a positive integer, got {n_iter!r}")
    n = x.shape[0]
    perplexity = check_positive(perplexity, "perplexity")
    if not 1.0 <= perplexity < n - 1:
        raise ValueError(
            f"perplexity must be in [1, n - 1) = [1, {n - 1}) for a batch of n = {n} points, "
            f"got {perplexity:g}; lower it or use a larger batch"
        )
    block = _row_slice(n, rows)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    d2 = _block_distances(x.to(work), block)
    self_mask = torch.zeros_like(d2, dtype=torch.bool)  # used in every bisection step
    _self_entries(self_mask, block).fill_(True)
    d2 = d2.masked_fill(self_mask, math.inf)
    # Shift and scale each row so that beta ~ 1 is a sensible start: the nearest neighbour is at
    # 0 and the median neighbour at 1 (the entropy is invariant to the shift; beta absorbs scale).
    d2 = d2 - d2.min(dim=1, keepdim=True).values
    scale = torch.nanmedian(d2.masked_fill(self_mask, math.nan), dim=1, keepdim=True).values
    d2 = d2 / scale.clamp_min(1e-12)
    target = math.log(perplexity)
    lo = torch.full((d2.shape[0], 1), -50.0, dtype=work, device=x.device)
    hi = torch.full_like(lo, 50.0)
    for _ in range(n_iter):
        mid = (lo + hi) / 2
        log_p = torch.log_softmax(-mid.exp() * d2, dim=1)
        entropy = -(log_p.exp() * log_p.masked_fill(self_mask, 0.0)).sum(1, keepdim=True)
        too_flat = entropy > target  # entropy falls as beta grows
        lo = torch.where(too_flat, mid, lo)
        hi = torch.where(too_flat, hi, mid)
    log_p = torch.log_softmax(-((lo + hi) / 2).exp() * d2, dim=1)
    return log_p.to(x.dtype)


# --------------------------------------------------------------------------------------------
# Supervisory kernels from labels, indices and graphs
# --------------------------------------------------------------------------------------------


def labels(y: Tensor, *, rows: slice | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """Label kernel: ``p(j|i) = 1 / |{k != i : y_k = y_i}|`` if ``y_j = y_i``, ``j != i``.

    A sample whose label appears once has an empty row (all ``-inf``); the loss leaves it out.

    Parameters
    ----------
    y : (n,) integer tensor
        Class labels.
    rows : slice, optional
        Build only these rows (anchors) against all n columns: the block the chunked and the
        distributed losses ask for. Default all rows.
    dtype : torch.dtype, optional
        Of the result (default torch's default dtype).

    Returns
    -------
    (len(rows), n) tensor
        Row-normalised log-probabilities, ``-inf`` at impossible neighbours.

    References
    ----------
    Khosla, P. et al. (2020). Supervised contrastive learning. NeurIPS.
    """
    check_labels(y, "labels")
    n = y.shape[0]
    block = _row_slice(n, rows)
    same = y[block][:, None] == y[None, :]
    _self_entries(same, block).fill_(False)
    counts = same.sum(dim=1, keepdim=True)
    log_uniform = -torch.log(counts.clamp_min(1).to(dtype or torch.get_default_dtype()))
    return torch.where(same, log_uniform, -math.inf)


def views(
    source_index: Tensor, *, rows: slice | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """Views kernel: ``p(j|i)`` uniform over the other entries with the same source index.

    Two augmented views of image k share index k (SimCLR); a mined k-NN pair shares a pair id.

    Parameters
    ----------
    source_index : (n,) integer tensor
        Which sample (or pair) each row comes from.
    rows : slice, optional
        Build only these rows (anchors) against all n columns: the block the chunked and the
        distributed losses ask for. Default all rows.
    dtype : torch.dtype, optional

    Returns
    -------
    (len(rows), n) tensor
        Row-normalised log-probabilities, ``-inf`` at impossible neighbours.
    """
    return labels(source_index, rows=rows, dtype=dtype)


def knn(x: Tensor, n_neighbors: int, *, rows: slice | None = None) -> Tensor:
    """k-NN kernel: ``p(j|i) = 1/k`` for the ``k`` nearest ``j != i`` (Euclidean), else 0.

    Parameters
    ----------
    x : (n, D) tensor
        Inputs.
    n_neighbors : int
        ``k``, in ``[1, n - 1]``.
    rows : slice, optional
        Build only these rows (anchors) against all n columns: the block the chunked and the
        distributed losses ask for. Default all rows.

    Returns
    -------
    (len(rows), n) tensor
        Row-normalised log-probabilities, ``-inf`` at impossible neighbours.
    """
    nearest = knn_indices(x, n_neighbors, rows=rows)  # checks x, n_neighbors and rows
    out = torch.full((nearest.shape[0], x.shape[0]), -math.inf, dtype=x.dtype, device=x.device)
    return out.scatter(1, nearest, -math.log(n_neighbors))


def knn_indices(x: Tensor, n_neighbors: int, *, rows: slice | None = None) -> Tensor:
    """The ``k`` nearest other rows of each row (Euclidean; exact, in the batch).

    Parameters
    ----------
    x : (n, D) tensor
        Inputs (no gradient flows).
    n_neighbors : int
        ``k``, in ``[1, n - 1]``.
    rows : slice, optional
        Only these rows' neighbours (among all n). Default all rows.

    Returns
    -------
    (len(rows), k) int64 tensor
        Column indices, nearest first; never the row itself.
    """
    check_features(x, "x", min_rows=2)
    n = x.shape[0]
    if not is_int(n_neighbors) or not 1 <= n_neighbors <= n - 1:
        raise ValueError(f"n_neighbors must be an integer in [1, {n - 1}], got {n_neighbors!r}")
    block = _row_slice(n, rows)
    with torch.no_grad(), _autocast_off(x):
        # ranked by |x_j|^2 - 2 x_i.x_j, row i's squared distances less the constant |x_i|^2:
        # one matmul with the norms as its bias, no pass to add |x_i|^2 or clamp (half the time
        # of the distances at 8192 x 384); centred first, as the distances are, for precision
        centred = x.detach() - x.detach().mean(dim=0, keepdim=True)
        norms = centred.pow(2).sum(dim=1)
        scores = torch.addmm(norms[None, :], centred[block], centred.T, alpha=-2.0)
        _self_entries(scores, block).fill_(math.inf)
        return scores.topk(n_neighbors, dim=1, largest=False).indices


def _refuse_no_mass_outside_self(empty: Tensor, block: slice) -> None:
    """A one-line error for the first row of the cluster kernel (``empty``, over ``block``)
    that ``exclude_self`` leaves with no mass: 0/0 would be a NaN row."""
    if bool(empty.any()):
        row = int(empty.nonzero()[0, 0]) + block.start
        raise ValueError(
            f"row {row} of the cluster kernel has no mass outside itself: its assignment is "
            "exactly one-hot on a cluster no other point shares, so exclude_self leaves nothing "
            "to normalise; use soft assignments (a log_softmax of finite logits has no exact "
            "zeros) or exclude_self=False"
        )


def clusters(
    log_assign: Tensor,
    teacher: Tensor | None = None,
    *,
    rows: slice | None = None,
    exclude_self: bool = False,
) -> Tensor:
    """Cluster-sharing kernel: ``q(j|i) = sum_c a_ic b_jc / sum_l b_lc``.

    ``log_assign`` holds log soft assignments ``log a`` (n, k), rows summing to 1;
    ``teacher`` (same shape) the log assignments ``log b`` of a teacher (default ``b = a``).
    Rows sum to one because ``sum_j b_jc / sum_l b_lc = 1``. With ``exclude_self`` the
    anchor's own entry is removed and the row renormalised. The (n x k) @ (k x n) product is
    taken in float64 after a per-row max shift, so confident assignments do not underflow.

    Parameters
    ----------
    log_assign : (n, k) tensor
        Log soft assignments of the student, rows summing to 1.
    teacher : (n, k) tensor, optional
        Log assignments of a teacher (default the student's).
    rows : slice, optional
        Build only these rows (anchors) against all n columns: the block the chunked and the
        distributed losses ask for. Default all rows.
    exclude_self : bool
        Give ``j = i`` probability 0 (the I-Con convention for neighbour distributions).

    Returns
    -------
    (len(rows), n) tensor
        Row-normalised log-probabilities, ``-inf`` at impossible neighbours.

    References
    ----------
    Alshammari, S. et al. (2025). I-Con: a unifying framework for representation learning.
    ICLR.
    """
    check_log_distributions(log_assign, "log_assign", allow_empty_rows=False)
    if teacher is None:
        teacher = log_assign
    else:
        check_log_distributions(teacher, "teacher", allow_empty_rows=False, like=log_assign)
    n = log_assign.shape[0]
    if n < 2:
        raise ValueError("the cluster kernel needs a batch of at least 2 points")
    block = _row_slice(n, rows)
    la = log_assign[block].double()
    lb = teacher.double()
    lb = lb - torch.logsumexp(lb, dim=0, keepdim=True)  # b_jc / sum_l b_lc, in log space
    la_max = la.max(dim=1, keepdim=True).values
    lb_max = lb.max(dim=1, keepdim=True).values
    shifted = (la - la_max).exp() @ (lb - lb_max).exp().T
    positive = shifted > 0
    safe = torch.where(positive, shifted, torch.ones_like(shifted))
    log_q = torch.where(positive, safe.log(), torch.full_like(safe, -math.inf))
    log_q = log_q + la_max + lb_max.T
    if exclude_self:
        _self_entries(log_q, block).fill_(-math.inf)
        if checking_values():
            _refuse_no_mass_outside_self(torch.isneginf(log_q).all(dim=1), block)
        log_q = torch.log_softmax(log_q, dim=-1)
    return log_q.to(log_assign.dtype)


def positive_columns(*keys: Tensor) -> tuple[Tensor, Tensor]:
    """For each row ``i``, the columns ``j != i`` that share any of the ``keys`` with ``i``.

    ``keys`` are (n,) integer tensors (a pair id, a sample index, ...); ``j`` is listed for
    ``i`` when ``key[j] == key[i]`` for at least one key, once. Returns ``(columns, mask)``, both
    (n, s): column indices, and which of them are real (the rest is padding). This is the
    support of the views kernel (:func:`views`) without its dense (n, n) matrix: sorting costs
    O(n log n) and the width ``s`` is the largest group.

    Parameters
    ----------
    *keys : (n,) integer tensors
        The keys; at least one.

    Returns
    -------
    columns : (n, s) int64 tensor
    mask : (n, s) bool tensor
    """
    if not keys:
        raise ValueError("positive_columns needs at least one key")
    n = keys[0].shape[0]
    for key in keys:
        check_labels(key, "key", n=n)
    device = keys[0].device
    arange = torch.arange(n, device=device)
    columns, masks = [], []
    for k, key in enumerate(keys):
        order = torch.argsort(key, stable=True)
        _, group_sorted, counts = torch.unique_consecutive(
            key[order], return_inverse=True, return_counts=True
        )
        group = torch.empty_like(group_sorted)
        group[order] = group_sorted
        starts = torch.cumsum(counts, 0) - counts
        width = int(counts.max())
        slots = torch.arange(width, device=device)
        mask = slots[None, :] < counts[group][:, None]
        column = order[(starts[group][:, None] + slots[None, :]).clamp(max=n - 1)]
        mask &= column != arange[:, None]
        for earlier in keys[:k]:  # listed already through an earlier key
            mask &= earlier[column] != earlier[:, None]
        columns.append(column)
        masks.append(mask)
    column, mask = torch.cat(columns, dim=1), torch.cat(masks, dim=1)
    # real entries first, then cut to the longest row (the anchor's own slot is gone)
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    width = max(int(mask.sum(dim=1).max()), 1)
    return column.gather(1, order)[:, :width], mask.gather(1, order)[:, :width]


def clusters_at(
    log_assign: Tensor,
    columns: Tensor,
    mask: Tensor,
    teacher: Tensor | None = None,
    *,
    rows: slice | None = None,
    exclude_self: bool = False,
) -> Tensor:
    """The cluster-sharing kernel at a few columns per row, and the mass of all the others.

    With ``q(j|i) = sum_c a_ic b_jc / sum_l b_lc`` (see :func:`clusters`), returns the
    (n, s + 1) log-probabilities ``[log q(c_i1|i), ..., log q(c_is|i), log r_i]`` where
    ``c_it = columns[i, t]`` (``-inf`` where ``mask`` is False) and
    ``r_i = sum_{j not listed} q(j|i) = sum_c a_ic (1 - sum_t b_{c_it c} / sum_l b_lc)``:
    every column that is not listed merged into one. With ``exclude_self`` the anchor's own
    column is dropped from ``r_i`` and the row renormalised by ``1 - q(i|i)``, computed from
    leave-one-out log-sum-exps (exact also when ``i`` holds nearly all of its clusters' mass).
    ``log_assign`` (and ``teacher``)
    may carry leading dimensions (several heads: (h, n, k) gives (h, n, s + 1)).

    Merging the columns where ``p = 0`` changes no f-divergence (they all have ``p/q = 0``), so
    ``D(p_listed || this)`` equals ``D(p || clusters(...))`` for every f-divergence, at O(n s k)
    cost instead of O(n^2 k) (up to a dense product for small batches, where it is faster). The
    listed columns are log-sum-exps, for more than three columns a row evaluated as products of
    shifted exponentials with an exact fallback where those underflow; ``r_i`` is one minus
    their sum, in float64.

    Parameters
    ----------
    log_assign : (..., n, k) tensor
        Log soft assignments (leading dimensions are heads).
    columns, mask : (n, s) tensors
        From :func:`positive_columns`.
    teacher : (..., n, k) tensor, optional
        Log assignments of a teacher.
    rows : slice, optional
        Build only these rows (anchors) against all n columns: the block the chunked and the
        distributed losses ask for. Default all rows.
    exclude_self : bool
        Give ``j = i`` probability 0 (the I-Con convention for neighbour distributions).

    Returns
    -------
    (..., len(rows), s + 1) tensor
        Log q at the listed columns, then the log of the merged rest.
    """
    k = log_assign.shape[-1]
    check_log_distributions(log_assign.reshape(-1, k), "log_assign", allow_empty_rows=False)
    if teacher is None:
        teacher = log_assign
    else:
        if teacher.shape != log_assign.shape:
            raise ValueError(
                f"teacher has shape {tuple(teacher.shape)}, log_assign {tuple(log_assign.shape)}"
            )
        check_log_distributions(teacher.reshape(-1, k), "teacher", allow_empty_rows=False)
    n = log_assign.shape[-2]
    if n < 2:
        raise ValueError("the cluster kernel needs a batch of at least 2 points")
    block = _row_slice(n, rows)
    if columns.shape != mask.shape or columns.shape[0] != n:
        raise ValueError(
            f"columns and mask must both be ({n}, s), got {tuple(columns.shape)} and "
            f"{tuple(mask.shape)}"
        )
    columns, mask = columns[block], mask[block]
    la = log_assign[..., block, :]
    lb = teacher - torch.logsumexp(teacher, dim=-2, keepdim=True)  # log b_jc / sum_l b_lc
    listed = _listed_log_q(la, lb, columns, mask)
    if exclude_self:  # renormalise by 1 - q(i|i), from leave-one-out cluster masses
        others = _log_mass_of_others(la, teacher, block)
        if checking_values():
            empty = torch.isneginf(others[..., 0]).reshape(-1, others.shape[-2]).any(0)
            _refuse_no_mass_outside_self(empty, block)
        listed = listed - others
    # the rest: 1 - the listed mass, in float64; it enters every f-divergence linearly
    # (as f(0) r_i), so an absolute rounding error of the listed values is all it carries
    other = (1.0 - listed.double().exp().sum(dim=-1, keepdim=True)).clamp_min(0.0)
    positive = other > 0
    rest = torch.where(positive, torch.where(positive, other, 1.0).log(), -math.inf)
    return torch.cat([listed, rest.to(listed.dtype)], dim=-1)


# A block's products are built in slices of at most this many elements (bounds the temporaries).
_SLICE_ELEMENTS = 1 << 24


def _listed_path(device: torch.device, n: int, s: int, k: int) -> str:
    """How :func:`_listed_log_q` evaluates ``r x s`` listed entries of ``(r, k) @ (k, n)``.

    ``logsumexp``: one exact log-sum-exp per listed column (a pair-mate or two; s <= 3, where
    it beats the products: 1.7 against 4.3 ms at n = 512, k = 20, s = 1).
    ``dense``: the whole product, then a gather (two matmuls backward); best while ``n`` is a
    small multiple of ``s``. Beyond it ``sampled``: ``torch.sparse.sampled_addmm``, only the
    listed dot products (O(r s k), nothing materialised); on a GPU first ``gathered``: the
    listed rows of the second factor gathered, then a broadcast product (O(r s k) memory
    traffic), while ``n s k`` stays below 4e7. Crossovers measured on 2 CPU cores (10 heads,
    forward and backward, s = 21): dense wins up to n ~ 35 s for k = 20 to 100, and sampled
    from n = 512 for k = 1000; at n = 8192, k = 1000 sampled takes 4.7 s, gathered 49 s. On
    an H200 (``benchmarks/bench_listed_paths.py``, same shapes): dense 0.6 to 6.5 ms up to
    n = 2048; at n = 8192 gathered 1.2 ms for k = 20 and 11.4 ms for k = 200 (sampled 15.2
    and 14.2), sampled 19.0 ms for k = 1000 (gathered 104, dense 134).
    """
    if s <= 3:
        return "logsumexp"
    if device.type == "cpu":
        return "dense" if n <= 32 * s and k <= 200 else "sampled"
    if n <= s * min(1.5 * k, 256):
        return "dense"
    return "gathered" if n * s * k <= 4e7 else "sampled"


def _sampled_products(ea: Tensor, eb: Tensor, columns: Tensor, mask: Tensor) -> Tensor:
    """``ea_i . eb_j`` at the listed entries (0 elsewhere), one sparse sampled product per head:
    (..., r, s). The CSR pattern holds the listed columns of each row, sorted."""
    import warnings

    r, s = columns.shape
    n, k = eb.shape[-2], eb.shape[-1]
    key, order = torch.where(mask, columns, n).sort(dim=1)  # listed first, ascending
    keep = key < n
    crow = torch.zeros(r + 1, dtype=torch.int64, device=columns.device)
    crow[1:] = keep.sum(dim=1).cumsum(0)
    col = key[keep]
    slot = (torch.arange(r, device=columns.device)[:, None] * s + order)[keep]
    a, b = ea.reshape(-1, r, k), eb.reshape(-1, n, k)
    values = []
    with warnings.catch_warnings():  # "sparse CSR support is in beta": used for this one op
        warnings.simplefilter("ignore", UserWarning)
        for h in range(a.shape[0]):
            pattern = torch.sparse_csr_tensor(
                crow, col, torch.zeros(col.shape, dtype=a.dtype, device=a.device), (r, n)
            )
            values.append(torch.sparse.sampled_addmm(pattern, a[h], b[h].T).values())
    flat = torch.zeros(a.shape[0], r * s, dtype=a.dtype, device=a.device)
    return flat.index_copy(1, slot, torch.stack(values)).reshape(*ea.shape[:-2], r, s)


def _listed_products(ea: Tensor, eb: Tensor, columns: Tensor, mask: Tensor, path: str) -> Tensor:
    """``ea_i . eb_j`` at each listed column ``j = columns[i, t]``, (..., r, s), by ``path``."""
    if path == "sampled":
        return _sampled_products(ea, eb, columns, mask)
    n, s = eb.shape[-2], columns.shape[1]
    heads = int(math.prod(ea.shape[:-2]))
    k = ea.shape[-1]
    # slices bound the temporaries of the forward pass (autograd keeps what backward needs)
    step = max(1, _SLICE_ELEMENTS // max(1, heads * (n if path == "dense" else s * k)))
    sums = []
    for start in range(0, columns.shape[0], step):
        cols = columns[start : start + step]
        a = ea[..., start : start + step, :]
        if path == "dense":
            full = a @ eb.transpose(-1, -2)  # (..., rows, n)
            sums.append(full.gather(-1, cols.expand(*full.shape[:-1], s)))
        else:
            # (..., rows, s, k); index_select's backward (index_add) is several times faster
            # than advanced indexing's (index_put with accumulate)
            picked = eb.index_select(-2, cols.reshape(-1)).unflatten(-2, cols.shape)
            sums.append((picked * a.unsqueeze(-2)).sum(dim=-1))
    return torch.cat(sums, dim=-2)


def _listed_log_q(la: Tensor, lb: Tensor, columns: Tensor, mask: Tensor) -> Tensor:
    """``log sum_c exp(la_ic + lb_jc)`` at each listed column ``j = columns[i, t]``, (..., r, s).

    Products of shifted exponentials instead of a log-sum-exp per column: with ``m_i = max_c
    la_ic`` and ``m_j = max_c lb_jc`` every factor lies in (0, 1] and the largest is 1, so the
    sum ``S_ij = sum_c exp(la_ic - m_i) exp(lb_jc - m_j)`` only underflows when ``log q`` lies
    ~87 nats (float32) below ``m_i + m_j``: two points confidently in different clusters. The
    entries below ``tiny / eps`` (~71 nats down in float32, where the products' rounding could
    grow; found with one device-to-host read) are recomputed with the exact
    log-sum-exp, so the result equals the log-sum-exp form everywhere, at the cost of a matrix
    product (evaluated as :func:`_listed_path` chooses).
    """
    k, n = la.shape[-1], lb.shape[-2]
    r, s = columns.shape
    columns = columns.long()
    dtype = torch.promote_types(la.dtype, lb.dtype)  # a float64 teacher of float32 heads
    la, lb = la.to(dtype), lb.to(dtype)
    path = _listed_path(la.device, n, s, k)
    if path == "logsumexp":
        return torch.stack(
            [torch.logsumexp(la + lb[..., columns[:, t], :], dim=-1) for t in range(s)], dim=-1
        ).masked_fill(~mask, -math.inf)
    # the shifts cancel in the value, so their gradient is zero: constants (no amax backward,
    # no index_put for the gathered column shifts)
    top_a = la.detach().amax(dim=-1, keepdim=True)
    top_b = lb.detach().amax(dim=-1, keepdim=True)
    ea, eb = (la - top_a).exp(), (lb - top_b).exp()
    with _autocast_off(ea):  # autocast would run the products in bf16 (0.01 nats off)
        total = _listed_products(ea, eb, columns, mask, path)
    tiny = torch.finfo(total.dtype).tiny / torch.finfo(total.dtype).eps
    lost = (total < tiny) & mask  # underflowed (or nearly): exact log-sum-exp below
    safe = torch.where(mask & ~lost, total, 1.0)  # no log(0): its backward would give nan
    out = safe.log() + top_a + top_b[..., columns, 0]
    if bool(lost.any()):
        flat_out, flat_lost = out.reshape(-1, r, s), lost.reshape(-1, r, s)
        h, i, t = flat_lost.nonzero(as_tuple=True)
        exact = torch.logsumexp(
            la.reshape(-1, r, k)[h, i] + lb.reshape(-1, n, k)[h, columns[i, t]], dim=-1
        )
        out = flat_out.index_put((h, i, t), exact).reshape(out.shape)
    return out.masked_fill(~mask, -math.inf)


def _log_mass_of_others(la: Tensor, log_b: Tensor, block: slice) -> Tensor:
    """``log(1 - q(i|i)) = log sum_c a_ic (sum_{j != i} b_jc) / sum_l b_lc`` for the block.

    The sums over ``j != i`` are exclusive prefix and suffix log-sum-exps (no subtraction, and
    in log space, so neither a point holding almost all of a cluster's mass nor others whose
    mass is hundreds of nats smaller lose precision).
    """
    empty = torch.full_like(log_b[..., :1, :], -math.inf)
    before = torch.cat([empty, torch.logcumsumexp(log_b, dim=-2)[..., :-1, :]], dim=-2)
    after = torch.cat(
        [torch.logcumsumexp(log_b.flip(-2), dim=-2).flip(-2)[..., 1:, :], empty], dim=-2
    )
    # n >= 2, so every row has a finite before or after: logaddexp never sees (-inf, -inf)
    others = torch.logaddexp(before, after)[..., block, :]
    log_share = others - torch.logsumexp(log_b, dim=-2, keepdim=True)
    return torch.logsumexp(la + log_share, dim=-1, keepdim=True)


def debias(
    log_p: Tensor, alpha: float, *, rows: slice | None = None, exclude_self: bool = True
) -> Tensor:
    """Debiasing: ``(1 - alpha) p(j|i) + alpha / m_i`` on the allowed entries.

    Allowed entries are all ``j`` (``j != i`` with ``exclude_self``, ``rows`` giving the
    anchors' positions); ``m_i`` counts them. ``alpha = 0`` returns ``p``, ``alpha = 1`` the
    uniform distribution. Rows with no mass (not a distribution) stay empty.

    Parameters
    ----------
    log_p : (r, m) tensor
        Row log-probabilities (empty rows allowed).
    alpha : float
        Mixing weight in ``[0, 1]``.
    rows : slice, optional
        Build only these rows (anchors) against all n columns: the block the chunked and the
        distributed losses ask for. Default all rows.
    exclude_self : bool
        Give ``j = i`` probability 0 (the I-Con convention for neighbour distributions).

    Returns
    -------
    (len(rows), n) tensor
        Row-normalised log-probabilities, ``-inf`` at impossible neighbours.

    References
    ----------
    Chuang, C.-Y. et al. (2020). Debiased contrastive learning. NeurIPS.
    """
    check_log_distributions(log_p, "log_p", allow_empty_rows=True)
    if not (is_real(alpha) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"debias alpha must be in [0, 1], got {alpha!r}")
    if alpha == 0.0:
        return log_p
    n_rows, m = log_p.shape
    allowed = torch.ones_like(log_p, dtype=torch.bool)
    if exclude_self:
        block = _row_slice(m, rows) if rows is not None else slice(0, n_rows)
        if block.stop - block.start != n_rows:
            raise ValueError(f"rows {rows!r} does not match the {n_rows} rows of log_p")
        _self_entries(allowed, block).fill_(False)
    n_allowed = allowed.sum(dim=1, keepdim=True).to(log_p.dtype)
    empty = (log_p == -math.inf).all(dim=1, keepdim=True)
    keep = allowed & ~empty
    kept_part = log_p + math.log1p(-alpha) if alpha < 1.0 else torch.full_like(log_p, -math.inf)
    uniform_part = math.log(alpha) - torch.log(n_allowed).expand_as(log_p)
    safe_kept = torch.where(keep, kept_part, torch.zeros_like(log_p))
    mixed = torch.logaddexp(safe_kept, torch.where(keep, uniform_part, torch.zeros_like(log_p)))
    return torch.where(keep, mixed, torch.full_like(log_p, -math.inf))


def propagate(log_p: Tensor, steps: int = 2, *, exclude_self: bool = True) -> Tensor:
    """k-NN walks: ``p_walk ∝ P + P^2 + ... + P^steps`` (row-stochastic ``P = exp(log_p)``).

    With ``exclude_self`` the walks that return to the anchor are dropped and rows renormalised.
    Needs the full square matrix (walks mix all rows), so it has no ``rows`` argument.

    Parameters
    ----------
    log_p : (n, n) tensor
        A k-NN (or any) neighbour distribution.
    steps : int
        Longest walk.
    exclude_self : bool
        Drop the walks that return to the anchor.

    Returns
    -------
    (n, n) tensor
        Row-normalised log-probabilities.
    """
    check_log_distributions(log_p, "log_p", allow_empty_rows=True)
    n, m = log_p.shape
    if n != m:
        raise ValueError(f"propagate needs a square (n, n) matrix, got {tuple(log_p.shape)}")
    if not is_int(steps) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    p = log_p.exp()
    walk, total = p, p
    for _ in range(steps - 1):
        walk = walk @ p
        total = total + walk
    if exclude_self:
        total = total.masked_fill(torch.eye(n, dtype=torch.bool, device=p.device), 0.0)
    mass = total.sum(dim=1, keepdim=True)
    positive = total > 0
    safe = torch.where(positive, total / torch.where(mass > 0, mass, 1.0), torch.ones_like(total))
    return torch.where(positive, safe.log(), torch.full_like(total, -math.inf))
