"""The three ways the cluster kernel evaluates q at listed columns, timed on one device.

The default p of ``beyond-icon cluster`` lists ``s`` columns per row (the pair-mate and the
batch's 20 nearest points), and q there is ``sum_c a_ic b_jc`` over K clusters for every head.
``kernels._listed_products`` computes these r x s dot products by ``dense`` (the whole product,
then a gather), ``gathered`` (the listed rows of b gathered, then a broadcast product) or
``sampled`` (``torch.sparse.sampled_addmm``); ``kernels._listed_path`` picks one per device and
shape. This script first checks each path against a float64 dense reference on the device
(values and gradients), then times forward plus backward of each at the given shapes and prints
which path ``_listed_path`` would choose.

    python benchmarks/bench_listed_paths.py --device cuda --shapes 512:20,512:1000,8192:20,8192:1000
"""

from __future__ import annotations

import argparse
import json

import torch

from beyond_icon.kernels import _listed_path, _listed_products
from beyond_icon.profiling import step_time
from beyond_icon.train import resolve_device

PATHS = ("dense", "gathered", "sampled")


def _inputs(heads: int, n: int, k: int, s: int, dtype, device, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ea = torch.rand(heads, n, k, generator=generator, dtype=torch.float64)
    eb = torch.rand(heads, n, k, generator=generator, dtype=torch.float64)
    # s distinct columns per row, none of them the row itself (as the batch's k-NN lists)
    scores = torch.rand(n, n, generator=generator)
    scores.fill_diagonal_(-1.0)
    columns = scores.topk(s, dim=1).indices
    mask = torch.rand(n, s, generator=generator) > 0.1
    mask[:, 0] = True
    return (
        ea.to(device, dtype),
        eb.to(device, dtype),
        columns.to(device),
        mask.to(device),
    )


def check(device: torch.device) -> list[str]:
    """Each path against a float64 reference written apart (every product by einsum, then the
    listed entries), values and gradients; returns the failures."""
    failures = []
    ea, eb, columns, mask = _inputs(3, 96, 40, 7, torch.float64, device)
    weight = torch.randn(3, 96, 7, dtype=torch.float64, device=device)
    a, b = ea.clone().requires_grad_(), eb.clone().requires_grad_()
    full = torch.einsum("hik,hjk->hij", a, b)
    out = full.gather(-1, columns.expand(3, -1, -1))
    (out * weight * mask).sum().backward()
    reference = (out * mask, a.grad, b.grad)
    for path in PATHS:
        a, b = ea.clone().requires_grad_(), eb.clone().requires_grad_()
        try:
            out = _listed_products(a, b, columns, mask, path)
            (out * weight * mask).sum().backward()
        except Exception as error:  # noqa: BLE001 - reported, not hidden
            failures.append(f"{path}: {type(error).__name__}: {error}")
            continue
        for name, x, y in zip(
            ("value", "grad a", "grad b"), (out * mask, a.grad, b.grad), reference
        ):
            if not torch.allclose(x, y, rtol=1e-10, atol=1e-12):
                failures.append(f"{path}: {name} differs by {float((x - y).abs().max()):.3g}")
    return failures


def time_path(path, heads, n, k, s, device, repeats) -> float:
    ea, eb, columns, mask = _inputs(heads, n, k, s, torch.float32, device)
    ea.requires_grad_()
    eb.requires_grad_()

    def step():
        out = _listed_products(ea, eb, columns, mask, path)
        out.sum().backward()
        ea.grad = eb.grad = None

    return step_time(step, repeats, device)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", default="512:20,512:1000", help="n:K, comma-separated")
    parser.add_argument("--heads", type=int, default=10)
    parser.add_argument("--listed", type=int, default=21, help="s, columns per row")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    failures = check(device)
    print("exactness (float64, values and gradients): " + ("ok" if not failures else "FAILED"))
    for failure in failures:
        print("  " + failure)
    rows = []
    print(f"{'n':>6} {'K':>5} " + " ".join(f"{p + ' ms':>12}" for p in PATHS) + "  chosen")
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split(":"))
        row = {"n": n, "k": k, "chosen": _listed_path(device, n, args.listed, k)}
        for path in PATHS:
            try:
                row[path] = time_path(path, args.heads, n, k, args.listed, device, args.repeats)
            except Exception as error:  # noqa: BLE001 - a path that cannot run is a result
                row[path] = None
                row[path + "_error"] = f"{type(error).__name__}: {str(error)[:200]}"
        rows.append(row)
        cells = " ".join(
            f"{1e3 * row[p]:>12.2f}" if row[p] is not None else f"{'failed':>12}" for p in PATHS
        )
        print(f"{n:>6} {k:>5} {cells}  {row['chosen']}", flush=True)
    result = {"device": str(device), "heads": args.heads, "listed": args.listed}
    result |= {"failures": failures, "rows": rows}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    raise SystemExit(1 if main()["failures"] else 0)
