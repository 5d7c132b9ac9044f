"""ParametricSNE and the sne command on tiny data."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

import beyond_icon as bi
from beyond_icon import data
from beyond_icon.cli import main


@pytest.fixture(scope="module")
def digits():
    return data.load("digits").subset(300, 100)


def test_estimator_round_trip(digits):
    est = bi.ParametricSNE(
        epochs=2, batch_size=100, perplexity=10, divergence="jsd", random_state=3
    )
    emb = est.fit_transform(digits.x_train)
    assert emb.shape == (300, 2) and np.isfinite(emb).all()
    assert len(est.history_) == 6 and {"loss", "grad_norm"} <= set(est.history_[0])
    unseen = est.transform(digits.x_test)
    assert unseen.shape == (100, 2) and np.isfinite(unseen).all()
    again = bi.ParametricSNE(
        epochs=2, batch_size=100, perplexity=10, divergence="jsd", random_state=3
    )
    np.testing.assert_allclose(again.fit_transform(digits.x_train), emb, rtol=1e-5, atol=1e-6)
    other = bi.ParametricSNE(
        epochs=2, batch_size=100, perplexity=10, divergence="jsd", random_state=4
    )
    assert not np.allclose(other.fit_transform(digits.x_train), emb)


def test_estimator_student_t_and_vectors():
    x = np.random.default_rng(0).normal(size=(120, 7)).astype(np.float32)
    est = bi.ParametricSNE(
        kernel="student_t", epochs=1, batch_size=60, perplexity=5, n_components=3
    )
    assert est.fit_transform(x).shape == (120, 3)
    assert est.pca_ is None and est.get_params()["kernel"] == "student_t"


def test_training_lowers_the_loss(digits):
    est = bi.ParametricSNE(epochs=8, batch_size=100, perplexity=10, divergence="tv", random_state=0)
    est.fit(digits.x_train)
    losses = [h["loss"] for h in est.history_]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.02


@pytest.mark.parametrize(
    "x, params, message",
    [
        (np.full((20, 4), np.nan), {}, "NaN"),
        (np.zeros((1, 4)), {}, "at least 3 samples"),
        (np.zeros((20, 4)), {"perplexity": 20.0}, "perplexity 20 needs batches"),
        (np.zeros((20, 4)), {"kernel": "cauchy"}, "kernel"),
        (np.zeros((20, 4)), {"divergence": "nope"}, "unknown divergence"),
        (np.zeros(20), {}, "X must be"),
    ],
)
def test_bad_input(x, params, message):
    with pytest.raises(ValueError, match=message):
        bi.ParametricSNE(**{"epochs": 1, "perplexity": 5.0, **params}).fit(x)


def test_transform_before_fit_and_wrong_shape(digits):
    with pytest.raises(RuntimeError, match="not fitted"):
        bi.ParametricSNE().transform(digits.x_test)
    est = bi.ParametricSNE(epochs=1, batch_size=100, perplexity=5).fit(digits.x_train)
    with pytest.raises(ValueError, match="sample shape"):
        est.transform(np.zeros((3, 64), dtype=np.float32))


def test_cli_writes_every_file(tmp_path):
    out = tmp_path / "run"
    code = main(
        [
            "sne",
            "--data",
            "digits",
            "--n-train",
            "200",
            "--n-test",
            "80",
            "--epochs",
            "2",
            "--batch-size",
            "100",
            "--perplexity",
            "10",
            "--divergence",
            "hellinger",
            "--kernel",
            "student_t",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    for name in (
        "config.yaml",
        "metrics.json",
        "history.csv",
        "embedding.png",
        "grad_norm.png",
        "embedding.npz",
        "checkpoint.pt",
    ):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"knn_acc", "trustworthiness", "silhouette", "train_time_s", "knn_acc_10"} <= set(
        metrics
    )
    assert 0 <= metrics["knn_acc"] <= 1 and 0 <= metrics["trustworthiness"] <= 1
    with open(out / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and float(rows[0]["grad_norm"]) > 0
    emb = np.load(out / "embedding.npz")
    assert emb["test"].shape == (80, 2)
    assert "divergence: hellinger" in (out / "config.yaml").read_text()


def test_cli_config_file_and_errors(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("task: sne\ndata: simplex:4\nepochs: 1\nbatch_size: 120\nperplexity: 5\n")
    assert main(["sne", "--config", str(config), "--out", str(tmp_path / "r"), "--quiet"]) == 0
    assert "data: simplex:4" in (tmp_path / "r" / "config.yaml").read_text()
    config.write_text("task: sne\nbogus: 1\n")
    assert main(["sne", "--config", str(config), "--out", str(tmp_path / "r2"), "--quiet"]) == 2
    assert "unknown sne option(s): bogus" in capsys.readouterr().err
    assert main(["sne", "--data", "nope", "--out", str(tmp_path / "r3"), "--quiet"]) == 2
