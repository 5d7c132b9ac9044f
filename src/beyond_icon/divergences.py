"""Divergences between neighbourhood distributions, computed on log-probabilities.

Every divergence takes ``(log_p, log_q)``, two tensors of shape ``(n, m)`` whose rows are
log-probabilities (``-inf`` marks an impossible neighbour), and returns the ``(n,)`` per-row
divergence ``D(p(.|i) || q(.|i))``.

Conventions, shared by all divergences here:

* ``0 * f(0/0) = 0``: entries where ``p`` and ``q`` are both zero contribute nothing and have a
  zero, finite gradient. Masked inputs are replaced *before* any operation that would produce a
  ``nan`` in the backward pass (the "double where" rule).
* A divergence that is infinite on the given supports (KL with ``q = 0 < p``, reverse KL with
  ``p = 0 < q``, ...) raises :class:`InfiniteDivergenceError` (a ``ValueError``) naming the rows
  and the remedy (debias the distribution that has zeros, see :func:`beyond_icon.kernels.debias`).
  It never returns ``inf``/``nan`` and never clamps silently.

The registry maps names to :class:`Divergence` objects: :func:`get`, :func:`names`,
:func:`register`, and :func:`f_divergence` builds one from a convex generator ``f`` with
``f(1) = 0``: ``D_f(p || q) = sum_j q_j f(p_j / q_j)``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from beyond_icon._validation import check_log_distributions, checking_values, common_dtype

__all__ = [
    "Divergence",
    "InfiniteDivergenceError",
    "alpha",
    "chi2",
    "compile_rules",
    "f_divergence",
    "get",
    "hellinger",
    "jeffreys",
    "jsd",
    "kl",
    "names",
    "register",
    "reverse_kl",
    "rules_compiled",
    "tv",
]

DivergenceFn = Callable[[Tensor, Tensor], Tensor]

_DEBIAS_HINT = (
    "Mix the distribution that has zeros with the uniform distribution "
    "(beyond_icon.kernels.debias(log_p, alpha=0.1), or debias='p'/'q' in the presets), "
    "or choose a bounded divergence such as 'tv', 'jsd' or 'hellinger'."
)


class InfiniteDivergenceError(ValueError):
    """The divergence is infinite because the supports of p and q do not fit.

    ``divergence`` holds the name the message gives (None when unknown)."""

    def __init__(self, message: str, divergence: str | None = None):
        super().__init__(message)
        self.divergence = divergence


def _raise_if(mask_fn: Callable[[], Tensor], name: str, what: str) -> None:
    """Raise InfiniteDivergenceError when the mask ``mask_fn()`` (n, m) has any True entry.

    With value checks off (see :func:`beyond_icon.value_checks`) the mask is not even built
    (three passes over the block saved) and the infinite value is returned instead."""
    if not checking_values():
        return
    mask = mask_fn()
    if bool(mask.any()):
        rows = torch.nonzero(mask.any(dim=-1)).flatten()
        shown = rows[:5].tolist()
        more = "" if rows.numel() <= 5 else f" and {rows.numel() - 5} more"
        raise InfiniteDivergenceError(
            f"divergence '{name}' is infinite: {what} in row(s) {shown}{more}. {_DEBIAS_HINT}",
            name,
        )


_LOG2_E = 1.0 / math.log(2.0)


def _exp(log_a: Tensor, scale: float = 1.0) -> Tensor:
    """``exp(scale * log_a)`` for log-probabilities (``-inf`` gives 0).

    On the CPU in float32 it is computed as ``exp2(log_a * scale * log2(e))``: torch's
    vectorised ``exp`` takes a slow path for inputs below about -88 and for ``-inf`` (5 to 12
    times slower per element on this project's CPUs, measured), which a sparse p (labels,
    neighbours: ``-inf`` on most entries) hits almost everywhere, while ``exp2`` does not. The
    relative error is about ``|scale * log_a| * 6e-8`` (3e-6 at ``log_a = -50``), against
    float32's resolution of 6e-8. Other dtypes and devices use ``exp``.
    """
    if log_a.dtype == torch.float32 and log_a.device.type == "cpu":
        return torch.exp2(log_a * (scale * _LOG2_E))
    return log_a.exp() if scale == 1.0 else (scale * log_a).exp()


# --------------------------------------------------------------------------------------------
# The built-in divergences. Inputs are assumed validated (see Divergence.__call__).
# --------------------------------------------------------------------------------------------


class _KLRule:
    """``t = p (log p - log q)`` (0 where p = 0); ``dt/dlog p = t + p``, ``dt/dlog q = -p``."""

    scales = (1.0, 1.0, -1.0)

    @staticmethod
    def forward(log_p, log_q, needed):
        p = _exp(log_p)
        terms = torch.where(log_p > -math.inf, p * (log_p - log_q), 0.0)
        return terms, terms + p if needed[0] else None, p if needed[1] else None


def kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Kullback-Leibler divergence, ``KL(p || q) = sum_j p_j (log p_j - log q_j)``, in
    ``[0, inf)``: the D of the I-Con equation.

    Parameters
    ----------
    log_p, log_q : (..., m) tensor
        Row log-probabilities (``-inf`` where a probability is 0), validated by the caller
        (:class:`Divergence` or :func:`beyond_icon.icon_loss`).

    Returns
    -------
    (...) tensor
        The divergence of each row, with a closed-form gradient.

    Raises
    ------
    InfiniteDivergenceError
        Where ``q = 0 < p`` (with value checks on, see :func:`beyond_icon.value_checks`).

    References
    ----------
    Kullback, S. and Leibler, R. A. (1951). On information and sufficiency. Annals of
    Mathematical Statistics 22(1).
    """
    _raise_if(lambda: (log_p > -math.inf) & (log_q == -math.inf), "kl", "p > 0 where q = 0")
    return _rowwise(log_p, log_q, _KLRule)


def reverse_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Reverse KL, ``KL(q || p) = sum_j q_j (log q_j - log p_j)``, in ``[0, inf)``.

    Parameters
    ----------
    log_p, log_q : (..., m) tensor
        Row log-probabilities (``-inf`` where a probability is 0), validated by the caller
        (:class:`Divergence` or :func:`beyond_icon.icon_loss`).

    Returns
    -------
    (...) tensor
        The divergence of each row, with a closed-form gradient.

    Raises
    ------
    InfiniteDivergenceError
        Where ``p = 0 < q``: a sparse p (labels, k-NN) needs debiasing first
        (:func:`beyond_icon.kernels.debias`).
    """
    _raise_if(lambda: (log_q > -math.inf) & (log_p == -math.inf), "reverse_kl", "q > 0 where p = 0")
    return _rowwise(log_q, log_p, _KLRule)


class _Rowwise(torch.autograd.Function):
    """``sum_j t(log p_j, log q_j)`` with a closed-form backward (called via :func:`_rowwise`).

    ``rule.forward(log_p, log_q, needed)`` gives the elementwise terms and their partial
    derivatives with respect to ``log p`` and ``log q`` (each 0 where both ``p`` and ``q`` are
    0), each up to a constant factor in ``rule.scales`` (terms, d log p, d log q), applied to
    the (n,) row sums and the (n, 1) gradient instead of the (n x m) block: one implementation
    of the row-wise pattern for every divergence below. The partials are computed in the
    forward pass from the same intermediates as the terms, and only those of inputs that need
    a gradient are kept (usually just q's: p is supervision), so backward is one product. The
    price: one (n x m) tensor of partials stays alive from forward to backward per call.
    """

    @staticmethod
    def forward(ctx, log_p: Tensor, log_q: Tensor, rule) -> Tensor:
        needed = ctx.needs_input_grad[:2]
        terms, d_p, d_q = _rule_forward(rule)(log_p, log_q, needed)
        ctx.save_for_backward(d_p, d_q)
        ctx.scales = rule.scales
        return _row_sums(terms, rule.scales[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        d_p, d_q = ctx.saved_tensors
        grad = grad.unsqueeze(-1)
        _, scale_p, scale_q = ctx.scales
        return (
            d_p * (grad if scale_p == 1.0 else scale_p * grad) if d_p is not None else None,
            d_q * (grad if scale_q == 1.0 else scale_q * grad) if d_q is not None else None,
            None,
        )


def _row_sums(terms: Tensor, scale: float) -> Tensor:
    sums = terms.sum(dim=-1)
    return sums if scale == 1.0 else scale * sums


def _rowwise(log_p: Tensor, log_q: Tensor, rule) -> Tensor:
    """Through :class:`_Rowwise` when a gradient will be taken; the terms alone otherwise (no
    partials computed under ``no_grad``, e.g. the first pass of a checkpointed chunk)."""
    if torch.is_grad_enabled() and (log_p.requires_grad or log_q.requires_grad):
        return _Rowwise.apply(log_p, log_q, rule)
    return _row_sums(_rule_forward(rule)(log_p, log_q, (False, False))[0], rule.scales[0])


_COMPILE = {"enabled": False}


def compile_rules(enabled: bool = True) -> None:
    """Run the built-in divergences' elementwise rules through ``torch.compile`` (or stop).

    A rule is a dozen elementwise passes over the (n, m) block (exponentials, logs, masks);
    compiled, they fuse into one loop per output. Measured on 2 CPU cores at n = 4096 (d = 128),
    see the README's speed section. Off by default: the first call of each rule compiles for
    about 20 s per process, and compiling needs a C++ compiler (CPU) or Triton (CUDA).

    Parameters
    ----------
    enabled : bool
    """
    _COMPILE["enabled"] = bool(enabled)


@contextlib.contextmanager
def rules_compiled(enabled: bool = True) -> Iterator[None]:
    """:func:`compile_rules` inside a ``with`` block only (the previous setting is restored).

    Parameters
    ----------
    enabled : bool

    Yields
    ------
    None
    """
    previous = _COMPILE["enabled"]
    _COMPILE["enabled"] = bool(enabled)
    try:
        yield
    finally:
        _COMPILE["enabled"] = previous


def _rule_forward(rule):
    """``rule.forward``, compiled once per rule when :func:`compile_rules` is on."""
    if not _COMPILE["enabled"]:
        return rule.forward
    compiled = getattr(rule, "_compiled_forward", None)
    if compiled is None:
        compiled = torch.compile(rule.forward, dynamic=True)
        rule._compiled_forward = compiled
    return compiled


def _on(mask: Tensor, log_a: Tensor) -> Tensor:
    return torch.where(mask, log_a, 0.0)


class _TVRule:
    """``t = |p - q| / 2``; ``dt/dlog p = sign(p - q) p / 2``, ``dt/dlog q = -sign(p - q) q / 2``."""

    scales = (0.5, 0.5, -0.5)

    @staticmethod
    def forward(log_p, log_q, needed):
        p, q = _exp(log_p), _exp(log_q)
        gap = p - q
        sign = torch.sign(gap) if any(needed) else None
        return gap.abs(), sign * p if needed[0] else None, sign * q if needed[1] else None


class _HellingerRule:
    """``t = (sqrt p - sqrt q)^2 / 2``; ``dt/dlog p = (sqrt p - sqrt q) sqrt p / 2``,
    ``dt/dlog q = -(sqrt p - sqrt q) sqrt q / 2``."""

    scales = (0.5, 0.5, -0.5)

    @staticmethod
    def forward(log_p, log_q, needed):
        root_p, root_q = _exp(log_p, 0.5), _exp(log_q, 0.5)
        gap = root_p - root_q
        return gap * gap, gap * root_p if needed[0] else None, gap * root_q if needed[1] else None


class _Chi2Rule:
    """``t = (p - q)^2 / q = (p - q) expm1(log p - log q)`` where ``q > 0`` (else 0);
    ``dt/dlog p = 2 p expm1(log p - log q)``, ``dt/dlog q = q - p exp(log p - log q)``.

    Where ``q = 0`` both inputs are replaced by 0, so ``p = q = 1`` and ``expm1(0) = 0`` there:
    the term and both partials are exactly 0 with no mask afterwards."""

    scales = (1.0, 2.0, 1.0)

    @staticmethod
    def forward(log_p, log_q, needed):
        support = log_q > -math.inf
        lp, lq = _on(support, log_p), _on(support, log_q)
        p, q, gap = _exp(lp), _exp(lq), torch.expm1(lp - lq)
        d_q = q - p * (gap + 1.0) if needed[1] else None
        return (p - q) * gap, p * gap if needed[0] else None, d_q


class _JeffreysRule:
    """``t = (p - q)(log p - log q)`` on the common support; ``dt/dlog p = p (log p - log q) +
    p - q``, ``dt/dlog q = -q (log p - log q) - (p - q)``; 0 off the support, where both
    inputs are replaced by 0 (so ``p = q`` and every factor vanishes)."""

    scales = (1.0, 1.0, -1.0)

    @staticmethod
    def forward(log_p, log_q, needed):
        support = log_p > -math.inf
        lp, lq = _on(support, log_p), _on(support, log_q)
        p, q, gap = _exp(lp), _exp(lq), lp - lq
        diff = p - q
        return (
            diff * gap,
            p * gap + diff if needed[0] else None,
            q * gap + diff if needed[1] else None,
        )


_TV, _Hellinger, _Chi2, _Jeffreys = _TVRule(), _HellingerRule(), _Chi2Rule(), _JeffreysRule()


def tv(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Total variation distance, ``TV(p, q) = 1/2 sum_j |p_j - q_j|``, in ``[0, 1]``.

    The f-divergence of ``f(t) = |t - 1| / 2``; bounded and symmetric, finite for any supports.
    The paper's best divergence for clustering frozen embeddings.

    Parameters
    ----------
    log_p, log_q : (..., m) tensor
        Row log-probabilities (``-inf`` where a probability is 0), validated by the caller
        (:class:`Divergence` or :func:`beyond_icon.icon_loss`).

    Returns
    -------
    (...) tensor
        The divergence of each row, with a closed-form gradient.

    References
    ----------
    Shone, J., Li, Z., Alshammari, S., Hamilton, M. and Freeman, W. (2025). Beyond I-Con:
    exploring new dimension of distance measures in representation learning. arXiv:2509.04734.
    """
    return _rowwise(log_p, log_q, _TV)


def hellinger(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Squared Hellinger distance, ``H^2(p, q) = 1/2 sum_j (sqrt p_j - sqrt q_j)^2``, in
    ``[0, 1]``: the f-divergence of ``f(t) = (sqrt t - 1)^2 / 2``.

    Parameters
    ----------
    log_p, log_q : (..., m) tensor
        Row log-probabilities (``-inf`` where a probability is 0), validated by the caller
        (:class:`Divergence` or :func:`beyond_icon.icon_loss`).

    Returns
    -------
    (...) tensor
        The divergence of each row, with a closed-form gradient.

    References
    ----------
    Hellinger, E. (1909). Neue Begruendung der Theorie quadratischer Formen von unendlichvielen
    Veraenderlichen. Journal fuer die reine und angewandte Mathematik 136.
    """
    return _rowwise(log_p, log_q, _Hellinger)


def jsd(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Jensen-Shannon divergence, ``JSD(p, q) = 1/2 KL(p || m) + 1/2 KL(q || m)`` with
    ``m = (p + q) / 2``.

    Natural logarithm, so the range is ``[0, log 2]``; symmetric and finite for any supports.
    The paper's best divergence for supervised contrastive learning with a Euclidean kernel.

    Parameters
    ----------
    log_p, log_q : (..., m) tensor
        Row log-probabilities (``-inf`` where a probability is 0), validated by the caller
        (:class:`Divergence` or :func:`beyond_icon.icon_loss`).

    Returns
    -------
    (...) tensor
        The divergence of each row, with a closed-form gradient.

    References
    ----------
    Lin, J. (1991). Divergence measures based on the Shannon entropy. IEEE Transactions on
    Information Theory 37(1).
    """
    return _rowwise(log_p, log_q, _JSDRule)


class _JSDRule:
    """``t = 1/2 p (log p - log m) + 1/2 q (log q - log m)``, ``m = (p + q) / 2``; the two
    halves are the partials: ``dt/dlog p = 1/2 p (log p - log m)``, ``dt/dlog q = 1/2 q (log q
    - log m)`` (the terms from ``d log m`` cancel).

    ``log m = log(p + q) - log 2`` from the probabilities (a log costs less than a logaddexp of
    the log-probabilities). Every logarithm is clamped at the dtype's lowest finite value, so a
    zero probability times its (clamped) log ratio is 0, never ``0 * inf``: one pass where a
    mask costs two. (An underflowed ``p`` gives a term of 0, as its true size is below
    float32's smallest number anyway.)"""

    scales = (0.5, 0.5, 0.5)

    @staticmethod
    def forward(log_p, log_q, needed):
        lowest = torch.finfo(log_p.dtype).min
        p, q = _exp(log_p), _exp(log_q)
        log_m = (torch.log(p + q) - math.log(2.0)).clamp_min(lowest)
        part_p = p * (log_p.clamp_min(lowest) - log_m)
        part_q = q * (log_q.clamp_min(lowest) - log_m)
        return part_p + part_q, part_p if needed[0] else None, part_q if needed[1] else None


def chi2(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Pearson chi-squared divergence, ``chi2(p || q) = sum_j (p_j - q_j)^2 / q_j``, in
    ``[0, inf)``.

    Computed as ``(p - q) expm1(log p - log q)``: no division by a tiny q and no square of a
    huge ratio.

    Parameters
    ----------
    log_p, log_q : (..., m) tensor
        Row log-probabilities (``-inf`` where a probability is 0), validated by the caller
        (:class:`Divergence` or :func:`beyond_icon.icon_loss`).

    Returns
    -------
    (...) tensor
        The divergence of each row, with a closed-form gradient.

    Raises
    ------
    InfiniteDivergenceError
        Where ``q = 0 < p`` (the Pearson form divides by ``q``).

    References
    ----------
    Pearson, K. (1900). On the criterion that a given system of deviations from the probable in
    the case of a correlated system of variables is such that it can be reasonably supposed to
    have arisen from random sampling. Philosophical Magazine 50(302).
    """
    _raise_if(lambda: (log_p > -math.inf) & (log_q == -math.inf), "chi2", "p > 0 where q = 0")
    return _rowwise(log_p, log_q, _Chi2)


def jeffreys(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Jeffreys divergence, ``J(p, q) = KL(p || q) + KL(q || p) = sum_j (p_j - q_j)(log p_j -
    log q_j)``, in ``[0, inf)``.

    Parameters
    ----------
    log_p, log_q : (..., m) tensor
        Row log-probabilities (``-inf`` where a probability is 0), validated by the caller
        (:class:`Divergence` or :func:`beyond_icon.icon_loss`).

    Returns
    -------
    (...) tensor
        The divergence of each row, with a closed-form gradient.

    Raises
    ------
    InfiniteDivergenceError
        Where the supports of p and q differ.

    References
    ----------
    Jeffreys, H. (1946). An invariant form for the prior probability in estimation problems.
    Proceedings of the Royal Society A 186(1007).
    """
    _raise_if(
        lambda: (log_p > -math.inf) != (log_q > -math.inf),
        "jeffreys",
        "p and q have different supports",
    )
    return _rowwise(log_p, log_q, _Jeffreys)


class _Alpha:
    """Amari alpha terms ``(A p + (1 - A) q - p^A q^(1-A)) / (A (1 - A))``;
    ``dt/dlog p = (p - p^A q^(1-A)) / (1 - A)``, ``dt/dlog q = (q - p^A q^(1-A)) / A``."""

    def __init__(self, a: float, scale: float):
        self.a = a
        # forward returns the terms divided by A; the factors apply outside the block
        self.scales = (scale * a, 1.0 / (1.0 - a), 1.0 / a)

    def forward(self, log_p, log_q, needed):
        """Terms and partials from shared intermediates.

        Where only one side is 0 the mixed term p^A q^(1-A) is exp(-inf) = 0 (the infinite
        cases were raised before), leaving A p + (1 - A) q. Where p and q are close, the
        per-entry term q (A expm1(u) - expm1(A u)), u = log p - log q, avoids cancellation;
        elsewhere the form with exponents <= 0 cannot overflow. The log-probabilities are
        clamped at the dtype's lowest finite value (one pass each, where masking the entries
        with p = q = 0 took five): a zero probability is exp(lowest) = 0, the mixed term
        exp(A (lowest + (1 - A) / A log q)) is 0 (or +inf in the cases that are infinite
        anyway), and where both are 0 the entry is ``close`` with ``u = 0``: term and partials
        exactly 0.
        """
        a = self.a
        lowest = torch.finfo(log_p.dtype).min
        safe_p, safe_q = log_p.clamp_min(lowest), log_q.clamp_min(lowest)
        p, q = _exp(safe_p), _exp(safe_q)
        mixed = _exp(torch.add(safe_p, safe_q, alpha=(1.0 - a) / a), a)  # p^A q^(1-A)
        log_ratio = safe_p - safe_q
        close = log_ratio.abs() < 1.0
        u = torch.where(close, log_ratio, 0.0)
        # the terms divided by A (the factor is in scales): fewer passes over the block
        near = q * torch.sub(torch.expm1(u), torch.expm1(a * u), alpha=1.0 / a)
        far = torch.sub(torch.add(p, q, alpha=(1.0 - a) / a), mixed, alpha=1.0 / a)
        terms = torch.where(close, near, far)
        return terms, p - mixed if needed[0] else None, q - mixed if needed[1] else None


def alpha(a: float) -> DivergenceFn:
    """Amari alpha-divergence ``D_A(p || q) = (1 - sum_j p_j^A q_j^(1-A)) / (A (1 - A))``.

    Computed as ``sum_j (A p_j + (1 - A) q_j - p_j^A q_j^(1-A)) / (A (1 - A))``, a sum of
    non-negative terms (weighted AM-GM), which equals the textbook form for normalised rows and
    avoids the cancellation of ``1 - sum`` when ``p`` is close to ``q``. ``A -> 1`` is KL,
    ``A -> 0`` reverse KL (returned for A within 1e-10 of 1 or 0); within 1e-2 of them the
    terms are taken in float64. Bounded by ``1/(A(1-A))`` for ``0 < A < 1``;
    ``get("alpha:A")`` is the registered form.

    Parameters
    ----------
    a : float
        The order A (any finite number). A = 0.5 is four times the squared Hellinger distance.

    Returns
    -------
    callable
        ``(log_p, log_q) -> (...)`` per-row values; for ``A > 1`` infinite where ``q = 0 <
        p``, for ``A < 0`` where ``p = 0 < q`` (an :class:`InfiniteDivergenceError`).

    References
    ----------
    Amari, S. (1985). Differential-Geometrical Methods in Statistics. Springer.
    Cichocki, A. and Amari, S. (2010). Families of alpha- beta- and gamma-divergences. Entropy
    12(6).
    """
    a = float(a)
    if not math.isfinite(a):
        raise ValueError(f"alpha must be a finite number, got {a}")
    if abs(a - 1.0) < 1e-10:  # float64 cannot resolve (1 - A) below this: the limit itself
        return kl
    if abs(a) < 1e-10:
        return reverse_kl
    scale = 1.0 / (a * (1.0 - a))
    # near A = 0 or 1 each term is a difference of O(p) numbers that is O(|A(1-A)|) small:
    # float32 would lose every digit (alpha:0.9999999 gave 0.774 where KL is 0.925)
    promote = min(abs(a), abs(1.0 - a)) < 1e-2

    def alpha_divergence(log_p: Tensor, log_q: Tensor) -> Tensor:
        if promote and log_p.dtype != torch.float64:
            return _alpha_terms(log_p.double(), log_q.double()).to(log_p.dtype)
        return _alpha_terms(log_p, log_q)

    def _alpha_terms(log_p: Tensor, log_q: Tensor) -> Tensor:
        if a > 1.0:
            _raise_if(
                lambda: (log_p > -math.inf) & (log_q == -math.inf),
                f"alpha:{a:g}",
                "p > 0 where q = 0",
            )
        if a < 0.0:
            _raise_if(
                lambda: (log_q > -math.inf) & (log_p == -math.inf),
                f"alpha:{a:g}",
                "q > 0 where p = 0",
            )
        return _rowwise(log_p, log_q, rule)

    rule = _Alpha(a, scale)  # read by _alpha_terms when it is called
    alpha_divergence.__name__ = f"alpha_{a:g}"
    alpha_divergence.__doc__ = f"Amari alpha-divergence with A = {a:g}."
    return alpha_divergence


# --------------------------------------------------------------------------------------------
# f-divergences from a user's generator
# --------------------------------------------------------------------------------------------


def _limit_at_zero(f: Callable[[Tensor], Tensor]) -> float:
    """``f(0)``, as the limit ``f(0+)`` where ``f(0)`` itself is NaN (``t log t`` at 0 is
    ``0 * -inf``): ``f`` at 1e-300 when it agrees with ``f`` at 1e-150, else infinite."""
    at_zero = float(f(torch.zeros(1, dtype=torch.float64))[0])
    if not math.isnan(at_zero):
        return at_zero
    near, nearer = (float(f(torch.tensor([t], dtype=torch.float64))[0]) for t in (1e-150, 1e-300))
    if math.isfinite(nearer) and abs(nearer - near) <= 1e-6 * (1.0 + abs(nearer)):
        return nearer
    return math.inf


def f_divergence(
    f: Callable[[Tensor], Tensor],
    *,
    name: str = "f",
    slope_at_infinity: float = math.inf,
    check: bool = True,
) -> DivergenceFn:
    """Build ``D_f(p || q) = sum_j q_j f(p_j / q_j)`` from a convex generator ``f``, ``f(1) = 0``.

    Boundary conventions: ``0 f(0/0) = 0``; where ``q = 0 < p`` the term is
    ``p_j * lim_{t->inf} f(t)/t`` (``slope_at_infinity``, infinite by default: an error);
    where ``p = 0 < q`` it is ``q_j * f(0)``, and an infinite ``f(0)`` is an error (``f(0)`` is
    the limit ``f(0+)`` where ``f`` gives NaN at 0, as ``t log t`` does).

    Parameters
    ----------
    f : callable
        The generator: maps a tensor of ratios ``t > 0`` elementwise, differentiable (its
        gradient comes from autograd).
    name : str
        Name used in error messages.
    slope_at_infinity : float
        ``lim_{t -> inf} f(t) / t``; infinite (the default) makes ``q = 0 < p`` an error.
    check : bool
        Test ``f(1) = 0`` and midpoint convexity on a grid of ratios from 1e-4 to 1e4.

    Returns
    -------
    callable
        ``(log_p, log_q) -> (...)`` per-row values, marked ``f_family`` (the cluster loss may
        merge the columns where ``p = 0``); pass it to :func:`register`.

    Raises
    ------
    ValueError
        ``f`` is not elementwise, ``f(1) != 0``, or ``f`` is not finite and convex on the grid.

    References
    ----------
    Csiszar, I. (1967). Information-type measures of difference of probability distributions
    and indirect observations. Studia Scientiarum Mathematicarum Hungarica 2.
    Ali, S. M. and Silvey, S. D. (1966). A general class of coefficients of divergence of one
    distribution from another. Journal of the Royal Statistical Society B 28(1).
    """
    if check:
        grid = torch.logspace(-4, 4, 41, dtype=torch.float64)
        values = f(grid)
        if not isinstance(values, Tensor) or values.shape != grid.shape:
            raise ValueError(f"f-divergence '{name}': f must map a tensor of ratios elementwise")
        at_one = float(f(torch.ones(1, dtype=torch.float64))[0])
        if not abs(at_one) <= 1e-8:
            raise ValueError(f"f-divergence '{name}': f(1) must be 0, got {at_one:.3g}")
        mid = f((grid[:-1] + grid[1:]) / 2)
        chord = (values[:-1] + values[1:]) / 2
        slack = 1e-9 * (1 + chord.abs())
        if not bool(torch.all(torch.isfinite(values))) or bool(torch.any(mid > chord + slack)):
            raise ValueError(f"f-divergence '{name}': f must be finite and convex on (0, inf)")
    f_at_zero = _limit_at_zero(f)

    def divergence(log_p: Tensor, log_q: Tensor) -> Tensor:
        p_pos = log_p > -math.inf
        q_pos = log_q > -math.inf
        both = p_pos & q_pos
        if not math.isfinite(slope_at_infinity):
            _raise_if(lambda: p_pos & ~q_pos, name, "p > 0 where q = 0 and f(t)/t is unbounded")
        if not math.isfinite(f_at_zero):
            _raise_if(lambda: q_pos & ~p_pos, name, "q > 0 where p = 0 and f(0) is infinite")
        safe_p = torch.where(both, log_p, torch.zeros_like(log_p))
        safe_q = torch.where(both, log_q, torch.zeros_like(log_q))
        inner = safe_q.exp() * f((safe_p - safe_q).exp())
        terms = torch.where(both, inner, torch.zeros_like(inner))
        if math.isfinite(slope_at_infinity):
            p_only = torch.where(p_pos & ~q_pos, log_p, torch.full_like(log_p, -math.inf))
            terms = terms + slope_at_infinity * p_only.exp()
        if math.isfinite(f_at_zero) and f_at_zero != 0.0:
            q_only = torch.where(q_pos & ~p_pos, log_q, torch.full_like(log_q, -math.inf))
            terms = terms + f_at_zero * q_only.exp()
        return terms.sum(dim=-1)

    divergence.__name__ = name
    divergence.__doc__ = f"f-divergence '{name}': sum_j q_j f(p_j / q_j)."
    divergence.f_family = True  # read by get() and register()
    divergence.finite_where_p_is_zero = math.isfinite(f_at_zero)
    return divergence


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Divergence:
    """A named divergence: ``D(log_p, log_q) -> (n,)``, with what is known of its range.

    Calling it validates the inputs (shapes, finiteness, normalised rows) unless
    ``validate=False``.

    Parameters
    ----------
    name : str
        The registry name.
    fn : callable
        The raw function ``(log_p, log_q) -> (...)``.
    upper_bound : float
        The largest value it can take (``inf`` if unbounded).
    symmetric : bool
        ``D(p || q) = D(q || p)``.
    f_family : bool
        An f-divergence ``sum_j q_j f(p_j / q_j)``: merging the columns where ``p = 0`` into
        one (their q summed) leaves it unchanged, which the cluster preset uses for speed.
    finite_where_p_is_zero : bool
        Finite, with finite gradients, where ``p = 0 < q`` (for an f-divergence: ``f(0)``
        finite), so a row of p without mass can be evaluated and masked out as it is.
    """

    name: str
    fn: DivergenceFn = field(repr=False)
    upper_bound: float = math.inf
    symmetric: bool = False
    # an f-divergence, sum_j q_j f(p_j / q_j): the columns where p = 0 may be merged into one
    # (their q summed) without changing its value, which the cluster preset uses for speed
    f_family: bool = False
    # finite, with finite gradients, where p = 0 < q (f(0) finite): a row of p without mass
    # then needs no stand-in before it is masked out of the loss
    finite_where_p_is_zero: bool = False

    def __call__(self, log_p: Tensor, log_q: Tensor, *, validate: bool = True) -> Tensor:
        if validate:
            check_log_distributions(log_p, "log_p", allow_empty_rows=False)
            check_log_distributions(log_q, "log_q", allow_empty_rows=False, like=log_p)
        log_p, log_q = common_dtype(log_p, log_q)
        try:
            out = self.fn(log_p, log_q)
        except InfiniteDivergenceError as error:
            # an f_divergence built as name="f" (its default) but registered as 'mine': the
            # user looks for the name they registered
            named = error.divergence
            if named is None or named == self.name:
                raise
            message = str(error).replace(f"'{named}'", f"'{self.name}'", 1)
            raise InfiniteDivergenceError(message, self.name) from None
        if not isinstance(out, Tensor) or out.shape != log_p.shape[:-1]:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"divergence '{self.name}' must return one value per row, shape "
                f"{tuple(log_p.shape[:-1])}, got {got}"
            )
        return out


_REGISTRY: dict[str, Divergence] = {}


def register(
    name: str,
    fn: DivergenceFn,
    *,
    upper_bound: float = math.inf,
    symmetric: bool = False,
    f_family: bool = False,
    overwrite: bool = False,
    finite_where_p_is_zero: bool = False,
) -> Divergence:
    """Register ``fn(log_p, log_q) -> (n,)`` under ``name``: every preset, task and command
    can then use the name.

    Parameters
    ----------
    name : str
        A non-empty name without ``:``; stored stripped and in lower case, since :func:`get`
        looks names up case-insensitively.
    fn : callable
        ``(log_p, log_q) -> (...)`` per-row values, or what :func:`f_divergence` returns.
    upper_bound : float
        Its largest value, if known.
    symmetric : bool
        Whether ``D(p || q) = D(q || p)``.
    f_family : bool
        Pass True only for an f-divergence (implied for what :func:`f_divergence` builds).
    overwrite : bool
        Replace an existing registration.
    finite_where_p_is_zero : bool
        Finite with finite gradients where ``p = 0 < q`` (implied for an :func:`f_divergence`
        with finite ``f(0)``).

    Returns
    -------
    Divergence
    """
    if not isinstance(name, str) or not name.strip() or ":" in name:
        raise ValueError(f"a divergence name must be a non-empty string without ':', got {name!r}")
    name = name.strip().lower()  # as get() looks names up
    if not callable(fn):
        raise TypeError(f"divergence '{name}' must be callable (log_p, log_q) -> (n,)")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"divergence '{name}' is already registered (pass overwrite=True)")
    f_family = f_family or getattr(fn, "f_family", False)
    finite = finite_where_p_is_zero or getattr(fn, "finite_where_p_is_zero", False)
    divergence = Divergence(
        name,
        fn,
        upper_bound=upper_bound,
        symmetric=symmetric,
        f_family=f_family,
        finite_where_p_is_zero=finite,
    )
    _REGISTRY[name] = divergence
    return divergence


def names() -> list[str]:
    """Registered divergence names (plus the parametric family ``alpha:A``).

    Returns
    -------
    list of str
    """
    return sorted(_REGISTRY) + ["alpha:A"]


def get(name: str | Divergence | DivergenceFn) -> Divergence:
    """Look up a divergence by name (``"tv"``, ``"alpha:0.5"``, ...) or wrap a callable.

    Parameters
    ----------
    name : str, Divergence or callable
        A registered name (case-insensitive), ``alpha:A`` for any number A, a
        :class:`Divergence` (returned as is), or a function ``(log_p, log_q) -> (...)``.

    Returns
    -------
    Divergence

    Raises
    ------
    ValueError
        An unknown name (the message lists the known ones) or a malformed ``alpha:A``.
    """
    if isinstance(name, Divergence):
        return name
    if callable(name):
        return Divergence(
            getattr(name, "__name__", "custom"),
            name,
            f_family=getattr(name, "f_family", False),
            finite_where_p_is_zero=getattr(name, "finite_where_p_is_zero", False),
        )
    if not isinstance(name, str):
        raise TypeError(f"divergence must be a name or a callable, got {type(name).__name__}")
    key = name.strip().lower()
    if key.startswith("alpha:"):
        try:
            a = float(key.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"'{name}': alpha:A needs a number A, e.g. 'alpha:0.5'") from None
        if a == 1.0:
            return Divergence(f"alpha:{a:g}", kl, f_family=True, finite_where_p_is_zero=True)
        if a == 0.0:
            return Divergence(f"alpha:{a:g}", reverse_kl, f_family=True)
        bound = 1.0 / (a * (1.0 - a)) if 0.0 < a < 1.0 else math.inf
        return Divergence(
            f"alpha:{a:g}",
            alpha(a),
            upper_bound=bound,
            symmetric=a == 0.5,
            f_family=True,
            finite_where_p_is_zero=a > 0.0,  # f(0) = 1 / (A (1 - A)) is finite for A > 0
        )
    if key not in _REGISTRY:
        raise ValueError(f"unknown divergence '{name}'; known: {', '.join(names())}")
    return _REGISTRY[key]


def is_builtin(divergence: Divergence) -> bool:
    """One of the library's own divergences (tested against float64 references), as opposed
    to a user's function, whose output :func:`beyond_icon.icon_loss` checks."""
    if divergence.name.startswith("alpha:"):
        return divergence.fn.__name__.startswith(("alpha_", "kl", "reverse_kl"))
    return _BUILTIN.get(divergence.name) is divergence.fn


# finite_where_p_is_zero: f(0) finite (KL's 0 log 0 = 0, TV 1/2, Hellinger 1/2, JSD log 2 / 2,
# chi2 1); reverse KL and Jeffreys are infinite there
register("kl", kl, f_family=True, finite_where_p_is_zero=True)
register("reverse_kl", reverse_kl, f_family=True)
register("tv", tv, upper_bound=1.0, symmetric=True, f_family=True, finite_where_p_is_zero=True)
register(
    "hellinger",
    hellinger,
    upper_bound=1.0,
    symmetric=True,
    f_family=True,
    finite_where_p_is_zero=True,
)
register(
    "jsd",
    jsd,
    upper_bound=math.log(2.0),
    symmetric=True,
    f_family=True,
    finite_where_p_is_zero=True,
)
register("chi2", chi2, f_family=True, finite_where_p_is_zero=True)
register("jeffreys", jeffreys, symmetric=True, f_family=True)
_BUILTIN = {name: d.fn for name, d in _REGISTRY.items()}


def register_module(spec: str) -> Divergence:
    """Register the divergence ``NAME`` defined in ``path/to/file.py:NAME`` (or ``module:NAME``).

    ``NAME`` is either a divergence ``(log_p, log_q) -> (n,)`` (two parameters) or a convex
    generator ``f(t)`` with ``f(1) = 0`` (one parameter), turned into an f-divergence. It is
    registered under ``NAME`` (replacing an earlier registration of that name).
    """
    import inspect

    from beyond_icon._imports import load_object

    fn = load_object(spec, "divergence module")
    name = spec.rsplit(":", 1)[1]
    if not callable(fn):
        raise ValueError(f"{spec} is not callable")
    if isinstance(fn, Divergence):
        return register(
            name,
            fn.fn,
            upper_bound=fn.upper_bound,
            symmetric=fn.symmetric,
            f_family=fn.f_family,
            overwrite=True,
        )
    try:
        n_params = len(
            [
                p
                for p in inspect.signature(fn).parameters.values()
                if p.default is inspect.Parameter.empty
            ]
        )
    except (TypeError, ValueError):
        n_params = 2
    if n_params == 1:
        return register(name, f_divergence(fn, name=name), f_family=True, overwrite=True)
    if n_params == 2:
        return register(name, fn, overwrite=True)
    raise ValueError(
        f"{spec}: expected f(t) (an f-generator) or fn(log_p, log_q), got {n_params} parameters"
    )
