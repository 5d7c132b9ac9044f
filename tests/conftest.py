from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

# Under pytest-xdist (``make test`` runs ``-n auto``) every worker is a process of its own:
# each takes its share of the cores, for its torch and for the processes its tests start, so
# that two workers on 2 cores do not run 4 threads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    _threads = max(1, (_cores or 1) // _workers)
    torch.set_num_threads(_threads)
    os.environ["OMP_NUM_THREADS"] = str(_threads)


def load_benchmark(name: str) -> ModuleType:
    """A script of ``benchmarks/`` imported as a module (the folder is not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_distributions(
    rng: np.random.Generator, n: int, m: int, zero_fraction: float = 0.0
) -> np.ndarray:
    """Rows of a random (n, m) stochastic matrix; about ``zero_fraction`` of entries are 0."""
    x = rng.gamma(0.7, size=(n, m))
    if zero_fraction:
        x[rng.random((n, m)) < zero_fraction] = 0.0
        empty = x.sum(1) == 0
        x[empty, 0] = 1.0
    return x / x.sum(1, keepdims=True)


def to_log(p: np.ndarray) -> torch.Tensor:
    with np.errstate(divide="ignore"):
        return torch.tensor(np.log(p), dtype=torch.float64)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _private_home(tmp_path_factory, monkeypatch):
    """Neighbour caches (~/.cache/beyond-icon) go to a temporary home, never the user's."""
    monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], nproc: int = 2):
    """Run ``python -m beyond_icon ARGS`` under torchrun with ``nproc`` gloo processes."""
    import subprocess
    import sys

    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port of its own: no race between parallel test workers
        "--nproc_per_node",
        str(nproc),
        "-m",
        "beyond_icon",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


RUN_FILES = ("config.yaml", "metrics.json", "history.csv", "checkpoint.pt")


def run_task(args: list[str], out, files: tuple[str, ...] = ()) -> dict:
    """``beyond-icon ARGS --out OUT --quiet`` must succeed and write the files every run folder
    holds plus ``files``; returns its metrics.json."""
    import json

    from beyond_icon.cli import main

    assert main([*args, "--out", str(out), "--quiet"]) == 0
    for name in RUN_FILES + tuple(files):
        assert (out / name).is_file(), name
    return json.loads((out / "metrics.json").read_text())
