"""Statistics of the study's tables: trial summaries, gains over scratch, paired tests, Holm.

Conventions (the paper's, Devi et al. 2024, and the ones its numbers are reproduced with):

* A *cell* is one setting (PT source, PT size, target, FT size, strategy, lr …) over trials.
* Gains are ratios of trial **means**, never means of per-trial ratios:
  ``gain_r2 = (mean R²_TL − mean R²_scratch) / |mean R²_scratch| · 100`` and
  ``gain_mae = (mean MAE_scratch − mean MAE_TL) / mean MAE_scratch · 100``; positive = TL
  better. A per-trial ratio explodes whenever one scratch trial has R² near zero; the ratio of
  means only does so when the scratch *mean* is near zero, and such cells are flagged
  (``unstable_r2_gain``: |mean scratch R²| < :data:`UNSTABLE_R2`) and left out of R² averages.
* Per-trial paired differences (trial k of TL and of scratch share split and seed) are used for
  the tests only: two-sided paired t-tests on MAE and on R² (``scipy.stats.ttest_rel``), and
  for the 95 % intervals of the gains.
* p-values are adjusted for the number of cells of a table with Holm–Bonferroni
  (``statsmodels.stats.multitest.multipletests(method="holm")``), which controls the
  family-wise error rate; every "significant" flag uses the adjusted value.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests

#: significance level of every flag (``negative_transfer``, "significant" in summaries)
ALPHA = 0.05
#: |mean scratch R²| below this makes a relative R² gain meaningless (flagged, not averaged)
UNSTABLE_R2 = 0.1
#: the multiple-testing correction applied within each table
ADJUSTMENT = "holm"
ADJUSTMENT_NAME = "Holm–Bonferroni"
TEST_NAME = "two-sided paired t-test (scipy.stats.ttest_rel) over trials"


#: the gain-over-scratch columns that every comparison table carries, in this order
GAIN_COLUMNS: tuple[str, ...] = (
    "scratch_n",
    "scratch_r2_mean",
    "scratch_mae_mean",
    "n_pairs",
    "gain_r2",
    "gain_r2_ci95",
    "gain_mae",
    "gain_mae_ci95",
    "unstable_r2_gain",
    "p_mae_paired_t",
    "p_r2_paired_t",
    "p_mae_paired_t_holm",
    "p_r2_paired_t_holm",
    "negative_transfer",
)


def describe(values: Sequence[float] | pd.Series, prefix: str) -> dict[str, float]:
    """Mean, sample std (ddof=1) and 95 % t-interval half-width of the non-NaN values.

    The half-width uses Student's t with n-1 degrees of freedom because there are only a few
    trials per cell; the interval is ``mean ± <prefix>_ci95``. Std and CI are NaN for n < 2.
    """
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    std = float(x.std(ddof=1)) if n > 1 else math.nan
    ci95 = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else math.nan
    return {f"{prefix}_mean": mean, f"{prefix}_std": std, f"{prefix}_ci95": ci95}


def relative_gain(tl_mean: float, scratch_mean: float, *, lower_is_better: bool) -> float:
    """% gain of a TL mean over a scratch mean, positive when TL is better; NaN at 0 scratch.

    R² (higher is better) is divided by ``|scratch|`` because scratch R² can be negative; MAE
    (lower is better) by the scratch MAE itself.
    """
    if scratch_mean is None or not np.isfinite(scratch_mean) or scratch_mean == 0:
        return math.nan
    delta = scratch_mean - tl_mean if lower_is_better else tl_mean - scratch_mean
    return float(delta / abs(scratch_mean) * 100.0)


def unstable_r2(scratch_r2_mean: pd.Series | float) -> pd.Series | bool:
    """True where the scratch R² mean is too close to zero for a relative R² gain."""
    return abs(scratch_r2_mean) < UNSTABLE_R2


def paired_p_value(tl: Sequence[float], scratch: Sequence[float]) -> float:
    """Two-sided paired t-test p-value of TL vs scratch; NaN with fewer than two pairs.

    Also NaN when all differences are (numerically) equal: the t statistic is then infinite
    or 0/0, and a p-value of 0 would claim a certainty that two or three trials cannot give.
    """
    a, b = np.asarray(tl, float), np.asarray(scratch, float)
    keep = ~(np.isnan(a) | np.isnan(b))
    if keep.sum() < 2:
        return math.nan
    diff = a[keep] - b[keep]
    if np.allclose(diff, diff[0], rtol=1e-9, atol=1e-12):
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_rel(a[keep], b[keep]).pvalue)


def adjust_p_values(p_values: pd.Series | Sequence[float]) -> pd.Series:
    """Holm–Bonferroni adjusted p-values over the non-NaN entries (NaN stays NaN).

    One call per table and metric: the family of hypotheses is the table's cells.
    """
    p = pd.Series(p_values, dtype=float)
    out = pd.Series(np.nan, index=p.index, dtype=float)
    tested = p.notna()
    if tested.any():
        out[tested] = multipletests(p[tested].to_numpy(), alpha=ALPHA, method=ADJUSTMENT)[1]
    return out


def negative_transfer(gain_mae: pd.Series, p_adjusted: pd.Series) -> pd.Series:
    """TL significantly worse than scratch: MAE gain < 0 and adjusted p < ALPHA (NaN: False)."""
    gain = pd.to_numeric(gain_mae, errors="coerce")
    p = pd.to_numeric(p_adjusted, errors="coerce")
    return ((gain < 0) & (p < ALPHA)).fillna(False).astype(bool)


def significant_improvement(gain_mae: pd.Series, p_adjusted: pd.Series) -> pd.Series:
    """TL significantly better than scratch: MAE gain > 0 and adjusted p < ALPHA."""
    gain = pd.to_numeric(gain_mae, errors="coerce")
    p = pd.to_numeric(p_adjusted, errors="coerce")
    return ((gain > 0) & (p < ALPHA)).fillna(False).astype(bool)
