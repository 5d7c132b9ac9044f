"""The I-Con loss: ``L = (1/|R|) sum_{i in R} D(p(.|i) || q(.|i))``.

``R`` is the set of rows of ``p`` that have mass. A row with no mass (a sample whose class
appears once in the batch) has no supervisory neighbour: it is left out of the average and
counted, never turned into NaN or a silent 0. If no row is left, ``ValueError``.

``log_p`` and ``log_q`` are (n, m) tensors of row log-probabilities, or callables
``rows: slice -> (len(rows), m)`` that build a block of rows on demand. With ``chunk_size``
the loss is evaluated block by block under activation checkpointing, so that forward and
backward keep O(chunk_size x m) intermediate memory instead of O(n x m); values and gradients
equal the dense path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from beyond_icon import divergences as _divergences
from beyond_icon._validation import check_log_distributions
from beyond_icon.distributed import Shard

__all__ = ["LossStats", "icon_loss", "icon_loss_rows"]

RowsFn = Callable[[slice], Tensor]


@dataclass(frozen=True)
class LossStats:
    """How many rows entered the average and how many were left out for having no mass."""

    n_rows: int
    n_empty: int


def _block(source: Tensor | RowsFn, rows: slice) -> Tensor:
    return source(rows) if callable(source) else source[rows]


def _n_rows(log_p: Tensor | RowsFn, log_q: Tensor | RowsFn, n_rows: int | None) -> int:
    for source in (log_p, log_q):
        if isinstance(source, Tensor):
            if source.dim() != 2:
                raise ValueError(f"log-probabilities must be (n, m), got {tuple(source.shape)}")
            if n_rows is not None and n_rows != source.shape[0]:
                raise ValueError(f"n_rows={n_rows} but a tensor has {source.shape[0]} rows")
            return source.shape[0]
    if n_rows is None:
        raise ValueError("when log_p and log_q are both callables, pass n_rows")
    return n_rows


def _block_terms(
    log_p: Tensor, log_q: Tensor, divergence: _divergences.Divergence, validate: bool = True
) -> tuple[Tensor, Tensor]:
    """Validate one block; return (per-row divergence of non-empty rows, mask of those rows)."""
    if validate:
        check_log_distributions(log_p, "log_p", allow_empty_rows=True)
        check_log_distributions(log_q, "log_q", allow_empty_rows=False, like=log_p)
    elif log_p.shape != log_q.shape:
        raise ValueError(f"log_p {tuple(log_p.shape)} and log_q {tuple(log_q.shape)} differ")
    has_mass = torch.isfinite(log_p.detach()).any(dim=-1)
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


def _check_user_values(values: Tensor, name: str) -> None:
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
    """Per-row divergences of the rows of ``p`` that have mass, and the boolean mask of them."""
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
    if chunk_size is None or chunk_size >= rows.stop - rows.start:
        values, mask = _block_terms(_block(log_p, rows), _block(log_q, rows), div, validate)
        return values.sum(), int(mask.sum())
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")

    def block_sum(start: int, stop: int) -> tuple[Tensor, Tensor]:
        block = slice(start, stop)
        values, mask = _block_terms(_block(log_p, block), _block(log_q, block), div, validate)
        return values.sum(), mask.sum()

    total, count = None, 0
    for start in range(rows.start, rows.stop, chunk_size):
        stop = min(start + chunk_size, rows.stop)
        part, part_count = checkpoint(block_sum, start, stop, use_reentrant=False)
        total = part if total is None else total + part
        count += int(part_count)
    return total, count


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
    """``mean_i D(p(.|i) || q(.|i))`` over the rows of ``p`` with mass.

    ``reduction`` is ``"mean"`` (the I-Con loss) or ``"sum"``. ``return_stats`` also returns
    :class:`LossStats`. ``chunk_size`` enables the row-chunked, checkpointed path. ``shard``
    (from :func:`beyond_icon.distributed.all_gather_with_grad`) restricts this process to its
    rows of the global batch: ``log_p``/``log_q`` then take global row slices, the mean is over
    the global count of rows, and the value is scaled by the world size (see
    :mod:`beyond_icon.distributed`). ``validate=False`` skips the check that every row is a
    log-distribution (for p and q built by this library's kernels: the presets pass it).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if chunk_size is not None and (
        not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
    ):
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

        count = int(all_reduce_sum(torch.tensor(count, device=total.device)))
    if count == 0:
        raise ValueError(
            f"every one of the {n} rows of p has no mass (no sample has a neighbour: e.g. every "
            "class appears once in the batch); the loss is undefined. Use larger batches, "
            "several views per sample, or debias p"
        )
    loss = (total / count if reduction == "mean" else total) * world_size
    if not bool(torch.isfinite(loss.detach())):
        raise ValueError(
            f"the '{div.name}' loss overflowed {loss.dtype} (value {float(loss.detach())}): q gives "
            "some neighbour a tiny probability that p does not. Debias q, compute in float64, "
            "or use a bounded divergence ('tv', 'jsd', 'hellinger')"
        )
    if return_stats:
        return loss, LossStats(n_rows=count, n_empty=n - count)
    return loss
