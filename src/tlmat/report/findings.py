"""The paper's findings, each set beside what this study's tables show.

Devi, Butler & Sai Gautam state a handful of findings; a user reproducing or extending the
study wants to see, per finding, whether their runs agree. Each finding is read off one
table with a plain, stated criterion (counts of cells, not a new statistic), and the whole
section says when the runs are too few or too small to count as evidence: a study with
fewer than the paper's five trials, or another model than its ALIGNN, is smoke scale.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pandas as pd

from tlmat.report.cells import GRID_CELL, at_largest_size, mpt_transfer_rows

PAPER_TRIALS = 5
PAPER_MODEL = "alignn"
FINDINGS_HEADER = ("finding (paper)", "this study", "criterion")


def study_scale(runs: pd.DataFrame | None) -> str:
    """``paper scale`` or ``smoke scale (why)`` from the run records."""
    if runs is None or runs.empty:
        return "no runs"
    trials = int(pd.to_numeric(runs["trial"], errors="coerce").max())
    models = sorted(set(runs["model"].dropna()))
    why = []
    if trials < PAPER_TRIALS:
        why.append(f"{trials} trial(s), the paper {PAPER_TRIALS}")
    if models != [PAPER_MODEL]:
        why.append(f"model {', '.join(models)}, the paper {PAPER_MODEL}")
    return f"smoke scale ({'; '.join(why)})" if why else "paper scale"


def _cells(table: pd.DataFrame, key: str, extra: tuple[str, ...] = ()) -> list[pd.DataFrame]:
    """The rows of each comparison cell that has at least two values of ``key``."""
    if table.empty or key not in table.columns:
        return []
    by = [c for c in (*GRID_CELL, *extra) if c in table.columns]
    groups = [group for _, group in table.groupby(by, dropna=False, sort=True)]
    return [g for g in groups if g[key].nunique() > 1 and g["r2_mean"].notna().any()]


def _best_is(cells: list[pd.DataFrame], key: str, pick: Callable[[pd.DataFrame], object]) -> str:
    wins = sum(group.loc[group["r2_mean"].idxmax(), key] == pick(group) for group in cells)
    return f"{wins} of {len(cells)} cells"


def headline_finding(headline: pd.DataFrame) -> list[str] | None:
    if headline.empty:
        return None
    rows = headline[
        (headline["definition"] == "all pairs, FT 200–800")
        & (headline["unstable_r2_cells"] == "excluded")
    ]
    if rows.empty:
        return None
    row = rows.iloc[0]
    return [
        "pair-wise TL beats scratch: +28.4 % R², +17.1 % MAE on average",
        f"{row['gain_r2']:+.1f} % R², {row['gain_mae']:+.1f} % MAE ({row['cells']} cells)",
        "headline.csv, all pairs at FT 200–800, unstable R² cells left out",
    ]


def full_is_best(strategies: pd.DataFrame) -> list[str] | None:
    cells = _cells(strategies, "strategy")
    if not cells:
        return None
    return [
        "unfreezing all layers (`full`) is the best strategy",
        f"`full` has the highest mean R² in {_best_is(cells, 'strategy', lambda g: 'full')}",
        "strategies.csv, per pair and FT size",
    ]


def strategy_order(strategies: pd.DataFrame) -> list[str] | None:
    """Mean R² per strategy over the compared cells, at each pair's largest compared FT size
    (small FT sizes give R² far below zero that would swamp the ranking)."""
    cells = _cells(strategies, "strategy")
    if not cells:
        return None
    compared = at_largest_size(pd.concat(cells), by=("model", "pt_dataset", "dataset"))
    means = compared.groupby("strategy")["r2_mean"].mean().sort_values(ascending=False)
    order = " > ".join(f"{name} {value:.2f}" for name, value in means.items())
    return [
        "full ≈ unfreeze_2body > unfreeze_3body > last_layer",
        f"mean R²: {order}",
        "strategies.csv, mean over the compared pairs at their largest compared FT size",
    ]


def random_sampling_helps(sampling: pd.DataFrame) -> list[str] | None:
    cells = _cells(sampling, "sampling", extra=("strategy", "lr"))
    if not cells:
        return None
    return [
        "random sampling beats stratified sampling",
        f"random has the higher mean R² in {_best_is(cells, 'sampling', lambda g: 'random')}",
        "sampling.csv, per pair",
    ]


def high_lr_helps(lrs: pd.DataFrame) -> list[str] | None:
    cells = _cells(lrs, "lr", extra=("strategy",))
    if not cells:
        return None
    wins = _best_is(cells, "lr", lambda g: g["lr"].max())
    return [
        "higher learning rates help",
        f"the highest rate tried has the best mean R² in {wins}",
        "learning_rate.csv, per pair and strategy",
    ]


def more_unfrozen_helps(unfrozen: pd.DataFrame) -> list[str] | None:
    cells = _cells(unfrozen, "freeze_before")
    if not cells:
        return None
    wins = _best_is(cells, "freeze_before", lambda g: g["freeze_before"].min())
    return [
        "more unfrozen layers improve performance",
        f"the most unfrozen setting (smallest N) has the best mean R² in {wins}",
        "unfrozen_layers.csv, per pair and FT size",
    ]


def mpt_beats_pairwise(mpt: pd.DataFrame) -> list[str] | None:
    rows = mpt_transfer_rows(mpt)
    if rows.empty or "gain_mae_vs_pairwise" not in rows.columns:
        return None
    compared = rows[rows["gain_mae_vs_pairwise"].notna()]
    wins = compared.loc[compared["gain_mae_vs_pairwise"] > 0, "dataset"].nunique()
    return [
        "MPT beats the best pair-wise model on 3 of 6 targets",
        f"better MAE on {wins} of {compared['dataset'].nunique()} targets",
        "mpt.csv, vs the maxed-out pair-wise model chosen by validation loss",
    ]


def findings_rows(tables: Mapping[str, pd.DataFrame]) -> list[list[str]]:
    """One row per finding whose table has something to compare."""
    empty = pd.DataFrame()
    rows = [
        headline_finding(tables.get("headline", empty)),
        full_is_best(tables.get("strategies", empty)),
        strategy_order(tables.get("strategies", empty)),
        random_sampling_helps(tables.get("sampling", empty)),
        high_lr_helps(tables.get("learning_rate", empty)),
        more_unfrozen_helps(tables.get("unfrozen_layers", empty)),
        mpt_beats_pairwise(tables.get("mpt", empty)),
    ]
    return [row for row in rows if row is not None]
