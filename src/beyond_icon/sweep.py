"""Sweeps: one task over divergences x seeds, resumable, optionally in parallel processes.

Layout of a sweep folder::

    DIR/sweep.yaml            task, divergences, seeds and the options first passed
    DIR/runs/<name>_s<seed>/  one run folder per (divergence, seed), as the task writes it
    DIR/results.csv           one row per finished run, every metric
    DIR/results.md            divergence x metric, mean +- std over seeds, best marked
    DIR/*.png                 bar chart; for sne also the embedding grid and gradient norms

A run is finished when its ``metrics.json`` exists (every task writes it last, atomically, after
all its other files); re-running the sweep skips finished runs and resumes unfinished ones from
their last checkpoint. Each run is done under a lock (``runs/<name>/.lock``, released when its
process ends), so a second sweep over the same folder skips the runs the first is doing. A row is
a divergence or a baseline loss (:data:`BASELINES`; the command line takes them apart with
``--baselines``): for the cluster task ``pmi`` is TEMI's loss (``loss=pmi``), and k-means is
reported as a row.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import importlib
import json
import math
import os
import re
import sys
import zipfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm.auto import tqdm

from beyond_icon import report

__all__ = ["BASELINES", "RunSpec", "aggregate", "build_report", "plan", "run_sweep"]

# (metric, higher is better) shown in the tables, per task
TABLE_METRICS = {
    "sne": [
        ("knn_acc", True),
        ("trustworthiness", True),
        ("silhouette", True),
        ("grad_norm_peak_ratio", False),
        ("train_time_s", False),
    ],
    "supcon": [("linear_probe_acc", True), ("knn_acc", True), ("train_time_s", False)],
    "cluster": [
        ("acc", True),
        ("nmi", True),
        ("ari", True),
        ("cluster_size_entropy", True),
        ("train_time_s", False),
    ],
}
BAR_METRICS = {
    "sne": ["knn_acc", "trustworthiness", "silhouette"],
    "supcon": ["linear_probe_acc", "knn_acc"],
    "cluster": ["acc", "nmi", "ari"],
}


#: The losses a sweep can run beside the divergences, per task (a row each).
BASELINES = {"cluster": ("pmi",)}


def task_module(task: str):
    if task not in TABLE_METRICS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TABLE_METRICS)}")
    return importlib.import_module(f"beyond_icon.tasks.{task}")


def config_class(task: str) -> type:
    module = task_module(task)
    return next(
        v
        for v in vars(module).values()
        if isinstance(v, type) and dataclasses.is_dataclass(v) and getattr(v, "task", None) == task
    )


def run_name(divergence: str, seed: int) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in divergence)
    return f"{safe}_s{seed}"


@dataclass(frozen=True)
class RunSpec:
    task: str
    divergence: str
    seed: int
    options: dict
    folder: str

    def config(self) -> Any:
        from beyond_icon.tasks.common import config_from_dict

        values = dict(self.options, seed=self.seed)
        if self.task == "cluster" and self.divergence == "pmi":
            values["loss"] = "pmi"
        else:
            values["divergence"] = self.divergence
        return config_from_dict(config_class(self.task), values)

    @property
    def finished(self) -> bool:
        return (Path(self.folder) / "metrics.json").is_file()


def plan(
    task: str, divergences: list[str], seeds: list[int], options: dict, out: str | Path
) -> list[RunSpec]:
    """The runs of a sweep; also writes (or checks) ``sweep.yaml``."""
    if not divergences or not seeds:
        raise ValueError("a sweep needs at least one divergence and one seed")
    # the registry takes names in any case: kl and KL are one divergence, one run folder
    divergences = [d.strip().lower() for d in divergences]
    if len(set(divergences)) != len(divergences) or len(set(seeds)) != len(seeds):
        raise ValueError("divergences and seeds must not repeat (names in any case)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    options = {k: v for k, v in options.items() if k not in ("seed", "divergence")}
    record = {
        "task": task,
        "divergences": list(divergences),
        "seeds": list(seeds),
        "options": options,
    }
    path = out / "sweep.yaml"
    if path.is_file():
        previous = read_record(out)
        if previous["task"] != task:
            raise ValueError(
                f"{out} holds a sweep of {previous['task']}, not {task}; use a new --out"
            )
        if _any_trained(out):  # the options the runs were made with, as first passed
            record["options"] = previous.get("options", options)
        record["divergences"] = list(dict.fromkeys(previous["divergences"] + list(divergences)))
        record["seeds"] = list(dict.fromkeys(previous["seeds"] + list(seeds)))
    specs = [
        RunSpec(task, d, s, options, str(out / "runs" / run_name(d, s)))
        for d in divergences
        for s in seeds
    ]
    from beyond_icon.tasks.common import register_divergence_module

    register_divergence_module(options.get("divergence_module"))
    # fail before any training if a divergence is unknown or an option has the wrong type;
    # the checks that need the data (ranges against its size) come at each run's start
    for spec in specs:
        spec.config()
        if not (task == "cluster" and spec.divergence == "pmi"):
            from beyond_icon import divergences as registry

            registry.get(spec.divergence)
    _check_earlier_runs(specs[0], out)
    _write_text(path, yaml.safe_dump(record, sort_keys=False))
    return specs


def _write_text(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (a temporary file, then a rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _any_trained(out: Path) -> bool:
    """Whether a run of the sweep folder has finished or written a checkpoint."""
    from beyond_icon.train import CHECKPOINT

    return any(
        (folder / name).is_file()
        for folder in (out / "runs").glob("*")
        for name in ("metrics.json", CHECKPOINT)
    )


def read_record(out: str | Path) -> dict:
    """``sweep.yaml`` of a sweep folder, checked: ``task``, ``divergences`` and ``seeds``.

    Raises
    ------
    ValueError
        The file is damaged (an interrupted write of an old version, an edit), naming it.
    """
    path = Path(out) / "sweep.yaml"
    remedy = (
        "delete it and rerun the sweep command with the divergences and seeds you want in the "
        "table (finished runs are kept)"
    )
    try:
        record = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid YAML ({_first_line(error)}): {remedy}") from None
    if not record:
        raise ValueError(f"{path} is empty: {remedy}")
    if not isinstance(record, dict):
        raise ValueError(f"{path} is not a mapping: {remedy}")
    fields = {"task": str, "divergences": list, "seeds": list}
    bad = [k for k, kind in fields.items() if not isinstance(record.get(k), kind)]
    if bad:
        raise ValueError(f"{path} lacks {', '.join(bad)}: {remedy}")
    return record


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _check_earlier_runs(spec: RunSpec, out: Path) -> None:
    """Refuse a sweep folder whose runs were made with other settings, defaults included.

    The settings are compared once resolved, each finished or checkpointed run's
    ``config.yaml`` (every setting) against the new runs' config: a default that changed
    since (the SNE's ``q_scope``, the cluster task's ``neighbor_mix``) would otherwise mix runs
    of two methods in one table, while a setting that does not define a run (the device, where
    the data sit, evaluation-only fields such as ``kmeans_init``) may differ. A key that a run's
    ``config.yaml`` lacks was added later, with that run's behaviour as its default, unless
    :data:`train.LEGACY_SETTINGS` records the old behaviour. The divergence and seed differ by
    design; so does ``loss`` for the cluster task's ``pmi`` baseline runs.
    """
    from beyond_icon.tasks.common import config_from_dict, identity
    from beyond_icon.train import (
        CHECKPOINT,
        LEGACY_SETTINGS,
        earlier_recipe,
        setting_differences,
    )

    def resolved(config) -> dict:
        # through YAML, as config.yaml was written, so that tuples compare equal to lists
        return yaml.safe_load(yaml.safe_dump(identity(config)))

    cls = config_class(spec.task)
    # the settings of a divergence's run (a pmi baseline spec would carry loss: pmi)
    now = resolved(config_from_dict(cls, dict(spec.options, seed=spec.seed)))
    defaults = resolved(cls())
    for path in sorted((out / "runs").glob("*/config.yaml")):
        folder = path.parent
        if not any((folder / name).is_file() for name in ("metrics.json", CHECKPOINT)):
            continue  # a run that stopped before training (a bad option): nothing to mix
        written = yaml.safe_load(path.read_text()) or {}
        # the identity's keys of config.yaml (it holds every field); one it lacks was added
        # later with its default, except a legacy one (setting_differences gives its old value)
        saved = {
            k: written.get(k, defaults[k]) for k in now if k in written or k not in LEGACY_SETTINGS
        }
        expected = dict(now)
        if spec.task == "cluster" and re.fullmatch(r"pmi_s-?\d+", folder.name):
            expected["loss"] = "pmi"  # a baseline run beside the divergences
        shown = setting_differences(saved, expected, ignore=("divergence", "seed"))
        if shown:
            remedy = (
                "use a new --out (an earlier recipe of the method cannot be run again)"
                if earlier_recipe(shown)
                else "use a new --out, or pass the earlier values"
            )
            raise SettingsChanged(
                f"{out} holds runs made with other settings ({', '.join(shown)}, in "
                f"{folder.name}); their results would mix with these in one table: {remedy}",
                keys=[line.split(":", 1)[0] for line in shown],
            )


class SettingsChanged(ValueError):
    """A sweep folder holds runs made with other settings (a changed default included);
    ``keys`` names the settings that differ."""

    def __init__(self, message: str, keys: list[str]):
        super().__init__(message)
        self.keys = list(keys)


class RunBusy(RuntimeError):
    """Another process (a second sweep over the same folder) holds this run's lock."""


@contextlib.contextmanager
def run_lock(folder: Path):
    """An exclusive lock on ``folder/.lock`` for the life of this process's work on the run.

    ``fcntl.flock`` locks die with their process, so a killed sweep never leaves a stale lock.
    Raises :class:`RunBusy` when another process holds it. (No locking where fcntl is missing.)
    """
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    with open(folder / ".lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunBusy(f"{folder.name} is being run by another process; skipped") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _execute(spec: RunSpec, threads: int | None) -> dict:
    import torch

    from beyond_icon.tasks.common import register_divergence_module
    from beyond_icon.train import CHECKPOINT

    if threads:
        torch.set_num_threads(threads)
    config = spec.config()
    register_divergence_module(getattr(config, "divergence_module", None))
    with run_lock(Path(spec.folder)):
        if spec.finished:  # finished by another sweep while this one was planning
            return json.loads((Path(spec.folder) / "metrics.json").read_text())
        # an interrupted run goes on from its checkpoint; one that never saved starts afresh
        # (without a "no checkpoint" warning for every new run of the sweep)
        resume = (Path(spec.folder) / CHECKPOINT).is_file()
        task = task_module(spec.task)
        result = task.run(config, out=spec.folder, resume=resume, verbose=False)
    return result.metrics


def run_sweep(specs: list[RunSpec], jobs: int = 1, verbose: bool = True) -> list[RunSpec]:
    """Run the unfinished specs (``jobs`` processes); returns the specs that failed."""
    todo = [s for s in specs if not s.finished]
    bar = tqdm(
        total=len(specs),
        initial=len(specs) - len(todo),
        desc="sweep",
        unit="run",
        disable=not verbose,
        dynamic_ncols=True,
    )
    failed: list[RunSpec] = []
    if jobs <= 1:
        for spec in todo:
            bar.set_postfix_str(Path(spec.folder).name)
            try:
                _execute(spec, None)
            except RunBusy as busy:
                tqdm.write(str(busy), file=sys.stderr)
            except (ValueError, RuntimeError) as error:
                tqdm.write(f"run {Path(spec.folder).name} failed: {error}", file=sys.stderr)
                failed.append(spec)
            bar.update(1)
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        import multiprocessing

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_execute, spec, threads): spec for spec in todo}
            for future in as_completed(futures):
                spec = futures[future]
                try:
                    future.result()
                except RunBusy as busy:
                    tqdm.write(str(busy), file=sys.stderr)
                except (ValueError, RuntimeError) as error:
                    tqdm.write(f"run {Path(spec.folder).name} failed: {error}", file=sys.stderr)
                    failed.append(spec)
                bar.set_postfix_str(Path(spec.folder).name)
                bar.update(1)
    bar.close()
    return failed


# ------------------------------------------------------------------------------- aggregation


def _load_runs(out: Path) -> tuple[dict, list[dict]]:
    record = read_record(out)
    rows = []
    for divergence in record["divergences"]:
        for seed in record["seeds"]:
            folder = out / "runs" / run_name(divergence, seed)
            if (folder / "metrics.json").is_file():
                metrics = _read_metrics(folder / "metrics.json")
                rows.append({"divergence": divergence, "seed": seed, "run": folder.name, **metrics})
    return record, rows


def _read_metrics(path: Path) -> dict:
    """A run's ``metrics.json``; a damaged one is named, with the way to redo the run."""
    remedy = f"delete {path.parent} and rerun the sweep to redo that run"
    try:
        metrics = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({_first_line(error)}): {remedy}") from None
    if not isinstance(metrics, dict):
        raise ValueError(f"{path} holds a {type(metrics).__name__}, not metrics: {remedy}")
    return metrics


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation; the latter is NaN for one value (undefined), and
    the tables show it as a dash."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else math.nan


def aggregate(out: str | Path) -> tuple[str, list[dict], dict]:
    """(task, rows of results.csv, {row name: {metric: (mean, std, n)}}) of the finished runs."""
    out = Path(out)
    if not (out / "sweep.yaml").is_file():
        raise FileNotFoundError(f"{out} is not a sweep folder (no sweep.yaml)")
    record, rows = _load_runs(out)
    task = record["task"]
    if task not in TABLE_METRICS:
        raise ValueError(
            f"{out / 'sweep.yaml'} names task {task!r}; known: {', '.join(TABLE_METRICS)}"
        )
    summary: dict[str, dict] = {}
    for divergence in record["divergences"]:
        mine = [r for r in rows if r["divergence"] == divergence]
        # a metric over the runs that have it (a run of an older version may lack one): its
        # own n, which the table shows where it is not the row's
        summary[divergence] = {
            m: (*_mean_std([r[m] for r in have]), len(have))
            for m, _ in TABLE_METRICS[task]
            if (have := [r for r in mine if _number(r.get(m))])
        }
        if not summary[divergence]:
            del summary[divergence]
    with_kmeans = [r for r in rows if "kmeans_acc" in r]
    if task == "cluster" and with_kmeans:  # k-means on the same embeddings, one value per seed
        by_seed = {r["seed"]: r for r in with_kmeans}
        summary["k-means"] = {
            m: (*_mean_std([r[f"kmeans_{m}"] for r in by_seed.values()]), len(by_seed))
            for m in ("acc", "nmi", "ari", "cluster_size_entropy")
            if all(f"kmeans_{m}" in r for r in by_seed.values())  # older runs lack entropy
        }
    return task, rows, summary


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _table(task: str, summary: dict) -> str:
    metrics = [(m, hi) for m, hi in TABLE_METRICS[task] if any(m in s for s in summary.values())]
    best = {}
    for m, higher in metrics:
        # a NaN (a damaged or hand-edited run) is shown, never marked best
        values = {name: s[m][0] for name, s in summary.items() if m in s and math.isfinite(s[m][0])}
        if values and m != "train_time_s":
            best[m] = (max if higher else min)(values, key=values.get)
    lines = [
        "| divergence | n | " + " | ".join(m for m, _ in metrics) + " |",
        "|---|---:|" + "---:|" * len(metrics),
    ]
    for name, s in summary.items():
        n = max(v[2] for v in s.values())
        cells = []
        for m, _ in metrics:
            if m not in s:
                cells.append("")
                continue
            mean, std, count = s[m]
            digits = 1 if m == "train_time_s" else 3
            spread = "–" if math.isnan(std) and count == 1 else f"{std:.{digits}f}"
            text = f"{mean:.{digits}f} ± {spread}"
            text = f"**{text}**" if best.get(m) == name else text
            cells.append(text if count == n else f"{text} (n = {count})")
        lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_report(out: str | Path, verbose: bool = True) -> str:
    """Write results.csv, results.md and the figures from the finished runs; return the table."""
    from beyond_icon.train import write_csv

    out = Path(out)
    task, rows, summary = aggregate(out)
    if not rows:
        raise ValueError(f"{out} has no finished run yet")
    write_csv(rows, out / "results.csv")
    table = _table(task, summary)
    lines = [
        f"# {task} sweep",
        "",
        f"Mean ± sample std over seeds (n runs; – where one run leaves the std undefined); "
        f"best per column in bold. {len(rows)} finished runs.",
        "",
        table,
        "",
        f"![metrics]({task}_bars.png)",
    ]
    _bars(task, summary, out / f"{task}_bars.png")
    if task == "sne":
        _sne_figures(out, rows)
        lines += [
            "",
            "![embeddings](sne_embeddings.png)",
            "",
            "![gradient norms](sne_grad_norm.png)",
        ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    if verbose:
        print(table)
    return table


def _bars(task: str, summary: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    metrics = [m for m in BAR_METRICS[task] if any(m in s for s in summary.values())]
    names = list(summary)
    fig, ax = plt.subplots(figsize=(1.4 + 1.1 * len(names) * len(metrics) / 2.5, 4.0))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        means = [summary[name][m][0] if m in summary[name] else math.nan for m in metrics]
        stds = [summary[name][m][1] if m in summary[name] else 0 for m in metrics]
        stds = [0.0 if math.isnan(v) else v for v in stds]  # one run: no error bar
        ax.bar(np.arange(len(metrics)) + i * width, means, width, yerr=stds, capsize=3, label=name)
    ax.set_xticks(np.arange(len(metrics)) + 0.4 - width / 2, metrics)
    ax.set_ylabel("mean ± std over seeds")
    ax.legend(
        fontsize=7,
        ncol=min(len(names), 6),
        loc="upper center",
        bbox_to_anchor=(0.5, -0.1),
        frameon=False,
    )
    ax.set_title(f"{task}: metrics by divergence", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _sne_figures(out: Path, rows: list[dict]) -> None:
    seed = min(r["seed"] for r in rows)
    panels, histories, classes = [], {}, None
    for r in rows:
        if r["seed"] != seed:
            continue
        folder = out / "runs" / r["run"]
        knn = f" (k-NN {r['knn_acc']:.3f})" if _number(r.get("knn_acc")) else ""
        path = folder / "embedding.npz"
        try:
            with np.load(path) as emb:
                panels.append((f"{r['divergence']}{knn}", emb["test"], emb["y_test"]))
                classes = [str(c) for c in emb["classes"]]
            path = folder / "history.csv"
            with open(path) as handle:
                histories[r["divergence"]] = [
                    {k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)
                ]
        except (OSError, ValueError, TypeError, KeyError, zipfile.BadZipFile) as error:
            what = "is missing" if not path.is_file() else f"is damaged ({_first_line(error)})"
            raise ValueError(
                f"{path} {what}: delete {folder} and rerun the sweep to redo that run"
            ) from None
    report.plot_embedding_grid(
        panels, classes, out / "sne_embeddings.png", f"test-split embeddings, seed {seed}"
    )
    report.plot_grad_norm(
        histories, out / "sne_grad_norm.png", f"gradient norm per step, seed {seed}"
    )
