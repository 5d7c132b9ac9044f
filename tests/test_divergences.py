"""Every divergence against its textbook formula in float64 numpy, entry by entry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import random_distributions, to_log
from hypothesis import given, settings
from hypothesis import strategies as st

import beyond_icon as bi
from beyond_icon import divergences

# ------------------------------------------------------------------ textbook references (numpy)


def ref_kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def ref_reverse_kl(p, q):
    return ref_kl(q, p)


def ref_tv(p, q):
    return 0.5 * sum(abs(pi - qi) for pi, qi in zip(p, q))


def ref_hellinger(p, q):
    return 0.5 * sum((math.sqrt(pi) - math.sqrt(qi)) ** 2 for pi, qi in zip(p, q))


def ref_jsd(p, q):
    m = [(pi + qi) / 2 for pi, qi in zip(p, q)]
    return 0.5 * ref_kl(p, m) + 0.5 * ref_kl(q, m)


def ref_chi2(p, q):
    return sum((pi - qi) ** 2 / qi for pi, qi in zip(p, q) if qi > 0)


def ref_jeffreys(p, q):
    return ref_kl(p, q) + ref_kl(q, p)


def ref_alpha(a):
    def f(p, q):
        return (1 - sum(pi**a * qi ** (1 - a) for pi, qi in zip(p, q))) / (a * (1 - a))

    return f


REFERENCES = {
    "kl": ref_kl,
    "reverse_kl": ref_reverse_kl,
    "tv": ref_tv,
    "hellinger": ref_hellinger,
    "jsd": ref_jsd,
    "chi2": ref_chi2,
    "jeffreys": ref_jeffreys,
    "alpha:0.5": ref_alpha(0.5),
    "alpha:0.3": ref_alpha(0.3),
    "alpha:0.9": ref_alpha(0.9),
    "alpha:2": ref_alpha(2.0),
    "alpha:-0.5": ref_alpha(-0.5),
}
BOUNDED = ["tv", "hellinger", "jsd", "alpha:0.5", "alpha:0.3"]
# Which zeros a divergence tolerates: finite when p has zeros (p=0<q), when q has zeros (q=0<p).
TOLERATES_P_ZEROS = ["kl", "tv", "hellinger", "jsd", "chi2", "alpha:0.5", "alpha:0.3", "alpha:2"]
TOLERATES_Q_ZEROS = ["reverse_kl", "tv", "hellinger", "jsd", "alpha:0.5", "alpha:0.3", "alpha:-0.5"]


def reference(name, p, q):
    return np.array([REFERENCES[name](pi, qi) for pi, qi in zip(p, q)])


# ------------------------------------------------------------------ values


@pytest.mark.parametrize("name", list(REFERENCES))
def test_matches_formula_on_random_distributions(name, rng):
    p, q = random_distributions(rng, 7, 11), random_distributions(rng, 7, 11)
    got = divergences.get(name)(to_log(p), to_log(q))
    np.testing.assert_allclose(got.numpy(), reference(name, p, q), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", TOLERATES_P_ZEROS)
def test_matches_formula_when_p_has_zeros(name, rng):
    p, q = random_distributions(rng, 6, 9, zero_fraction=0.4), random_distributions(rng, 6, 9)
    got = divergences.get(name)(to_log(p), to_log(q))
    np.testing.assert_allclose(got.numpy(), reference(name, p, q), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", TOLERATES_Q_ZEROS)
def test_matches_formula_when_q_has_zeros(name, rng):
    p, q = random_distributions(rng, 6, 9), random_distributions(rng, 6, 9, zero_fraction=0.4)
    got = divergences.get(name)(to_log(p), to_log(q))
    np.testing.assert_allclose(got.numpy(), reference(name, p, q), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(REFERENCES))
def test_shared_zeros_contribute_nothing(name, rng):
    p = random_distributions(rng, 5, 8, zero_fraction=0.3)
    q = random_distributions(rng, 5, 8)
    q[p == 0] = 0.0
    q /= q.sum(1, keepdims=True)
    got = divergences.get(name)(to_log(p), to_log(q))
    # the same value as on the restricted support
    want = [REFERENCES[name](pi[pi > 0], qi[pi > 0]) for pi, qi in zip(p, q)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(REFERENCES))
def test_identical_inputs_give_zero(name, rng):
    p = random_distributions(rng, 5, 8, zero_fraction=0.3)
    got = divergences.get(name)(to_log(p), to_log(p))
    np.testing.assert_allclose(got.numpy(), 0.0, atol=1e-13)


@pytest.mark.parametrize(
    "name, p_zero",
    [
        ("kl", False),
        ("chi2", False),
        ("reverse_kl", True),
        ("jeffreys", True),
        ("jeffreys", False),
        ("alpha:2", False),
        ("alpha:-0.5", True),
    ],
)
def test_infinite_cases_raise_with_remedy(name, p_zero, rng):
    p, q = random_distributions(rng, 4, 6), random_distributions(rng, 4, 6)
    (p if p_zero else q)[2, 1] = 0.0
    p, q = p / p.sum(1, keepdims=True), q / q.sum(1, keepdims=True)
    with pytest.raises(bi.InfiniteDivergenceError, match=r"row\(s\) \[2\].*debias"):
        divergences.get(name)(to_log(p), to_log(q))


def test_alpha_tends_to_kl_and_reverse_kl(rng):
    p, q = random_distributions(rng, 5, 7), random_distributions(rng, 5, 7)
    lp, lq = to_log(p), to_log(q)
    kl, rkl = divergences.kl(lp, lq), divergences.reverse_kl(lp, lq)
    for eps in (1e-3, 1e-5):
        torch.testing.assert_close(
            divergences.get(f"alpha:{1 - eps}")(lp, lq), kl, rtol=5 * eps, atol=0
        )
        torch.testing.assert_close(
            divergences.get(f"alpha:{eps}")(lp, lq), rkl, rtol=5 * eps, atol=0
        )
    assert divergences.get("alpha:1").fn is divergences.kl
    assert divergences.get("alpha:0").fn is divergences.reverse_kl


def test_hellinger_is_a_quarter_of_alpha_half(rng):
    p, q = random_distributions(rng, 5, 7), random_distributions(rng, 5, 7)
    torch.testing.assert_close(
        4 * divergences.hellinger(to_log(p), to_log(q)),
        divergences.get("alpha:0.5")(to_log(p), to_log(q)),
    )


def test_precision_near_identity_float32():
    """Divergences of nearby distributions keep relative precision (no 1 - sum cancellation)."""
    torch.manual_seed(0)
    logits = torch.randn(4, 50, dtype=torch.float64)
    lp = torch.log_softmax(logits, -1)
    lq = torch.log_softmax(logits + 1e-3 * torch.randn_like(logits), -1)
    # Values are ~1e-7: a "1 - sum" form loses everything in float32 (relative error ~0.6 for
    # Hellinger); the per-entry forms keep about three digits, the limit set by rounding the
    # float32 log-probabilities themselves.
    for name in ["hellinger", "chi2", "alpha:0.5", "alpha:0.3", "alpha:2"]:
        want = divergences.get(name)(lp, lq)
        got = divergences.get(name)(lp.float(), lq.float())
        torch.testing.assert_close(got.double(), want, rtol=5e-3, atol=0)


# ------------------------------------------------------------------ properties (hypothesis)

# Masses are 0 or at least 1e-12: unbounded divergences of smaller masses can exceed the float64
# range, which icon_loss reports as an overflow (tested in test_loss.py).
mass = st.one_of(st.just(0.0), st.floats(1e-12, 10.0))
row_pairs = st.integers(2, 12).flatmap(
    lambda m: st.tuples(
        st.lists(mass, min_size=m, max_size=m).filter(lambda v: sum(v) > 1e-3),
        st.lists(mass, min_size=m, max_size=m).filter(lambda v: sum(v) > 1e-3),
    )
)


def _normalise(values):
    x = np.asarray(values, dtype=np.float64)[None, :]
    return x / x.sum()


@settings(max_examples=60, deadline=None)
@given(pair=row_pairs, name=st.sampled_from(BOUNDED + ["jeffreys", "kl", "chi2", "reverse_kl"]))
def test_non_negative_and_bounded(pair, name):
    p, q = _normalise(pair[0]), _normalise(pair[1])
    div = divergences.get(name)
    try:
        value = float(div(to_log(p), to_log(q))[0])
    except bi.InfiniteDivergenceError:
        return
    assert math.isfinite(value)
    assert value >= -1e-12
    assert value <= div.upper_bound + 1e-12


@settings(max_examples=60, deadline=None)
@given(pair=row_pairs, name=st.sampled_from(["tv", "hellinger", "jsd", "jeffreys", "alpha:0.5"]))
def test_symmetric(pair, name):
    p, q = _normalise(pair[0]), _normalise(pair[1])
    div = divergences.get(name)
    assert div.symmetric
    try:
        forward = div(to_log(p), to_log(q))
    except bi.InfiniteDivergenceError:
        return
    torch.testing.assert_close(forward, div(to_log(q), to_log(p)), rtol=1e-10, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(mass, min_size=2, max_size=12).filter(lambda v: sum(v) > 1e-3),
    name=st.sampled_from(list(REFERENCES)),
)
def test_identity(values, name):
    p = _normalise(values)
    assert abs(float(divergences.get(name)(to_log(p), to_log(p))[0])) < 1e-12


# ------------------------------------------------------------------ gradients


@pytest.mark.parametrize("name", list(REFERENCES))
def test_gradcheck(name, rng):
    lp = torch.log_softmax(torch.tensor(rng.normal(size=(3, 5))), -1).requires_grad_()
    lq = torch.log_softmax(torch.tensor(rng.normal(size=(3, 5))), -1).requires_grad_()
    fn = divergences.get(name).fn
    assert torch.autograd.gradcheck(fn, (lp, lq))


@pytest.mark.parametrize("name", TOLERATES_P_ZEROS)
def test_gradients_finite_and_zero_at_masked_entries(name, rng):
    """p has -inf entries (q does not): the gradient wrt log_p there is finite (zero for the
    divergences whose terms vanish with p) and everything else is finite."""
    p = random_distributions(rng, 4, 6, zero_fraction=0.4)
    lp = to_log(p).requires_grad_()
    lq = torch.log_softmax(torch.tensor(rng.normal(size=(4, 6))), -1).requires_grad_()
    divergences.get(name)(lp, lq).sum().backward()
    assert torch.isfinite(lp.grad).all() and torch.isfinite(lq.grad).all()
    assert torch.all(lp.grad[p == 0] == 0)


def test_shared_minus_inf_gradients_are_zero(rng):
    lp = torch.log_softmax(torch.tensor(rng.normal(size=(3, 6))), -1)
    lp = lp.masked_fill(torch.tensor([[True, False, False, False, False, False]] * 3), -math.inf)
    lp = torch.log_softmax(lp, -1)
    lq = torch.log_softmax(lp.detach() + 0.3 * torch.tensor(rng.normal(size=(3, 6))), -1)
    for name in REFERENCES:
        a, b = lp.clone().requires_grad_(), lq.clone().requires_grad_()
        divergences.get(name)(a, b).sum().backward()
        assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all(), name
        assert torch.all(a.grad[:, 0] == 0) and torch.all(b.grad[:, 0] == 0), name


# ------------------------------------------------------------------ registry and user divergences


def test_names_and_get():
    assert {"kl", "reverse_kl", "tv", "hellinger", "jsd", "chi2", "jeffreys", "alpha:A"} <= set(
        divergences.names()
    )
    assert divergences.get("TV").name == "tv"
    with pytest.raises(ValueError, match="unknown divergence 'nope'"):
        divergences.get("nope")
    with pytest.raises(ValueError, match="alpha:A needs a number"):
        divergences.get("alpha:x")


def test_f_divergence_generators_match_builtins(rng):
    p = random_distributions(rng, 5, 8, zero_fraction=0.3)
    q = random_distributions(rng, 5, 8)
    lp, lq = to_log(p), to_log(q)
    kl_f = divergences.f_divergence(lambda t: torch.special.xlogy(t, t), name="kl_f")
    tv_f = divergences.f_divergence(
        lambda t: 0.5 * (t - 1).abs(), name="tv_f", slope_at_infinity=0.5
    )
    hel_f = divergences.f_divergence(
        lambda t: 0.5 * (t.sqrt() - 1) ** 2, name="h", slope_at_infinity=0.5
    )
    torch.testing.assert_close(kl_f(lp, lq), divergences.kl(lp, lq))
    torch.testing.assert_close(tv_f(lp, lq), divergences.tv(lp, lq))
    torch.testing.assert_close(hel_f(lp, lq), divergences.hellinger(lp, lq))
    # q has zeros where p > 0: TV's generator has a finite slope at infinity, KL's does not
    torch.testing.assert_close(tv_f(lq, lp), divergences.tv(lq, lp))
    with pytest.raises(bi.InfiniteDivergenceError):
        kl_f(lq, lp)


def test_f_divergence_rejects_bad_generators():
    with pytest.raises(ValueError, match=r"f\(1\) must be 0"):
        divergences.f_divergence(lambda t: t * t, name="bad")
    with pytest.raises(ValueError, match="convex"):
        divergences.f_divergence(lambda t: -torch.special.xlogy(t, t), name="concave")


def test_register_custom_divergence_reaches_icon_loss(rng):
    def squared_l2(log_p, log_q):
        return (log_p.exp() - log_q.exp()).pow(2).sum(-1)

    div = divergences.register("test_squared_l2", squared_l2, symmetric=True)
    assert "test_squared_l2" in divergences.names()
    with pytest.raises(ValueError, match="already registered"):
        divergences.register("test_squared_l2", squared_l2)
    p, q = random_distributions(rng, 4, 5), random_distributions(rng, 4, 5)
    want = ((p - q) ** 2).sum(1).mean()
    assert abs(float(bi.icon_loss(to_log(p), to_log(q), "test_squared_l2")) - want) < 1e-12
    assert div.name == "test_squared_l2"


def test_custom_divergence_with_wrong_output_shape_is_an_error(rng):
    p = to_log(random_distributions(rng, 3, 4))
    with pytest.raises(ValueError, match="one value per row"):
        divergences.get(lambda a, b: (a.exp() - b.exp()).sum())(p, p)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: (p, p[:, :3]), "shape"),
        (lambda p: (p.masked_fill(torch.eye(4, 5, dtype=torch.bool), math.nan), p), "NaN"),
        (lambda p: (p + 0.1, p), "summing to 1"),
        (lambda p: (p[0], p[0]), r"shape \(n, m\)"),
        (lambda p: (torch.full_like(p, -math.inf), p), "no mass"),
    ],
)
def test_bad_inputs_raise(make, message, rng):
    p = to_log(random_distributions(rng, 4, 5))
    with pytest.raises(ValueError, match=message):
        divergences.get("kl")(*make(p))


@pytest.mark.parametrize("a, limit", [(0.9999999, "kl"), (1e-7, "reverse_kl"), (0.999, "kl")])
def test_alpha_near_its_limits_is_right_in_float32(a, limit):
    """alpha:0.9999999 gave 0.774 in float32 where KL is 0.925 (cancellation)."""
    g = torch.Generator().manual_seed(0)
    log_p = torch.log_softmax(torch.randn(5, 7, generator=g), dim=1)
    log_q = torch.log_softmax(torch.randn(5, 7, generator=g), dim=1)
    got = divergences.get(f"alpha:{a}")(log_p, log_q)
    want = divergences.get(limit)(log_p.double(), log_q.double())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=2e-3 if a == 0.999 else 1e-5, atol=1e-6)


def test_user_divergences_returning_nan_or_negative_values_are_named():
    from beyond_icon import icon_loss

    log_p = torch.log_softmax(torch.randn(4, 5), dim=1)
    log_q = torch.log_softmax(torch.randn(4, 5), dim=1)

    def broken(lp, lq):
        return (lp - lq).sum(-1) * float("nan")

    def negative(lp, lq):
        return -(lp.exp() - lq.exp()).abs().sum(-1) - 0.1

    with pytest.raises(ValueError, match="divergence 'broken' returned NaN"):
        icon_loss(log_p, log_q, broken)
    with pytest.raises(ValueError, match="returned negative values"):
        icon_loss(log_p, log_q, negative)


@pytest.mark.parametrize("name", ["kl", "tv", "hellinger", "jsd", "chi2", "jeffreys", "alpha:0.5"])
def test_closed_form_backward_with_leading_dimensions(name):
    """The row-wise Functions broadcast the incoming gradient over the last axis only."""
    g = torch.Generator().manual_seed(1)
    log_p = torch.log_softmax(torch.randn(3, 4, 5, generator=g, dtype=torch.float64), -1)
    log_q = torch.log_softmax(torch.randn(3, 4, 5, generator=g, dtype=torch.float64), -1)
    weights = torch.randn(3, 4, generator=g, dtype=torch.float64)
    fn = divergences.get(name).fn
    a = log_p.clone().requires_grad_(True)
    (fn(a, log_q) * weights).sum().backward()
    b = log_p.clone().requires_grad_(True)
    flat = fn(b.reshape(12, 5), log_q.reshape(12, 5)).reshape(3, 4)
    (flat * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own imports
def test_compiled_rules_give_the_eager_values_and_gradients():
    """divergences.compile_rules: torch.compile of the elementwise rule (off by default)."""
    from beyond_icon import methods

    z = torch.randn(40, 6, generator=torch.Generator().manual_seed(0), requires_grad=True)
    labels = torch.arange(40) % 4
    loss = methods.SupCon("jsd", metric="euclidean")
    eager = loss(z, labels)
    (eager_grad,) = torch.autograd.grad(eager, z)
    with divergences.rules_compiled():
        compiled = loss(z, labels)
        (compiled_grad,) = torch.autograd.grad(compiled, z)
    assert not divergences._COMPILE["enabled"]  # restored after the block
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)


@pytest.mark.parametrize("name", ["kl", "tv", "hellinger", "jsd", "chi2", "alpha:0.5", "alpha:2"])
def test_float32_values_and_gradients_where_probabilities_underflow(name):
    """Log-probabilities below float32's smallest exponent (-104) give exponentials of 0 on the
    fast CPU path; the row values and gradients stay finite and equal float64's (the terms of
    such entries are below 1e-45)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 12, dtype=torch.float64, generator=gen)
    log_p = torch.log_softmax(logits, dim=1)
    log_q = torch.log_softmax(logits + 0.3 * torch.randn(6, 12, generator=gen).double(), dim=1)
    log_p[:, :3] = log_p[:, :3] - 150.0  # p underflows in float32 on three columns
    log_q[:, 1:3] = log_q[:, 1:3] - 200.0  # q on two of them (q << p elsewhere would
    # make chi2 and alpha:2 exceed float32's range for real, ~p^2 / q = e^200)
    log_p, log_q = torch.log_softmax(log_p, 1), torch.log_softmax(log_q, 1)
    reference = divergences.get(name)(log_p, log_q)
    q32 = log_q.float().requires_grad_()
    value = divergences.get(name)(log_p.float(), q32)
    value.sum().backward()
    q64 = log_q.clone().requires_grad_()
    divergences.get(name)(log_p, q64).sum().backward()
    torch.testing.assert_close(value.double(), reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q32.grad.double(), q64.grad, rtol=1e-4, atol=1e-6)


def test_f_divergence_takes_f0_as_its_limit():
    """t log t is NaN at 0 in floating point (0 * -inf) but its limit is 0: the generator of KL
    must give KL on a sparse p, not an 'infinite' error."""
    kl_f = divergences.f_divergence(lambda t: t * torch.log(t), name="kl_f")
    log_p = torch.tensor([[0.5, 0.5, 0.0, 0.0]]).log()
    log_q = torch.full((1, 4), 0.25).log()
    torch.testing.assert_close(kl_f(log_p, log_q), divergences.kl(log_p, log_q))
    reverse = divergences.f_divergence(lambda t: -torch.log(t), name="rkl_f")
    with pytest.raises(divergences.InfiniteDivergenceError, match="f\\(0\\) is infinite"):
        reverse(log_p, log_q)


def test_registered_names_are_found_in_any_case():
    try:
        registered = divergences.register(" MyTV ", divergences.tv, overwrite=True)
        assert registered.name == "mytv"
        assert divergences.get("MyTV") is registered and divergences.get("mytv") is registered
    finally:
        divergences._REGISTRY.pop("mytv", None)


def test_infinite_error_names_the_registered_name():
    """An f_divergence built with the default name 'f' and registered as 'mine' reports its
    infinite rows as 'mine', the name the user asked for; under its own name it stays 'f'."""
    reverse = divergences.f_divergence(lambda t: -torch.log(t))
    log_p = torch.tensor([[0.5, 0.5, 0.0, 0.0]]).log()
    log_q = torch.full((1, 4), 0.25).log()
    try:
        registered = divergences.register("mine", reverse)
        with pytest.raises(divergences.InfiniteDivergenceError) as caught:
            divergences.get("mine")(log_p, log_q)
        assert str(caught.value).startswith("divergence 'mine' is infinite: q > 0 where p = 0")
        assert caught.value.divergence == "mine" and "'f'" not in str(caught.value)
        assert registered.name == "mine"
    finally:
        divergences._REGISTRY.pop("mine", None)
    with pytest.raises(divergences.InfiniteDivergenceError, match="divergence 'f' is infinite"):
        divergences.get(reverse)(log_p, log_q)
    with pytest.raises(divergences.InfiniteDivergenceError, match="divergence 'kl' is infinite"):
        divergences.get("kl")(log_q, log_p)  # a built-in keeps its own name
