"""The supcon task and command on tiny data."""

from __future__ import annotations

import json

import numpy as np
from conftest import run_task
from PIL import Image

from beyond_icon.cli import main
from beyond_icon.tasks import supcon


def _image_folder(root):
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("test", 3)):
        for c, name in enumerate(("red", "green", "blue")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 60, (16, 16, 3)).astype(np.uint8)
                pixels[..., c] += 150
                Image.fromarray(pixels).save(folder / f"{i}.jpg")


def test_cli_on_image_folder(tmp_path):
    _image_folder(tmp_path / "imgs")
    out = tmp_path / "run"
    metrics = run_task(
        [
            "supcon",
            "--data",
            f"imagefolder:{tmp_path / 'imgs'}",
            "--epochs",
            "2",
            "--batch-size",
            "12",
            "--divergence",
            "tv",
            "--probe-epochs",
            "5",
            "--knn-k",
            "3",
        ],
        out,
        ("training.png", "features.npz"),
    )
    assert {"linear_probe_acc", "knn_acc", "train_time_s", "images_per_s"} <= set(metrics)
    history = (out / "history.csv").read_text().splitlines()
    assert history[0].split(",")[:6] == ["epoch", "step", "loss", "grad_norm", "lr", "time"]
    assert len(history) == 1 + 2 * 2


def test_cli_on_digits_cosine(tmp_path):
    code = main(
        [
            "supcon",
            "--data",
            "digits",
            "--n-train",
            "200",
            "--n-test",
            "100",
            "--epochs",
            "2",
            "--batch-size",
            "64",
            "--metric",
            "cosine",
            "--divergence",
            "kl",
            "--probe-epochs",
            "20",
            "--out",
            str(tmp_path / "d"),
            "--quiet",
        ]
    )
    assert code == 0
    metrics = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert metrics["knn_acc"] > 0.5  # 10 classes: chance is 0.1


def test_resume_gives_the_same_final_metrics(tmp_path):
    config = supcon.SupConConfig(
        data="digits",
        n_train=120,
        n_test=60,
        epochs=3,
        batch_size=40,
        divergence="hellinger",
        probe_epochs=10,
        device="cpu",
    )
    full = supcon.run(config, out=tmp_path / "full", verbose=False)
    # an interrupted run: the first epoch only, as a crash would leave it
    from beyond_icon import train

    original = train.fit

    def one_epoch(*args, **kwargs):
        return original(*args, **kwargs, stop_after_epochs=1)

    supcon.fit = one_epoch
    try:
        supcon.run(config, out=tmp_path / "cut", verbose=False)
    finally:
        supcon.fit = original
    resumed = supcon.run(config, out=tmp_path / "cut", resume=True, verbose=False)
    for key in ("linear_probe_acc", "knn_acc"):
        assert resumed.metrics[key] == full.metrics[key]
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]


def test_singleton_classes_single_view_vs_two_views():
    """With two views every sample has a positive even if its class appears once."""
    import pytest
    import torch

    from beyond_icon.methods import SupCon

    z, y = torch.randn(5, 8), torch.arange(5)
    with pytest.raises(ValueError, match="no mass"):
        SupCon("tv")(z, y)
    assert SupCon("tv")(torch.randn(5, 2, 8), y).isfinite()


def test_knn_k_is_checked_before_training(tmp_path, capsys):
    from beyond_icon.cli import main

    code = main(["supcon", "--data", "digits", "--knn-k", "0", "--out", str(tmp_path / "r")])
    assert code == 2 and "knn_k must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "r" / "checkpoint.pt").exists()  # nothing was trained


def test_defaults_reach_a_stated_quality_on_digits():
    """Every default (JSD, Euclidean kernel, the small CNN, 20 epochs) on the bundled digits:
    the frozen features separate the classes (measured: linear probe 0.989, 7-NN 0.993)."""
    result = supcon.run(supcon.SupConConfig(data="digits", device="cpu"), verbose=False)
    assert result.metrics["linear_probe_acc"] >= 0.95
    assert result.metrics["knn_acc"] >= 0.95


def test_a_divergence_infinite_where_p_is_zero_needs_debias():
    """SupCon's p is zero between classes: Jeffreys would train on a finite stand-in."""
    import pytest

    from beyond_icon.tasks import supcon

    config = supcon.SupConConfig(data="simplex:3", divergence="jeffreys", epochs=1)
    with pytest.raises(ValueError, match="'jeffreys' is infinite where p = 0 < q"):
        supcon.run(config, verbose=False)


def test_options_that_cannot_apply_are_refused_in_one_line(tmp_path):
    import pytest

    for options, message in (
        ({"flip": True}, "flip applies to grey images; simplex3 holds vectors of 2 features"),
        ({"debias": 1.0}, r"debias must be a number in \[0, 1\)"),
    ):
        config = supcon.SupConConfig(data="simplex:3", epochs=1, **options)
        with pytest.raises(ValueError, match=message):
            supcon.run(config, out=tmp_path / "run", verbose=False)
        assert not (tmp_path / "run" / "config.yaml").exists()  # refused before the claim
