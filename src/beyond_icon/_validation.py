"""Input checks shared by kernels, divergences and losses: a clear ValueError, never a NaN."""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator
from contextvars import ContextVar

import numpy as np
import torch
from torch import Tensor

_VALUE_CHECKS: ContextVar[bool] = ContextVar("beyond_icon_value_checks", default=True)


def checking_values() -> bool:
    """Whether checks that read tensor values (and so make the host wait for the device) run."""
    return _VALUE_CHECKS.get()


@contextlib.contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """Turn the value checks of the library's losses on or off inside a ``with`` block.

    On (the default), every loss call checks that features are finite, that labels are in
    range, that a divergence is not infinite and that the loss is finite, each with a one-line
    error naming the rows; each check reads a value back from the device, about five host
    synchronisations per call. Off, the built-in presets make none: a bad input then shows up
    as a non-finite loss, which :func:`beyond_icon.train.fit` catches (one read per step) and
    explains by running the same step again with the checks on. Shape and dtype checks always
    run (they cost nothing).

    Parameters
    ----------
    enabled : bool

    Yields
    ------
    None

    Examples
    --------
    >>> with value_checks(False):  # doctest: +SKIP
    ...     loss = supcon(z, labels)
    """
    token = _VALUE_CHECKS.set(bool(enabled))
    try:
        yield
    finally:
        _VALUE_CHECKS.reset(token)


# How far logsumexp of a row may be from 0 and still count as normalised.
_ROW_TOLERANCE = {
    torch.float64: 1e-6,
    torch.float32: 1e-3,
    torch.float16: 5e-2,
    torch.bfloat16: 5e-2,
}


def under_torch_func(x: Tensor) -> bool:
    """Whether ``x`` is a ``torch.func`` (functorch) wrapper, i.e. the code runs inside
    ``grad``, ``vmap``, ``jacrev``, ...: where only torch's own ops (and no old-style
    ``autograd.Function``, no detour through numpy) may touch it."""
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return wrapped is not None and bool(wrapped(x))


def _where(mask: Tensor, limit: int = 5) -> str:
    """Describe the positions of True entries of ``mask`` (rows for 2-D, indices for 1-D)."""
    idx = torch.nonzero(mask)
    shown = [tuple(i) if len(i) > 1 else i[0] for i in idx[:limit].tolist()]
    more = "" if idx.shape[0] <= limit else f" and {idx.shape[0] - limit} more"
    return f"{shown}{more}"


def check_tensor(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_features(z: Tensor, name: str = "z", *, min_rows: int = 1, values: bool = True) -> Tensor:
    """Features: a floating (n, d) tensor, n >= min_rows, with no NaN or Inf (unless
    ``values`` is False: the shape and dtype only)."""
    check_tensor(z, name)
    if z.dim() != 2:
        raise ValueError(f"{name} must have shape (n, d), got {tuple(z.shape)}")
    if not z.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got dtype {z.dtype}")
    if z.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got {z.shape[0]}")
    if values and checking_values():
        bad = ~torch.isfinite(z.detach())
        if bool(bad.any()):
            rows = bad.any(dim=1)
            raise ValueError(f"{name} contains NaN or Inf in row(s) {_where(rows)}")
    return z


def check_labels(y: Tensor, name: str = "labels", *, n: int | None = None) -> Tensor:
    """Labels: a 1-D integer tensor, optionally of length n."""
    check_tensor(y, name)
    if y.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor (class or index ids), got {y.dtype}")
    if n is not None and y.shape[0] != n:
        raise ValueError(f"{name} has {y.shape[0]} entries but the batch has {n} rows")
    return y


def is_int(value: object) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_real(value: object) -> bool:
    """A Python or NumPy real number, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_positive(value: float, name: str) -> float:
    """A positive finite real (NumPy scalars too, not bool), as a Python float."""
    if not (is_real(value) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def common_dtype(log_p: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
    """``log_p`` and ``log_q`` in the wider of their two dtypes (e.g. a float32 labels' p
    against a float64 q), unchanged when they already share one."""
    if log_p.dtype == log_q.dtype:
        return log_p, log_q
    common = torch.promote_types(log_p.dtype, log_q.dtype)
    return log_p.to(common), log_q.to(common)


def check_log_distributions(
    log_p: Tensor,
    name: str = "log_p",
    *,
    allow_empty_rows: bool,
    like: Tensor | None = None,
) -> Tensor:
    """Rows of log-probabilities: (n, m), no NaN or +inf, each row's logsumexp equal to 0.

    Rows that are entirely ``-inf`` (no mass) are accepted only with ``allow_empty_rows``.
    With value checks off (:func:`value_checks`) only the shape and dtype are checked.
    """
    check_tensor(log_p, name)
    if log_p.dim() != 2:
        raise ValueError(f"{name} must have shape (n, m), got {tuple(log_p.shape)}")
    if like is not None and log_p.shape != like.shape:
        raise ValueError(
            f"{name} has shape {tuple(log_p.shape)} but log_p has shape {tuple(like.shape)}"
        )
    if like is not None and log_p.device != like.device:
        raise ValueError(
            f"{name} is on {log_p.device} but log_p is on {like.device}: give both one device"
        )
    if not log_p.is_floating_point():
        raise ValueError(
            f"{name} must be a floating tensor of log-probabilities, got {log_p.dtype}"
        )
    if not checking_values():  # the value checks below read the tensor back
        return log_p
    values = log_p.detach()
    bad = torch.isnan(values) | (values == math.inf)
    if bool(bad.any()):
        raise ValueError(f"{name} contains NaN or +inf at {_where(bad)}")
    total = torch.logsumexp(values.float() if values.dtype != torch.float64 else values, dim=-1)
    empty = total == -math.inf
    if bool(empty.any()) and not allow_empty_rows:
        raise ValueError(
            f"{name} has row(s) {_where(empty)} with no mass (all -inf); a distribution needs "
            "at least one possible neighbour"
        )
    tolerance = _ROW_TOLERANCE.get(log_p.dtype, 1e-3)
    off = (~empty) & (total.abs() > tolerance)
    if bool(off.any()):
        rows = torch.nonzero(off).flatten()[:5].tolist()
        sums = total.exp()[off][:5].tolist()
        raise ValueError(
            f"{name} rows must be log-probabilities summing to 1; row(s) {rows} sum to "
            f"{[round(s, 6) for s in sums]} (use torch.log_softmax or a beyond_icon.kernels kernel)"
        )
    return log_p
