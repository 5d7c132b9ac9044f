"""The documentation site builds with warnings as errors (a broken reference fails)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra is part of the dev install")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    pages = {p.parent.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("index.html")}
    for page in ("guides/sne", "guides/cluster", "guides/extract", "reference/divergences"):
        assert page in pages
    reference = (tmp_path / "reference" / "divergences" / "index.html").read_text()
    assert "f_divergence" in reference


# Every module with public API: numpydoc sections (Parameters, Returns) on what it exports
NUMPYDOC_MODULES = [
    "beyond_icon.divergences",
    "beyond_icon.kernels",
    "beyond_icon.loss",
    "beyond_icon.methods",
    "beyond_icon.affinity",
    "beyond_icon.sampling",
    "beyond_icon.parametric_sne",
    "beyond_icon.neighbors",
    "beyond_icon.extract",
    "beyond_icon.models",
    "beyond_icon.train",
    "beyond_icon.metrics",
    "beyond_icon.distributed",
    "beyond_icon.profiling",
    "beyond_icon.data.datasets",
    "beyond_icon.data.augment",
    "beyond_icon.tasks.common",
    "beyond_icon.tasks.sne",
    "beyond_icon.tasks.supcon",
    "beyond_icon.tasks.cluster",
]


def _public(module_name):
    import importlib
    import inspect

    module = importlib.import_module(module_name)
    for name in module.__all__:
        obj = getattr(module, name)
        if getattr(obj, "__module__", None) != module_name:
            continue
        if inspect.isclass(obj) and issubclass(obj, Exception):
            continue
        if inspect.isfunction(obj) or inspect.isclass(obj):
            yield name, obj


@pytest.mark.parametrize("module_name", NUMPYDOC_MODULES)
def test_public_api_has_numpydoc_sections(module_name):
    import dataclasses
    import inspect

    missing = []
    for name, obj in _public(module_name):
        doc = inspect.getdoc(obj) or ""
        if dataclasses.is_dataclass(obj):
            # a task config documents each field with option(default, help); a record, with
            # an Attributes section
            fields = dataclasses.fields(obj)
            if all(f.metadata.get("help") for f in fields) or "Attributes\n----------" in doc:
                continue
        target = obj.__init__ if inspect.isclass(obj) else obj
        params = [p for p in inspect.signature(target).parameters if p not in ("self", "cls")]
        if params and "Parameters\n----------" not in doc:
            missing.append(f"{name}: Parameters")
        returns = inspect.isfunction(obj) and inspect.signature(obj).return_annotation != "None"
        if returns and "Returns\n-------" not in doc and "Yields\n------" not in doc:
            missing.append(f"{name}: Returns")
    assert not missing, missing
