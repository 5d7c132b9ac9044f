"""What every task shares: the common config fields, data loading, the run folder, start-up."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from beyond_icon import data as data_registry
from beyond_icon.data import Dataset

__all__ = [
    "TaskConfig",
    "begin",
    "claim_run",
    "coerce",
    "config_from_dict",
    "finish",
    "format_metrics",
    "help_text",
    "identity",
    "load_task_data",
    "option",
    "peak_gpu_memory",
    "prepare_run_dir",
    "register_divergence_module",
    "write_config",
]


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A config field and its help text, in one place: ``lr: float = option(1e-2, "Adam
    learning rate")``. The text is the field's ``metadata["help"]``, which ``--help`` shows.

    Parameters
    ----------
    default : object, optional
        The default value.
    help : str
        One line for ``--help``.
    default_factory : callable, optional
        For mutable defaults (lists).

    Returns
    -------
    dataclasses.Field
    """
    return field(default=default, default_factory=default_factory, metadata={"help": help})


def help_text(config_cls: type, name: str) -> str:
    """The help text of a config field (empty when it has none).

    Parameters
    ----------
    config_cls : type
    name : str

    Returns
    -------
    str
    """
    for f in dataclasses.fields(config_cls):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(name)


@dataclass
class TaskConfig:
    """Fields every task has; a task's config adds its own, each declared with :func:`option`
    (default and help text together)."""

    task: ClassVar[str] = ""
    # options a task no longer has, with what replaces them: a one-line error, not a guess
    renamed: ClassVar[dict[str, str]] = {}
    # fields that may differ when a run is resumed (where the data sit, which device runs it)
    not_identity: ClassVar[tuple[str, ...]] = ("data_dir", "download", "device")
    # the version of the task's method beyond its options (widths, step budgets, search
    # details): stored with every run as ``recipe``, so that a run of an earlier recipe is
    # neither resumed nor mixed into a sweep's table; None: not versioned
    recipe: ClassVar[int | None] = None
    data: str = option(
        "digits",
        "dataset spec: digits, fashion-mnist, cifar10, imagefolder:PATH, embeddings:PATH, simplex:K",
    )
    data_dir: str | None = option(None, "where to look for dataset files")
    download: bool = option(False, "download the dataset when it is not found locally")
    n_train: int | None = option(
        None,
        "stratified subset of the train split (cluster: of all points of data without a test split)",
    )
    n_test: int | None = option(
        None, "stratified subset of the test split (cluster: refused for data without one)"
    )
    divergence_module: str | None = option(
        None, "register a user-defined divergence from path.py:NAME (then --divergence NAME)"
    )
    seed: int = option(0, "random seed")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")


def identity(config: TaskConfig, dataset: Dataset | None = None) -> dict:
    """The settings that define a run (stored in its checkpoint, checked on resume), and with
    ``dataset`` the data's :meth:`~beyond_icon.data.Dataset.fingerprint`, so that a resume on
    other data under the same spec (a file overwritten) is refused.

    Parameters
    ----------
    config : TaskConfig
    dataset : Dataset, optional

    Returns
    -------
    dict
    """
    values = dataclasses.asdict(config)
    kept = {k: v for k, v in values.items() if k not in config.not_identity}
    data = {} if dataset is None else {"data_fingerprint": dataset.fingerprint()}
    return kept | {"task": config.task} | _recipe(config) | data


def _recipe(config: TaskConfig) -> dict:
    return {} if config.recipe is None else {"recipe": config.recipe}


def begin(
    config: TaskConfig,
    out: str | Path | None,
    verbose: bool,
    whole: bool = False,
):
    """The start of every task's run: process group, device, data and the run folder's path.

    Nothing in the folder is touched yet: the task checks its options against the data first,
    then calls :func:`claim_run`, so that a run refused for a typo leaves an earlier run in the
    same folder as it was.

    Parameters
    ----------
    config : TaskConfig
    out : path, optional
    verbose : bool
    whole : bool
        Every sample of a dataset without its own test split as the train split
        (:func:`load_task_data`).

    Returns
    -------
    tuple
        (device, dataset, out folder or None, verbose on this rank).
    """
    from beyond_icon.distributed import is_main

    device = start(config)
    dataset = load_task_data(config, whole)
    out = prepare_run_dir(out)
    verbose = verbose and is_main()
    if verbose:
        print(dataset.describe())
    return device, dataset, out, verbose


def claim_run(config: TaskConfig, out: Path | None, resume: bool) -> None:
    """Take the run folder once the task's checks have passed: a new run (no ``resume``, or
    no checkpoint to resume) removes an earlier run's checkpoint and metrics and writes its
    config.yaml. A run resumed from a checkpoint keeps the folder's config.yaml until
    :func:`finish` (given the config) rewrites it, so that a resume refused for other
    settings leaves the run's record as it was (a resume that extends the budget and is
    interrupted again leaves the earlier budget there).

    Parameters
    ----------
    config : TaskConfig
    out : Path or None
    resume : bool
    """
    from beyond_icon.distributed import is_main
    from beyond_icon.train import CHECKPOINT, remove_earlier_run

    if out is None or not is_main() or (resume and (out / CHECKPOINT).is_file()):
        return
    if not resume:  # before this config.yaml, not at training's start only
        remove_earlier_run(out)
    write_config(config, out)


def finish(
    result: dict,
    out: Path | None,
    verbose: bool,
    write: Callable[[Path], None] | None = None,
    config: TaskConfig | None = None,
) -> None:
    """The end of every task's run, on rank 0: config.yaml (when ``config`` is given: a
    resumed run's settings, see :func:`begin`), the task's own files (``write(out)``), then
    ``metrics.json`` last (a sweep counts a run finished by it), and the metrics on one line.

    Parameters
    ----------
    result : dict
        The metrics.
    out : Path or None
    verbose : bool
    write : callable, optional
        ``write(out)`` writes the task's own files.
    config : TaskConfig, optional
        The run's settings, written to config.yaml.
    """
    from beyond_icon import report

    if out is not None:
        if config is not None:
            write_config(config, out)
        if write is not None:
            write(out)
        report.save_json(result, out / "metrics.json")
    if verbose:
        print(format_metrics(result))


def check_finite_where_p_is_zero(name: str, where: str, remedy: str) -> None:
    """A one-line error for one of the library's divergences that is infinite where ``p = 0 <
    q`` (``reverse_kl``, ``jeffreys``, ``alpha:A`` with ``A <= 0``), for a task whose p has
    zeros: training would stop at its first step, or (Jeffreys' fast rule, which drops the
    terms off p's support) minimise a finite stand-in without saying so. A user's divergence
    is left to its own handling of p = 0.

    Parameters
    ----------
    name : str
        The divergence (registered name).
    where : str
        Where p is zero, for the message.
    remedy : str
        The task's own remedy, for the message (a divergence finite there is the other).
    """
    from beyond_icon import divergences

    divergence = divergences.get(name)
    if divergences.is_builtin(divergence) and not divergence.finite_where_p_is_zero:
        raise ValueError(
            f"divergence {name!r} is infinite where p = 0 < q, and p is zero {where}; {remedy}, "
            "or a divergence finite there (kl, tv, jsd, hellinger, chi2, alpha:A with A > 0)"
        )


def format_metrics(result: dict) -> str:
    """``name=value`` pairs on one line, floats to four decimals.

    Parameters
    ----------
    result : dict

    Returns
    -------
    str
    """
    return " ".join(
        f"{key}={value:.4f}" if isinstance(value, float) else f"{key}={value}"
        for key, value in result.items()
    )


def peak_gpu_memory(device: Any) -> dict:
    """``{"peak_gpu_memory_mib": ...}`` on CUDA (peak allocated by torch), else ``{}``.

    Parameters
    ----------
    device : torch.device

    Returns
    -------
    dict
    """
    import torch

    if getattr(device, "type", None) != "cuda":
        return {}
    return {"peak_gpu_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20}


def load_task_data(config: Any, whole: bool = False) -> Dataset:
    """The dataset named by ``config.data``, cut to ``n_train`` / ``n_test`` if set.

    Parameters
    ----------
    config : TaskConfig
    whole : bool
        For a dataset without a test split of its own (split 75/25 here): every sample as
        the train split, in the source's order (:meth:`Dataset.whole`), ``n_train`` a subset
        of all of them and ``n_test`` refused. A dataset with its own test split keeps it.

    Returns
    -------
    Dataset
    """
    if not 0 <= config.seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {config.seed}")
    for name in ("n_train", "n_test"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer (or unset), got {value!r}")
    dataset = data_registry.load(config.data, data_dir=config.data_dir, download=config.download)
    if whole and not dataset.has_test_split:
        if config.n_test is not None:
            raise ValueError(
                f"n_test does not apply: {dataset.name} has no test split of its own, so "
                f"every point is used; leave n_test unset (n_train takes a subset of all points)"
            )
        dataset = dataset.whole()
    for name, split in (("n_train", dataset.x_train), ("n_test", dataset.x_test)):
        asked = getattr(config, name)
        if asked is not None and asked > len(split):
            raise ValueError(
                f"{name} = {asked} is more than the {len(split)} points of the {name[2:]} "
                f"split of {dataset.name}; lower it or leave it unset for the whole split"
            )
    if config.n_train or config.n_test:
        dataset = dataset.subset(config.n_train, config.n_test, seed=0)
    return dataset


def prepare_run_dir(out: str | Path | None) -> Path | None:
    """The run folder, created if needed.

    Parameters
    ----------
    out : path, optional

    Returns
    -------
    Path or None

    Raises
    ------
    ValueError
        ``out`` is a file.
    """
    if out is None:
        return None
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a run folder")
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
    (written by the main process only).

    Parameters
    ----------
    config : TaskConfig
    out : Path
    """
    from beyond_icon.distributed import is_main

    if not is_main():
        return
    fields = dataclasses.asdict(config)
    tmp = out / "config.yaml.tmp"
    written = {"task": type(config).task, **_recipe(config), **fields}
    tmp.write_text(yaml.safe_dump(written, sort_keys=False))
    tmp.replace(out / "config.yaml")


def config_from_dict(cls: type, values: dict) -> Any:
    """Build a task config from a dict, rejecting unknown keys with a clear message.

    Parameters
    ----------
    cls : type
        A :class:`TaskConfig` subclass.
    values : dict

    Returns
    -------
    TaskConfig
    """
    names = {f.name for f in dataclasses.fields(cls)}
    for old in sorted(set(values) & set(cls.renamed)):
        raise ValueError(f"{cls.task} has no option {old!r} any more: {cls.renamed[old]}")
    # a run's config.yaml also names its task and recipe: not options (a run of another recipe
    # given as --config starts anew under the current one)
    unknown = sorted(set(values) - names - {"task", "recipe"})
    if unknown:
        raise ValueError(
            f"unknown {cls.task} option(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}"
        )
    fields = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    return cls(
        **{
            k: coerce(fields[k], v, f"{cls.task} option {k}")
            for k, v in values.items()
            if k in names
        }
    )


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def coerce(annotation: str, value: Any, where: str) -> Any:
    """``value`` checked against a field annotation (``int``, ``float | None``, ``list[str]``,
    ...), converting the strings a YAML file or a command line gives (``"1e-3"``, ``"no"``);
    anything else is a one-line ``ValueError`` naming ``where``, the value and the type.

    Parameters
    ----------
    annotation : str
        The field's annotation as a string.
    value : object
    where : str
        Named in the error message.

    Returns
    -------
    object
    """
    optional = "None" in annotation
    base = annotation.replace("| None", "").replace("None |", "").strip()

    def fail() -> ValueError:
        return ValueError(
            f"{where}: {value!r} is not {'an' if base == 'int' else 'a'} {annotation}"
        )

    if value is None or (
        optional and isinstance(value, str) and value.strip().lower() in ("none", "null", "")
    ):
        if optional:
            return None
        raise fail()
    if base.startswith("list["):
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise fail()
        return [
            coerce(base[5:-1], item.strip() if isinstance(item, str) else item, where)
            for item in items
            if not (isinstance(item, str) and not item.strip())
        ]
    if base == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise fail()
    if base == "int":
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:
                    number = float(value.strip())  # "1e3"
                except ValueError:
                    raise fail() from None
                if number.is_integer():
                    return int(number)
                raise fail() from None
        raise fail()
    if base == "float":
        if isinstance(value, bool):
            raise fail()
        try:
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):
                return float(value.strip())
        except (ValueError, OverflowError):
            raise fail() from None
        raise fail()
    if base == "str":
        if isinstance(value, str):
            return value
        raise fail()
    return value


def register_divergence_module(spec: str | None) -> None:
    """Register a user's divergence (``path.py:NAME``) for this run, if one is configured.

    Parameters
    ----------
    spec : str, optional
    """
    if spec:
        from beyond_icon.divergences import register_module

        register_module(spec)
