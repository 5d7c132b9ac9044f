"""The diagnostic of benchmarks/cluster_ceiling.py on data whose answer is known."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import cluster_ceiling  # noqa: E402


def test_three_separated_groups_are_pure_and_recovered(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 10
    y = np.repeat(np.arange(3), 60)
    x = centres[y] + rng.normal(size=(180, 16))
    np.savez(tmp_path / "blobs.npz", x=x.astype(np.float16), y=y)
    (row,) = cluster_ceiling.main(["--data", str(tmp_path / "blobs.npz")])
    assert row["purity@20"] == 1.0 and row["mutual_purity@20"] == 1.0
    for name in ("spectral", "kmeans", "linear"):
        assert row[f"{name}_acc"] == 1.0 and row[f"{name}_nmi"] > 0.999, name


def test_spectral_splits_two_disconnected_neighbourhoods():
    # two groups of 30 whose neighbour lists never leave the group
    rng = np.random.default_rng(1)
    neighbors = np.concatenate(
        [
            rng.permuted(np.tile(np.arange(30), (30, 1)), axis=1)[:, :5],
            30 + rng.permuted(np.tile(np.arange(30), (30, 1)), axis=1)[:, :5],
        ]
    )
    labels = cluster_ceiling.spectral(neighbors, 2)
    assert len(set(labels[:30])) == 1 and len(set(labels[30:])) == 1
    assert labels[0] != labels[30]
