"""``make dist``'s wheel installs into a fresh virtual environment and runs from there."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(command, **kwargs):
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-2000:])
    return done


def test_wheel_installs_into_a_fresh_venv_and_runs(tmp_path):
    pytest.importorskip("build", reason="the build package is part of the dev install")
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT)])
    wheels, sdists = list(dist.glob("*.whl")), list(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1
    fresh = tmp_path / "fresh"
    _run([sys.executable, "-m", "venv", "--without-pip", str(fresh)])
    python = fresh / "bin" / "python"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            str(wheels[0]),
        ]
    )
    # the dependencies (torch, numpy, ...) are borrowed from this environment without
    # reinstalling them; its editable beyond_icon is not (a .pth path is not a site dir)
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    Path(site.stdout.strip(), "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    where = _run([str(python), "-c", "import beyond_icon; print(beyond_icon.__file__)"])
    assert where.stdout.strip().startswith(str(fresh))
    cli = fresh / "bin" / "beyond-icon"
    assert "sne" in _run([str(cli), "--help"]).stdout
    run = [str(cli), "cluster", "--data", "digits", "--n-steps", "5", "--kmeans-init", "1"]
    _run([*run, "--out", str(tmp_path / "run"), "--quiet"])
    assert (tmp_path / "run" / "metrics.json").is_file()
