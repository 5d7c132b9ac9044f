"""Forward + backward time and peak memory of the SupCon preset, every divergence, vs a reference.

The reference is an independent dense implementation of the SupCon loss of Khosla et al.
(L_out, cosine similarity / temperature), written here directly on the logits matrix, as the
SupContrast code computes it. Both run in the same process on the same inputs; the table
reports our time and memory as ratios to it. Each ratio is the median over ``--repeats`` pairs
of back-to-back steps (reference, then ours), so that the drift of a shared machine cancels
within each pair. A second table compares the row-chunked path (``chunk_size``: recomputed
blocks, bounded memory) against the default evaluation.

    python benchmarks/bench_loss.py [--sizes 1024 4096] [--large-sizes 16384] [--dim 128]
        [--repeats 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from beyond_icon import methods, value_checks
from beyond_icon.profiling import HostSyncCounter, peak_memory

SYNCS: dict = {}  # step -> host syncs of one forward + backward
DIVERGENCES = ["kl", "reverse_kl", "tv", "hellinger", "jsd", "chi2", "jeffreys", "alpha:0.5"]


def supcon_reference(
    features: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Khosla et al. SupCon (L_out), dense: mean over anchors of -mean_{p in P(i)} log q(p|i)."""
    z = F.normalize(features, dim=1)
    logits = z @ z.T / temperature
    n = z.shape[0]
    not_self = ~torch.eye(n, dtype=torch.bool, device=z.device)
    positives = (labels[:, None] == labels[None, :]) & not_self
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    log_denominator = torch.log((logits.exp() * not_self).sum(dim=1, keepdim=True))
    log_prob = logits - log_denominator
    n_pos = positives.sum(dim=1)
    mean_log_prob = (log_prob * positives).sum(dim=1) / n_pos.clamp_min(1)
    return -mean_log_prob[n_pos > 0].mean()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step, device: torch.device, repeats: int) -> tuple[float, int]:
    """Median seconds of ``step()`` over ``repeats`` (after one warm-up), and its peak bytes."""
    with HostSyncCounter() as syncs:  # the warm-up also counts the host syncs of one step
        step()
    SYNCS[step] = syncs.count
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return (statistics.median(times) if times else float("nan")), peak_memory(step, device)


def paired(ref_step, step, device: torch.device, repeats: int) -> tuple[float, float]:
    """Median of ``step`` time / ``ref_step`` time over ``repeats`` back-to-back pairs, and the
    median time of ``step``."""
    ratios, times = [], []
    for _ in range(repeats):
        pair = []
        for fn in (ref_step, step):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            pair.append(time.perf_counter() - start)
        ratios.append(pair[1] / pair[0])
        times.append(pair[1])
    return statistics.median(ratios), statistics.median(times)


def _step_maker(n: int, args: argparse.Namespace, device: torch.device):
    """``make_step(loss_fn)``: one forward + backward of ``loss_fn`` on fixed random features."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(n, args.dim, generator=gen).to(device, getattr(torch, args.dtype))
    labels = torch.randint(0, args.classes, (n,), generator=gen).to(device)

    def make_step(loss_fn):
        def step():
            z = base.clone().requires_grad_()
            with value_checks(args.value_checks == "on"):
                loss_fn(z, labels).backward()

        return step

    return make_step


def bench_size(n: int, args: argparse.Namespace, device: torch.device, temperature: float):
    """Rows of the two tables for batch size n."""
    make_step = _step_maker(n, args, device)

    def supcon_khosla(z, y):
        return supcon_reference(z, y, temperature)

    ref_step = make_step(supcon_khosla)
    ref_time, ref_mem = measure(ref_step, device, args.repeats)
    rows = [(n, "reference SupCon (Khosla)", ref_time, ref_mem, 1.0, 1.0, SYNCS[ref_step])]
    for name in DIVERGENCES:
        debias = 0.05 if name in ("reverse_kl", "jeffreys") else 0.0  # infinite otherwise
        loss = methods.SupCon(name, metric="cosine", temperature=temperature, debias=debias)
        step = make_step(loss)
        _, m = measure(step, device, 0)  # warm-up, host syncs and peak memory
        ratio, t = paired(ref_step, step, device, args.repeats)
        label = name + (f" (p debiased {debias})" if debias else "")
        rows.append((n, label, t, m, ratio, m / ref_mem, SYNCS[step]))
    chunk_rows = []
    for name in ("kl", "jsd"):
        dense = methods.SupCon(name, temperature=temperature)
        chunked = methods.SupCon(name, temperature=temperature, chunk_size=args.chunk_size)
        td, md = measure(make_step(dense), device, args.repeats)
        tc, mc = measure(make_step(chunked), device, args.repeats)
        chunk_rows.append((n, name, td, md, tc, mc))
    return rows, chunk_rows


def bench_large(n: int, args: argparse.Namespace, device: torch.device, temperature: float):
    """Rows for a batch too large for n x n buffers per divergence: the chunked path only
    (``chunk_size`` rows at a time), against the dense reference."""
    make_step = _step_maker(n, args, device)

    ref_step = make_step(lambda z, y: supcon_reference(z, y, temperature))
    ref_time, ref_mem = measure(ref_step, device, 1)
    rows = [(n, "reference SupCon (Khosla), dense", ref_time, ref_mem, 1.0, 1.0, SYNCS[ref_step])]
    for name in ("kl", "tv", "jsd"):
        loss = methods.SupCon(
            name, metric="cosine", temperature=temperature, chunk_size=args.large_chunk_size
        )
        step = make_step(loss)
        t, m = measure(step, device, 1)
        label = f"{name}, chunked ({args.large_chunk_size} rows)"
        rows.append((n, label, t, m, t / ref_time, m / ref_mem, SYNCS[step]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7, help="timed pairs per loss")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"]
    )
    parser.add_argument(
        "--large-sizes", type=int, nargs="*", default=[16384], help="chunked path only"
    )
    parser.add_argument("--large-chunk-size", type=int, default=1024)
    parser.add_argument(
        "--value-checks",
        choices=["off", "on"],
        default="off",
        help="the losses' value checks (off: as beyond_icon.train.fit runs a step; on: the "
        "default of a direct call, about five host syncs each)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the divergences' elementwise rules (divergences.compile_rules); "
        "the compile happens in the warm-up step, outside the timings",
    )
    args = parser.parse_args()
    if args.compile:
        from beyond_icon import divergences

        divergences.compile_rules(True)
    device = torch.device(args.device)
    temperature = 0.1
    print(
        f"torch {torch.__version__}, device {device}, {args.dtype}, "
        f"threads {torch.get_num_threads()}, "
        f"d = {args.dim}, {args.classes} classes, median of {args.repeats} pairs, "
        f"value checks {args.value_checks}{', rules compiled' if args.compile else ''}\n"
    )

    rows, chunk_rows = [], []
    for n in args.sizes:
        size_rows, size_chunk_rows = bench_size(n, args, device, temperature)
        rows += size_rows
        chunk_rows += size_chunk_rows
    for n in args.large_sizes:
        rows += bench_large(n, args, device, temperature)

    print(
        "| n | loss | fwd+bwd (ms) | peak memory (MiB) | time / reference | memory / reference "
        "| host syncs |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|")
    for n, label, t, m, rt, rm, syncs in rows:
        print(
            f"| {n} | {label} | {1e3 * t:.1f} | {m / 2**20:.1f} | {rt:.2f} | {rm:.2f} | {syncs} |"
        )
    print(f"\nRow-chunked path (chunk_size = {args.chunk_size}) against the default path:\n")
    print("| n | divergence | default ms | default MiB | chunked ms | chunked MiB | memory ratio |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for n, name, td, md, tc, mc in chunk_rows:
        print(
            f"| {n} | {name} | {1e3 * td:.1f} | {md / 2**20:.1f} | {1e3 * tc:.1f} | "
            f"{mc / 2**20:.1f} | {mc / md:.3f} |"
        )


if __name__ == "__main__":
    main()
