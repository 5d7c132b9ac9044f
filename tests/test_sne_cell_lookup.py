"""benchmarks/sne_cell_lookup.py: the training and transform cell lookups against the exact one."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_benchmark
from sklearn.datasets import load_digits

from beyond_icon.parametric_sne import ParametricSNE


@pytest.fixture(scope="module")
def lookup():
    return load_benchmark("sne_cell_lookup")


@pytest.fixture(scope="module")
def digits():
    return load_digits().data.astype(np.float32)


def test_without_noise_every_lookup_is_the_nearest_cell(lookup, digits):
    rates = lookup.lookup_rates(digits, ParametricSNE(input_noise=0.0), repeats=1)
    assert rates["cells"] == 359  # n / 5
    assert rates["training"] == rates["transform"] == 1.0
    assert rates["moved"] == 0.0


def test_noise_moves_cells_and_the_weights_are_reported(lookup, digits):
    weighted = lookup.lookup_rates(digits, ParametricSNE(), repeats=2)
    assert 0.0 < weighted["moved"] < 1.0
    assert 0.9 < weighted["training"] <= 1.0  # 32 candidates of 359 cells: nearly exact
    assert weighted["weight_min"] < 1.0 < weighted["weight_max"]
    plain = lookup.lookup_rates(digits, ParametricSNE(input_noise_power=0.0), repeats=1)
    assert plain["weight_min"] == plain["weight_max"] == 1.0


def test_two_levels_from_1024_cells(lookup, digits):
    rates = lookup.lookup_rates(digits, ParametricSNE(n_cells=1024), repeats=1)
    assert rates["cells"] == 1024
    assert 0.95 < rates["transform"] <= 1.0
    assert 0.9 < rates["training"] <= 1.0  # the lists' mask applies in training too


def test_settings_without_cells_are_refused(lookup, digits):
    with pytest.raises(ValueError, match="no cells"):
        lookup.lookup_rates(digits, ParametricSNE(n_cells=0))
