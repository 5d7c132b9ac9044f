"""Where a fitted ParametricSNE's test 5-NN accuracy comes from: its cells.

The MLP's cells (:class:`beyond_icon.models.CellMLP`) let the map jump between the k-means
cells of its input space. This script fits the default estimator (or ``--set`` settings) and
asks how much of the embedding's 5-NN classifier is a vote inside the test point's own cell:

- ``own_cell``: the fraction of a test point's 5 embedding neighbours (among the training
  points) that lie in its own cell; ``all_five``: the fraction of test points whose 5 all do;
- the same test points classified by votes inside their own cell: ``embedding`` (the 5
  nearest in the embedding, restricted to the cell), ``random`` (5 members drawn at random),
  ``majority`` (the whole cell's majority label), ``local_pca`` (the 5 nearest in the plane of
  the cell's own top two principal directions: what a linear map per cell could order by),
  ``inputs`` (the 5 nearest in the network's input space, the PCA features, inside the cell),
  beside ``inputs_all`` (the 5 nearest in the input space, any cell) and ``knn5`` (the
  embedding's plain 5-NN accuracy);
- the train embedding's pieces (:func:`beyond_icon.metrics.embedding_pieces`: connected
  components of the graph that joins points within ``2 x`` the median distance to the 10th
  neighbour), the median size of a point's piece and the median number of cells in it.

If ``all_five`` is near 1, the embedding's 5-NN accuracy is a vote inside the cells, and it is
bounded by how well the map orders the points of a cell (``embedding`` against ``random`` and
``local_pca``), not by the layout of the cells.

Usage::

    python benchmarks/sne_cells.py --data fashion-mnist --seed 1
    python benchmarks/sne_cells.py --data fashion-mnist --n-train 10000 --n-test 10000
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
from sklearn.neighbors import NearestNeighbors

from beyond_icon import data, metrics
from beyond_icon.models import CellMLP
from beyond_icon.parametric_sne import ParametricSNE, _float_tensor


def _vote(labels: np.ndarray) -> np.ndarray:
    """The majority label of each row of ``labels`` (ties: the smallest label)."""
    counts = np.zeros((len(labels), int(labels.max()) + 1), dtype=np.int64)
    np.add.at(counts, (np.arange(len(labels))[:, None], labels), 1)
    return counts.argmax(1)


def _hits(train: np.ndarray, test: np.ndarray, labels: np.ndarray, truth, k: int) -> int:
    """How many ``test`` rows the vote of their ``k`` nearest ``train`` rows labels right."""
    found = NearestNeighbors(n_neighbors=k).fit(train).kneighbors(test)[1]
    return int((_vote(labels[found]) == truth).sum())


@torch.no_grad()
def network_inputs(estimator: ParametricSNE, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The inputs of a fitted estimator's cell MLP (its PCA features) and their cells.

    Parameters
    ----------
    estimator : ParametricSNE
        Fitted, with cells.
    x : (n, ...) array
        Points as ``fit`` takes them.

    Returns
    -------
    features : (n, k) float32 array
    cells : (n,) int64 array
        The cell ``transform`` gives each point.
    """
    body = estimator.model_[2]
    if not isinstance(body, CellMLP):
        raise ValueError("this estimator has no cells (n_cells=0 or a backbone without them)")
    x = estimator._check_new(x)
    stem = estimator.model_[0].eval()
    device = next(estimator.model_.parameters()).device
    flat = _float_tensor(x, device).reshape(len(x), -1)
    z = torch.cat([stem(flat[s : s + 8192]) for s in range(0, len(flat), 8192)])
    return z.cpu().numpy(), body.cells(z).cpu().numpy()


def cell_votes(
    estimator: ParametricSNE,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    k: int = 5,
    seed: int = 0,
) -> dict:
    """The measures of the module docstring for a fitted estimator.

    Parameters
    ----------
    estimator : ParametricSNE
        Fitted on ``x_train``, with cells.
    x_train, y_train, x_test, y_test : arrays
    k : int
        Neighbours of a vote (5).
    seed : int
        Seed of the random votes.

    Returns
    -------
    dict
        ``own_cell``, ``all_five``, ``knn5``, ``votes`` (a dict of accuracies), ``pieces``,
        ``piece_size`` and ``cells_per_piece``.
    """
    rng = np.random.default_rng(seed)
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    z_train, c_train = network_inputs(estimator, x_train)
    z_test, c_test = network_inputs(estimator, x_test)
    e_train, e_test = estimator.embedding_, estimator.transform(x_test)
    near = NearestNeighbors(n_neighbors=k).fit(e_train).kneighbors(e_test, return_distance=False)
    same = c_train[near] == c_test[:, None]
    right = {name: 0 for name in ("embedding", "random", "majority", "local_pca", "inputs")}
    order = np.argsort(c_train, kind="stable")
    cells = len(estimator.model_[2].landmarks)  # a cell may hold no training point
    starts = np.searchsorted(c_train[order], np.arange(cells + 1))
    counted = 0
    for cell in np.unique(c_test):
        members = order[starts[cell] : starts[cell + 1]]
        tests = np.flatnonzero(c_test == cell)
        if len(members) == 0:  # a cell no training point falls in: no vote
            continue
        counted += len(tests)
        kk = min(k, len(members))
        truth, labels = y_test[tests], y_train[members]

        right["embedding"] += _hits(e_train[members], e_test[tests], labels, truth, kk)
        right["inputs"] += _hits(z_train[members], z_test[tests], labels, truth, kk)
        centred = z_train[members] - z_train[members].mean(0)
        plane = np.linalg.svd(centred, full_matrices=False)[2][:2]
        right["local_pca"] += _hits(
            centred @ plane.T,
            (z_test[tests] - z_train[members].mean(0)) @ plane.T,
            labels,
            truth,
            kk,
        )
        drawn = np.stack([rng.choice(len(members), kk, replace=False) for _ in tests])
        right["random"] += int((_vote(labels[drawn]) == truth).sum())
        right["majority"] += int((np.bincount(labels).argmax() == truth).sum())
    votes = {name: hits / len(y_test) for name, hits in right.items()}
    found = NearestNeighbors(n_neighbors=k).fit(z_train).kneighbors(z_test)[1]
    votes["inputs_all"] = float((_vote(y_train[found]) == y_test).mean())
    # the train embedding's pieces
    piece = metrics.embedding_pieces(e_train)  # r = 2 x the median distance to the 10th
    n_pieces = int(piece.max()) + 1
    sizes = np.bincount(piece)
    cells_in = np.array(
        [len(np.unique(c_train[piece == p])) for p in range(n_pieces)] if n_pieces < 20000 else [0]
    )
    return {
        "own_cell": float(same.mean()),
        "all_five": float(same.all(1).mean()),
        "knn5": float((_vote(y_train[near]) == y_test).mean()),
        "votes": votes,
        "voted": counted / len(y_test),
        "pieces": int(n_pieces),
        "piece_size": float(np.median(sizes[piece])),
        "cells_per_piece": float(np.median(cells_in[piece])) if n_pieces < 20000 else float("nan"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--n-train", type=int, default=None, help="first N training points")
    parser.add_argument("--n-test", type=int, default=None, help="first N test points")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--divergence", default="kl")
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="estimator setting"
    )
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)
    dataset = data.load(args.data)
    x_train, y_train = dataset.x_train[: args.n_train], dataset.y_train[: args.n_train]
    x_test, y_test = dataset.x_test[: args.n_test], dataset.y_test[: args.n_test]
    settings = {}
    for item in args.set:
        name, _, value = item.partition("=")
        try:
            settings[name] = json.loads(value)
        except json.JSONDecodeError:
            settings[name] = value
    estimator = ParametricSNE(divergence=args.divergence, random_state=args.seed, **settings)
    started = time.perf_counter()
    estimator.fit(x_train)
    fitted = time.perf_counter() - started
    result = cell_votes(estimator, x_train, y_train, x_test, y_test, seed=args.seed)
    result.update(
        data=args.data,
        n_train=len(x_train),
        seed=args.seed,
        divergence=args.divergence,
        settings=settings,
        fit_s=fitted,
    )
    votes = result["votes"]
    print(
        f"{args.data} {len(x_train)}/{len(x_test)}, {args.divergence}, seed {args.seed}"
        f"{' ' + str(settings) if settings else ''}: test 5-NN {result['knn5']:.4f}; "
        f"{result['own_cell']:.3f} of the 5 neighbours in the point's own cell, all five for "
        f"{result['all_five']:.3f}\n  votes inside the own cell: embedding "
        f"{votes['embedding']:.4f}, random {votes['random']:.4f}, majority "
        f"{votes['majority']:.4f}, local PCA plane {votes['local_pca']:.4f}, input space "
        f"{votes['inputs']:.4f} (any cell: {votes['inputs_all']:.4f})\n  train embedding: "
        f"{result['pieces']} pieces, a point's piece holds {result['piece_size']:.0f} points "
        f"and {result['cells_per_piece']:.0f} cells (median); fit {fitted:.1f} s"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
