"""``beyond-icon demo --quick``: every task x divergence x seed runs and the report is whole."""

from __future__ import annotations

import shutil

import pytest

from beyond_icon.cli import main

# Both tests start from one quick demo (about 40 s on 2 cores), on one pytest-xdist worker.
pytestmark = pytest.mark.xdist_group("demo")


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as patch:  # set up before conftest's private home
        patch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
        assert main(["demo", "--out", str(out), "--quick"]) == 0
    return out


def test_quick_demo_writes_the_report(quick_demo):
    tmp_path = quick_demo
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


def test_demo_sets_aside_runs_made_under_other_defaults(quick_demo, tmp_path, capsys):
    """A demo folder from an earlier version (its runs made under a default that changed since)
    is moved aside, not mixed into the report and not deleted; the demo starts that task anew."""
    import yaml

    tmp_path = tmp_path / "demo"
    shutil.copytree(quick_demo, tmp_path)  # a finished quick demo, as a user would have it
    config = next((tmp_path / "cluster" / "runs").glob("*/config.yaml"))
    saved = yaml.safe_load(config.read_text())
    saved["neighbor_mix"] = 0.0  # the cluster task's default before 0.75
    config.write_text(yaml.safe_dump(saved))
    assert main(["demo", "--out", str(tmp_path), "--quick"]) == 0
    aside = list(tmp_path.glob("*.before-*"))
    assert [p.name.split(".")[0] for p in aside] == ["cluster"]  # supcon and sne stay
    assert (aside[0] / "runs").is_dir()
    assert "moved to" in capsys.readouterr().out
    report = (tmp_path / "report.md").read_text()
    assert "## cluster" in report
    # supcon's and sne's 16 runs were reused: the wall time says it is this invocation's
    assert "Wall time of this invocation:" in report and "16 of the 24 runs reused" in report
    assert (tmp_path / "cluster" / "sweep.yaml").is_file()
    # a setting the demo itself chooses (--quick's n_steps against a full demo's) is not a
    # changed default: refused as before, nothing moved
    config = next((tmp_path / "cluster" / "runs").glob("*/config.yaml"))
    saved = yaml.safe_load(config.read_text())
    saved["n_steps"] = 3000
    config.write_text(yaml.safe_dump(saved))
    assert main(["demo", "--out", str(tmp_path), "--quick"]) == 2
    err = capsys.readouterr().err
    assert "holds a full demo's runs (n_steps differ)" in err, err
    assert "give this demo another --out, or run it without --quick" in err
    assert len(list(tmp_path.glob("*.before-*"))) == 1
