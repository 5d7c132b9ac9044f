"""What frozen features allow a cluster head: neighbour purity, graph clustering, a linear bound.

For each embeddings file (``x``, ``y``; the text sets of ``../shared/data/text-embeddings``)
prints, on the features as ``beyond-icon cluster`` sees them:

- the label purity of the mined cosine k-NN (the fraction of a point's k nearest neighbours that
  share its label; the pairs of the cluster task are drawn from the 20 nearest), and of the
  mutual pairs among the 20 (j in i's 20 and i in j's);
- spectral clustering of that symmetrised 20-NN graph (normalised adjacency, its K leading
  eigenvectors, row-normalised, k-means with 10 restarts): what a method that only sees the
  mined graph reaches, accuracy / NMI;
- k-means (n_init 10) on the standardised features, the baseline row of ``beyond-icon cluster``;
- a supervised linear classifier (logistic regression, C = 0.1, on the standardised features,
  3-fold cross-validated predictions): an upper bound for a linear head, which is what the
  default head is.

    python benchmarks/cluster_ceiling.py --data /tmp/te/stackoverflow_minilm.npz [more files]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy import sparse
from scipy.sparse.linalg import eigsh
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_predict

from beyond_icon import metrics
from beyond_icon.neighbors import mine_neighbors


def spectral(neighbors: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Clusters of the symmetrised k-NN graph by normalised spectral clustering."""
    n, m = neighbors.shape
    rows = np.repeat(np.arange(n), m)
    graph = sparse.csr_matrix((np.ones(n * m), (rows, neighbors.ravel())), shape=(n, n))
    graph = ((graph + graph.T) > 0).astype(np.float64)
    scale = sparse.diags(1.0 / np.sqrt(np.asarray(graph.sum(axis=1)).ravel()))
    _, vectors = eigsh(scale @ graph @ scale, k, which="LA")
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return KMeans(k, n_init=10, random_state=seed).fit_predict(vectors)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", required=True, help="embeddings .npz files")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = []
    for path in args.data:
        started = time.perf_counter()
        loaded = np.load(path)
        x, y = loaded["x"].astype(np.float32), loaded["y"]
        k = len(np.unique(y))
        neighbors = np.asarray(mine_neighbors(torch.from_numpy(x), 20, metric="cosine"))
        same = y[neighbors] == y[:, None]
        back = np.zeros_like(same)
        members = [set(row) for row in neighbors.tolist()]
        for i, row in enumerate(neighbors.tolist()):
            back[i] = [i in members[j] for j in row]
        # per-feature standardisation, as the head and the k-means row see the features
        standard = (x - x.mean(0)) / np.maximum(x.std(0), 1e-6)
        kmeans = KMeans(k, n_init=10, random_state=args.seed).fit_predict(standard)
        graph = spectral(neighbors, k, args.seed)
        linear = cross_val_predict(LogisticRegression(C=0.1, max_iter=300), standard, y, cv=3)
        row = {
            "data": path,
            **{f"purity@{m}": float(same[:, :m].mean()) for m in (1, 5, 20)},
            "mutual_fraction@20": float(back.mean()),
            "mutual_purity@20": float(same[back].mean()),
        }
        for name, found in (("spectral", graph), ("kmeans", kmeans), ("linear", linear)):
            row[f"{name}_acc"] = metrics.hungarian_accuracy(y, found)
            row[f"{name}_nmi"] = metrics.nmi(y, found)
        row["seconds"] = time.perf_counter() - started
        rows.append(row)
        print(
            " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        )
    return rows


if __name__ == "__main__":
    main()
