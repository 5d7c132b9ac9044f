"""``beyond-icon demo --quick``: every task x divergence x seed runs and the report is whole."""

from __future__ import annotations

from beyond_icon.cli import main


def test_quick_demo_writes_the_report(tmp_path):
    assert main(["demo", "--out", str(tmp_path), "--quick"]) == 0
    report = (tmp_path / "report.md").read_text()
    for task in ("cluster", "supcon", "sne"):
        assert f"## {task}" in report
        for divergence in ("kl", "tv", "jsd", "hellinger"):
            assert f"| {divergence} | 2 |" in report  # two seeds each
    assert "| k-means | 2 |" in report
    for line in report.splitlines():
        if line.startswith("!["):
            figure = line.split("(", 1)[1].rstrip(")")
            assert (tmp_path / figure).is_file(), figure
