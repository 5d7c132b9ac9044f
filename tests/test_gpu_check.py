"""benchmarks/gpu_check.sh runs end to end (tiny sizes on the CPU), so the GPU check a lent
machine runs is the script that CI ran."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _smoke(script: str, **env: str) -> str:
    """Run ``benchmarks/SCRIPT --smoke`` on the CPU with this interpreter; its stdout."""
    done = subprocess.run(
        ["bash", f"benchmarks/{script}", "--smoke"],
        cwd=ROOT,
        env={**os.environ, "DEVICE": "cpu", "PY": sys.executable, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_gpu_check_smoke_on_cpu(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 22), ("test", 11)):  # the smoke run asks for 64 and 32
        for name in ("a", "b", "c"):
            folder = tmp_path / "images" / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    out = _smoke("gpu_check.sh", CIFAR=str(tmp_path / "images"))
    assert out.count("== bench_loss") == 2 and "bfloat16" in out
    assert "images/s" in out and "ms per step" in out and "gpu_check: done" in out
    assert "extract (small CNN): " in out and "extract (DINOv2 ViT-S/14)" in out


def test_gpu_sne_cluster_smoke_on_cpu(tmp_path):
    """benchmarks/gpu_sne_cluster.sh (the GPU check of issues 10 and 11) runs end to end at tiny
    sizes, and each stage leaves its rows in OUTDIR."""
    out = _smoke("gpu_sne_cluster.sh", OUTDIR=str(tmp_path))
    assert out.count(" ratio") == 2 and "mining: 2000 x 16" in out
    assert "backbone=cnn" in out and "gpu_sne_cluster: done" in out
    for name in ("cluster_step_mix0", "cluster_step_mix0.75", "sne_10k_kl", "sne_10k_bounded"):
        assert (tmp_path / f"{name}.json").is_file(), name
    kl = json.loads((tmp_path / "sne_10k_kl.json").read_text())
    assert [row["method"].split("; ")[1] for row in kl] == [
        "n_steps=20)",
        "n_steps=20, backbone=cnn)",
        "n_steps=20, batch_size=128)",
    ]
