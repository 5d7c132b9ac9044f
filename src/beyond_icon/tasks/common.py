"""What every task shares: loading the configured data, the run folder, timing."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from beyond_icon import data as data_registry
from beyond_icon.data import Dataset

__all__ = [
    "config_from_dict",
    "load_task_data",
    "prepare_run_dir",
    "register_divergence_module",
    "write_config",
]


def load_task_data(config: Any) -> Dataset:
    """The dataset named by ``config.data``, cut to ``n_train`` / ``n_test`` if set."""
    dataset = data_registry.load(config.data, data_dir=config.data_dir, download=config.download)
    if config.n_train or config.n_test:
        dataset = dataset.subset(config.n_train, config.n_test, seed=0)
    return dataset


def prepare_run_dir(out: str | Path | None) -> Path | None:
    if out is None:
        return None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def start(config: Any) -> Any:
    """Register the configured user divergence, resolve the device, and join the process
    group when launched by torchrun (several processes). Returns the device."""
    from beyond_icon.distributed import init_from_env
    from beyond_icon.train import resolve_device

    register_divergence_module(getattr(config, "divergence_module", None))
    device = resolve_device(config.device)
    init_from_env(device)
    return device


def write_config(config: Any, out: Path) -> None:
    """``config.yaml``: every field of the task's config dataclass, plus the task name
    (written by the main process only)."""
    from beyond_icon.distributed import is_main

    if not is_main():
        return
    fields = dataclasses.asdict(config)
    tmp = out / "config.yaml.tmp"
    tmp.write_text(yaml.safe_dump({"task": type(config).task, **fields}, sort_keys=False))
    tmp.replace(out / "config.yaml")


def config_from_dict(cls: type, values: dict) -> Any:
    """Build a task config from a dict, rejecting unknown keys with a clear message."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names - {"task"})
    if unknown:
        raise ValueError(
            f"unknown {cls.task} option(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}"
        )
    return cls(**{k: v for k, v in values.items() if k in names})


def register_divergence_module(spec: str | None) -> None:
    """Register a user's divergence (``path.py:NAME``) for this run, if one is configured."""
    if spec:
        from beyond_icon.divergences import register_module

        register_module(spec)
