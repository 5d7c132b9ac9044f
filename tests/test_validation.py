"""The shared input checks, and turning the value checks off."""

from __future__ import annotations

import math

import pytest
import torch

from beyond_icon import methods, value_checks
from beyond_icon._validation import (
    check_features,
    check_labels,
    check_log_distributions,
    check_positive,
    checking_values,
)


def test_features_labels_and_numbers():
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        check_features([[1.0]], "z")
    with pytest.raises(ValueError, match=r"shape \(n, d\)"):
        check_features(torch.zeros(3), "z")
    z = torch.zeros(4, 2)
    z[2, 0] = math.nan
    with pytest.raises(ValueError, match=r"z contains NaN or Inf in row\(s\) \[2\]"):
        check_features(z, "z")
    with pytest.raises(ValueError, match="labels"):
        check_labels(torch.tensor([0.5, 1.0]), "labels")
    with pytest.raises(ValueError, match="sigma"):
        check_positive(-1.0, "sigma")


def test_log_distributions_must_be_normalised_rows():
    good = torch.log_softmax(torch.randn(3, 4), dim=1)
    check_log_distributions(good, "log_q", allow_empty_rows=False)
    with pytest.raises(ValueError, match="log_q"):
        check_log_distributions(good + 1.0, "log_q", allow_empty_rows=False)


def test_value_checks_are_scoped_and_restored():
    assert checking_values()
    with value_checks(False):
        assert not checking_values()
        with value_checks(True):
            assert checking_values()
        assert not checking_values()
    assert checking_values()
    with pytest.raises(RuntimeError), value_checks(False):
        raise RuntimeError  # an error inside the block still restores the checks
    assert checking_values()


def test_value_checks_off_turns_errors_into_non_finite_losses():
    z = torch.randn(6, 3)
    z[2, 1] = float("inf")
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="NaN or Inf"):
        methods.SupCon()(z, labels)
    with value_checks(False):
        assert not torch.isfinite(methods.SupCon()(z, labels))
    # every class once: no row of p has mass; checked it is an error, unchecked a NaN (never 0)
    single = torch.arange(6)
    with pytest.raises(ValueError, match="no mass"):
        methods.SupCon()(torch.randn(6, 3), single)
    with value_checks(False):
        assert torch.isnan(methods.SupCon()(torch.randn(6, 3), single))
