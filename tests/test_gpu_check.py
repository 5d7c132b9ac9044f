"""benchmarks/gpu_check.sh runs end to end (tiny sizes on the CPU), so the GPU check a lent
machine runs is the script that CI ran."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_on_cpu(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 6)):
        for name in ("a", "b", "c"):
            folder = tmp_path / "images" / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    env = {
        **os.environ,
        "DEVICE": "cpu",
        "PY": sys.executable,
        "CIFAR": str(tmp_path / "images"),
    }
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert out.count("== bench_loss") == 2 and "bfloat16" in out
    assert "images/s" in out and "ms per step" in out and "gpu_check: done" in out
    assert "extract (small CNN): " in out and "extract (DINOv2 ViT-S/14)" in out
