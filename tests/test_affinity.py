"""PerplexityAffinity against a dense float64 reference; batches of p; the cache."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from beyond_icon.affinity import PerplexityAffinity, calibrate_perplexity


def _points(n=120, d=5, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(4, d))
    return (centres[rng.integers(0, 4, n)] + rng.normal(size=(n, d))).astype(np.float32)


def _reference_joint(x: np.ndarray, perplexity: float, k: int) -> np.ndarray:
    """t-SNE's P by brute force in float64: k nearest by Euclidean distance, a per-row
    bisection on beta over those k, then (P_{j|i} + P_{i|j}) / 2n."""
    x = x.astype(np.float64)
    n = len(x)
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    conditional = np.zeros((n, n))
    for i in range(n):
        nearest = np.argsort(d2[i], kind="stable")[:k]
        dist = d2[i, nearest]
        lo, hi = 1e-20, 1e20
        for _ in range(200):
            beta = math.sqrt(lo * hi)
            w = np.exp(-beta * (dist - dist.min()))
            p = w / w.sum()
            entropy = -(p[p > 0] * np.log(p[p > 0])).sum()
            if entropy > math.log(perplexity):
                lo = beta
            else:
                hi = beta
        conditional[i, nearest] = p
    return (conditional + conditional.T) / (2 * n)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    x = _points()
    return x, PerplexityAffinity(perplexity=10.0, cache_dir=tmp_path_factory.mktemp("c")).fit(x)


def test_matches_dense_float64_reference(fitted):
    x, affinity = fitted
    want = _reference_joint(x, 10.0, 30)
    got = affinity.P_.toarray()
    np.testing.assert_allclose(got, want, atol=1e-9, rtol=1e-6)
    np.testing.assert_allclose(got, got.T, atol=1e-15)  # symmetric
    assert got.sum() == pytest.approx(1.0, abs=1e-9)
    assert np.all(np.diag(got) == 0)


def test_calibration_hits_the_perplexity():
    rng = np.random.default_rng(1)
    d2 = rng.gamma(2.0, 3.0, size=(50, 40)) * 10 ** rng.uniform(-3, 3, size=(50, 1))
    p = calibrate_perplexity(np.sort(d2, axis=1), 12.0)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-12)
    entropy = -(p * np.log(np.where(p > 0, p, 1))).sum(1)
    np.testing.assert_allclose(np.exp(entropy), 12.0, rtol=1e-6)
    with pytest.raises(ValueError, match="perplexity 50 needs"):
        calibrate_perplexity(d2, 50.0)


def test_batch_rows_are_the_global_rows_restricted(fitted):
    _, affinity = fitted
    indices = np.array([3, 17, 4, 60, 61, 99, 100, 2])
    log_p = affinity.get_batch(torch.as_tensor(indices), dtype=torch.float64)
    dense = affinity.P_.toarray()[np.ix_(indices, indices)]
    has_mass = dense.sum(1) > 0
    want = dense[has_mass] / dense[has_mass].sum(1, keepdims=True)
    np.testing.assert_allclose(log_p[has_mass].exp().numpy(), want, atol=1e-12)
    assert torch.isneginf(log_p[~has_mass]).all()  # rows with no neighbour here: no mass
    assert torch.isneginf(log_p.diagonal()).all()
    np.testing.assert_allclose(
        affinity.batch_mass(indices), dense.sum(1) / affinity.row_mass_[indices]
    )
    full = affinity.get_batch(np.arange(affinity.n_samples_), dtype=torch.float64)
    rows = affinity.P_.toarray() / affinity.row_mass_[:, None]
    np.testing.assert_allclose(full.exp().numpy(), rows, atol=1e-12)


def test_sampled_neighbours_follow_p(fitted):
    _, affinity = fitted
    rng = np.random.default_rng(0)
    draws = affinity.sample_neighbors(np.array([5, 5]), 20000, rng).ravel()
    row = affinity.P_.getrow(5).toarray().ravel() / affinity.row_mass_[5]
    freq = np.bincount(draws, minlength=len(row)) / len(draws)
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(row))
    np.testing.assert_allclose(freq, row, atol=0.01)


def test_negative_weights_estimate_the_non_neighbour_normaliser(fitted):
    x, affinity = fitted
    n = affinity.n_samples_
    rng = np.random.default_rng(0)
    z = torch.as_tensor(x[:, :2], dtype=torch.float64)
    w = 1.0 / (1.0 + torch.cdist(z, z) ** 2)
    neighbour_all = torch.as_tensor(affinity.P_.toarray() > 0)
    w_far = w.masked_fill(neighbour_all, 0.0).fill_diagonal_(0.0)
    ratios = []
    for _ in range(300):
        batch = np.sort(rng.choice(n, 40, replace=False))
        log_c = affinity.negative_log_weights(batch, dtype=torch.float64)
        neighbour = torch.as_tensor(affinity.dense_batch(batch) > 0)
        assert torch.all(log_c[neighbour] == 0) and torch.all(log_c.diagonal() == 0)
        far = w[batch][:, batch].masked_fill(neighbour, 0.0).fill_diagonal_(0.0)
        estimate = (log_c.exp() * far).sum(1)  # the other points stand for all non-neighbours
        ratios.append(estimate / w_far[batch].sum(1))
    assert float(torch.cat(ratios).mean()) == pytest.approx(1.0, rel=0.05)
    half = affinity.negative_log_weights(np.arange(10), exaggeration=2.0, dtype=torch.float64)
    one = affinity.negative_log_weights(np.arange(10), dtype=torch.float64)
    off = one != 0
    np.testing.assert_allclose((one - half)[off].numpy(), math.log(2.0))


def test_batch_scope_weights_every_point_once(fitted):
    """scope="batch": q is the plain kernel over the batch (every log weight 0), exaggeration
    still divides the negatives; an unknown scope is a one-line error."""
    _, affinity = fitted
    batch = np.arange(0, 40, 2)
    plain = affinity.negative_log_weights(batch, scope="batch", dtype=torch.float64)
    assert torch.all(plain == 0)
    tripled = affinity.negative_log_weights(batch, 3.0, scope="batch", dtype=torch.float64)
    neighbour = torch.as_tensor(affinity.dense_batch(batch) > 0) | torch.eye(len(batch)).bool()
    assert torch.all(tripled[neighbour] == 0)
    np.testing.assert_allclose(tripled[~neighbour].numpy(), -math.log(3.0))
    with pytest.raises(ValueError, match="scope must be one of"):
        affinity.negative_log_weights(batch, scope="local")


def test_batch_matrices_are_made_on_the_requested_device(fitted):
    """get_batch and negative_log_weights build their (b, b) matrices where they are used: asked
    for the meta device, no (b, b) tensor is ever made on the CPU (only the stored entries and
    the b weights travel), and the result has the CPU result's shape and dtype."""
    from torch.utils._python_dispatch import TorchDispatchMode

    _, affinity = fitted
    batch = np.arange(0, 40, 2)
    b = len(batch)

    class SquareOnCpu(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.made = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.shape == (b, b) and t.device.type == "cpu":
                    self.made.append(str(func))
            return out

    for make in (
        lambda device: affinity.get_batch(batch, device=device),
        lambda device: affinity.negative_log_weights(batch, 2.0, device=device),
    ):
        here = make("cpu")
        with SquareOnCpu() as watch:
            there = make("meta")
        assert watch.made == []
        assert there.device.type == "meta"
        assert there.shape == here.shape == (b, b) and there.dtype == here.dtype == torch.float32


def test_cache_is_reused_and_a_corrupt_one_rebuilt(tmp_path):
    x = _points(80)
    first = PerplexityAffinity(perplexity=5.0, cache_dir=tmp_path).fit(x)
    assert not first.from_cache_
    files = list(tmp_path.glob("knn-*-euclidean-k15.npz"))
    assert len(files) == 1
    again = PerplexityAffinity(perplexity=5.0, cache_dir=tmp_path).fit(x)
    assert again.from_cache_
    np.testing.assert_array_equal(again.P_.toarray(), first.P_.toarray())
    files[0].write_bytes(files[0].read_bytes()[:100])  # truncated
    (tmp_path / ".leftover.tmp.npz").write_bytes(b"junk")  # a crashed writer's leftover
    with pytest.warns(UserWarning, match="damaged neighbour cache"):
        rebuilt = PerplexityAffinity(perplexity=5.0, cache_dir=tmp_path).fit(x)
    assert not rebuilt.from_cache_
    np.testing.assert_array_equal(rebuilt.P_.toarray(), first.P_.toarray())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert PerplexityAffinity(perplexity=5.0, cache_dir=tmp_path).fit(x).from_cache_


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="perplexity 50 needs more"):
        PerplexityAffinity(perplexity=50.0, cache_dir=tmp_path).fit(_points(40))
    # too few points, or more neighbours than there are other points: named for what they are
    with pytest.raises(ValueError, match="needs at least 2 points, got 1"):
        PerplexityAffinity(perplexity=1.0, cache_dir=tmp_path).fit(_points(1))
    with pytest.raises(ValueError, match=r"n_neighbors = 40 needs more than 40 points, got 30"):
        PerplexityAffinity(perplexity=3.0, cache_dir=tmp_path, n_neighbors=40).fit(_points(30))
    with pytest.raises(RuntimeError, match="not fitted"):
        PerplexityAffinity().get_batch(np.arange(3))
    fitted = PerplexityAffinity(perplexity=3.0, cache_dir=tmp_path, n_neighbors=9).fit(_points(30))
    with pytest.raises(ValueError, match="indices must be in"):
        fitted.get_batch(np.array([0, 30]))
    with pytest.raises(ValueError, match="1-D integer"):
        fitted.get_batch(np.array([0.0, 1.0]))


def test_a_batch_s_entries_travel_once_and_the_cache_is_not_pickled(fitted):
    """p and q of one batch share the slice of P and its entries' positions on the device (sent
    once, not once per matrix); a pickled affinity leaves that cache behind and still works."""
    import pickle

    _, affinity = fitted
    batch = np.arange(1, 41, 2)  # a batch no other test asked for
    log_p = affinity.get_batch(batch)
    log_c = affinity.negative_log_weights(batch, 2.0)
    cached = affinity._last_batch[2]
    assert list(cached) == ["cpu"]
    rows, cols = cached["cpu"]
    assert affinity._batch_entries(batch, "cpu")[1] is rows  # the same tensors, not new ones
    assert torch.isfinite(log_p[rows, cols]).all() and (log_c[rows, cols] == 0).all()
    copy = pickle.loads(pickle.dumps(affinity))
    assert copy._last_batch is None
    torch.testing.assert_close(copy.get_batch(batch), log_p)


def test_calibration_converges_in_a_few_newton_steps():
    """The safeguarded Newton meets the perplexity within 16 steps on rows of every scale,
    including one where plain Newton falls into a two-cycle (row 31,029 of the draw below);
    a row of equal distances, which no beta can calibrate, stays uniform."""
    rng = np.random.default_rng(1)
    shape = (60000, 90)
    d2 = np.sort(rng.gamma(2.0, 3.0, size=shape) * 10 ** rng.uniform(-3, 3, size=(60000, 1)), 1)
    rows = np.concatenate([d2[:2000], d2[31029:31030]])
    p = calibrate_perplexity(rows, 30.0, n_iter=16)
    entropy = -(p * np.log(np.where(p > 0, p, 1))).sum(1)
    np.testing.assert_allclose(np.exp(entropy), 30.0, rtol=1e-6)
    flat = calibrate_perplexity(np.ones((2, 40)), 30.0)
    np.testing.assert_allclose(flat, 1 / 40)


def test_affinity_parameters_and_batches_are_checked(tmp_path):
    x = _points(30)
    for kwargs, message in (
        (dict(perplexity=math.inf), "perplexity must be a finite number"),
        (dict(perplexity=3, n_neighbors=0), "n_neighbors must be a positive integer"),
    ):
        with pytest.raises(ValueError, match=message):
            PerplexityAffinity(cache_dir=tmp_path, **kwargs).fit(x)
    affinity = PerplexityAffinity(perplexity=np.float64(3), cache_dir=tmp_path).fit(x)
    with pytest.raises(ValueError, match="indices must be distinct"):
        affinity.get_batch([0, 1, 1, 2])
    with pytest.raises(ValueError, match="exaggeration must be a positive finite number"):
        affinity.negative_log_weights([0, 1, 2], exaggeration=math.inf)
    torch.testing.assert_close(  # a NumPy scalar is the number it holds
        affinity.negative_log_weights([0, 1, 2], exaggeration=np.float32(12.0)),
        affinity.negative_log_weights([0, 1, 2], exaggeration=12.0),
    )
    # anchors may repeat when neighbours are drawn for them
    drawn = affinity.sample_neighbors([0, 0, 3], 2, np.random.default_rng(0))
    assert drawn.shape == (3, 2)
