"""Regression metrics: MAPE only where it means something."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tlmat.metrics import regression_metrics


def test_mape_of_positive_targets_is_the_mean_relative_error():
    scores = regression_metrics(np.array([1.0, 2.0, 4.0]), np.array([1.1, 1.8, 4.0]))
    assert scores["mape"] == pytest.approx((0.1 + 0.1 + 0.0) / 3)
    assert scores["mae"] == pytest.approx(0.1)


@pytest.mark.parametrize("targets", [[-1.0, 2.0, 3.0], [0.0, 2.0, 3.0]])
def test_mape_is_left_out_when_a_target_is_not_positive(targets):
    scores = regression_metrics(np.array(targets), np.array([1.0, 2.0, 3.0]))
    assert math.isnan(scores["mape"]) and not math.isnan(scores["r2"])
