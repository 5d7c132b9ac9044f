"""Per-rank peak memory (and time) of the sharded global-batch loss against the dense loss.

The dense loss runs in one process on the whole global batch; the sharded loss runs in W gloo
processes, each holding n / W rows and computing its rows of the n x n matrices against the
gathered batch. Forward + backward of ``SupCon(divergence, metric="euclidean")``, d = 128.

    python benchmarks/bench_distributed.py --global-batch 8192 --world-size 2
"""

from __future__ import annotations

import argparse
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from beyond_icon import methods
from beyond_icon.profiling import peak_memory


def _batch(n: int, dim: int):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, dim, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def _step(loss, z, labels):
    def run():
        zz = z.clone().requires_grad_()
        loss(zz, labels).backward()

    return run


def _worker(rank, world_size, port, args, results):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    torch.set_num_threads(max(1, torch.get_num_threads() // world_size))
    z, labels = _batch(args.global_batch, args.dim)
    share = torch.arange(args.global_batch).tensor_split(world_size)[rank]
    for name in args.divergences.split(","):
        step = _step(methods.SupCon(name, metric="euclidean"), z[share], labels[share])
        step()
        dist.barrier()
        started = time.perf_counter()
        step()
        seconds = time.perf_counter() - started
        results[(name, rank)] = (peak_memory(step), seconds)
        dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--global-batch", type=int, default=8192)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--divergences", default="kl,jsd")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(
        _worker, args=(args.world_size, port, args, results), nprocs=args.world_size, join=True
    )
    z, labels = _batch(args.global_batch, args.dim)
    print(
        f"global batch {args.global_batch}, d = {args.dim}, {args.world_size} gloo processes, "
        f"SupCon(metric='euclidean'), forward + backward\n"
    )
    print(
        "| divergence | dense: peak MiB | dense: s | sharded: peak MiB per rank (max) | sharded: s (max) | memory ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.divergences.split(","):
        step = _step(methods.SupCon(name, metric="euclidean"), z, labels)
        step()
        started = time.perf_counter()
        step()
        dense_seconds = time.perf_counter() - started
        dense = peak_memory(step)
        ranks = [results[(name, r)] for r in range(args.world_size)]
        sharded = max(m for m, _ in ranks)
        seconds = max(t for _, t in ranks)
        print(
            f"| {name} | {dense / 2**20:.0f} | {dense_seconds:.2f} | {sharded / 2**20:.0f} | "
            f"{seconds:.2f} | {sharded / dense:.3f} |"
        )


if __name__ == "__main__":
    main()
