"""Make a checkout's virtual environment work wherever the checkout is copied or moved.

``pip install -e .`` writes two absolute paths into the environment: the first line of
``bin/beyond-icon`` (this environment's python, where it was made) and the ``.pth`` file that
puts ``src/`` on the path. A checkout copied with its ``.venv`` to another folder or machine
then fails before any of its code runs: the script's interpreter is not there
(``FileNotFoundError``), and ``python -m beyond_icon`` finds no module. This rewrites both to
paths relative to the environment itself:

- the ``.pth`` line becomes ``src/``'s path relative to ``site-packages`` (``site`` reads
  relative lines from there);
- ``bin/beyond-icon`` becomes a shell line that starts the ``python`` beside it, then the CLI.

The environment's ``bin/python`` links to the base interpreter by its absolute path, which
is the same on every machine of one image.

    python tools/relocatable_venv.py .venv src
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

LAUNCHER = """#!/bin/sh
'''exec' "$(dirname -- "$(readlink -f -- "$0")")/python" "$0" "$@"
' '''
# beyond-icon's launcher, made by tools/relocatable_venv.py: the python beside this file
# (beside its target, when started through a link), whatever folder the environment was
# copied or moved to
import sys

from beyond_icon.cli import main

if __name__ == "__main__":
    sys.exit(main())
"""


def make_relocatable(venv: Path, src: Path) -> list[Path]:
    """Rewrite the environment's editable ``.pth`` and its ``beyond-icon`` script.

    Parameters
    ----------
    venv : Path
        The virtual environment (``.venv``).
    src : Path
        The checkout's ``src/`` folder, which holds ``beyond_icon``.

    Returns
    -------
    list of Path
        The files rewritten.

    Raises
    ------
    FileNotFoundError
        No editable ``.pth`` of beyond_icon in the environment, or no ``bin/beyond-icon``.
    """
    venv, src = venv.resolve(), src.resolve()
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    found = sorted(site.glob("__editable__*beyond_icon*.pth"))
    script = venv / "bin" / "beyond-icon"
    if not found or not script.is_file():
        raise FileNotFoundError(
            f"{venv} holds no editable install of beyond_icon (run pip install -e . first)"
        )
    for pth in found:
        # setuptools' default (lenient) editable install: one line, the path of src/
        line = pth.read_text().strip()
        if "\n" in line or line.startswith("import") or Path(site, line).resolve() != src:
            raise ValueError(f"{pth} is not a one-line path to {src}: {line[:80]!r}")
        pth.write_text(os.path.relpath(src, site) + "\n")
    script.write_text(LAUNCHER)
    script.chmod(0o755)
    return [*found, script]


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python tools/relocatable_venv.py VENV SRC")
    for path in make_relocatable(Path(sys.argv[1]), Path(sys.argv[2])):
        print(f"relocatable: {path}")
