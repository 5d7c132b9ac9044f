"""benchmarks/sne_cells.py: the votes inside the cells of a fitted ParametricSNE, on digits."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_benchmark
from sklearn.datasets import load_digits
from sklearn.neighbors import KNeighborsClassifier

from beyond_icon import metrics
from beyond_icon.parametric_sne import ParametricSNE


@pytest.fixture(scope="module")
def cells():
    return load_benchmark("sne_cells")


@pytest.fixture(scope="module")
def split():
    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    return x[:600], y[:600], x[600:900], y[600:900]


@pytest.fixture(scope="module")
def fitted(split):
    # 12 cells of about 50 points, of several digits each: the votes inside a cell differ (with
    # 60 cells of 10 points every vote gave the same label)
    return ParametricSNE(n_cells=12, n_steps=40, random_state=0, device="cpu").fit(split[0])


def test_votes_match_plain_classifiers(cells, split, fitted):
    x, y, xt, yt = split
    result = cells.cell_votes(fitted, x, y, xt, yt)
    emb = metrics.knn_accuracy(fitted.embedding_, y, fitted.transform(xt), yt, k=5)
    assert result["knn5"] == pytest.approx(emb)
    z, c = cells.network_inputs(fitted, x)
    zt, ct = cells.network_inputs(fitted, xt)
    assert set(c) <= set(range(12)) and len(z) == len(x)
    plain = KNeighborsClassifier(5, algorithm="brute").fit(z, y).score(zt, yt)
    assert result["votes"]["inputs_all"] == pytest.approx(plain)
    assert 0.0 <= result["all_five"] <= result["own_cell"] <= 1.0
    assert result["voted"] == 1.0  # every test point's cell holds training points
    assert 1 <= result["pieces"] <= len(x) and 1 <= result["piece_size"] <= len(x)


def test_votes_inside_cells_match_a_point_by_point_reference(cells, split, fitted):
    """Each test point on its own: its cell's training points, the 5 nearest of them in the
    embedding and in the inputs, their vote, and the cell's majority."""
    x, y, xt, yt = split
    result = cells.cell_votes(fitted, x, y, xt, yt)
    z, c = cells.network_inputs(fitted, x)
    zt, ct = cells.network_inputs(fitted, xt)
    e, et = fitted.embedding_, fitted.transform(xt)
    hits = {"embedding": 0, "inputs": 0, "majority": 0}
    for i in range(len(xt)):
        members = np.flatnonzero(c == ct[i])
        k = min(5, len(members))
        for name, train, point in (("embedding", e, et[i]), ("inputs", z, zt[i])):
            nearest = members[np.argsort(((train[members] - point) ** 2).sum(1), kind="stable")]
            hits[name] += np.bincount(y[nearest[:k]], minlength=10).argmax() == yt[i]
        hits["majority"] += np.bincount(y[members], minlength=10).argmax() == yt[i]
    for name, count in hits.items():
        assert result["votes"][name] == pytest.approx(count / len(xt)), name
    own = np.mean(
        [(c[np.argsort(((e - p) ** 2).sum(1))[:5]] == ct[i]).mean() for i, p in enumerate(et)]
    )
    assert result["own_cell"] == pytest.approx(own)


def test_a_map_that_keeps_the_inputs_votes_as_the_inputs_do(cells, split, fitted, monkeypatch):
    """With the network's inputs as the embedding, the vote of the 5 nearest inside a cell is
    the input space's, and the plain 5-NN is the input space's 5-NN."""
    x, y, xt, yt = split
    kept = cells.network_inputs(fitted, x)[0]
    monkeypatch.setattr(fitted, "embedding_", kept)
    monkeypatch.setattr(fitted, "transform", lambda new: cells.network_inputs(fitted, new)[0])
    result = cells.cell_votes(fitted, x, y, xt, yt)
    votes = result["votes"]
    assert votes["embedding"] == votes["inputs"]
    assert result["knn5"] == pytest.approx(votes["inputs_all"])
    # inside cells of about 50 points the votes are not all the same one
    assert len({votes[k] for k in ("inputs", "random", "majority")}) > 1


def test_an_estimator_without_cells_is_refused(cells, split):
    x = split[0]
    plain = ParametricSNE(n_cells=0, n_steps=5, random_state=0, device="cpu").fit(x)
    with pytest.raises(ValueError, match="no cells"):
        cells.network_inputs(plain, x)
