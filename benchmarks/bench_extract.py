"""Streamed extraction against the in-memory path: images/s and peak resident memory.

Runs ``beyond-icon extract`` as a child process on an image folder, twice: into a features
folder (streamed: DataLoader workers decode and resize, chunks go to disk as they come) and into
one .npz (the whole folder decoded into memory first). The resident memory of the process and
all its children (the decoding workers) is sampled from /proc every 0.1 s as the sum of their
proportional set sizes (a page shared by forked workers counts once) and the peak reported. The encoder is small and local (:func:`tiny_encoder`, a two-layer strided CNN
at 224 x 224) so that the figure measures the pipeline, not a ViT on 2 CPU cores.

    python benchmarks/bench_extract.py --folder /tmp/cifar/cifar10-jpeg --limit 6000,60000

``--limit`` also measures subsets (the first N images of a copy of the folder, classes kept) to
show how memory grows with the number of images. With ``--resume-check`` the streamed run is
interrupted (SIGINT after the first chunks), resumed, and its features compared bit for bit
with an uninterrupted run's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent


def tiny_encoder() -> nn.Module:
    """A fixed random two-layer strided CNN, 224 x 224 x 3 -> 128 (about 6 M multiply-adds)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 8, stride=8),
        nn.GELU(),
        nn.Conv2d(32, 64, 4, stride=4),
        nn.GELU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 128),
    )


def _tree_rss_kib(pid: int) -> int:
    """Resident KiB of ``pid`` and all its descendants (the sum of their PSS)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        stack += children.get(p, [])
        try:  # proportional set size: pages shared with the forked workers counted once
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


def _run(args: list[str], interrupt_after_chunks: int | None = None, out: Path | None = None):
    """Run the CLI; (seconds, peak MiB, return code)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "beyond_icon", "extract", *args, "--quiet"]
    started = time.perf_counter()
    child = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    peak = 0
    while child.poll() is None:
        peak = max(peak, _tree_rss_kib(child.pid))
        if interrupt_after_chunks is not None and out is not None:
            chunks = list((out / ".chunks").glob("*-*[0-9].npz"))
            if len(chunks) >= interrupt_after_chunks:
                child.send_signal(signal.SIGINT)
                interrupt_after_chunks = None
        time.sleep(0.1)
    stderr = child.stderr.read()
    if child.returncode not in (0, 130):
        raise SystemExit(f"extract failed ({child.returncode}): {stderr[-2000:]}")
    return time.perf_counter() - started, peak / 1024, child.returncode


def _subset(folder: Path, limit: int, where: Path) -> Path:
    """A folder of links to the first ``limit`` images (split and class layout kept)."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    step = max(1, len(files) // limit)
    for p in files[::step][:limit]:
        target = where / p.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(p)
    return where


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, required=True, help="an image folder")
    parser.add_argument("--limit", default="", help="comma-separated subset sizes to add")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--skip-in-memory", action="store_true")
    parser.add_argument("--resume-check", action="store_true")
    args = parser.parse_args()
    encoder = f"{Path(__file__).resolve()}:tiny_encoder"
    common = ["--encoder", encoder, "--batch-size", str(args.batch_size), "--device", "cpu"]
    common += ["--image-size", "224"]
    if args.workers is not None:
        common += ["--workers", str(args.workers)]
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, encoder tiny_encoder at 224 x 224")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folders = [(None, args.folder)]
        for limit in [int(v) for v in args.limit.split(",") if v]:
            folders.append((limit, _subset(args.folder, limit, tmp / f"subset{limit}")))
        for limit, folder in folders:
            data = ["--data", f"imagefolder:{folder}"]
            out = tmp / f"features{limit}"
            seconds, peak, _ = _run([*common, *data, "--out", str(out)])
            meta = json.loads((out / "meta.json").read_text())
            n = sum(meta["splits"].values())
            rows.append(("streamed", n, seconds, n / seconds, peak))
            print(
                f"streamed  {n:>7} images: {seconds:7.1f} s, {n / seconds:7.0f} img/s, "
                f"peak memory {peak:7.0f} MiB",
                flush=True,
            )
            if not args.skip_in_memory:
                npz = tmp / f"features{limit}.npz"
                # the in-memory path caches the decoded folder: remove it so decoding is measured
                for cache in folder.glob(".beyond-icon-cache.npz"):
                    cache.unlink()
                seconds, peak, _ = _run([*common, *data, "--out", str(npz)])
                rows.append(("in memory", n, seconds, n / seconds, peak))
                print(
                    f"in memory {n:>7} images: {seconds:7.1f} s, {n / seconds:7.0f} img/s, "
                    f"peak memory {peak:7.0f} MiB",
                    flush=True,
                )
                for cache in folder.glob(".beyond-icon-cache.npz"):
                    cache.unlink()
            if args.resume_check and limit == min(
                [v for v, _ in folders if v is not None], default=None
            ):
                resumed = tmp / f"resumed{limit}"
                _, _, code = _run([*common, *data, "--out", str(resumed)], 1, resumed)
                left = len(list((resumed / ".chunks").glob("*-*[0-9].npz")))
                _run([*common, *data, "--out", str(resumed)])
                same = all(
                    np.array_equal(np.load(out / f"x_{s}.npy"), np.load(resumed / f"x_{s}.npy"))
                    for s in ("train", "test")
                )
                print(
                    f"interrupted (exit {code}) with {left} chunks on disk, resumed: "
                    f"features {'identical' if same else 'DIFFERENT'} bit for bit",
                    flush=True,
                )
            shutil.rmtree(out, ignore_errors=True)
    print("\n| path | images | seconds | images/s | peak memory (MiB) |\n|---|---:|---:|---:|---:|")
    for name, n, seconds, rate, peak in rows:
        print(f"| {name} | {n} | {seconds:.1f} | {rate:.0f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
