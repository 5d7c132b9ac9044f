"""Parametric SNE (ours, several divergences) against openTSNE and UMAP on the same data.

Each method embeds the train split (ours also maps the test split through its network; openTSNE
uses its ``transform`` of new points, UMAP its ``transform``), then the same metrics are taken
on the test split: 5-NN accuracy (train embedding as reference), trustworthiness (k = 10, w.r.t.
the PCA-50 inputs) and wall time of fitting. One run per method, one table.

    pip install -e ".[bench]"
    python benchmarks/bench_sne.py --data fashion-mnist --n-train 10000 --n-test 10000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.decomposition import PCA

from beyond_icon import data, metrics
from beyond_icon.data import as_float
from beyond_icon.tasks.sne import ParametricSNE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits")
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument("--n-test", type=int, default=None)
    parser.add_argument("--divergences", default="kl,tv,jsd,hellinger")
    parser.add_argument("--kernel", default="student_t")
    parser.add_argument("--backbone", default="mlp")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        import openTSNE
        import umap
    except ImportError as error:
        raise SystemExit(
            f"this benchmark needs the bench extra (pip install -e '.[bench]'): {error}"
        ) from None

    dataset = data.load(args.data).subset(args.n_train, args.n_test)
    x_train = as_float(dataset.x_train).reshape(len(dataset.x_train), -1)
    x_test = as_float(dataset.x_test).reshape(len(dataset.x_test), -1)
    pca = PCA(min(50, x_train.shape[1]), random_state=0).fit(x_train)
    p_train, p_test = pca.transform(x_train), pca.transform(x_test)
    print(f"{dataset.describe()}; torch threads {torch.get_num_threads()}\n")

    rows = []

    def record(name, fit_seconds, emb_train, emb_test):
        rows.append(
            (
                name,
                fit_seconds,
                metrics.knn_accuracy(emb_train, dataset.y_train, emb_test, dataset.y_test, 5),
                metrics.trustworthiness(p_test, emb_test, k=10),
            )
        )
        print(f"  {name}: {fit_seconds:.1f} s", flush=True)

    for divergence in args.divergences.split(","):
        est = ParametricSNE(
            kernel=args.kernel,
            divergence=divergence,
            backbone=args.backbone,
            epochs=args.epochs,
            random_state=args.seed,
            device="cpu",
        )
        started = time.perf_counter()
        est.fit(dataset.x_train)
        seconds = time.perf_counter() - started
        record(
            f"beyond-icon ParametricSNE ({args.kernel}, {divergence})",
            seconds,
            est.embedding_,
            est.transform(dataset.x_test),
        )

    started = time.perf_counter()
    tsne = openTSNE.TSNE(perplexity=30, n_jobs=-1, random_state=args.seed).fit(p_train)
    seconds = time.perf_counter() - started
    record(
        "openTSNE (non-parametric, transform for test)",
        seconds,
        np.asarray(tsne),
        np.asarray(tsne.transform(p_test)),
    )

    started = time.perf_counter()
    reducer = umap.UMAP(n_neighbors=15, random_state=args.seed)
    emb_train = reducer.fit_transform(p_train)
    seconds = time.perf_counter() - started
    record("UMAP (transform for test)", seconds, emb_train, reducer.transform(p_test))

    print("\n| method | fit time (s) | 5-NN acc (test) | trustworthiness (test, k=10) |")
    print("|---|---:|---:|---:|")
    for name, seconds, knn, trust in rows:
        print(f"| {name} | {seconds:.1f} | {knn:.3f} | {trust:.3f} |")


if __name__ == "__main__":
    main()
