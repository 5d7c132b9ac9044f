"""Loading a user's object named ``path/to/file.py:NAME`` or ``package.module:NAME``."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

_FILE_MODULES: dict[tuple[str, int], object] = {}


def load_object(spec: str, what: str) -> object:
    """The attribute ``NAME`` of the file or module in ``spec``; clear errors otherwise."""
    if ":" not in spec:
        raise ValueError(f"{what} must be given as path.py:NAME or module:NAME, got {spec!r}")
    target, name = spec.rsplit(":", 1)
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{what} file {path} does not exist")
        # a file runs once per process while it is unchanged, like an imported module: a sweep
        # loads it when planning and again for each run, and a file that registers its
        # divergence itself would otherwise find the name taken the second time
        key = (str(path.resolve()), path.stat().st_mtime_ns)
        module = _FILE_MODULES.get(key)
        if module is None:
            module_spec = importlib.util.spec_from_file_location(
                f"beyond_icon_user_{path.stem}", path
            )
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            _FILE_MODULES[key] = module
    else:
        module = importlib.import_module(target)
    if not hasattr(module, name):
        raise ValueError(f"{target} defines no {name!r} ({what})")
    return getattr(module, name)
