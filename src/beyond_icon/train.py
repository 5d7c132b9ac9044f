"""One training loop for every task: seeding, device, AMP, progress, gradient-norm log,
atomic checkpoints and exact resumption.

Randomness that decides a batch (shuffling, augmentation) comes from a generator seeded by
``(seed, epoch)``, passed to the task's batch function, so an epoch is the same whether the run
was interrupted before it or not: a resumed run ends with the same parameters as an
uninterrupted one on the CPU.
"""

from __future__ import annotations

import csv
import inspect
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from beyond_icon._validation import value_checks

__all__ = [
    "SCHEDULES",
    "split_batches",
    "SCHEDULE_HELP",
    "TrainConfig",
    "TrainingDiverged",
    "atomic_save",
    "epoch_generator",
    "fit",
    "load_checkpoint",
    "resolve_device",
    "seed_everything",
    "write_csv",
]

CHECKPOINT = "checkpoint.pt"


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (all devices).

    Parameters
    ----------
    seed : int
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when available (``cuda:LOCAL_RANK`` under torchrun); an
    unavailable CUDA request is a clear error.

    Parameters
    ----------
    device : str or torch.device
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Returns
    -------
    torch.device
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device) == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{local_rank}"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device '{device}' was requested but no CUDA GPU is available; use --device cpu"
        )
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise ValueError(
                f"device '{device}' was requested but this machine has {count} CUDA GPU(s): "
                f"cuda:0 to cuda:{count - 1}"
            )
    return device


def epoch_generator(seed: int, epoch: int, device: str | torch.device = "cpu") -> torch.Generator:
    """The generator for everything random in one epoch, a function of (seed, epoch) only.

    Parameters
    ----------
    seed : int
    epoch : int
    device : str or torch.device

    Returns
    -------
    torch.Generator
    """
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves half a file.

    Parameters
    ----------
    obj : object
    path : str or Path
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_csv(rows: list[dict], path: str | Path) -> None:
    """Write dict rows as CSV atomically (columns: union of keys, in first-seen order).

    Parameters
    ----------
    rows : list of dict
    path : str or Path
    """
    path = Path(path)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


#: The learning-rate schedules, one vocabulary for every task (after an optional linear
#: warm-up): their names and what they do.
SCHEDULES = {
    "none": "constant",
    "cosine": "cosine decay to 0 over the budget",
    "step": "halved at 1/3 and again at 2/3 of the budget (the paper's 30 epochs halved every 10)",
}
SCHEDULE_HELP = "learning rate: " + "; ".join(f"{k} ({v})" for k, v in SCHEDULES.items())


@dataclass
class TrainConfig:
    """Optimisation settings shared by the tasks.

    Parameters
    ----------
    epochs : int
        Passes over the batches of :func:`fit` (the budget).
    lr : float
        Peak learning rate.
    weight_decay : float
    optimizer : {"adam", "adamw"}
        AdamW decouples the weight decay.
    schedule : str
        One of :data:`SCHEDULES`.
    warmup_epochs : int
        Linear warm-up before the schedule.
    grad_clip : float, optional
        Clip the gradient norm.
    amp : bool
        bf16 autocast on CUDA (ignored on the CPU).
    fused : bool
        Adam's fused kernel on the CPU and CUDA (the same update in one kernel instead of a
        loop of element-wise ops, equal to rounding; the update of ParametricSNE's 2,048 x
        256 table of cell vectors, its recipe 1, took about 1 ms instead of 1.5 in a
        micro-benchmark on 2 CPU cores). Other devices, and torch before 2.4 on the CPU: the
        default. A run resumed from a checkpoint of the default Adam keeps that (the same
        update).
    seed : int
        Epoch ``e`` draws its batches from ``epoch_generator(seed, e)``.
    extra : dict
        Free-form settings a task records with the run.
    """

    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"  # adam | adamw (decoupled weight decay)
    schedule: str = "none"  # one of SCHEDULES
    warmup_epochs: int = 0
    grad_clip: float | None = None
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    fused: bool = False  # Adam's fused kernel (CPU and CUDA)
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {self.epochs!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer must be adam or adamw, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"
            )
        if self.grad_clip is not None and not (
            self.grad_clip > 0 and math.isfinite(self.grad_clip)
        ):
            raise ValueError(
                f"grad_clip must be a positive number or None (no clipping), got {self.grad_clip!r}"
            )
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if not isinstance(self.warmup_epochs, int) or not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(
                f"warmup_epochs must be an integer in [0, epochs = {self.epochs}) (the learning "
                f"rate would never reach lr), got {self.warmup_epochs!r}"
            )


def _lr_factor(config: TrainConfig, progress: float) -> float:
    """Learning-rate multiplier at ``progress`` epochs (fractional)."""
    if config.warmup_epochs and progress < config.warmup_epochs:
        return (progress + 1e-3) / config.warmup_epochs
    if config.schedule == "cosine":
        span = max(config.epochs - config.warmup_epochs, 1e-9)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - config.warmup_epochs) / span)))
    if config.schedule == "step":  # halved at 1/3 and at 2/3 of the budget
        return 0.5 ** min(2, int(3 * progress / config.epochs))
    return 1.0


def split_batches(batch_size: int, *columns: Tensor) -> list[tuple[Tensor, ...]]:
    """One epoch's batches: the rows of ``columns`` (already in epoch order, e.g. a
    permutation and what goes with it) cut into ``n // batch_size`` consecutive batches of
    equal size (the remainder spread over them), as tuples of the columns' pieces.

    Parameters
    ----------
    batch_size : int
    *columns : (n, ...) tensors

    Returns
    -------
    list of tuple of tensors
    """
    count = max(1, len(columns[0]) // batch_size)
    return list(zip(*(torch.tensor_split(column, count) for column in columns)))


def shard_batch(item: Any, rank: int, world_size: int) -> Any:
    """This rank's part of a global batch: tensors split along dim 0 (the same cut whatever
    the rank), tuples element-wise, integers (augmentation seeds) offset by the rank."""
    if world_size == 1:
        return item
    if isinstance(item, Tensor):
        return item.tensor_split(world_size)[rank]
    if isinstance(item, (tuple, list)):
        return type(item)(shard_batch(x, rank, world_size) for x in item)
    if isinstance(item, int):
        return item + rank
    return item


def _average_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """All-reduce the mean of the gradients in one flat buffer."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
        offset += g.numel()


class TrainingDiverged(ValueError):
    """The loss or its gradient stopped being finite during training."""


CHECKPOINT_FORMAT = "beyond-icon-checkpoint/2"
BUDGET_FIELDS = ("epochs", "n_steps")  # may differ on resume: the run is extended or cut
# Settings added after checkpoints were written: the behaviour those runs had, so that a
# checkpoint without the key resumes under the same settings (and not under the new default).
LEGACY_SETTINGS = {
    "q_scope": "global",  # parametric SNE: q over the whole train split
    "neighbor_mix": 0.0,  # cluster task: p on the pair-mate only
    "n_cells": 0,  # parametric SNE: the plain MLP, no cells
    "hidden": [256, 256],  # parametric SNE: the MLP's widths
    "input_noise_power": 0.0,  # parametric SNE: the same input noise on every feature
    "local_dims": 0,  # parametric SNE: no per-cell maps
    "recipe": 1,  # a task's method before its recipe was versioned (TaskConfig.recipe)
}


#: Keys of a run's identity that an earlier version did not record: a run saved without one
#: is not refused for it (its value then is unknown, not different).
UNRECORDED_SETTINGS = ("data_fingerprint",)


def remove_earlier_run(out: Path) -> list[Path]:
    """Remove an earlier run's ``checkpoint.pt`` and ``metrics.json`` from ``out`` for a new run
    (no resume): the first would be overwritten at the first save, the second says "finished",
    and neither may stand beside the new run's config.yaml if it stops early.

    Parameters
    ----------
    out : Path

    Returns
    -------
    list of Path
        The files removed.
    """
    stale = [out / name for name in (CHECKPOINT, "metrics.json") if (out / name).is_file()]
    for path in stale:
        path.unlink()
    return stale


def setting_differences(saved: dict, now: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """``"key: old there, new now"`` for each setting that differs between a run made earlier
    (``saved``; a key of :data:`LEGACY_SETTINGS` it lacks takes its old behaviour) and ``now``,
    over the keys of both but ``ignore``; the checkpoint's resume check and a sweep's share it.
    Two ``data`` specs whose paths resolve to the same file are the same setting
    (:func:`beyond_icon.data.datasets.same_spec`).

    Parameters
    ----------
    saved, now : dict
    ignore : tuple of str

    Returns
    -------
    list of str
    """
    from beyond_icon.data.datasets import same_spec

    saved = {k: v for k, v in LEGACY_SETTINGS.items() if k in now} | saved
    keys = sorted(set(saved) | set(now))
    return [
        f"{k}: {saved.get(k)!r} there, {now.get(k)!r} now"
        for k in keys
        if k not in ignore
        # a run saved before its data were fingerprinted: its data cannot be told apart
        and not (k in UNRECORDED_SETTINGS and k not in saved)
        and saved.get(k) != now.get(k)
        # a data path given relative one time and absolute the other is the same data
        and not (k == "data" and same_spec(saved.get(k), now.get(k)))
    ]


def earlier_recipe(differences: list[str]) -> bool:
    """Whether :func:`setting_differences` found a run of an earlier recipe of its method
    (``TaskConfig.recipe``), which no option can make again.

    Parameters
    ----------
    differences : list of str
        Lines of :func:`setting_differences`.

    Returns
    -------
    bool
    """
    # a run of another task differs in recipe too, but is not an earlier recipe of this one
    keys = {line.split(":", 1)[0] for line in differences}
    return "recipe" in keys and "task" not in keys


def _plain(value: Any) -> Any:
    """``value`` as plain data (what ``weights_only`` loading admits); anything else as repr.
    A numpy scalar is its Python number (``np.int64(10)`` and ``10`` are one setting)."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return repr(value)


def load_checkpoint(
    path: Path, device: torch.device, identity: dict | None = None, verbose: bool = False
) -> dict:
    """A checkpoint written by :func:`fit`, loaded without unpickling code, checked against
    the run's ``identity``; a one-line ``ValueError`` for anything else.

    Parameters
    ----------
    path : Path
    device : torch.device
        Where tensors are mapped.
    identity : dict, optional
        The run's settings; other settings are refused, naming the fields.
    verbose : bool

    Returns
    -------
    dict
    """
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable or unsafe file gets one line
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        if len(reason) > 160:  # the first sentence (torch's zip errors run on for lines)
            reason = reason.split(". ")[0][:160]
        raise ValueError(
            f"{path} is not a beyond-icon checkpoint that can be loaded safely "
            f"({type(error).__name__}{': ' + reason if reason else ''}); delete it or run "
            "without --resume"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} was not written by this version of beyond-icon (format "
            f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r}, "
            f"expected {CHECKPOINT_FORMAT!r}); delete it or run without --resume"
        )
    saved = state.get("identity")
    if identity is not None and saved is not None:
        differ = setting_differences(saved, identity, ignore=BUDGET_FIELDS)
        if differ:
            remedy = (
                "it was made by an earlier recipe of the method and cannot be resumed: run "
                "without --resume, or use another --out"
                if earlier_recipe(differ)
                else "resume with the same settings, or use another --out"
            )
            # what the run is first (another task, an earlier recipe), then at most 5 fields
            first = {"task": 0, "recipe": 1}
            differ.sort(key=lambda line: first.get(line.split(":", 1)[0], 2))
            shown = ", ".join(differ[:5]) + (
                f", and {len(differ) - 5} more" if len(differ) > 5 else ""
            )
            raise ValueError(f"{path} belongs to a run with other settings ({shown}); {remedy}")
        for key in BUDGET_FIELDS:
            if key in saved and saved.get(key) != identity.get(key) and verbose:
                tqdm.write(
                    f"resuming with {key} {identity.get(key)!r} instead of {saved.get(key)!r}: "
                    "the run continues under the new budget's learning-rate schedule from where "
                    "it stopped (not the same as a fresh run of that length)"
                )
    return state


def _explain_divergence(loss_fn, batch, step, epoch, value, use_amp, device) -> None:
    """A non-finite loss or gradient: run the step's loss again with the value checks on, so a
    bad input or an infinite divergence is named in one line; else report the divergence.
    Raised before the optimiser step, so the weights stay usable."""
    try:
        with (
            value_checks(True),
            torch.no_grad(),
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp),
        ):
            loss_fn(batch)
    except ValueError as error:
        raise TrainingDiverged(
            f"training diverged at step {step} (epoch {epoch + 1}): {error}"
        ) from error
    raise TrainingDiverged(
        f"training diverged at step {step} (epoch {epoch + 1}): the loss is {value:.4g} and its "
        "gradient is not finite. Lower the learning rate (--lr), compute in float32 or float64 "
        "rather than float16, or use a bounded divergence ('tv', 'jsd', 'hellinger')"
    )


def fit(
    model: nn.Module,
    batches: Callable[[torch.Generator], Iterable[Any]],
    loss_fn: Callable[[Any], Tensor],
    config: TrainConfig,
    *,
    device: torch.device,
    out_dir: str | Path | None = None,
    resume: bool = False,
    state_modules: dict[str, nn.Module] | None = None,
    after_step: Callable[[], None] | None = None,
    desc: str = "train",
    verbose: bool = True,
    stop_after_epochs: int | None = None,
    checkpoint_every_s: float = 30.0,
    identity: dict | None = None,
) -> list[dict]:
    """Train ``model`` with Adam and return the per-step history.

    ``batches(generator)`` (or ``batches(generator, epoch)``, for schedules that depend on
    the step) yields one epoch of batches; ``loss_fn(batch)`` returns the scalar
    loss. ``state_modules`` (e.g. a loss with buffers, an EMA teacher) are checkpointed with
    the model; ``after_step`` runs after each optimiser step (EMA updates). With ``out_dir``
    checkpoints are written atomically and ``history.csv`` kept current with them;
    ``resume`` continues from it. ``stop_after_epochs`` ends early (for tests of resumption).
    Checkpoints are written after an epoch when ``checkpoint_every_s`` seconds have passed since
    the last one (0: after every epoch), and always after the last epoch.

    Checkpoints hold tensors, numbers and plain containers only and are read with
    ``torch.load(weights_only=True)``: a planted file cannot run code, and a foreign or old one
    is refused with a one-line ``ValueError``. ``identity`` (the settings that define the run,
    plain values) is stored with them; resuming with different settings is refused, naming the
    fields, except the budget (``epochs`` / ``n_steps``), which may extend a run: it continues
    under the new budget's schedule, which is not the same as a fresh run of that length.

    Parameters
    ----------
    model : nn.Module
    batches : callable
        ``batches(generator)`` or ``batches(generator, epoch)``: one epoch of batches.
    loss_fn : callable
        ``loss_fn(batch) -> 0-d tensor``.
    config : TrainConfig
    device : torch.device
    out_dir : path, optional
        Where checkpoints and ``history.csv`` go.
    resume : bool
        Continue from ``out_dir``'s checkpoint.
    state_modules : dict of nn.Module, optional
        Checkpointed with the model (a loss with buffers, an EMA teacher).
    after_step : callable, optional
        Runs after each optimiser step.
    desc : str
        Progress-bar label.
    verbose : bool
    stop_after_epochs : int, optional
        End early (tests of resumption).
    checkpoint_every_s : float
        Least seconds between checkpoints (the last epoch is always saved).
    identity : dict, optional
        The settings that define the run, checked on resume.

    Returns
    -------
    list of dict
        One row per step: epoch, step, loss, grad_norm, lr, time, segment.

    Raises
    ------
    TrainingDiverged
        A non-finite loss or gradient, before the step is applied, with the cause when a
        value check names one.
    """
    config.check()
    loop = _Loop(model, batches, loss_fn, config, device, state_modules or {}, after_step, desc)
    loop.verbose = verbose and loop.rank == 0
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and loop.rank == 0:
        out.mkdir(parents=True, exist_ok=True)  # e.g. ParametricSNE.fit(out_dir=a new folder)
    identity = _plain(identity) if identity is not None else None
    if resume and out is not None and (out / CHECKPOINT).is_file():
        loop.restore(out / CHECKPOINT, identity)
    elif resume and loop.rank == 0:  # a mistyped --out, or a run stopped before its first save
        where = f"in {out}" if out is not None else "(no run folder)"
        notice = f"no checkpoint {where}: {desc} starts from the beginning"
        if loop.verbose:
            tqdm.write(notice)
        else:  # --quiet hides progress, not a resume that did not happen
            warnings.warn(notice, UserWarning, stacklevel=2)
    if not resume and out is not None and loop.rank == 0:
        stale = remove_earlier_run(out)
        if stale and loop.verbose:
            tqdm.write(
                f"{out}: a new run (no --resume); the earlier run's checkpoint and "
                "metrics.json were removed"
            )
    last_epoch = (
        config.epochs if stop_after_epochs is None else min(config.epochs, stop_after_epochs)
    )
    last_save = time.perf_counter()
    for epoch in range(loop.start_epoch, last_epoch):
        running = loop.epoch(epoch)
        if loop.verbose:
            tqdm.write(f"{desc} epoch {epoch + 1}/{config.epochs}: loss {running:.4f}")
        # A checkpoint costs a pickle of the model, the optimiser and the whole history: with
        # epochs of a few steps (parametric SNE on small data) saving after each would cost more
        # than training. Save at most every checkpoint_every_s seconds, and at the end. Epochs are
        # reproducible from (seed, epoch), so resuming from any checkpoint ends the same way.
        due = time.perf_counter() - last_save >= checkpoint_every_s or epoch + 1 == last_epoch
        if out is not None and loop.rank == 0 and due:
            last_save = time.perf_counter()
            loop.save(out, epoch + 1, identity)
    model.eval()
    return loop.history


class _Loop:
    """The parts of :func:`fit`, each a method: the optimiser and the distributed start
    (``__init__``), resumption (``restore``), one epoch of batches (``epoch``), one step
    (``step``) and the checkpoint (``save``)."""

    def __init__(self, model, batches, loss_fn, config, device, state_modules, after_step, desc):
        from beyond_icon.distributed import world

        self.model, self.batches, self.loss_fn, self.config = model, batches, loss_fn, config
        self.device, self.state_modules, self.after_step, self.desc = (
            device,
            state_modules,
            after_step,
            desc,
        )
        self.rank, self.world_size = world()
        if self.world_size > 1:  # every rank starts from rank 0's weights
            import torch.distributed as dist

            for tensor in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(tensor.data, 0)
        self.params = [p for p in model.parameters() if p.requires_grad]
        optimizer_cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
        settings = {"lr": config.lr, "weight_decay": config.weight_decay}
        try:  # the fused kernel runs on the CPU from torch 2.4; older: the default, same update
            fused = config.fused and device.type in ("cpu", "cuda")
            self.optimizer = optimizer_cls(
                self.params, **settings, **({"fused": True} if fused else {})
            )
        except RuntimeError:
            self.optimizer = optimizer_cls(self.params, **settings)
        self.use_amp = config.amp and device.type == "cuda"
        required = [
            p
            for p in inspect.signature(batches).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        ]
        self.takes_epoch = len(required) >= 2  # batches(generator, epoch)
        self.history: list[dict] = []
        self.start_epoch = 0
        self.verbose = True
        self._clock()

    def _clock(self) -> None:
        """The step counter, the clock and the segment carried over from the history."""
        history = self.history
        self.next_step = len(history)
        self.started = time.perf_counter() - (history[-1]["time"] if history else 0.0)
        self.segment = history[-1].get("segment", 0) + 1 if history else 0  # +1 per --resume

    def restore(self, path: Path, identity: dict | None) -> None:
        state = load_checkpoint(path, self.device, identity, self.verbose)
        if state["epoch"] > self.config.epochs:  # a resume extends a run, never cuts it
            raise ValueError(
                f"{path} holds {state['epoch']} epochs ({len(state['history'])} steps), more "
                f"than the {self.config.epochs} this run asks for; resume with at least the "
                "budget it was trained with"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for name, module in self.state_modules.items():
            if name in state["modules"]:
                module.load_state_dict(state["modules"][name])
            else:  # a module added to the task after the checkpoint was written
                warnings.warn(
                    f"the checkpoint has no {name!r} state (an earlier version wrote it): "
                    "it starts fresh",
                    stacklevel=2,
                )
        # map_location moved every tensor to the device; the CPU generator's state must be a
        # CPU ByteTensor, as must a CUDA generator's (the input noise draws from that one)
        torch.set_rng_state(state["torch_rng"].cpu())
        if state.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)
        self.history, self.start_epoch = state["history"], state["epoch"]
        self._clock()
        if self.verbose:
            tqdm.write(
                f"resuming {self.desc} from epoch {self.start_epoch} of {self.config.epochs}"
            )

    def epoch(self, epoch: int) -> float:
        """Train one epoch; returns the running (exponentially averaged) loss."""
        self.model.train()
        for module in self.state_modules.values():
            module.train()
        generator = epoch_generator(self.config.seed, epoch)
        made = self.batches(generator, epoch) if self.takes_epoch else self.batches(generator)
        batches = [shard_batch(b, self.rank, self.world_size) for b in made]
        bar = tqdm(
            batches,
            desc=f"{self.desc} epoch {epoch + 1}/{self.config.epochs}",
            disable=not self.verbose,
            leave=False,
            dynamic_ncols=True,
        )
        running = None
        for i, batch in enumerate(bar):
            factor = _lr_factor(self.config, epoch + i / max(len(batches), 1))
            value, norm = self.step(batch, epoch, factor)
            running = value if running is None else 0.9 * running + 0.1 * value
            bar.set_postfix(loss=f"{running:.4f}")
            self.history.append(
                {
                    "epoch": epoch,
                    "step": self.next_step,
                    "loss": value,
                    "grad_norm": norm,
                    "lr": self.config.lr * factor,
                    "time": time.perf_counter() - self.started,
                    "segment": self.segment,
                }
            )
            self.next_step += 1
        bar.close()
        return running

    def step(self, batch: Any, epoch: int, factor: float) -> tuple[float, float]:
        """One optimiser step; returns (loss, gradient norm), read back together (the step's
        one host synchronisation)."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * factor
        # the step runs without the losses' value checks (no host syncs inside the loss)
        with (
            value_checks(False),
            torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp),
        ):
            loss = self.loss_fn(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.world_size > 1:
            _average_gradients(self.params, self.world_size)
        clip = math.inf if self.config.grad_clip is None else self.config.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        value = loss.detach().float()
        if self.world_size > 1:  # each rank returns W x its rows' share: the mean is the loss
            from beyond_icon.distributed import all_reduce_sum

            value = all_reduce_sum(value) / self.world_size
        value, norm = torch.stack([value, norm.detach().float().to(value.device)]).tolist()
        if not (math.isfinite(norm) and math.isfinite(value)):  # before the step: weights stay
            _explain_divergence(
                self.loss_fn, batch, self.next_step, epoch, value, self.use_amp, self.device
            )
        self.optimizer.step()
        if self.after_step is not None:
            self.after_step()
        return value, norm

    def save(self, out: Path, epochs_done: int, identity: dict | None) -> None:
        atomic_save(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "modules": {k: m.state_dict() for k, m in self.state_modules.items()},
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": (
                    torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
                ),
                "history": self.history,
                "epoch": epochs_done,
                "format": CHECKPOINT_FORMAT,
                "identity": identity,
            },
            out / CHECKPOINT,
        )
        write_csv(self.history, out / "history.csv")
