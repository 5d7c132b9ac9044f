"""Batches that carry their neighbourhoods.

With p fitted once over the whole training set (:mod:`beyond_icon.affinity`), a batch of
uniformly drawn points holds almost none of its rows' neighbours: p restricted to the batch
would be empty. :class:`NeighborBatchSampler` draws anchors (a fresh permutation of the training
set, pass after pass) and, for each anchor, neighbours sampled from its row of p, as parametric
UMAP and contrastive neighbour embedding do; the union is the batch. Every row of p then has
neighbours in the batch, and the other points of the batch are its negatives.

References
----------
Sainburg, T., McInnes, L. and Gentner, T. Q. (2021). Parametric UMAP embeddings for
representation and semisupervised learning. Neural Computation 33(11).
Damrich, S., Böhm, J. N., Hamprecht, F. A. and Kobak, D. (2023). From t-SNE to UMAP with
contrastive learning. ICLR.
"""

from __future__ import annotations

import numpy as np
import torch

from beyond_icon._validation import is_int
from beyond_icon.affinity import PerplexityAffinity

__all__ = ["NeighborBatchSampler"]


class NeighborBatchSampler:
    """Batches of anchors and their sampled neighbours, reproducible from (seed, epoch).

    An epoch is one pass over a permutation of the training points, split into
    ``n // n_anchors`` chunks of ``n_anchors`` to ``2 * n_anchors - 1`` anchors (equal sizes up to
    one); each chunk gives a batch: the anchors, ``n_positives`` neighbours of each drawn from
    ``p(.|anchor)``, duplicates removed (sorted indices).

    Parameters
    ----------
    affinity : PerplexityAffinity
        A fitted affinity (its ``sample_neighbors`` draws the neighbours).
    n_anchors : int
        Anchors per batch (see above; a batch holds at most ``(1 + n_positives)`` times its
        anchors).
    n_positives : int
        Neighbours drawn per anchor.
    """

    def __init__(self, affinity: PerplexityAffinity, n_anchors: int, n_positives: int = 1):
        affinity._check_fitted()
        n = affinity.n_samples_
        if not is_int(n_anchors) or n_anchors < 1:
            raise ValueError(f"n_anchors must be a positive integer, got {n_anchors!r}")
        if not is_int(n_positives) or n_positives < 1:
            raise ValueError(f"n_positives must be a positive integer, got {n_positives!r}")
        self.affinity = affinity
        self.n_anchors = min(int(n_anchors), n)
        self.n_positives = int(n_positives)

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.affinity.n_samples_ // self.n_anchors)

    def epoch(self, generator: torch.Generator) -> list[torch.Tensor]:
        """One epoch of batches (sorted, distinct int64 indices), drawn from ``generator``."""
        n = self.affinity.n_samples_
        order = torch.randperm(n, generator=generator).numpy()
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        rng = np.random.default_rng(seed)
        batches = []
        for anchors in np.array_split(order, self.steps_per_epoch):
            positives = self.affinity.sample_neighbors(anchors, self.n_positives, rng)
            batch = np.unique(np.concatenate([anchors, positives.ravel()]))
            batches.append(torch.as_tensor(batch))
        return batches
