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


def test_batch_norm_trains_the_cells_mlp_with_its_maps(gap, monkeypatch, capsys):
    """``--batch-norm`` swaps in BatchNorm subclasses of the MLP and the CellMLP that take
    every other parameter of theirs (the cells' maps among them), and reports the row."""
    import sys

    import torch

    from beyond_icon import data, parametric_sne

    # main swaps the module's classes: restored after the test
    monkeypatch.setattr(parametric_sne, "MLP", parametric_sne.MLP)
    monkeypatch.setattr(parametric_sne, "CellMLP", parametric_sne.CellMLP)
    digits = data.load("digits")
    monkeypatch.setattr(gap.data, "load", lambda name: digits)
    fitted, fit = [], parametric_sne.ParametricSNE.fit
    monkeypatch.setattr(
        parametric_sne.ParametricSNE, "fit", lambda self, x: fitted.append(self) or fit(self, x)
    )
    settings = ["n_steps=3", "batch_size=100", "perplexity=10", 'device="cpu"']
    argv = ["sne_train_gap.py", "--n", "300", "--batch-norm"]
    monkeypatch.setattr(sys, "argv", argv + [a for s in settings for a in ("--set", s)])
    gap.main()
    body = fitted[0].model_[2]
    assert body.local_dims == 5 and len(body.landmarks) == 60  # the default cells and maps
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in body.modules())
    assert "BatchNorm; transform" in capsys.readouterr().out
