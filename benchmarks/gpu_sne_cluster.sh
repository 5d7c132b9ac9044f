#!/usr/bin/env bash
# The GPU check of issues 10 and 11, one script (sized for about 8 minutes on one H200):
#   1. the cluster head's step, I-Con (TV) against TEMI's PMI on the same batch, at batch 256 and
#      4096, K = 20 and 1000, for the paper's pair-only p (--neighbor-mix 0) and the default p
#      (--neighbor-mix 0.75, the batch's 20-NN searched every step): bench_cluster_head.py;
#   2. neighbour mining: the exact cosine 20-NN of 100k random 384-d points on the device;
#   3. bench_sne.py on Fashion-MNIST 10k / 10k with ours on the device: KL with default settings,
#      openTSNE on the machine's CPUs as the same run's reference (UMAP left out: its fit and
#      transform took 142 s there), then KL with the plain 256-256 MLP of before the cells
#      (n_cells=0 hidden=[256,256]: what the cells cost and gain on a GPU), KL with batches of 4,096 anchors (more negatives, the lever 2 CPU
#      cores cannot afford), then TV, JSD and Hellinger;
#   4. while BUDGET seconds allow: the same on the full 60k / 10k, KL only.
# Every stage writes its rows to OUTDIR as it goes, so a run cut short keeps what it measured.
#
# Its first run (2026-11-29, one H200 behind 16 slow CPU cores) had UMAP and variants for the
# MLP and for batches of 1,024 anchors in stage 3, and was stopped at 590 s in the batch-4096
# row: stages 1 and 2 took about a minute. The MLP's fit took 24 s there, as on 2 local cores,
# so the host rather than the GPU seems to bound the SNE step (not profiled there); openTSNE
# took 51 s there against 23 s on 2 local cores.
#
#   BEYOND_ICON_DATA=DIR TEXT=stackoverflow_minilm.npz OUTDIR=out benchmarks/gpu_sne_cluster.sh
#   DEVICE=cpu benchmarks/gpu_sne_cluster.sh --smoke   # tiny sizes on any machine (the test suite)
#
# Fashion-MNIST is found as data.load finds it ($BEYOND_ICON_DATA, the Debian package). TEXT is an
# embeddings .npz (x, y); without one, stage 1 times random 384-d embeddings of the same size.
# PY (default .venv/bin/python, else python3 with src/ on the path) needs openTSNE for stages 3
# and 4 (a GPU machine without a registry: carry its wheel, see the device notes).
set -euo pipefail

DEVICE=${DEVICE:-cuda}
# shellcheck source=benchmarks/_python.sh
source "$(dirname "$0")/_python.sh"
export PYTHONUNBUFFERED=1
OUTDIR=${OUTDIR:-$(mktemp -d)}
mkdir -p "$OUTDIR"
BUDGET=${BUDGET:-480}
if [ "${1:-}" = "--smoke" ]; then
    BATCHES="32,64"; CLUSTERS="5,10"; REPEATS=2; MINE_N=2000; MINE_D=16
    SNE_DATA="--data digits --n-train 300 --n-test 100"; SNE_SET="--set n_steps=20"
    SNE_BASELINES="--skip-baselines"; VARIANTS=("backbone=cnn" "batch_size=128")
    LARGE_DATA="--data digits --n-train 400 --n-test 100"; LARGE_NEEDS=0
    TEXT_N=600
else
    BATCHES="256,4096"; CLUSTERS="20,1000"; REPEATS=10; MINE_N=100000; MINE_D=384
    SNE_DATA="--data fashion-mnist --n-train 10000 --n-test 10000"; SNE_SET=""
    SNE_BASELINES="--skip-umap"
    VARIANTS=("n_cells=0 hidden=[256,256]" "batch_size=4096")
    LARGE_DATA="--data fashion-mnist"; LARGE_NEEDS=200
    TEXT_N=20000
fi
started=$(date +%s)
elapsed() { echo $(( $(date +%s) - started )); }

echo "== device"
"$PY" - "$DEVICE" <<'PY'
import sys, torch
device = sys.argv[1]
name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "CPU"
print(f"torch {torch.__version__} on {device} ({name}), {torch.get_num_threads()} CPU threads")
PY

echo "== cluster head step: I-Con (TV) against PMI"
text=${TEXT:-}
if [ -z "$text" ]; then
    text="$OUTDIR/random_text.npz"
    "$PY" - "$text" "$TEXT_N" <<'PY'
import sys
import numpy as np
rng = np.random.default_rng(0)
n = int(sys.argv[2])
np.savez(sys.argv[1], x=rng.standard_normal((n, 384)).astype(np.float16), y=rng.integers(0, 20, n))
PY
fi
for mix in 0 0.75; do
    echo "-- neighbor_mix $mix"
    "$PY" benchmarks/bench_cluster_head.py --data "embeddings:$text" --device "$DEVICE" \
        --batch-sizes "$BATCHES" --clusters "$CLUSTERS" --neighbor-mix "$mix" \
        --batch-neighbors 20 --repeats "$REPEATS" --json "$OUTDIR/cluster_step_mix$mix.json"
done

echo "== neighbour mining: exact cosine 20-NN of $MINE_N random $MINE_D-d points on $DEVICE"
"$PY" - "$DEVICE" "$MINE_N" "$MINE_D" <<'PY'
import sys, time
import numpy as np
import torch
from beyond_icon.neighbors import mine_neighbors
device, n, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
mine_neighbors(x[:1000], 20, metric="cosine", device=device)  # warm-up
started = time.perf_counter()
table = mine_neighbors(x, 20, metric="cosine", device=device)
print(f"mining: {n} x {d}, k = 20: {time.perf_counter() - started:.2f} s, table {table.shape}")
PY
echo "(elapsed $(elapsed) s)"

echo "== bench_sne, ours on $DEVICE: KL with defaults, the baselines, then KL variants"
variant_args=()
for v in "${VARIANTS[@]}"; do variant_args+=(--variant "$v"); done
# shellcheck disable=SC2086
"$PY" benchmarks/bench_sne.py $SNE_DATA $SNE_SET $SNE_BASELINES --device "$DEVICE" \
    --divergences kl "${variant_args[@]}" --json "$OUTDIR/sne_10k_kl.json"
echo "(elapsed $(elapsed) s)"
echo "== bench_sne, ours on $DEVICE: the bounded divergences with defaults"
# shellcheck disable=SC2086
"$PY" benchmarks/bench_sne.py $SNE_DATA $SNE_SET --skip-baselines --device "$DEVICE" \
    --divergences tv,jsd,hellinger --json "$OUTDIR/sne_10k_bounded.json"
echo "(elapsed $(elapsed) s)"

if [ $(( $(elapsed) + LARGE_NEEDS )) -le "$BUDGET" ]; then
    echo "== bench_sne, full training set, KL"
    # shellcheck disable=SC2086
    "$PY" benchmarks/bench_sne.py $LARGE_DATA $SNE_SET $SNE_BASELINES --device "$DEVICE" \
        --divergences kl --variant "batch_size=4096" --json "$OUTDIR/sne_full.json"
else
    echo "== bench_sne, full training set: skipped, $(elapsed) s of the $BUDGET s budget spent"
fi
echo "gpu_sne_cluster: done in $(elapsed) s"
