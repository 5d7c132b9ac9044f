"""benchmarks/bench_sne.py on tiny data: ours alone (no baselines needed), its JSON rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _command(divergences: str, calls: int, *extra: str) -> list[str]:
    """bench_sne.py on 200 / 100 digits, ours alone, 3 steps a fit."""
    return [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_sne.py"),
        *("--data", "digits", "--n-train", "200", "--n-test", "100", "--skip-baselines"),
        *("--divergences", divergences, "--set", "n_steps=3", "--transform-calls", str(calls)),
        *extra,
    ]


def test_bench_sne_times_every_transform_call_and_reports_the_median(tmp_path):
    out = tmp_path / "rows.json"
    command = _command("kl", 3, "--json", str(out))
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(out.read_text())
    calls = row["transform_calls_s"]
    assert len(calls) == 3 and row["transform_s"] == sorted(calls)[1]
    assert 0 <= row["knn5"] <= 1 and 0 <= row["trustworthiness"] <= 1
    assert 1 <= row["pieces"] <= 100 and 0 < row["largest_piece"] <= 1
    assert f"{row['pieces']} pieces" in done.stdout
    header, rule, line = done.stdout.strip().splitlines()[-3:]
    assert header.count("|") == rule.count("|") == line.count("|") == 8  # 7 columns
    assert line.endswith(f"| {row['pieces']} | {row['largest_piece']:.1%} |")
    assert "transform" in done.stdout and "ParametricSNE (kl; n_steps=3)" in done.stdout
    bad = subprocess.run(command[:2] + ["--transform-calls", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--transform-calls must be at least 1" in bad.stderr


def test_bench_sne_draws_every_method_into_the_plot(tmp_path):
    plot = tmp_path / "embeddings.png"
    command = _command("kl,tv", 1, "--plot", str(plot))
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    width, height = Image.open(plot).size
    assert width > 1.9 * height  # two panels side by side (one panel: 1.4)
    missing = command[:-1] + [str(tmp_path / "nowhere" / "embeddings.png")]
    bad = subprocess.run(missing, capture_output=True, text=True)
    assert bad.returncode == 2 and "--plot: no folder" in bad.stderr


def test_panel_titles_name_the_method():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_sne import _short
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert _short("beyond-icon ParametricSNE (kl; defaults)") == "ours (kl)"
    assert _short("beyond-icon ParametricSNE (tv; n_steps=3)") == "ours (tv), n_steps=3"
    assert _short("openTSNE (non-parametric; transform for test)") == "openTSNE"
    assert _short("UMAP (transform for test)") == "UMAP"
