#!/usr/bin/env bash
# The GPU check of issue 13, one script (under 8 minutes on one GPU):
#   1. bench_loss on the device in float32 and bfloat16 at n = 4096 and 16384 (chunked);
#   2. a SupCon run of the paper config (ResNet-50, batch 2048, Euclidean kernel) on the
#      CIFAR-10 JPEG copy for 2 epochs of 5 steps, reporting images/s of the second;
#   3. the cluster task (the paper's pair-only p, --neighbor-mix 0) at batch 4096 with
#      K = 1000 on 1M random 768-d embeddings (one pass over the anchors: 244 steps, the
#      budget rounds up to whole passes): mining time, step time, peak GPU memory;
#   4. streamed extraction (issue 14) of the CIFAR-10 JPEG copy at 224 x 224: images/s with a
#      small local CNN (the pipeline: decoding workers, transfer, writing), and with DINOv2
#      ViT-S/14 when its weights are in the torch.hub cache (a machine without network has
#      none: the step says so and skips it).
#
#   benchmarks/gpu_check.sh                 # on cuda, full sizes
#   DEVICE=cpu benchmarks/gpu_check.sh --smoke   # tiny sizes on any machine (the test suite)
#
# CIFAR (default ../shared/data/cifar10-jpeg.tar.gz) may be the .tar.gz or an unpacked folder
# with train/ and test/. PY (default .venv/bin/python, else python3 with src/ on the path) runs
# everything; a GPU machine needs its own CUDA torch plus numpy, scikit-learn, scipy, PyYAML,
# tqdm, matplotlib and Pillow.
set -euo pipefail

DEVICE=${DEVICE:-cuda}
# shellcheck source=benchmarks/_python.sh
source "$(dirname "$0")/_python.sh"
CIFAR=${CIFAR:-../shared/data/cifar10-jpeg.tar.gz}
if [ "${1:-}" = "--smoke" ]; then
    LOSS_SIZES="256"; LARGE_SIZES="512"; LARGE_CHUNK=128
    SUPCON_ARGS="--n-train 64 --n-test 32 --batch-size 32 --backbone cnn --probe-epochs 1"
    EMB_N=3000; EMB_DIM=32; K=10; BATCH=256; STEPS=5
else
    LOSS_SIZES="4096"; LARGE_SIZES="16384"; LARGE_CHUNK=1024
    # 2 epochs of 5 steps of 2048: images/s is taken from the last epoch, after the warm-up
    SUPCON_ARGS="--n-train 10240 --n-test 1000 --probe-epochs 1"
    EMB_N=1000000; EMB_DIM=768; K=1000; BATCH=4096; STEPS=50
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
started=$(date +%s)

for dtype in float32 bfloat16; do
    echo "== bench_loss on $DEVICE in $dtype"
    "$PY" benchmarks/bench_loss.py --device "$DEVICE" --dtype "$dtype" --sizes $LOSS_SIZES \
        --large-sizes $LARGE_SIZES --large-chunk-size $LARGE_CHUNK --repeats 3
done

echo "== supcon, paper config, CIFAR-10 JPEG copy"
if [ -d "$CIFAR" ]; then
    images="$CIFAR"
else
    tar -xzf "$CIFAR" -C "$work"
    images="$work/cifar10-jpeg"
fi
# shellcheck disable=SC2086
"$PY" -m beyond_icon supcon --config configs/paper/cifar10_supcon.yaml \
    --data "imagefolder:$images" --device "$DEVICE" --epochs 2 $SUPCON_ARGS \
    --out "$work/supcon" --quiet
"$PY" - "$work/supcon/metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"supcon: {m['images_per_s']:.1f} images/s (2 views each), train {m['train_time_s']:.1f} s")
PY

echo "== cluster: batch $BATCH, K = $K, $EMB_N random $EMB_DIM-d embeddings"
"$PY" - "$work/emb.npz" "$EMB_N" "$EMB_DIM" <<'PY'
import sys
import numpy as np
path, n, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
test = max(n // 100, 100)  # a small test split: evaluating the heads on 1M points is not the point
np.savez(path, x=rng.standard_normal((n, d), dtype=np.float32).astype(np.float16),
         y=rng.integers(0, 10, n),
         x_test=rng.standard_normal((test, d), dtype=np.float32).astype(np.float16),
         y_test=rng.integers(0, 10, test))
PY
"$PY" -m beyond_icon cluster --data "embeddings:$work/emb.npz" --n-clusters "$K" \
    --batch-size "$BATCH" --n-steps "$STEPS" --kmeans-init 0 --neighbor-mix 0 --device "$DEVICE" \
    --out "$work/cluster" --quiet
"$PY" - "$work/cluster/metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
memory = m.get("peak_gpu_memory_mib")
print(f"cluster: mining {m['mining_time_s']:.1f} s, {1e3 * m['step_time_s']:.1f} ms per step "
      f"({m['n_steps']} steps), peak GPU memory "
      + (f"{memory:.0f} MiB" if memory is not None else "n/a (not on a GPU)"))
PY
echo "== extract: streamed, CIFAR-10 JPEG copy at 224 x 224"
folder="$images"
if [ "${1:-}" = "--smoke" ]; then  # 13 images of each class and split, linked
    folder="$work/few"
    for class_dir in "$images"/train/* "$images"/test/*; do  # every class in both splits
        find "$class_dir" -name "*.jpg" | sort | awk "NR <= 13" | while read -r f; do
            rel=${f#"$images/"}; mkdir -p "$folder/$(dirname "$rel")"; ln -s "$f" "$folder/$rel"
        done
    done
fi
report_extract() {
    "$PY" - "$1/meta.json" "$2" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
rate = m["images_per_second"]
print(f"extract ({sys.argv[2]}): {sum(m['splits'].values())} images x {m['dim']}, "
      + (f"{rate:.0f} images/s" if rate else "rate n/a"))
PY
}
"$PY" -m beyond_icon extract --encoder benchmarks/bench_extract.py:tiny_encoder \
    --data "imagefolder:$folder" --image-size 224 --device "$DEVICE" --out "$work/tiny" --quiet
report_extract "$work/tiny" "small CNN"
if "$PY" -c "import os, sys, torch; sys.exit(0 if os.path.isdir(os.path.join(torch.hub.get_dir(), 'facebookresearch_dinov2_main')) else 1)"; then
    "$PY" -m beyond_icon extract --encoder dinov2_vits14 --data "imagefolder:$folder" \
        --device "$DEVICE" --batch-size 512 --out "$work/dino" --quiet
    report_extract "$work/dino" "DINOv2 ViT-S/14"
else
    echo "extract (DINOv2 ViT-S/14): skipped, its weights are not in the torch.hub cache"
fi
echo "gpu_check: done in $(( $(date +%s) - started )) s"
