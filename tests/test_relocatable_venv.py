"""tools/relocatable_venv.py: a .venv copied or moved with its checkout still runs the CLI."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location(
    "relocatable_venv", ROOT / "tools/relocatable_venv.py"
)
relocatable = importlib.util.module_from_spec(spec)
spec.loader.exec_module(relocatable)


def _checkout(tmp_path: Path) -> tuple[Path, Path]:
    """A checkout with a real venv (no pip) holding an editable install the way pip leaves
    it: a .pth with src/'s absolute path and a script whose first line is the venv's python.
    Its beyond_icon is a stub whose CLI prints where it was imported from."""
    folder = tmp_path / "before"
    package = folder / "src" / "beyond_icon"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "cli.py").write_text(
        "import sys\n\ndef main():\n    print('cli', __file__, sys.argv[1:])\n    return 3\n"
    )
    (package / "__main__.py").write_text("import sys\nfrom .cli import main\nsys.exit(main())\n")
    venv = folder / ".venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (site / "__editable__.beyond_icon-0.1.0.pth").write_text(str(folder / "src") + "\n")
    script = venv / "bin" / "beyond-icon"
    script.write_text(f"#!{venv / 'bin' / 'python'}\nprint('old')\n")
    script.chmod(0o755)
    return folder, venv


@pytest.mark.skipif(os.name != "posix", reason="a POSIX venv layout")
def test_a_moved_checkout_runs_its_cli_through_both_entry_points(tmp_path):
    folder, venv = _checkout(tmp_path)
    moved = tmp_path / "after"
    shutil.copytree(folder, moved, symlinks=True)
    old = subprocess.run([moved / ".venv/bin/python", "-m", "beyond_icon"], capture_output=True)
    assert b"No module named beyond_icon" not in old.stderr  # the old folder is still there
    shutil.rmtree(folder)
    with pytest.raises(FileNotFoundError):  # pip's script: its python's folder is gone
        subprocess.run([moved / ".venv/bin/beyond-icon"], capture_output=True)
    shutil.rmtree(moved)

    folder, venv = _checkout(tmp_path)
    written = relocatable.make_relocatable(venv, folder / "src")
    assert [p.name for p in written] == ["__editable__.beyond_icon-0.1.0.pth", "beyond-icon"]
    assert written[0].read_text() == "../../../../src\n"
    folder.rename(moved)  # moved, the old folder gone
    for command in (
        [moved / ".venv/bin/beyond-icon", "cluster", "--out", "x"],
        [moved / ".venv/bin/python", "-m", "beyond_icon", "cluster", "--out", "x"],
    ):
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert done.returncode == 3, done.stderr
        assert done.stdout.startswith(f"cli {moved / 'src'}") and "'--out', 'x'" in done.stdout
    link = tmp_path / "beyond-icon"  # started through a link elsewhere: its target's python
    link.symlink_to(moved / ".venv/bin/beyond-icon")
    assert subprocess.run([link], capture_output=True).returncode == 3


def test_refuses_what_it_does_not_know(tmp_path):
    folder, venv = _checkout(tmp_path)
    (venv / "bin" / "beyond-icon").unlink()
    with pytest.raises(FileNotFoundError, match="no editable install"):
        relocatable.make_relocatable(venv, folder / "src")
    folder, venv = _checkout(tmp_path / "strict")
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "__editable__.beyond_icon-0.1.0.pth").write_text("import __editable___finder\n")
    with pytest.raises(ValueError, match="not a one-line path"):
        relocatable.make_relocatable(venv, folder / "src")


def test_the_makefile_runs_it_after_the_editable_install():
    text = (ROOT / "Makefile").read_text()
    recipe = text[text.index("$(STAMP): pyproject.toml tools/relocatable_venv.py") :]
    assert (
        recipe.index('pip install -e ".[dev]"')
        < recipe.index("tools/relocatable_venv.py $(VENV) src")
        < recipe.index("touch $(STAMP)")
    )
