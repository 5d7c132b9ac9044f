"""Kernels against hand-written per-pair loops in float64."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

from beyond_icon import kernels


def _rows_normalised(log_p: torch.Tensor) -> None:
    sums = torch.logsumexp(log_p, dim=1)
    finite = sums > -math.inf
    torch.testing.assert_close(sums[finite], torch.zeros_like(sums[finite]), atol=1e-12, rtol=0)


def _loop_kernel(z: np.ndarray, similarity) -> np.ndarray:
    n = len(z)
    out = np.full((n, n), -np.inf)
    for i in range(n):
        w = np.array([similarity(z[i], z[j]) if j != i else 0.0 for j in range(n)])
        total = sum(w[j] for j in range(n) if j != i)
        for j in range(n):
            if j != i:
                out[i, j] = math.log(w[j] / total)
    return out


@pytest.fixture
def z(rng) -> torch.Tensor:
    return torch.tensor(rng.normal(size=(9, 4)))


def test_gaussian_matches_loop(z):
    sigma = 0.7
    want = _loop_kernel(z.numpy(), lambda a, b: math.exp(-np.sum((a - b) ** 2) / (2 * sigma**2)))
    np.testing.assert_allclose(kernels.gaussian(z, sigma).numpy(), want, rtol=1e-10)


@pytest.mark.parametrize("dof", [1.0, 3.5])
def test_student_t_matches_loop(z, dof):
    want = _loop_kernel(
        z.numpy(), lambda a, b: (1 + np.sum((a - b) ** 2) / dof) ** (-(dof + 1) / 2)
    )
    np.testing.assert_allclose(kernels.student_t(z, dof).numpy(), want, rtol=1e-10)


def test_cosine_matches_loop(z):
    t = 0.3

    def sim(a, b):
        return math.exp(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) / t)

    np.testing.assert_allclose(
        kernels.cosine(z, t).numpy(), _loop_kernel(z.numpy(), sim), rtol=1e-10
    )


@pytest.mark.parametrize(
    "kernel",
    [
        lambda z, rows: kernels.gaussian(z, 1.3, rows=rows),
        lambda z, rows: kernels.student_t(z, 1.0, rows=rows),
        lambda z, rows: kernels.cosine(z, 0.2, rows=rows),
        lambda z, rows: kernels.perplexity(z, 3.0, rows=rows),
        lambda z, rows: kernels.knn(z, 3, rows=rows),
        lambda z, rows: kernels.labels(torch.arange(9) % 3, rows=rows, dtype=z.dtype),
        lambda z, rows: kernels.clusters(torch.log_softmax(z, -1), rows=rows),
        lambda z, rows: kernels.clusters(torch.log_softmax(z, -1), rows=rows, exclude_self=True),
    ],
)
def test_row_blocks_equal_rows_of_full_matrix(z, kernel):
    full = kernel(z, None)
    _rows_normalised(full)
    for rows in (slice(0, 4), slice(4, 9), slice(3, 4)):
        torch.testing.assert_close(kernel(z, rows), full[rows], rtol=1e-9, atol=1e-12)


def test_squared_distances_exact_zero_and_finite_gradient():
    z = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, -1.0]], dtype=torch.float64, requires_grad=True)
    log_q = kernels.gaussian(z)
    assert float(log_q[0, 1].detach()) == pytest.approx(math.log(1 / (1 + math.exp(-5))))
    log_q[0, 1].backward()
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("kernel", ["gaussian", "student_t", "cosine"])
@pytest.mark.parametrize("scale, temperature", [(1.0, 0.01), (1e3, 0.1), (1e3, 0.01)])
def test_gradients_finite_at_extremes(kernel, scale, temperature, rng):
    z = (scale * torch.tensor(rng.normal(size=(12, 5)), dtype=torch.float32)).requires_grad_()
    fn = {
        "gaussian": lambda z: kernels.gaussian(z, sigma=temperature),
        "student_t": lambda z: kernels.student_t(z, dof=1.0),
        "cosine": lambda z: kernels.cosine(z, temperature=temperature),
    }[kernel]
    log_q = fn(z)
    p = kernels.labels(torch.arange(12) % 3, dtype=torch.float32)
    finite = p > -math.inf
    (-(p.exp() * torch.where(finite, log_q, 0.0)).sum()).backward()
    assert torch.isfinite(z.grad).all()


# ------------------------------------------------------------------ perplexity


def _loop_perplexity_row(d2: np.ndarray, target: float) -> np.ndarray:
    """Independent per-row bisection on beta (t-SNE's classic search), float64."""
    lo, hi = 0.0, np.inf
    beta = 1.0
    for _ in range(200):
        w = np.exp(-beta * (d2 - d2.min()))
        p = w / w.sum()
        h = -np.sum(p[p > 0] * np.log(p[p > 0]))
        if h > math.log(target):
            lo = beta
            beta = beta * 2 if hi == np.inf else (beta + hi) / 2
        else:
            hi = beta
            beta = (beta + lo) / 2
    return p


def test_perplexity_matches_independent_search_and_target(rng):
    x = rng.normal(size=(40, 6))
    log_p = kernels.perplexity(torch.tensor(x), perplexity=8.0)
    _rows_normalised(log_p)
    p = log_p.exp().numpy()
    for i in range(40):
        others = [j for j in range(40) if j != i]
        d2 = np.sum((x[others] - x[i]) ** 2, axis=1)
        np.testing.assert_allclose(p[i, others], _loop_perplexity_row(d2, 8.0), atol=1e-7)
        assert p[i, i] == 0.0


@pytest.mark.parametrize("target", [2.0, 10.0, 30.0, 100.0])
def test_perplexity_reaches_target(target):
    x = torch.randn(300, 10, generator=torch.Generator().manual_seed(1))
    p = kernels.perplexity(x.double(), perplexity=target).exp()
    entropy = -(torch.special.xlogy(p, p)).sum(1)
    assert torch.all((entropy.exp() - target).abs() < 1e-3)
    assert kernels.perplexity(x, perplexity=target).dtype == torch.float32


@pytest.mark.parametrize("value", [0.5, 9.0, 50.0, float("nan")])
def test_perplexity_out_of_range(value):
    with pytest.raises(ValueError, match="perplexity"):
        kernels.perplexity(torch.randn(10, 3), perplexity=value)


def test_perplexity_has_no_gradient():
    x = torch.randn(10, 3, requires_grad=True)
    assert not kernels.perplexity(x, 3.0).requires_grad


# ------------------------------------------------------------------ labels, views, knn


def test_labels_matches_loop_and_leaves_singletons_empty():
    y = torch.tensor([0, 1, 0, 2, 0, 1])
    got = kernels.labels(y, dtype=torch.float64).exp().numpy()
    want = np.zeros((6, 6))
    for i in range(6):
        same = [j for j in range(6) if j != i and y[j] == y[i]]
        for j in same:
            want[i, j] = 1 / len(same)
    np.testing.assert_allclose(got, want)
    assert torch.all(kernels.labels(y)[3] == -math.inf)


def test_views_pairs():
    index = torch.tensor([0, 1, 2, 0, 1, 2])
    p = kernels.views(index).exp()
    assert p[0, 3] == 1 and p[4, 1] == 1 and p.sum() == 6


@pytest.mark.parametrize(
    "bad", [torch.tensor([0.0, 1.0]), torch.tensor([[0, 1]]), torch.tensor([True, False])]
)
def test_labels_reject_bad_dtype_and_shape(bad):
    with pytest.raises(ValueError, match="labels"):
        kernels.labels(bad)


def test_knn_matches_brute_force(rng):
    x = rng.normal(size=(15, 3))
    p = kernels.knn(torch.tensor(x), 4).exp().numpy()
    for i in range(15):
        d = np.sum((x - x[i]) ** 2, 1)
        d[i] = np.inf
        want = np.zeros(15)
        want[np.argsort(d)[:4]] = 0.25
        np.testing.assert_allclose(p[i], want)
    with pytest.raises(ValueError, match="n_neighbors"):
        kernels.knn(torch.tensor(x), 15)


def test_knn_indices_rows_match_sorted_distances(rng):
    """Nearest first, never the row itself, a row block equal to those rows of the whole, in
    float32 on features far from the origin (the search centres them)."""
    x = rng.normal(size=(60, 8)) + 50.0
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    want = np.argsort(d, axis=1, kind="stable")[:, :5]
    got = kernels.knn_indices(torch.tensor(x, dtype=torch.float32), 5)
    np.testing.assert_array_equal(got.numpy(), want)
    block = kernels.knn_indices(torch.tensor(x, dtype=torch.float32), 5, rows=slice(20, 35))
    np.testing.assert_array_equal(block.numpy(), want[20:35])


# ------------------------------------------------------------------ clusters, debias, propagate


@pytest.mark.parametrize("with_teacher", [False, True])
def test_clusters_matches_loop(rng, with_teacher):
    n, k = 7, 3
    a = rng.dirichlet(np.ones(k), size=n)
    b = rng.dirichlet(np.ones(k), size=n) if with_teacher else a
    got = (
        kernels.clusters(torch.tensor(np.log(a)), torch.tensor(np.log(b)) if with_teacher else None)
        .exp()
        .numpy()
    )
    want = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            want[i, j] = sum(a[i, c] * b[j, c] / sum(b[m, c] for m in range(n)) for c in range(k))
    np.testing.assert_allclose(got, want, rtol=1e-10)
    np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-12)


def test_clusters_confident_assignments_do_not_underflow():
    logits = torch.tensor([[80.0, 0.0], [0.0, 80.0], [80.0, 0.0], [0.0, 80.0]])
    log_q = kernels.clusters(torch.log_softmax(logits, -1))
    assert torch.isfinite(log_q).all()
    assert torch.allclose(torch.logsumexp(log_q, 1), torch.zeros(4), atol=1e-6)
    # q(1|0) = (1 * e^-80 + e^-80 * 1) / 2: both clusters hold two points
    assert float(log_q[0, 1]) == pytest.approx(-80.0, abs=1e-3)


def test_clusters_exclude_self(rng):
    a = torch.tensor(np.log(rng.dirichlet(np.ones(3), size=5)))
    full = kernels.clusters(a).exp()
    excl = kernels.clusters(a, exclude_self=True).exp()
    off = full.clone().fill_diagonal_(0)
    torch.testing.assert_close(excl, off / off.sum(1, keepdim=True))


@pytest.mark.parametrize("rows", [None, slice(1, 3)])
def test_clusters_one_hot_singleton_with_exclude_self_is_refused(rows):
    # point 2 alone in cluster 0 with an exact one-hot assignment: excluding itself leaves
    # its row no mass (0/0); a named error, not a NaN row
    a = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]).log()
    with pytest.raises(ValueError, match="row 2 of the cluster kernel has no mass outside"):
        kernels.clusters(a, rows=rows, exclude_self=True)
    columns, mask = torch.tensor([[1], [0], [1]]), torch.ones(3, 1, dtype=torch.bool)
    for log_assign in (a, torch.stack([a, a])):  # one head, and two
        with pytest.raises(ValueError, match="row 2 of the cluster kernel has no mass outside"):
            kernels.clusters_at(log_assign, columns, mask, rows=rows, exclude_self=True)
    # the other rows, the kernel without exclude_self and soft assignments stay finite
    assert torch.isfinite(kernels.clusters(a, rows=slice(0, 2), exclude_self=True)).any(1).all()
    assert not kernels.clusters(a).isnan().any()
    soft = torch.log_softmax(torch.tensor([[-30.0, 30.0], [-30.0, 30.0], [30.0, -30.0]]), -1)
    assert torch.allclose(kernels.clusters(soft, exclude_self=True).logsumexp(1), torch.zeros(3))
    listed = kernels.clusters_at(soft, columns, mask, exclude_self=True)
    assert torch.allclose(listed.logsumexp(1), torch.zeros(3), atol=1e-6)


def test_debias_matches_formula(rng):
    y = torch.tensor([0, 0, 1, 1, 1, 2])
    log_p = kernels.labels(y, dtype=torch.float64)
    got = kernels.debias(log_p, 0.2).exp().numpy()
    p = log_p.exp().numpy()
    want = np.zeros_like(p)
    for i in range(6):
        if p[i].sum() == 0:
            continue
        for j in range(6):
            if j != i:
                want[i, j] = 0.8 * p[i, j] + 0.2 / 5
    np.testing.assert_allclose(got, want, atol=1e-15)
    assert kernels.debias(log_p, 0.0) is log_p
    uniform = kernels.debias(log_p, 1.0).exp()
    assert torch.allclose(
        uniform[0], torch.tensor([0.0, 0.2, 0.2, 0.2, 0.2, 0.2], dtype=torch.float64)
    )
    # rows: the block of anchors 2..4 gets its own diagonal removed
    block = kernels.debias(log_p[2:5], 0.2, rows=slice(2, 5)).exp().numpy()
    np.testing.assert_allclose(block, want[2:5], atol=1e-15)
    with pytest.raises(ValueError, match="alpha"):
        kernels.debias(log_p, 1.5)


def test_debias_gradient_finite():
    log_p = torch.log_softmax(torch.randn(4, 4, dtype=torch.float64), -1)
    log_p = torch.log_softmax(log_p.masked_fill(torch.eye(4, dtype=torch.bool), -math.inf), -1)
    log_p.requires_grad_()
    kernels.debias(log_p, 0.3).exp().sum().backward()
    assert torch.isfinite(log_p.grad).all()


def test_propagate_matches_matrix_powers(rng):
    x = rng.normal(size=(10, 2))
    log_p = kernels.knn(torch.tensor(x), 3)
    p = log_p.exp().numpy()
    walk = p + p @ p + p @ p @ p
    np.fill_diagonal(walk, 0)
    want = walk / walk.sum(1, keepdims=True)
    np.testing.assert_allclose(kernels.propagate(log_p, 3).exp().numpy(), want, atol=1e-15)
    keep_self = p + p @ p
    np.testing.assert_allclose(
        kernels.propagate(log_p, 2, exclude_self=False).exp().numpy(), keep_self / 2, atol=1e-15
    )
    with pytest.raises(ValueError, match="square"):
        kernels.propagate(log_p[:3], 2)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: kernels.gaussian(torch.randn(1, 3)), "at least 2 rows"),
        (lambda: kernels.gaussian(torch.randn(4)), r"shape \(n, d\)"),
        (
            lambda: kernels.cosine(torch.tensor([[0.0, 1.0], [math.nan, 1.0]])),
            r"NaN or Inf in row\(s\) \[1\]",
        ),
        (lambda: kernels.cosine(torch.randn(3, 2), temperature=0.0), "temperature"),
        (lambda: kernels.gaussian(torch.randint(0, 3, (4, 2))), "floating"),
        (lambda: kernels.clusters(torch.randn(4, 3)), "summing to 1"),
        (lambda: kernels.gaussian(torch.randn(4, 2), rows=slice(5, 9)), "selects no row"),
    ],
)
def test_bad_inputs(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("name", ["gaussian", "student_t", "cosine"])
@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e3])
def test_half_precision_inputs_give_float32_kernels_and_finite_gradients(name, scale):
    from beyond_icon import icon_loss

    z = (torch.randn(8, 4, generator=torch.Generator().manual_seed(0)) * scale).half()
    z.requires_grad_(True)
    log_q = getattr(kernels, name)(z)
    assert log_q.dtype == torch.float32
    loss = icon_loss(kernels.labels(torch.arange(8) % 2, dtype=log_q.dtype), log_q, "jsd")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


def _listed_reference(la: torch.Tensor, columns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log q(c_it | i) of the cluster kernel, one log-sum-exp per listed entry (float64)."""
    lb = la - torch.logsumexp(la, dim=-2, keepdim=True)
    heads, n, _ = la.shape
    out = torch.full((heads, n, columns.shape[1]), -math.inf, dtype=la.dtype)
    for h in range(heads):
        for i in range(n):
            for t in range(columns.shape[1]):
                if mask[i, t]:
                    out[h, i, t] = torch.logsumexp(la[h, i] + lb[h, columns[i, t]], dim=0)
    return out


@pytest.mark.parametrize(
    ("device", "n", "k", "path"),
    [  # the fastest path measured at each shape (10 heads, s = 21, forward and backward)
        ("cpu", 512, 20, "dense"),
        ("cpu", 512, 1000, "sampled"),
        ("cpu", 8192, 1000, "sampled"),
        ("cuda", 512, 1000, "dense"),
        ("cuda", 2048, 1000, "dense"),
        ("cuda", 8192, 20, "gathered"),
        ("cuda", 8192, 200, "gathered"),
        ("cuda", 8192, 1000, "sampled"),  # H200: 19.0 ms against gathered 104, dense 134
    ],
)
def test_listed_path_picks_the_measured_fastest(device, n, k, path):
    """The evaluation path of the listed products at the shapes benchmarks/bench_listed_paths.py
    measured (the CPU's on 2 cores, CUDA's on an H200); one or two listed columns take the
    exact log-sum-exp."""
    assert kernels._listed_path(torch.device(device), n, 21, k) == path
    assert kernels._listed_path(torch.device(device), n, 2, k) == "logsumexp"


@pytest.mark.parametrize("path", ["logsumexp", "dense", "sampled", "gathered"])
@pytest.mark.parametrize("scale", [1.0, 400.0])  # 400: products far below float32's range
def test_clusters_at_listed_columns_exact_with_underflow(path, scale, monkeypatch):
    """The listed columns of ``clusters_at`` equal a per-entry float64 log-sum-exp, values and
    gradients, on each evaluation path; in float32 with confident heads the products underflow
    and those entries are recomputed exactly (finite, to float32 rounding)."""
    monkeypatch.setattr(kernels, "_listed_path", lambda *args: path)
    g = torch.Generator().manual_seed(0)
    n, k = 60, 6
    logits = torch.randn(2, n, k, generator=g, dtype=torch.float64) * scale
    pair = torch.arange(n) // 2
    sample = torch.randint(0, n // 3, (n,), generator=g)
    columns, mask = kernels.positive_columns(pair, sample)
    assert not mask.all() and mask.any(dim=1).all()  # padded rows, as in a real batch
    z = logits.clone().requires_grad_(True)
    got = kernels.clusters_at(torch.log_softmax(z, -1), columns, mask)[..., :-1]
    z_ref = logits.clone().requires_grad_(True)
    want = _listed_reference(torch.log_softmax(z_ref, -1), columns, mask)
    listed = mask.expand_as(got)
    torch.testing.assert_close(got[listed], want[listed], rtol=1e-9, atol=1e-9)
    assert (got[~listed] == -math.inf).all()
    weights = torch.randn(got.shape, generator=g, dtype=torch.float64)
    (got.masked_fill(~listed, 0) * weights).sum().backward()
    (want.masked_fill(~listed, 0) * weights).sum().backward()
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-7, atol=1e-9)
    # float32: the shifted products of disagreeing confident rows underflow
    z32 = logits.float().requires_grad_(True)
    got32 = kernels.clusters_at(torch.log_softmax(z32, -1), columns, mask)[..., :-1]
    assert torch.isfinite(got32[listed]).all()
    torch.testing.assert_close(
        got32[listed].double(), want[listed].detach(), rtol=1e-5, atol=1e-4 * scale
    )
    got32.masked_fill(~listed, 0).sum().backward()
    assert torch.isfinite(z32.grad).all()
    if scale > 1:  # the case the exact fallback exists for
        assert (want[listed] < -200).any()


@pytest.mark.parametrize("path", ["dense", "sampled", "gathered"])
def test_clusters_at_listed_columns_float32_under_autocast_and_mixed_dtypes(path, monkeypatch):
    """bf16 autocast does not reach the products (they stay float32), and a float64 teacher of
    float32 heads is promoted as the log-sum-exp form promotes it."""
    monkeypatch.setattr(kernels, "_listed_path", lambda *args: path)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 64, 20, generator=g, dtype=torch.float64) * 3
    columns, mask = kernels.positive_columns(torch.arange(64) // 8)
    want = _listed_reference(torch.log_softmax(logits, -1), columns, mask)
    listed = mask.expand_as(want)
    la = torch.log_softmax(logits.float(), -1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = kernels.clusters_at(la, columns, mask)[..., :-1]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got[listed].double(), want[listed], rtol=1e-5, atol=1e-5)
    teacher = torch.log_softmax(logits, -1)
    mixed = kernels.clusters_at(la, columns, mask, teacher)[..., :-1]
    assert mixed.dtype == torch.float64
    torch.testing.assert_close(mixed[listed], want[listed], rtol=1e-5, atol=1e-5)


def _chain(z, block, dof, sigma, log_weights, exclude_self):
    """The kernels as autograd's chain of elementary ops (what the fused function replaces)."""
    centred = z - z.detach().mean(0, keepdim=True)
    a = centred[block]
    sq = (a[:, None, :] - centred[None, :, :]).pow(2).sum(-1)
    logits = -sq / (2 * sigma**2) if dof is None else -0.5 * (dof + 1) * torch.log1p(sq / dof)
    if log_weights is not None:
        logits = logits + log_weights
    if exclude_self:
        eye = torch.zeros_like(logits, dtype=torch.bool)
        eye.diagonal(offset=block.start).fill_(True)
        logits = logits.masked_fill(eye, -math.inf)
    return torch.log_softmax(logits, -1)


@pytest.mark.parametrize("dof", [None, 1.0, 3.5])
@pytest.mark.parametrize("block", [slice(0, 11), slice(3, 8)])
@pytest.mark.parametrize(
    "weighted, exclude_self", [(False, True), (False, False), (True, True), (True, False)]
)
def test_distance_kernels_values_and_gradients_match_autograd_in_float64(
    rng, dof, block, weighted, exclude_self
):
    """The fused Student-t / Gaussian kernel (a written-out backward) against autograd's chain
    of elementary ops and torch's gradcheck, in float64: any row block, weights, self entries."""
    z = torch.tensor(rng.normal(size=(11, 3)) * 2.0, requires_grad=True)
    rows = block.stop - block.start
    log_w = torch.tensor(rng.normal(size=(rows, 11))) if weighted else None
    sigma = 0.8

    def fused(z):
        if dof is None:
            return kernels.gaussian(
                z, sigma, rows=block, exclude_self=exclude_self, log_weights=log_w
            )
        return kernels.student_t(z, dof, rows=block, exclude_self=exclude_self, log_weights=log_w)

    got = fused(z)
    want = _chain(z, block, dof, sigma, log_w, exclude_self)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    weight = torch.tensor(rng.normal(size=(rows, 11)))
    finite = torch.isfinite(want)  # a loss reads the finite entries (p is 0 at the self ones)
    (g_got,) = torch.autograd.grad((got.where(finite, 0) * weight).sum(), z)
    (g_want,) = torch.autograd.grad((want.where(finite, 0) * weight).sum(), z)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda z: fused(z).where(finite, 0), (z,))


@pytest.mark.parametrize("dof", [None, 1.0])
def test_distance_kernels_match_autograd_in_float32(rng, dof):
    """In float32 (what training uses) the fused kernel and autograd's chain agree to
    float32 rounding, values and gradients, on a 300-point batch with a row block."""
    z = torch.tensor(rng.normal(size=(300, 2)) * 5.0, dtype=torch.float32, requires_grad=True)
    block = slice(40, 300)
    with kernels.autograd_chain():
        want = kernels.gaussian(z, rows=block) if dof is None else kernels.student_t(z, rows=block)
    got = kernels.gaussian(z, rows=block) if dof is None else kernels.student_t(z, rows=block)
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5)
    weight = torch.tensor(rng.normal(size=(260, 300)), dtype=torch.float32)
    (g_got,) = torch.autograd.grad((got.where(finite, 0) * weight).sum(), z)
    (g_want,) = torch.autograd.grad((want.where(finite, 0) * weight).sum(), z)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-4 * float(g_want.abs().max()))


def test_autograd_chain_gives_higher_order_gradients_and_torch_func(rng):
    """The fused kernel is differentiable once: create_graph raises an error that names the
    remedy. Inside kernels.autograd_chain() Hessians work, with the same values; torch.func
    takes autograd's chain by itself (torch.func.grad, inside the context or not)."""
    z = torch.tensor(rng.normal(size=(6, 2)), requires_grad=True)

    def loss(z):
        return kernels.student_t(z).diagonal(1).sum()

    with pytest.raises(RuntimeError, match="first-order backward only.*autograd_chain"):
        torch.autograd.grad(loss(z), z, create_graph=True)  # not a silently constant gradient
    (grad,) = torch.autograd.grad(loss(z), z)
    with kernels.autograd_chain():
        hessian = torch.autograd.functional.hessian(loss, z)
        func_grad = torch.func.grad(loss)(z.detach())
        torch.testing.assert_close(kernels.gaussian(z), kernels.gaussian(z.detach()))
    torch.testing.assert_close(torch.func.grad(loss)(z.detach()), func_grad)  # outside too
    step = 1e-6  # the Hessian against finite differences of the fused first-order gradient
    column = []
    for k in range(z.numel()):
        bump = torch.zeros(z.numel(), dtype=z.dtype)
        bump[k] = step
        plus = z.detach() + bump.view_as(z)
        minus = z.detach() - bump.view_as(z)
        gp = torch.autograd.grad(loss(plus.requires_grad_()), plus)[0]
        gm = torch.autograd.grad(loss(minus.requires_grad_()), minus)[0]
        column.append(((gp - gm) / (2 * step)).flatten())
    torch.testing.assert_close(
        hessian.reshape(12, 12), torch.stack(column, 1), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(func_grad, grad.detach())
    assert not kernels._CHAIN.on  # the context ends with its block


def test_distance_kernels_learned_weights_and_half_precision(rng):
    """Weights that need a gradient go through autograd's chain (their gradient checked by
    gradcheck); float16 embeddings are computed in float32 and get a float16 gradient;
    autocast does not reach the distances."""
    z = torch.tensor(rng.normal(size=(7, 2)), dtype=torch.float32, requires_grad=True)
    log_w = torch.zeros(7, 7, requires_grad=True)
    kernels.student_t(z, 1.0, log_weights=log_w).diagonal(1).sum().backward()
    assert log_w.grad is not None and log_w.grad.abs().sum() > 0
    z64 = z.detach().double()
    learned = torch.tensor(rng.normal(size=(7, 7)), requires_grad=True)
    off = ~torch.eye(7, dtype=torch.bool)
    assert torch.autograd.gradcheck(
        lambda w: kernels.student_t(z64, 2.0, log_weights=w)[off], (learned,)
    )
    half = z.detach().half().requires_grad_()
    out = kernels.gaussian(half)
    assert out.dtype == torch.float32
    out.diagonal(1).sum().backward()
    assert half.grad.dtype == torch.float16 and torch.isfinite(half.grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = kernels.student_t(z * 10.0)
    torch.testing.assert_close(inside, kernels.student_t(z * 10.0), rtol=0, atol=0)
    with pytest.raises(ValueError, match="block's shape"):
        kernels.student_t(z, log_weights=torch.zeros(3, 7))


def test_a_tiny_sigma_gives_the_nearest_neighbour_not_nan():
    """exp(-|d|^2 / (2 sigma^2)) for a sigma tiny against the distances: each row's mass goes
    to its nearest other point (its logit 0), where every logit was -inf and the row NaN."""
    z = torch.tensor([[0.0, 0.0], [10.0, 0.0], [30.0, 0.0], [30.0, 25.0]])
    for chain in (False, True):
        with kernels.autograd_chain() if chain else contextlib.nullcontext():
            log_q = kernels.gaussian(z, sigma=1e-19)
        assert not torch.isnan(log_q).any()
        assert log_q.exp().argmax(1).tolist() == [1, 0, 1, 2]
        torch.testing.assert_close(log_q.exp().sum(1), torch.ones(4))
    # a moderate sigma: the shift leaves the kernel as it was (float64 reference)
    zd = z.double()
    sq = torch.cdist(zd, zd) ** 2
    want = torch.log_softmax((-sq / (2 * 0.7**2)).fill_diagonal_(-math.inf), 1)
    torch.testing.assert_close(kernels.gaussian(zd, sigma=0.7), want)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda z: kernels.gaussian(z, sigma=1e-20), "sigma=1e-20 is too small for torch.float32"),
        (lambda z: kernels.gaussian(z * 1e20), "z's entries reach"),
        (lambda z: kernels.student_t(z * 1e20), "z's entries reach"),
        (lambda z: kernels.perplexity(z * 1e20, 2.0), "x's entries reach"),
        (lambda z: kernels.student_t(z, dof=1e-40), "dof=1e-40 is too small"),
        (lambda z: kernels.perplexity(z, 1.5, n_iter=0), "n_iter must be a positive integer"),
    ],
)
def test_kernel_scales_beyond_float32_are_named_not_nan(call, message):
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=message):
        call(z)


def test_numpy_scalars_are_kernel_parameters():
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(kernels.gaussian(z, sigma=np.float32(0.5)), kernels.gaussian(z, 0.5))
    torch.testing.assert_close(kernels.knn(z, np.int64(2)), kernels.knn(z, 2))
