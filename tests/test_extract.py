"""beyond-icon extract: features from a frozen encoder, written for embeddings:PATH."""

from __future__ import annotations

import numpy as np
import torch

from beyond_icon.cli import main

ENCODER = """
import torch
def make():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16))
"""


def test_extract_with_a_local_encoder(tmp_path):
    (tmp_path / "enc.py").write_text(ENCODER)
    out = tmp_path / "emb.npz"
    code = main(
        [
            "extract",
            "--encoder",
            f"{tmp_path / 'enc.py'}:make",
            "--data",
            "digits",
            "--out",
            str(out),
            "--batch-size",
            "500",
            "--quiet",
        ]
    )
    assert code == 0
    emb = np.load(out)
    assert emb["x_train"].shape == (1347, 16) and emb["x_test"].shape == (450, 16)
    assert (
        main(
            [
                "cluster",
                "--data",
                f"embeddings:{out}",
                "--n-steps",
                "1",
                "--kmeans-init",
                "1",
                "--out",
                str(tmp_path / "r"),
                "--quiet",
            ]
        )
        == 0
    )


def test_extract_unknown_or_unreachable_encoder(tmp_path, capsys, monkeypatch):
    assert (
        main(
            ["extract", "--encoder", "resnet", "--data", "digits", "--out", str(tmp_path / "x.npz")]
        )
        == 2
    )
    assert "unknown encoder" in capsys.readouterr().err

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load", offline)
    assert (
        main(
            [
                "extract",
                "--encoder",
                "dinov2_vits14",
                "--data",
                "digits",
                "--out",
                str(tmp_path / "x.npz"),
            ]
        )
        == 2
    )
    assert "module:factory" in capsys.readouterr().err
