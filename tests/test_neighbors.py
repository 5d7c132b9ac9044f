"""Exact blocked neighbour search (cosine and Euclidean), the approximate backend, the cache."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from beyond_icon.neighbors import cached_neighbor_table, cached_neighbors, mine_neighbors


def test_cosine_matches_dense_exact_search():
    x = np.random.default_rng(0).normal(size=(257, 6)).astype(np.float32)
    got = mine_neighbors(x, 5, query_block=50, key_block=64)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    want = np.argsort(-sims, axis=1, kind="stable")[:, :5]
    assert np.array_equal(got, want)
    with pytest.raises(ValueError, match="n_neighbors"):
        mine_neighbors(x, 257)


def test_euclidean_matches_dense_float64_search():
    x = (np.random.default_rng(1).normal(size=(203, 7)) * 5 + 100).astype(np.float32)
    got, d2 = mine_neighbors(
        x, 6, metric="euclidean", query_block=40, key_block=64, return_distances=True
    )
    x64 = x.astype(np.float64)
    full = ((x64[:, None] - x64[None]) ** 2).sum(-1)
    np.fill_diagonal(full, np.inf)
    want = np.argsort(full, axis=1, kind="stable")[:, :6]
    assert np.array_equal(got, want)
    np.testing.assert_allclose(d2, np.take_along_axis(full, want, 1), rtol=1e-4, atol=1e-3)


def test_float16_memory_map_is_searched_in_its_dtype(tmp_path):
    """A float16 table (an extract folder) is mined through a memory map, block by block, and
    finds what the float32 search of the same values finds."""
    x = np.random.default_rng(2).normal(size=(300, 8)).astype(np.float16)
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    for metric in ("cosine", "euclidean"):
        got = mine_neighbors(mapped, 4, metric=metric, query_block=64, key_block=100)
        want = mine_neighbors(x.astype(np.float32), 4, metric=metric)
        assert np.array_equal(got, want)
    indices, _, _ = cached_neighbor_table(mapped, 4, tmp_path)
    assert np.array_equal(indices, mine_neighbors(x.astype(np.float32), 4))
    bad = x.copy()
    bad[7, 2] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        mine_neighbors(bad, 3, key_block=64)


def test_cache_reuse_truncation_and_damage(tmp_path):
    x = np.random.default_rng(1).normal(size=(60, 4)).astype(np.float32)
    first, cached = cached_neighbors(x, 5, tmp_path)
    assert not cached and len(list(tmp_path.glob("knn-*-cosine-k5.npz"))) == 1
    again, cached = cached_neighbors(x, 3, tmp_path)  # a smaller k reuses the table
    assert cached and np.array_equal(again, first[:, :3])
    (tmp_path / ".knn-leftover.123.tmp.npz").write_bytes(b"")  # a killed writer's temporary
    assert cached_neighbors(x, 5, tmp_path)[1]
    path = next(tmp_path.glob("knn-*-cosine-k5.npz"))
    foreign = np.zeros((60, 5), dtype=np.int64) + 60  # out of range
    np.savez(path, indices=foreign, values=np.zeros((60, 5), np.float32))
    with pytest.warns(UserWarning, match="damaged neighbour cache"):
        rebuilt, cached = cached_neighbors(x, 5, tmp_path)
    assert not cached and np.array_equal(rebuilt, first)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cached_neighbors(x, 5, tmp_path)[1]


def test_unwritable_cache_still_returns(tmp_path):
    x = np.random.default_rng(2).normal(size=(30, 3)).astype(np.float32)
    blocker = tmp_path / "file"
    blocker.write_text("")
    indices, values, cached = cached_neighbor_table(x, 4, blocker / "sub", metric="euclidean")
    assert indices.shape == values.shape == (30, 4) and not cached


def test_approximate_backend_agrees_on_easy_data(tmp_path):
    pytest.importorskip("pynndescent")
    x = np.random.default_rng(3).normal(size=(300, 5)).astype(np.float32)
    exact, _, _ = cached_neighbor_table(x, 8, tmp_path, metric="euclidean", method="exact")
    approx, d2, _ = cached_neighbor_table(x, 8, tmp_path, metric="euclidean", method="nndescent")
    assert approx.shape == (300, 8) and not (approx == np.arange(300)[:, None]).any()
    recall = np.mean([len(set(a) & set(e)) / 8 for a, e in zip(approx, exact)])
    assert recall > 0.95
    assert np.all(np.diff(d2, axis=1) >= -1e-4)  # nearest first


def test_bad_arguments():
    x = np.zeros((10, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="metric"):
        mine_neighbors(x, 2, metric="manhattan")
    with pytest.raises(ValueError, match="neighbor_method"):
        cached_neighbor_table(x, 2, metric="euclidean", method="faiss")
    with pytest.raises(ValueError, match="NaN"):
        mine_neighbors(np.full((5, 2), np.nan), 2)


def test_ties_resolve_to_the_lowest_indices_whatever_k():
    """Duplicate points tie exactly: the table for k is the first k columns of the table for a
    larger k (what the cache reuses), block sizes notwithstanding."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(40, 6)).astype(np.float32)
    x = np.concatenate([base, base[:10], base[:10], base[:5]])  # 25 duplicates
    for metric in ("cosine", "euclidean"):
        wide = mine_neighbors(x, 12, metric=metric, query_block=16, key_block=32)
        for k in (1, 2, 3, 5, 8):
            narrow = mine_neighbors(x, k, metric=metric, query_block=16, key_block=32)
            assert np.array_equal(narrow, wide[:, :k]), (metric, k)
        # a point's duplicates come first, lowest index first
        assert list(wide[0, :2]) == [40, 50]


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_ties_wider_than_the_margin_still_go_to_the_lowest_indices(metric):
    """150 copies of each of three points: each copy's k-th neighbour is tied with far more
    than TIE_MARGIN others. The table for k is the first k columns of a larger one (what the
    cache reuses) and holds the lowest-index copies."""
    rng = np.random.default_rng(0)
    copies = np.repeat(rng.normal(size=(3, 4)), 150, axis=0)
    x = np.concatenate([copies, rng.normal(size=(40, 4))]).astype(np.float32)
    order = rng.permutation(len(x))
    x = x[order]
    wide = mine_neighbors(x, 60, metric=metric, key_block=128)
    for k in (1, 5, 20):
        narrow = mine_neighbors(x, k, metric=metric, key_block=128)
        assert np.array_equal(narrow, wide[:, :k]), k
    group = np.flatnonzero(order < 150)  # the rows that are copies of the first point
    first = group[0]
    assert list(wide[first, :5]) == list(group[1:6])


def test_cache_prefers_the_exact_k_then_the_smallest_larger(tmp_path):
    """A lookup takes the table for exactly k when it exists, else the smallest larger one, in
    numeric order (as text, "k10" sorts before "k9")."""
    x = np.random.default_rng(1).normal(size=(60, 4)).astype(np.float32)
    for k in (9, 10, 12):  # each one larger than the last: all three are searched and stored
        assert not cached_neighbor_table(x, k, tmp_path)[2]
    for path in tmp_path.glob("knn-*.npz"):  # mark each file's values with its k
        with np.load(path) as table:
            indices, values = table["indices"], table["values"].copy()
        values[:, 0] = float(path.name.split("-k")[1][: -len(".npz")])
        np.savez(path, indices=indices, values=values)
    for k, expected in ((5, 9.0), (9, 9.0), (10, 10.0), (11, 12.0), (12, 12.0)):
        _, values, cached = cached_neighbor_table(x, k, tmp_path)
        assert cached and values[0, 0] == expected, (k, values[0, 0])


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_query_ranges_and_blocks_agree_and_never_return_self(metric):
    """A query range searched in small blocks equals those rows of the whole search; the self
    match (one diagonal of each block that holds it) is never returned."""
    x = np.random.default_rng(0).normal(size=(700, 16)).astype(np.float32)
    whole = mine_neighbors(x, 7, metric=metric)
    blocked = mine_neighbors(x, 7, metric=metric, query_block=64, key_block=100)
    part = mine_neighbors(
        x, 7, metric=metric, query_block=50, key_block=128, queries=slice(130, 377)
    )
    np.testing.assert_array_equal(blocked, whole)
    np.testing.assert_array_equal(part, whole[130:377])
    assert (whole != np.arange(700)[:, None]).all()


@pytest.mark.parametrize("queries", [slice(0, 6, 2), slice(5, 2)])
def test_queries_must_be_a_contiguous_forward_slice(queries):
    x = np.random.default_rng(0).normal(size=(12, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="queries"):
        mine_neighbors(x, 2, queries=queries)
    # an empty share (a rank of a sharded search over fewer points than ranks) is a (0, k) table
    assert mine_neighbors(x, 2, queries=slice(3, 3)).shape == (0, 2)


def test_an_approximate_table_is_reused_for_its_own_k_only(tmp_path):
    """An approximate search for a larger k is not the search for k: reusing it would make a
    run's neighbours depend on the runs before it."""
    from beyond_icon.neighbors import _lookup, _store

    indices = np.tile(np.arange(1, 11), (12, 1)) % 12
    values = np.ones((12, 10), dtype=np.float32)
    for key in ("knn-v2-abc-cosine-approx", "knn-v2-abc-cosine"):
        _store(tmp_path, key, 10, indices, values)
        assert _lookup(tmp_path, key, 12, 10) is not None
    assert _lookup(tmp_path, "knn-v2-abc-cosine-approx", 12, 5) is None
    assert _lookup(tmp_path, "knn-v2-abc-cosine", 12, 5)[0].shape == (12, 5)


def test_tables_cached_before_ties_were_ordered_are_not_read(tmp_path):
    x = np.random.default_rng(2).normal(size=(30, 3)).astype(np.float32)
    indices, values, cached = cached_neighbor_table(x, 4, tmp_path)
    assert not cached
    (path,) = tmp_path.glob("knn-v2-*.npz")
    path.rename(tmp_path / path.name.replace("knn-v2-", "knn-"))  # the old name
    assert not cached_neighbor_table(x, 4, tmp_path)[2]
