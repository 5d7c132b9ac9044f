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
