"""Regression metrics in the data set's units (scikit-learn, one place for all of them)."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import mean_absolute_error, mean_absolute_percentage_error, r2_score


def regression_metrics(target: np.ndarray, prediction: np.ndarray) -> dict[str, float]:
    """R², MAE and MAPE; R² is NaN for fewer than two samples (undefined).

    MAPE is NaN unless every target is positive: a percentage of a value that can be zero or
    negative (formation energies, min-max scaled targets) is no error measure at all.
    """
    target = np.asarray(target, dtype=float)
    prediction = np.asarray(prediction, dtype=float)
    positive = len(target) > 0 and bool((target > 0).all())
    return {
        "r2": float(r2_score(target, prediction)) if len(target) >= 2 else float("nan"),
        "mae": float(mean_absolute_error(target, prediction)),
        "mape": float(mean_absolute_percentage_error(target, prediction)) if positive else math.nan,
    }
