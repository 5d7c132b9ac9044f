"""Evaluation metrics: Hungarian accuracy against brute force, cluster-size entropy."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from beyond_icon import metrics


@pytest.mark.parametrize("k", [2, 3, 4])
def test_hungarian_against_brute_force(k):
    rng = np.random.default_rng(k)
    for _ in range(20):
        labels, clusters = rng.integers(0, k, 30), rng.integers(0, k, 30)
        best = max(
            np.mean(np.array(perm)[clusters] == labels) for perm in itertools.permutations(range(k))
        )
        assert metrics.hungarian_accuracy(labels, clusters) == pytest.approx(best)
    assert metrics.hungarian_accuracy([0, 0, 1, 1], [1, 1, 0, 0]) == 1.0


def test_more_clusters_than_classes():
    assert metrics.hungarian_accuracy([0, 0, 1, 1], [0, 1, 2, 2]) == 0.75


def test_cluster_size_entropy():
    assert metrics.cluster_size_entropy([0, 1, 2, 3] * 5, 4) == pytest.approx(1.0)
    assert metrics.cluster_size_entropy([2] * 10, 4) == 0.0
    assert str(metrics.cluster_size_entropy([2] * 10, 4)) == "0.0"  # not -0.0 in metrics.json
    sizes = np.array([6, 3, 1])
    share = sizes / sizes.sum()
    want = -(share * np.log(share)).sum() / math.log(5)  # two empty clusters of five
    assert metrics.cluster_size_entropy(np.repeat([0, 1, 4], sizes), 5) == pytest.approx(want)
    with pytest.raises(ValueError, match="in \\[0, 3\\)"):
        metrics.cluster_size_entropy([0, 3], 3)


def test_hungarian_accuracy_takes_any_integer_ids():
    # -1 (noise) is a cluster of its own, not class 1 wrapped around; large ids allocate nothing
    assert metrics.hungarian_accuracy([0, 1, -1, -1], [0, 1, 1, 1]) == 0.75
    assert metrics.hungarian_accuracy([0, 0, 1, 1], [0, 0, 10**12, 10**12]) == 1.0
    assert metrics.hungarian_accuracy([0.0, 0.0, 1.0, 1.0], [5, 5, 7, 7]) == 1.0  # integral floats
    for labels, clusters, message in (
        ([[0, 1], [1, 0]], [[1, 0], [0, 1]], "1-D"),
        ([0, 0, 1, 1], [0.2, 0.9, 1.5, 1.1], "integer ids"),
        ([], [], "non-empty"),
    ):
        with pytest.raises(ValueError, match=message):
            metrics.hungarian_accuracy(labels, clusters)


def test_linear_probe_checks_its_inputs_and_is_repeatable():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    y = (x[:, 0] > 0).astype(int)
    first = metrics.linear_probe_accuracy(x, y, x, y, epochs=5)
    assert metrics.linear_probe_accuracy(x, y, x, y, epochs=5) == first  # seeded start
    assert metrics.linear_probe_accuracy(x, 5 * y - 1, x, 5 * y - 1, epochs=5) == first
    for kwargs, message in (
        (dict(train_x=x * np.nan), "train_x contains NaN"),
        (dict(batch_size=0), "batch_size must be a positive integer"),
        (dict(test_x=x[:0], test_y=y[:0]), "test_y must be a non-empty"),
        (dict(train_y=y + 0.5), "train_y must be integer ids"),
    ):
        args = dict(train_x=x, train_y=y, test_x=x, test_y=y) | kwargs
        with pytest.raises(ValueError, match=message):
            metrics.linear_probe_accuracy(**args)


def test_trustworthiness_checks_k_and_lengths():
    x = np.random.default_rng(0).normal(size=(20, 3))
    with pytest.raises(ValueError, match="k must be a positive integer"):
        metrics.trustworthiness(x, x[:, :2], k=0)
    with pytest.raises(ValueError, match="20 input points but 10 embedded"):
        metrics.trustworthiness(x, x[:10, :2])


def test_knn_accuracy_checks_its_inputs():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4))
    y = (x[:, 0] > 0).astype(int)
    assert metrics.knn_accuracy(x, y, x, y, k=1) == 1.0
    for kwargs, message in (
        (dict(test_x=x[:, :3]), "train_x has 4 features per row but test_x has 3"),
        (dict(test_y=y[:20]), r"test_x must have one row of features per label \(20\)"),
        (dict(train_x=x[:0]), r"train_x must have one row of features per label \(30\)"),
        (dict(train_x=x[:, :0]), r"train_x must have one row of features per label"),
        (dict(train_x=np.zeros(())), r"train_x must have one row of features per label"),
        (dict(test_x=x[:0], test_y=y[:0]), "test_y must be a non-empty"),
        (dict(train_x=x * np.inf), "train_x contains NaN or Inf"),
        (dict(train_y=y + 0.5), "train_y must be integer ids"),
        (dict(k=0), "k must be a positive integer"),
        (dict(metric="manhattan"), "metric must be 'euclidean' or 'cosine'"),
    ):
        args = dict(train_x=x, train_y=y, test_x=x, test_y=y) | kwargs
        with pytest.raises(ValueError, match=message):
            metrics.knn_accuracy(**args)


def test_linear_probe_names_a_feature_count_mismatch():
    x = np.random.default_rng(0).normal(size=(20, 3))
    y = np.arange(20) % 2
    with pytest.raises(ValueError, match="train_x has 3 features per row but test_x has 2"):
        metrics.linear_probe_accuracy(x, y, x[:, :2], y, epochs=1)


@pytest.mark.parametrize("score", [metrics.nmi, metrics.adjusted_rand])
def test_partition_scores_refuse_empty_mismatched_or_non_integer_ids(score):
    y = np.array([0, 0, 1, 1])
    assert score(y, np.array([5, 5, -1, -1])) == 1.0  # any integer ids
    with pytest.raises(ValueError, match="labels must be a non-empty 1-D array"):
        score(np.array([], dtype=int), np.array([], dtype=int))
    with pytest.raises(ValueError, match="4 labels but 3 cluster assignments"):
        score(y, y[:3])
    with pytest.raises(ValueError, match="clusters must be integer ids"):
        score(y, y + 0.5)


def test_cluster_size_entropy_refuses_non_integer_ids():
    with pytest.raises(ValueError, match="clusters must be integer ids"):
        metrics.cluster_size_entropy(np.array([0.2, 1.7, 1.0]), 2)
    with pytest.raises(ValueError, match="clusters must be a non-empty"):
        metrics.cluster_size_entropy(np.array([], dtype=int), 2)
    with pytest.raises(ValueError, match="n_clusters must be an integer >= 2"):
        metrics.cluster_size_entropy(np.array([0, 1]), 2.5)


def test_embedding_pieces_counts_separate_clumps_and_ignores_scale():
    rng = np.random.default_rng(0)
    centres = np.stack(np.meshgrid(np.arange(7), np.arange(7)), -1).reshape(-1, 2) * 100.0
    # uniform squares: a Gaussian clump's stray points may stand apart, pieces of their own
    clumps = (centres[:, None, :] + rng.uniform(size=(49, 40, 2))).reshape(-1, 2)
    ids = metrics.embedding_pieces(clumps)
    assert ids.max() + 1 == 49
    truth = np.repeat(np.arange(49), 40)
    assert metrics.adjusted_rand(truth, ids) == 1.0  # each clump one piece, whole
    assert np.array_equal(metrics.embedding_pieces(clumps * 1e-3), ids)  # scale-free
    assert np.array_equal(metrics.embedding_pieces(clumps * 1e4), ids)


def test_embedding_pieces_keeps_a_continuous_sheet_whole():
    sheet = np.random.default_rng(1).uniform(size=(3000, 2))
    ids = metrics.embedding_pieces(sheet)
    assert np.bincount(ids).max() >= 0.99 * len(sheet)  # a stray point or two at most
    two = np.concatenate([sheet, sheet + [5.0, 0.0]])  # two sheets, a gap of 4 widths
    assert metrics.embedding_pieces(two).max() + 1 <= 4
    assert set(np.unique(metrics.embedding_pieces(two)[:3000])).isdisjoint(
        metrics.embedding_pieces(two)[3000:]
    )


def test_embedding_pieces_of_copies_and_bad_input():
    copies = np.repeat(np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]]), 20, axis=0)
    ids = metrics.embedding_pieces(copies)  # the spacing is 0: each distinct point a piece
    assert ids.max() + 1 == 3 and len(set(ids[:20])) == 1
    with pytest.raises(ValueError, match="more than k"):
        metrics.embedding_pieces(np.zeros((10, 2)))
    with pytest.raises(ValueError, match="non-finite"):
        metrics.embedding_pieces(np.full((20, 2), np.nan))
    with pytest.raises(ValueError, match="k must be"):
        metrics.embedding_pieces(copies, k=0)
    with pytest.raises(ValueError, match="factor must be"):
        metrics.embedding_pieces(copies, factor=0.0)


def _same_partition(a, b) -> bool:
    return metrics.adjusted_rand(a, b) == 1.0 and a.max() == b.max()


def test_embedding_pieces_merged_in_blocks_equal_the_whole_graph(monkeypatch):
    """Dense clumps (most pairs joined) are merged block by block to bound the memory: the
    same pieces as the graph built at once."""
    rng = np.random.default_rng(2)
    clumps = np.concatenate(
        [rng.normal(size=(300, 2)) * 1e-3 + [10.0 * i, 0.0] for i in range(3)]
        + [rng.uniform(size=(600, 2)) * 40.0]  # a sheet that sets the spacing, strays too
    )
    whole = metrics.embedding_pieces(clumps)
    monkeypatch.setattr(metrics, "PIECES_MAX_PAIRS", 0)
    for block in (1, 500, 10_000):
        monkeypatch.setattr(metrics, "_PIECES_BLOCK_PAIRS", block)
        assert _same_partition(metrics.embedding_pieces(clumps), whole), block


def test_embedding_pieces_follow_k_and_factor():
    rng = np.random.default_rng(3)
    two = np.concatenate([rng.uniform(size=(200, 2)), rng.uniform(size=(200, 2)) + [1.5, 0.0]])
    # the squares' gap is 0.5, about 5 times the median distance to the 10th neighbour
    assert metrics.embedding_pieces(two, factor=2.0).max() + 1 >= 2
    assert metrics.embedding_pieces(two, factor=20.0).max() + 1 == 1
    assert metrics.embedding_pieces(two, k=10).max() + 1 >= 2
    assert metrics.embedding_pieces(two, k=150).max() + 1 == 1  # a wider spacing joins them
    with pytest.raises(ValueError, match="factor must be"):
        metrics.embedding_pieces(two, factor=True)
    with pytest.raises(ValueError, match="factor must be"):
        metrics.embedding_pieces(two, factor="2")
    with pytest.raises(ValueError, match="real numbers"):
        metrics.embedding_pieces(two.astype(complex))
