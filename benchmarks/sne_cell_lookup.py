"""How exact ParametricSNE's cell lookups are, under the default input noise.

While training, the cell of a noisy input is searched among the ``NEAR_CELLS`` cells nearest
its clean input's cell (within the two-level lists from 1,024 cells); ``transform`` looks the
cell of a clean input up in two levels. This script builds the default estimator's network for
the first ``--n`` training points (PCA, noise weights, k-means cells; no training: the lookup
does not depend on the trained weights) and reports, against the nearest of all cells (every
landmark scored):

- ``training``: the fraction of noisy inputs whose training-path cell is the nearest of all
  (``--repeats`` noise draws of every point);
- ``transform``: the fraction of clean inputs whose two-level cell is the nearest of all;
- ``moved``: the fraction of noisy inputs whose nearest cell differs from their clean input's.

Usage::

    python benchmarks/sne_cell_lookup.py --data fashion-mnist --n 10000
    python benchmarks/sne_cell_lookup.py --data fashion-mnist --n 60000
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from beyond_icon import data
from beyond_icon.models import CellMLP
from beyond_icon.parametric_sne import NEAR_CELLS, ParametricSNE, _float_tensor, _validate


def _nearest(body: CellMLP, z: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """The nearest of all cells, by the lookup's own scores (one level, every landmark)."""
    scores = body._scores().T
    return torch.cat(
        [(body._with_ones(z[s : s + rows]) @ scores).argmax(1) for s in range(0, len(z), rows)]
    )


@torch.no_grad()
def lookup_rates(x: np.ndarray, estimator: ParametricSNE, repeats: int = 3, seed: int = 0) -> dict:
    """The three fractions of the module docstring for ``estimator``'s (unfitted) settings.

    Parameters
    ----------
    x : (n, ...) array
        Training inputs, as ``fit`` takes them.
    estimator : ParametricSNE
        Its settings build the network; it is not fitted.
    repeats : int
        Noise draws of every point.
    seed : int
        Seed of the noise.

    Returns
    -------
    dict
        ``cells``, ``training``, ``transform``, ``moved`` and the noise weights' range
        (``weight_min``, ``weight_max``; 1 and 1 without weights).
    """
    x = _validate(x)
    xf = _float_tensor(x, torch.device("cpu"))
    flat = xf.reshape(len(xf), -1)
    estimator._check_params(len(x))
    projection, _ = estimator._input_space(flat)
    net = estimator._network(xf, projection, torch.device("cpu"))
    stem, noise, body = net[0], net[1], net[2]
    if not isinstance(body, CellMLP):
        raise ValueError("these settings give no cells (n_cells=0 or a backbone without them)")
    z = torch.cat([stem(flat[s : s + 16384]) for s in range(0, len(flat), 16384)])
    near = body.neighbouring_cells(NEAR_CELLS)
    clean = body.cells(z)
    exact_clean = _nearest(body, z)
    noise.train()
    torch.manual_seed(seed)
    hits = moved = 0
    for _ in range(repeats):
        noisy = noise(z)
        found = body.cells_near(noisy, clean, near)  # as ParametricSNE.fit's steps
        exact = _nearest(body, noisy)
        hits += int((found == exact).sum())
        moved += int((exact != exact_clean).sum())
    weight = noise.weight
    return {
        "cells": len(body.landmarks),
        "training": hits / (repeats * len(z)),
        "transform": float((clean == exact_clean).double().mean()),
        "moved": moved / (repeats * len(z)),
        "weight_min": 1.0 if weight is None else float(weight.min()),
        "weight_max": 1.0 if weight is None else float(weight.max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--n", type=int, default=None, help="first N training points (all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--input-noise-power", type=float, default=None, help="default: ours")
    args = parser.parse_args()
    x = data.load(args.data).x_train[: args.n]
    estimator = ParametricSNE()
    if args.input_noise_power is not None:
        estimator.set_params(input_noise_power=args.input_noise_power)
    rates = lookup_rates(x, estimator, repeats=args.repeats)
    print(
        f"{args.data}, {len(x)} points, {rates['cells']} cells, noise weights "
        f"{rates['weight_min']:.2f} to {rates['weight_max']:.2f}: the training cell of a noisy "
        f"input is the nearest of all for {rates['training']:.4f}, transform's cell of a clean "
        f"input for {rates['transform']:.4f}; the noise moves the nearest cell for "
        f"{rates['moved']:.3f}"
    )


if __name__ == "__main__":
    main()
