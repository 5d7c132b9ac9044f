"""The global-batch I-Con loss across processes (torchrun / torch.distributed).

Contrastive and cluster losses see the whole batch, so on W processes the loss must be taken
over the global batch (W x local) or results change with the number of devices. Each rank
gathers the features of all ranks with :func:`all_gather_with_grad` (gradients flow back to
every rank's own features) and evaluates only its own rows of the n x n matrices, so memory is
O(local x global) per rank. The sum over its rows is divided by the global number of rows
(all-reduced), then multiplied by W: with DDP's gradient averaging (or an explicit all-reduce
mean of gradients) the parameter gradients equal single-process training on the concatenated
batch, and the mean over ranks of the returned values is the global loss.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "Shard",
    "all_gather_with_grad",
    "all_reduce_sum",
    "gather_rows",
    "init_from_env",
    "is_main",
    "world",
]


@dataclass(frozen=True)
class Shard:
    """This process's rows of the global batch: ``rows`` (a slice) of ``n_global`` rows.

    Parameters
    ----------
    rows : slice
        This rank's rows.
    n_global : int
        Rows of the global batch.
    world_size : int
    """

    rows: slice
    n_global: int
    world_size: int


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group.

    Returns
    -------
    rank : int
    world_size : int
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this is rank 0 (or the only process).

    Returns
    -------
    bool
    """
    return world()[0] == 0


def init_from_env(device: torch.device | None = None) -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, ...).

    gloo on the CPU, NCCL on CUDA. Returns whether this is a multi-process run.

    Parameters
    ----------
    device : torch.device, optional
        This process's device (its type picks the backend).

    Returns
    -------
    bool
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        cuda = device is not None and device.type == "cuda"
        if cuda:
            torch.cuda.set_device(device)  # NCCL collectives run on the current device
        dist.init_process_group("nccl" if cuda else "gloo")
    return True


def gather_rows(x: Tensor, sizes: list[int]) -> Tensor:
    """all_gather of tensors whose first dimension differs by rank (padded to the largest).

    Parameters
    ----------
    x : (n_rank, ...) tensor
    sizes : list of int
        Every rank's ``n_rank``.

    Returns
    -------
    (sum(sizes), ...) tensor
        The rows of all ranks, in rank order.
    """
    largest = max(sizes)
    padded = x.new_zeros((largest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


class _AllGather(torch.autograd.Function):
    """Concatenate every rank's (n_r, ...) tensor; backward sums the gradient over ranks and
    returns this rank's slice (the gradient of the global loss w.r.t. its own rows)."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int]) -> Tensor:
        ctx.rank, ctx.sizes = world()[0], sizes
        return gather_rows(x, sizes)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def _sizes(n_local: int, device: torch.device) -> list[int]:
    _, world_size = world()
    local = torch.tensor([n_local], device=device)
    sizes = [torch.zeros_like(local) for _ in range(world_size)]
    dist.all_gather(sizes, local)
    return [int(s) for s in sizes]


def all_gather_with_grad(x: Tensor) -> tuple[Tensor, Shard]:
    """Concatenate ``x`` over ranks (rank order); returns it and this rank's Shard.

    Without a process group: ``x`` itself and the whole range. Local sizes may differ.

    Parameters
    ----------
    x : (n_rank, ...) tensor
        This rank's rows (local batches may differ in size).

    Returns
    -------
    gathered : (n_global, ...) tensor
        Gradients flow back to each rank's own rows.
    shard : Shard
    """
    rank, world_size = world()
    if world_size == 1:
        return x, Shard(slice(0, x.shape[0]), x.shape[0], 1)
    sizes = _sizes(x.shape[0], x.device)
    gathered = _AllGather.apply(x, sizes) if x.requires_grad else gather_rows(x, sizes)
    start = sum(sizes[:rank])
    return gathered, Shard(slice(start, start + sizes[rank]), sum(sizes), world_size)


def all_reduce_sum(value: Tensor) -> Tensor:
    """Sum over ranks (no gradient); the value itself without a process group.

    Parameters
    ----------
    value : tensor

    Returns
    -------
    tensor
    """
    if world()[1] == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value
