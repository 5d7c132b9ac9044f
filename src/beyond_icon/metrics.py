"""Evaluation: k-NN accuracy, trustworthiness, silhouette, an embedding's pieces, Hungarian
accuracy, NMI, ARI and a linear probe. Inputs are numpy arrays or tensors; outputs are plain
floats (the pieces: one id per point)."""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import connected_components
from sklearn import metrics as sk_metrics
from sklearn.manifold import trustworthiness as sk_trustworthiness
from sklearn.neighbors import KDTree, KNeighborsClassifier, NearestNeighbors

from beyond_icon._validation import is_int, is_real

__all__ = [
    "adjusted_rand",
    "cluster_size_entropy",
    "embedding_pieces",
    "hungarian_accuracy",
    "knn_accuracy",
    "linear_probe_accuracy",
    "nmi",
    "silhouette",
    "trustworthiness",
]


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def knn_accuracy(train_x, train_y, test_x, test_y, k: int = 5, metric: str = "euclidean") -> float:
    """Accuracy of a k-NN majority vote (``metric`` euclidean or cosine) fitted on train.

    Parameters
    ----------
    train_x : (n, d) array
        Reference points (e.g. the train embedding).
    train_y : (n,) integer array
    test_x : (m, d) array
        Query points.
    test_y : (m,) integer array
    k : int
        Neighbours voting.
    metric : {"euclidean", "cosine"}

    Returns
    -------
    float
    """
    if not (is_int(k) and k >= 1):
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    train_y, test_y = _ids(train_y, "train_y"), _ids(test_y, "test_y")
    train_x, test_x = _labelled_features(train_x, train_y, test_x, test_y)
    k = min(k, len(train_x))
    model = KNeighborsClassifier(n_neighbors=k, metric=metric, algorithm="brute", n_jobs=-1)
    model.fit(train_x, train_y)
    return float((model.predict(test_x) == test_y).mean())


def _labelled_features(
    train_x, train_y: np.ndarray, test_x, test_y: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Train and test features flattened to (n, d), one row per label, finite, with the same
    number of features."""
    features = []
    for name, x, y in (("train_x", train_x, train_y), ("test_x", test_x, test_y)):
        x = _np(x)
        x = x[:, None] if x.ndim == 1 else x  # one feature per point
        if x.ndim < 2 or len(x) != len(y) or not np.prod(x.shape[1:]):
            raise ValueError(
                f"{name} must have one row of features per label ({len(y)}), got shape {x.shape}"
            )
        x = x.reshape(len(x), -1)
        if x.dtype.kind not in "fiu":
            raise ValueError(f"{name} must be numeric, got dtype {x.dtype}")
        if not np.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or Inf")
        features.append(x)
    if features[0].shape[1] != features[1].shape[1]:
        raise ValueError(
            f"train_x has {features[0].shape[1]} features per row but test_x has "
            f"{features[1].shape[1]}"
        )
    return features[0], features[1]


def trustworthiness(high, low, k: int = 10, max_points: int = 10_000, seed: int = 0) -> float:
    """Trustworthiness (Venna & Kaski) of the low-dimensional ``low`` w.r.t. ``high``, in [0, 1].

    Computed on at most ``max_points`` points (a fixed random subset: the exact computation
    sorts an n x n distance matrix).

    Parameters
    ----------
    high : (n, D) array
        The input space.
    low : (n, d) array
        The embedding.
    k : int
        Neighbourhood size.
    max_points : int
        A random subset of this many points is scored.
    seed : int

    Returns
    -------
    float
        1 when every embedding neighbour is an input-space neighbour.

    References
    ----------
    Venna, J. and Kaski, S. (2001). Neighborhood preservation in nonlinear projection methods:
    an experimental study. ICANN.
    """
    if not (is_int(k) and k >= 1):
        raise ValueError(f"k must be a positive integer, got {k!r}")
    high, low = _np(high).reshape(len(high), -1), _np(low)
    if len(high) != len(low):
        raise ValueError(f"{len(high)} input points but {len(low)} embedded points")
    if len(high) > max_points:
        keep = np.random.default_rng(seed).choice(len(high), max_points, replace=False)
        high, low = high[keep], low[keep]
    k = min(k, len(high) // 2 - 1)
    if k < 1:
        raise ValueError("trustworthiness needs at least 4 points")
    return float(sk_trustworthiness(high, low, n_neighbors=k))


def embedding_pieces(embedding, k: int = 10, factor: float = 2.0) -> np.ndarray:
    """The pieces of an embedding: the connected components of its radius graph.

    Two points are joined when ``|z_i - z_j| <= r``, with ``r = factor * median_i d_k(i)`` and
    ``d_k(i)`` the distance from point ``i`` to its ``k``-th nearest neighbour. ``r`` follows
    the embedding's own local spacing, so the pieces do not change with its scale. A map that
    keeps a continuous dataset continuous gives few pieces, most points in the largest; one
    that breaks it into tight clumps with space between them (as a map made of cells can)
    gives many, which neighbourhood scores such as k-NN accuracy and trustworthiness at small
    ``k``, taken inside the clumps, do not see. Memory stays bounded when clumps are dense:
    above ``PIECES_MAX_PAIRS`` joined pairs the graph is merged in blocks of rows.

    Parameters
    ----------
    embedding : (n, d) array
        Finite real coordinates, ``n > k``.
    k : int
        The neighbour whose distance sets the local spacing (10).
    factor : float
        ``r`` in units of the median ``d_k`` (2).

    Returns
    -------
    (n,) int array
        The piece of each point, ``0 .. n_pieces - 1`` (in no particular order):
        ``ids.max() + 1`` pieces, ``np.bincount(ids).max() / n`` of the points in the largest.

    References
    ----------
    Ester, M., Kriegel, H.-P., Sander, J. and Xu, X. (1996). A density-based algorithm for
    discovering clusters in large spatial databases with noise. KDD. (The pieces are DBSCAN's
    clusters with ``eps = r`` and ``min_samples = 1``.)
    """
    if not (is_int(k) and k >= 1):
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if not (is_real(factor) and math.isfinite(factor) and factor > 0):
        raise ValueError(f"factor must be a positive finite number, got {factor!r}")
    x = _np(embedding)
    if x.dtype.kind not in "iuf":
        raise ValueError(f"the embedding must be real numbers, got {x.dtype}")
    x = x.reshape(len(x), -1).astype(np.float64)
    if len(x) <= k:
        raise ValueError(f"embedding_pieces needs more than k = {k} points, got {len(x)}")
    if not np.isfinite(x).all():
        raise ValueError("the embedding has non-finite coordinates")
    spacing = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)[0][:, k]
    radius = factor * float(np.median(spacing))
    # copies are one point to the graph: a collapsed clump of copies costs no pairs
    x, copies = np.unique(x, axis=0, return_inverse=True)
    copies = copies.reshape(-1)
    if not radius > 0:  # most points have k copies: each distinct point a piece
        return copies.astype(np.int64)
    tree = NearestNeighbors(radius=radius).fit(x)
    counts = KDTree(x).query_radius(x, radius, count_only=True)  # each row's joined points
    if counts.sum() <= PIECES_MAX_PAIRS:
        pieces = connected_components(tree.radius_neighbors_graph(x), directed=False)[1]
    else:
        pieces = _pieces_in_blocks(tree, x, counts)
    return pieces[copies].astype(np.int64)


PIECES_MAX_PAIRS = 20_000_000  # joined pairs built at once (about 240 MB of graph)
_PIECES_BLOCK_PAIRS = 5_000_000  # about the pairs of one block, when merged in blocks


def _pieces_in_blocks(tree: NearestNeighbors, x: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The radius graph's components, its rows' pairs (``counts`` a row) merged block by
    block: each point's label is its piece so far, and a block's pairs, as pairs of labels,
    join labels."""
    n = len(x)
    labels = np.arange(n)
    start = 0
    while start < n:
        stop = start + 1 + int(np.searchsorted(np.cumsum(counts[start:]), _PIECES_BLOCK_PAIRS))
        stop = min(stop, n)
        found = tree.radius_neighbors(x[start:stop], return_distance=False)
        rows = np.repeat(np.arange(start, stop), [len(f) for f in found])
        pairs = np.unique(np.stack([labels[rows], labels[np.concatenate(found)]], 1), axis=0)
        ids, inverse = np.unique(pairs, return_inverse=True)
        inverse = inverse.reshape(pairs.shape)
        graph = sp.coo_matrix(
            (np.ones(len(pairs)), (inverse[:, 0], inverse[:, 1])), (len(ids),) * 2
        )
        joined = connected_components(graph, directed=False)[1]
        first = np.full(joined.max() + 1, -1)
        first[joined[::-1]] = ids[::-1]  # each joined group's smallest label stands for it
        relabel = np.arange(n)
        relabel[ids] = first[joined]
        labels = relabel[labels]
        start = stop
    return np.unique(labels, return_inverse=True)[1].reshape(-1)


def silhouette(x, labels, max_points: int = 10_000, seed: int = 0) -> float:
    """Mean silhouette coefficient of the classes in ``x`` (in [-1, 1]).

    Parameters
    ----------
    x : (n, d) array
    labels : (n,) integer array
    max_points : int
        A random subset of this many points is scored (the cost is quadratic).
    seed : int

    Returns
    -------
    float

    References
    ----------
    Rousseeuw, P. J. (1987). Silhouettes: a graphical aid to the interpretation and validation of
    cluster analysis. Journal of Computational and Applied Mathematics 20.
    """
    x, labels = _np(x).reshape(len(x), -1), _np(labels)
    if len(np.unique(labels)) < 2:
        raise ValueError("silhouette needs at least two classes")
    size = min(max_points, len(x))
    return float(
        sk_metrics.silhouette_score(
            x, labels, sample_size=size if size < len(x) else None, random_state=seed
        )
    )


def hungarian_accuracy(labels, clusters) -> float:
    """Accuracy under the best one-to-one matching of clusters to classes (Hungarian method).

    Parameters
    ----------
    labels : (n,) integer array
        True classes.
    clusters : (n,) integer array
        Cluster assignments (any integer ids, negative or large ones too).

    Returns
    -------
    float
        In [0, 1]; with more clusters than classes the extra clusters count as errors.

    References
    ----------
    Kuhn, H. W. (1955). The Hungarian method for the assignment problem. Naval Research
    Logistics Quarterly 2.
    """
    labels, clusters = _partitions(labels, clusters)
    # compact ids (any values, negative or large, e.g. -1 for noise): a (clusters, classes)
    # table of the ids that occur, not of the largest id
    label_ids, label_index = np.unique(labels, return_inverse=True)
    cluster_ids, cluster_index = np.unique(clusters, return_inverse=True)
    counts = np.zeros((len(cluster_ids), len(label_ids)), dtype=np.int64)
    np.add.at(counts, (cluster_index, label_index), 1)
    rows, cols = linear_sum_assignment(-counts)
    return float(counts[rows, cols].sum() / len(labels))


def _ids(values, name: str) -> np.ndarray:
    """A non-empty 1-D array of integer ids (integral floats accepted, others refused)."""
    array = _np(values)
    if array.ndim != 1 or len(array) == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {array.shape}")
    if array.dtype.kind == "f":
        if not (np.isfinite(array).all() and np.array_equal(array, np.round(array))):
            raise ValueError(f"{name} must be integer ids, got non-integer values")
    elif array.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integer ids, got dtype {array.dtype}")
    return array.astype(np.int64)


def _partitions(labels, clusters) -> tuple[np.ndarray, np.ndarray]:
    """Classes and cluster assignments: integer ids, one of each per point."""
    labels, clusters = _ids(labels, "labels"), _ids(clusters, "clusters")
    if labels.shape != clusters.shape:
        raise ValueError(f"{len(labels)} labels but {len(clusters)} cluster assignments")
    return labels, clusters


def cluster_size_entropy(clusters, n_clusters: int) -> float:
    """Normalised entropy of the cluster sizes, ``H(sizes / n) / log(n_clusters)``.

    Parameters
    ----------
    clusters : (n,) integer array
        Cluster of each point, in ``[0, n_clusters)``.
    n_clusters : int
        K, the number of clusters available (empty ones count).

    Returns
    -------
    float in [0, 1]
        1 for equal sizes, 0 when every point is in one cluster. A collapsed partition is the
        failure mode of cluster losses without a balancing term.
    """
    if not (is_int(n_clusters) and n_clusters >= 2):
        raise ValueError(f"n_clusters must be an integer >= 2, got {n_clusters!r}")
    clusters = _ids(clusters, "clusters")
    if clusters.min() < 0 or clusters.max() >= n_clusters:
        raise ValueError(
            f"clusters must be in [0, {n_clusters}), got {clusters.min()}..{clusters.max()}"
        )
    share = np.bincount(clusters, minlength=n_clusters) / len(clusters)
    share = share[share > 0]
    # + 0.0: one cluster gives -0 * log(1) = -0.0, which JSON writes as -0.0
    return float((share * -np.log(share)).sum() / np.log(n_clusters)) + 0.0


def nmi(labels, clusters) -> float:
    """Normalised mutual information of clusters and classes (arithmetic normalisation), in
    [0, 1].

    Parameters
    ----------
    labels : (n,) integer array
        True classes.
    clusters : (n,) integer array
        Cluster assignments (any integer ids).

    Returns
    -------
    float

    References
    ----------
    Strehl, A. and Ghosh, J. (2002). Cluster ensembles. JMLR 3.
    """
    return float(sk_metrics.normalized_mutual_info_score(*_partitions(labels, clusters)))


def adjusted_rand(labels, clusters) -> float:
    """Adjusted Rand index of clusters and classes: 0 for chance, 1 for identical partitions.

    Parameters
    ----------
    labels : (n,) integer array
        True classes.
    clusters : (n,) integer array
        Cluster assignments (any integer ids).

    Returns
    -------
    float

    References
    ----------
    Hubert, L. and Arabie, P. (1985). Comparing partitions. Journal of Classification 2.
    """
    return float(sk_metrics.adjusted_rand_score(*_partitions(labels, clusters)))


def linear_probe_accuracy(
    train_x,
    train_y,
    test_x,
    test_y,
    *,
    epochs: int = 100,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> float:
    """Test accuracy of a linear classifier trained (Adam, cross-entropy) on frozen,
    standardised train features.

    Parameters
    ----------
    train_x, train_y, test_x, test_y : arrays
        Frozen features and their labels.
    epochs, lr, weight_decay, batch_size : training of the probe
    device : str
    seed : int
        The probe's starting weights and the batch order.

    Returns
    -------
    float
    """
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not (is_int(value) and value >= 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    device = torch.device(device)
    y_train, y_test = _ids(train_y, "train_y"), _ids(test_y, "test_y")
    _, compact = np.unique(np.concatenate([y_train, y_test]), return_inverse=True)  # 0..C-1
    xtr, xte = (
        torch.as_tensor(x, dtype=torch.float32, device=device)
        for x in _labelled_features(train_x, y_train, test_x, y_test)
    )
    ytr = torch.as_tensor(compact[: len(y_train)], dtype=torch.long, device=device)
    yte = torch.as_tensor(compact[len(y_train) :], dtype=torch.long, device=device)
    mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    n_classes = int(max(ytr.max(), yte.max())) + 1
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the probe's start from seed, not the global RNG
        torch.manual_seed(seed)
        probe = torch.nn.Linear(xtr.shape[1], n_classes).to(device)
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    for _ in range(epochs):
        order = torch.randperm(len(xtr), generator=gen).to(device)
        for idx in order.split(batch_size):
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(probe(xtr[idx]), ytr[idx]).backward()
            optimizer.step()
        schedule.step()
    with torch.no_grad():
        return float((probe(xte).argmax(1) == yte).float().mean())
