"""Peak memory, time and host syncs of a computation, for benchmarks and tests."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

__all__ = ["HostSyncCounter", "peak_memory", "step_time"]


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ start/stop lines) while the block runs."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def step_time(
    step: Callable[[], object], repeats: int, device: str | torch.device = "cpu"
) -> float:
    """Mean seconds of ``step()`` over ``repeats`` calls after one warm-up; on CUDA the clock
    stops only once the queued work has finished.

    Parameters
    ----------
    step : callable
        One unit of work (e.g. a training step).
    repeats : int
        Timed calls, at least 1.
    device : str or torch.device
        Where the work runs.

    Returns
    -------
    float
        Seconds per call.
    """
    device = torch.device(device)

    def wait() -> None:  # CUDA runs asynchronously: time finished work only
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()
    wait()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    wait()
    return (time.perf_counter() - started) / repeats


def peak_memory(fn: Callable[[], object], device: str | torch.device = "cpu") -> int:
    """Bytes of tensor memory at the peak while ``fn()`` runs, above what was live before.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: torch's profiler, summing every event's
    self allocation in time order (op granularity: an op's internal workspace is not seen).

    Parameters
    ----------
    fn : callable
        Runs the computation (e.g. a forward and backward pass).
    device : str or torch.device

    Returns
    -------
    int
        Bytes.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


class HostSyncCounter(torch.overrides.TorchFunctionMode):
    """Counts the tensor operations that make the host wait for the device.

    On a GPU, reading a value (``bool(t)``, ``t.item()``, ``int(t)``, ``t.tolist()``) or an op
    whose output size depends on values (``nonzero``, boolean-mask indexing,
    ``masked_select``, ``unique``, ``bincount``, ``repeat_interleave`` of tensor repeats
    without ``output_size``; also ``equal``) blocks the host until the stream has run up to it. These are
    the same calls on every device, so counting them on the CPU finds the syncs a CUDA run would
    make (the CPU twin of ``torch.cuda.set_sync_debug_mode``). Used as a context manager::

        with HostSyncCounter() as syncs:
            loss(z, labels).backward()
        assert syncs.count == 0, syncs.calls

    ``calls`` lists the name of each counted operation. Backward passes run in C++ and are not
    seen, except for autograd Functions written in Python.
    """

    _READS = frozenset({"__bool__", "item", "tolist", "__int__", "__float__", "__index__"})
    _DATA_DEPENDENT = frozenset(
        {
            "nonzero",
            "masked_select",
            "unique",
            "unique_consecutive",
            "argwhere",
            "bincount",  # its length is the largest value
            "equal",  # a Python bool
        }
    )

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    @property
    def count(self) -> int:
        return len(self.calls)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in self._READS or name in self._DATA_DEPENDENT:
            self.calls.append(f"{name} at {_caller()}")
        elif name == "repeat_interleave" and kwargs.get("output_size") is None:
            # the output's length is data when repeats is a tensor (or the one-argument form,
            # where the input is the repeats); an integer repeats is not
            repeats = kwargs.get("repeats", args[1] if len(args) > 1 else None)
            if repeats is None or isinstance(repeats, torch.Tensor):
                self.calls.append(f"{name} (no output_size) at {_caller()}")
        elif name in ("__getitem__", "__setitem__") and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
                self.calls.append(f"{name}[bool mask] at {_caller()}")
        return func(*args, **kwargs)


def _caller() -> str:
    """file:line of the innermost frame outside torch and this module."""
    import traceback

    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in frame.filename and frame.filename != __file__:
            return f"{Path(frame.filename).name}:{frame.lineno}"
    return "?"
