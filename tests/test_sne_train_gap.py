"""benchmarks/sne_train_gap.py's free embedding started from a given embedding, on digits."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_benchmark
from sklearn.datasets import load_digits


@pytest.fixture(scope="module")
def gap():
    return load_benchmark("sne_train_gap")


def test_free_embedding_from_a_start_starts_there_and_reports_each_quarter(
    gap, capsys, monkeypatch
):
    from beyond_icon import methods

    seen, forward = [], methods.SNE._forward_fitted

    def recording(self, z, indices, exaggeration):
        seen.append(exaggeration)
        return forward(self, z, indices, exaggeration)

    monkeypatch.setattr(methods.SNE, "_forward_fitted", recording)
    x, y = load_digits(return_X_y=True)
    x, y = x[:300].astype(np.float32), y[:300]
    start = np.random.default_rng(0).normal(size=(300, 2)).astype(np.float32)
    kept = gap.free_embedding(x, 8, 1e-9, start=start, labels=y)
    # Adam moves a coordinate by at most about lr a step: the start itself, barely moved
    np.testing.assert_allclose(kept, start, rtol=0, atol=1e-6)
    assert capsys.readouterr().out.count("train 5-NN (LOO)") == 4
    moved = gap.free_embedding(x, 8, 0.05, start=start)
    assert moved.shape == (300, 2) and np.isfinite(moved).all()
    assert np.abs(moved - start).max() > 0  # the loss moves it
    assert capsys.readouterr().out == ""  # no labels: nothing printed
    assert seen == [1.0] * 16  # a warm start: no early exaggeration
    gap.free_embedding(x, 8, 0.05)  # from the small PCA: exaggerated for the first quarter
    assert seen[16:] == [12.0, 12.0] + [1.0] * 6
