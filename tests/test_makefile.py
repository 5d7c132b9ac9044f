"""The Makefile's environment: a .venv that is not this checkout's is made again."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make")


def _dry_run(folder: Path) -> str:
    done = subprocess.run(
        ["make", "-n", "install"], cwd=folder, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _checkout_with_venv(tmp_path: Path, python: str) -> Path:
    """A checkout whose .venv was made elsewhere: a fresh stamp, scripts that start
    ``python``, and no beyond_icon of this checkout's src/ on its path."""
    folder = tmp_path / "checkout"
    (folder / "src" / "beyond_icon").mkdir(parents=True)
    shutil.copy(ROOT / "Makefile", folder)
    (folder / "pyproject.toml").write_text("")
    (folder / "tools").mkdir()
    shutil.copy(ROOT / "tools" / "relocatable_venv.py", folder / "tools")
    bin_ = folder / ".venv" / "bin"
    bin_.mkdir(parents=True)
    os.symlink(python, bin_ / "python")
    (bin_ / "beyond-icon").write_text(f"#!{python}\n")
    stamp = folder / ".venv" / ".installed"
    stamp.touch()
    later = time.time() + 60
    os.utime(stamp, (later, later))  # newer than pyproject.toml: make would trust it
    return folder


def test_a_venv_moved_from_another_checkout_is_made_again(tmp_path):
    """Its python runs, but its editable install is another checkout's: before, the stamp
    stood and every command of the README failed with FileNotFoundError."""
    out = _dry_run(_checkout_with_venv(tmp_path, sys.executable))
    assert "-m venv --clear .venv" in out and "pip install -e" in out


def test_a_venv_whose_python_is_gone_is_made_again(tmp_path):
    out = _dry_run(_checkout_with_venv(tmp_path, str(tmp_path / "gone" / "python3")))
    assert "-m venv --clear .venv" in out


@pytest.mark.skipif(
    Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(),
    reason="the suite does not run in this checkout's .venv",
)
def test_this_checkouts_venv_is_trusted():
    assert "-m venv" not in _dry_run(ROOT)
