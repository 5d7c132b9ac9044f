"""The I-Con loss: ``L = (1/|R|) sum_{i in R} D(p(.|i) || q(.|i))``.

``R`` is the set of rows of ``p`` that have mass. A row with no mass (a sample whose class
appears once in the batch) has no supervisory neighbour: it is left out of the average and
counted, never turned into NaN or a silent 0. If no row is left, ``ValueError``.

``log_p`` and ``log_q`` are (n, m) tensors of row log-probabilities, or callables
``rows: slice -> (len(rows), m)`` that build a block of rows on demand. By default the rows
go through plain autograd in blocks of :data:`BLOCK_BYTES` per tensor on the CPU (cache-sized:
about twice as fast as whole matrices at n = 4096), in one piece elsewhere. With ``chunk_size``
the loss is evaluated block by block under activation checkpointing, so that forward and
backward keep O(chunk_size x m) intermediate memory instead of O(n x m); values and gradients
equal the default path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from beyond_icon import divergences as _divergences
from beyond_icon._validation import (
    check_log_distributions,
    checking_values,
    common_dtype,
    is_int,
    value_checks,
)
from beyond_icon.distributed import Shard

__all__ = ["LossStats", "icon_loss", "icon_loss_rows"]

RowsFn = Callable[[slice], Tensor]


@dataclass(frozen=True)
class LossStats:
    """How many rows entered the average and how many were left out for having no mass.

    Parameters
    ----------
    n_rows : int or 0-d tensor
        Rows of p with mass (a tensor on the loss's device when value checks are off).
    n_empty : int or 0-d tensor
        Rows without mass, left out of the mean.
    """

    n_rows: int | Tensor
    n_empty: int | Tensor


def _block(source: Tensor | RowsFn, rows: slice) -> Tensor:
    if not callable(source):
        return source[rows]
    block = source(rows)
    asked = rows.stop - rows.start
    if not isinstance(block, Tensor) or block.dim() != 2 or block.shape[0] != asked:
        shape = tuple(block.shape) if isinstance(block, Tensor) else type(block).__name__
        raise ValueError(
            f"a rows callable returned {shape} for rows {rows.start}:{rows.stop}; it must give "
            f"a ({asked}, m) tensor (is n_rows right?)"
        )
    return block


def _n_rows(log_p: Tensor | RowsFn, log_q: Tensor | RowsFn, n_rows: int | None) -> int:
    if n_rows is not None and not (is_int(n_rows) and n_rows >= 1):
        raise ValueError(f"n_rows must be a positive integer, got {n_rows!r}")
    for source in (log_p, log_q):
        if isinstance(source, Tensor):
            if source.dim() != 2:
                raise ValueError(f"log-probabilities must be (n, m), got {tuple(source.shape)}")
            if 0 in source.shape:
                raise ValueError(
                    f"log-probabilities need a row and a column at least, got {tuple(source.shape)}"
                )
            if n_rows is not None and n_rows != source.shape[0]:
                raise ValueError(f"n_rows={n_rows} but a tensor has {source.shape[0]} rows")
            return source.shape[0]
    if n_rows is None:
        raise ValueError("when log_p and log_q are both callables, pass n_rows")
    return int(n_rows)


def _block_terms(
    log_p: Tensor, log_q: Tensor, divergence: _divergences.Divergence, validate: bool = True
) -> tuple[Tensor, Tensor]:
    """Validate one block; return (per-row divergence of non-empty rows, mask of those rows)."""
    if validate:
        check_log_distributions(log_p, "log_p", allow_empty_rows=True)
        check_log_distributions(log_q, "log_q", allow_empty_rows=False, like=log_p)
    log_p, log_q = common_dtype(log_p, log_q)
    if not validate and log_p.shape != log_q.shape:
        raise ValueError(f"log_p {tuple(log_p.shape)} and log_q {tuple(log_q.shape)} differ")
    has_mass = log_p.detach().amax(dim=-1) != -math.inf  # NaN rows count (and propagate)
    if not validate and not checking_values():
        return _masked_values(divergence, log_p, log_q, has_mass), has_mass
    if not bool(has_mass.all()):
        log_p, log_q = log_p[has_mass], log_q[has_mass]
    if log_p.shape[0] == 0:
        # empty but still connected to q's graph: a rank whose rows all lack mass must still
        # take part in the backward pass (the distributed all-gather reduces gradients there)
        return log_q.sum(dim=-1), has_mass
    values = divergence(log_p, log_q, validate=False)
    if not _divergences.is_builtin(divergence):  # a user's function: check what it returns
        _check_user_values(values.detach(), divergence.name)
    return values, has_mass


def _masked_values(
    divergence: _divergences.Divergence, log_p: Tensor, log_q: Tensor, has_mass: Tensor
) -> Tensor:
    """Per-row divergences with the rows of p without mass set to 0, and no host sync: those
    rows are evaluated as they are (finite for most divergences) or with p := q (finite terms
    and partials), then masked. The sync-free twin of dropping them by boolean indexing."""
    if not divergence.finite_where_p_is_zero:
        log_p = torch.where(has_mass[..., None], log_p, log_q.detach())
    values = divergence(log_p, log_q, validate=False)
    return torch.where(has_mass, values, torch.zeros_like(values))


def _check_user_values(values: Tensor, name: str) -> None:
    if not checking_values():
        return
    bad = torch.isnan(values)
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten()[:5].tolist()
        raise ValueError(f"divergence '{name}' returned NaN for row(s) {rows}: check its formula")
    negative = values < -1e-6 * (1.0 + values.abs())
    if bool(negative.any()):
        rows = torch.nonzero(negative).flatten()[:5].tolist()
        raise ValueError(
            f"divergence '{name}' returned negative values ({values[negative][:3].tolist()}) for "
            f"row(s) {rows}; a divergence is >= 0"
        )


def icon_loss_rows(
    log_p: Tensor | RowsFn,
    log_q: Tensor | RowsFn,
    divergence: str | _divergences.Divergence | Callable = "kl",
    *,
    n_rows: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-row divergences of the rows of ``p`` that have mass, and the boolean mask of them.

    Parameters
    ----------
    log_p, log_q : (n, m) tensor or callable
        As in :func:`icon_loss`.
    divergence : str, Divergence or callable
        D.
    n_rows : int, optional
        Number of rows when both inputs are callables.

    Returns
    -------
    values : (r,) tensor
        ``D(p(.|i) || q(.|i))`` for the ``r`` rows of p with mass.
    mask : (n,) bool tensor
        Which rows those are.
    """
    div = _divergences.get(divergence)
    n = _n_rows(log_p, log_q, n_rows)
    rows = slice(0, n)
    return _block_terms(_block(log_p, rows), _block(log_q, rows), div)


def _sum_and_count(
    log_p: Tensor | RowsFn,
    log_q: Tensor | RowsFn,
    div: _divergences.Divergence,
    rows: slice,
    chunk_size: int | None,
    validate: bool = True,
) -> tuple[Tensor, int]:
    """Sum of the per-row divergences over ``rows`` (rows of p with mass only), and their count."""
    if chunk_size is None:
        return _blocked_sum_and_count(log_p, log_q, div, rows, validate)
    if chunk_size >= rows.stop - rows.start:
        return _one_block(log_p, log_q, div, rows, validate)
    if not is_int(chunk_size) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")

    # the recomputation in backward must take the branch the forward took, whatever the
    # value checks are where (and on which thread) backward runs
    checks = checking_values()

    def block_sum(start: int, stop: int) -> tuple[Tensor, Tensor]:
        block = slice(start, stop)
        with value_checks(checks):
            values, mask = _block_terms(_block(log_p, block), _block(log_q, block), div, validate)
        return values.sum(), mask.sum()

    total, count = None, 0
    for start in range(rows.start, rows.stop, chunk_size):
        stop = min(start + chunk_size, rows.stop)
        part, part_count = checkpoint(block_sum, start, stop, use_reentrant=False)
        total = part if total is None else total + part
        count = count + _count(part_count)
    return total, count


BLOCK_BYTES = 2**21
"""Bytes of one (rows x m) tensor in a block of the default CPU evaluation (2 MiB)."""


def _block_rows(n_columns: int, itemsize: int) -> int:
    return max(1, BLOCK_BYTES // max(1, n_columns * itemsize))


def _one_block(
    log_p: Tensor | RowsFn,
    log_q: Tensor | RowsFn,
    div: _divergences.Divergence,
    rows: slice,
    validate: bool,
) -> tuple[Tensor, int | Tensor]:
    """Sum and count of ``rows`` evaluated as one block."""
    values, mask = _block_terms(_block(log_p, rows), _block(log_q, rows), div, validate)
    return values.sum(), _count(mask.sum())


def _blocked_sum_and_count(
    log_p: Tensor | RowsFn,
    log_q: Tensor | RowsFn,
    div: _divergences.Divergence,
    rows: slice,
    validate: bool,
) -> tuple[Tensor, int | Tensor]:
    """The default evaluation: on the CPU, blocks of rows whose (rows x m) tensors take
    :data:`BLOCK_BYTES` each, through plain autograd (no recomputation, unlike
    ``chunk_size``); elsewhere the rows left after the first block in one piece.

    A dozen elementwise passes over an (n x m) matrix are bound by memory on a CPU: no n x n
    buffer of a large batch stays in cache, and each fresh one is likely a new mapping that
    the kernel fills page by page (large allocations go to mmap; not measured apart). Blocks
    of 2 MiB are reused from the allocator and stay in the caches, which made the SupCon step
    2.1 to 2.3 times faster at n = 4096 on 2 cores (measured, ``benchmarks/bench_loss.py``),
    with the same value and gradient up to summation order.
    The first block's rows assume m = n (the presets' square q); its shape and device then
    fix the others.
    """
    n = rows.stop - rows.start
    if n == 0:  # a rank without rows: an empty sum that stays in the graph
        return _one_block(log_p, log_q, div, rows, validate)
    start, step = rows.start, None
    total, count = None, 0
    while start < rows.stop:
        size = _block_rows(n, 4) if step is None else step
        block = slice(start, min(start + size, rows.stop))
        try:
            p_block, q_block = _block(log_p, block), _block(log_q, block)
            values, mask = _block_terms(p_block, q_block, div, validate)
        except ValueError:
            if block == rows:
                raise
            # the checks name rows by their place in the block: evaluate the rows as one
            # block, which raises the same error with the batch's row numbers
            return _one_block(log_p, log_q, div, rows, validate)
        total = values.sum() if total is None else total + values.sum()
        count = count + _count(mask.sum())
        if step is None:
            cpu = q_block.device.type == "cpu"
            step = _block_rows(q_block.shape[-1], q_block.element_size()) if cpu else n
        start = block.stop
    return total, count


def _count(value: Tensor) -> int | Tensor:
    """A count as a Python int, or left on the device when value checks are off."""
    return int(value) if checking_values() else value


def icon_loss(
    log_p: Tensor | RowsFn,
    log_q: Tensor | RowsFn,
    divergence: str | _divergences.Divergence | Callable = "kl",
    *,
    chunk_size: int | None = None,
    n_rows: int | None = None,
    reduction: str = "mean",
    return_stats: bool = False,
    shard: Shard | None = None,
    validate: bool = True,
) -> Tensor | tuple[Tensor, LossStats]:
    """The I-Con loss ``L = (1/n) sum_i D(p(.|i) || q(.|i))`` over the rows of ``p`` with mass.

    Parameters
    ----------
    log_p, log_q : (n, m) tensor or callable
        Row log-probabilities (``-inf`` where a probability is 0), or functions ``rows ->
        (len(rows), m)`` that build a block of rows on demand (the chunked path calls them
        block by block). A row of p with no mass (all ``-inf``, e.g. a class seen once in the
        batch) is left out of the mean and counted in :class:`LossStats`.
    divergence : str, Divergence or callable
        D (see :func:`beyond_icon.divergences.get`).
    chunk_size : int, optional
        Evaluate ``chunk_size`` rows at a time under activation checkpointing: peak memory
        O(chunk_size x m) with the dense path's value and gradient.
    n_rows : int, optional
        Number of rows when both inputs are callables.
    reduction : {"mean", "sum"}
        ``mean`` is the I-Con loss.
    return_stats : bool
        Also return :class:`LossStats`.
    shard : Shard, optional
        From :func:`beyond_icon.distributed.all_gather_with_grad`: this process's rows of the
        global batch. The inputs then take global row slices, the mean is over the global
        count of rows, and the value is scaled by the world size (see
        :mod:`beyond_icon.distributed`).
    validate : bool
        Check that every row is a log-distribution. The presets pass False for the p and q
        of the library's own kernels.

    Returns
    -------
    loss : 0-d tensor
    stats : LossStats
        Only with ``return_stats``.

    Raises
    ------
    ValueError
        Invalid rows, no row with mass, or a loss that overflows its dtype (with value checks
        on; off, see :func:`beyond_icon.value_checks`, these give a non-finite loss).

    References
    ----------
    Alshammari, S. et al. (2025). I-Con: a unifying framework for representation learning.
    ICLR.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if chunk_size is not None and (not is_int(chunk_size) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    div = _divergences.get(divergence)
    if shard is None:
        n = _n_rows(log_p, log_q, n_rows)
        rows, world_size = slice(0, n), 1
    else:
        n, rows, world_size = shard.n_global, shard.rows, shard.world_size
    total, count = _sum_and_count(log_p, log_q, div, rows, chunk_size, validate)
    if shard is not None:
        from beyond_icon.distributed import all_reduce_sum

        count = _count(all_reduce_sum(torch.as_tensor(count, device=total.device)))
    if isinstance(count, Tensor):  # value checks off: no sync; 0 rows give 0 / 0 = NaN
        loss = (total / count if reduction == "mean" else total) * world_size
        if return_stats:
            return loss, LossStats(n_rows=count, n_empty=n - count)
        return loss
    if count == 0:
        raise ValueError(
            f"every one of the {n} rows of p has no mass (no sample has a neighbour: e.g. every "
            "class appears once in the batch); the loss is undefined. Use larger batches, "
            "several views per sample, or debias p"
        )
    loss = (total / count if reduction == "mean" else total) * world_size
    if not bool(torch.isfinite(loss.detach())):
        if math.isnan(float(loss.detach())):  # no divergence gives NaN on valid rows
            raise ValueError(
                f"the '{div.name}' loss is NaN: a row of q had no finite probability (a kernel "
                f"scale such as sigma, dof or temperature tiny against the distances, or "
                f"features too large for {loss.dtype}); check those, or compute in float64"
            )
        raise ValueError(
            f"the '{div.name}' loss overflowed {loss.dtype} (value {float(loss.detach())}): q gives "
            "some neighbour a tiny probability that p does not, e.g. under a kernel scale "
            "(sigma, dof, temperature) too small for the distances; raise it, use a bounded "
            "divergence ('tv', 'jsd', 'hellinger'), or (in Python) debias q or compute in float64"
        )
    if return_stats:
        return loss, LossStats(n_rows=count, n_empty=n - count)
    return loss
