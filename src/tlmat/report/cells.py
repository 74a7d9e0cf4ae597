"""Cell selections shared by the headline, the summary and the figures."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

#: keys of a pair-wise cell; strategy/lr tables add their ablation key to these
GRID_CELL: tuple[str, ...] = ("model", "pt_dataset", "pt_size", "dataset", "size")


def at_largest_size(table: pd.DataFrame, by: Sequence[str] = ("model", "dataset")) -> pd.DataFrame:
    """Rows at the largest FT size of each target (targets differ in how much data they have)."""
    if table.empty:
        return table
    largest = table.groupby(list(by))["size"].transform("max")
    return table[table["size"] == largest]


def best_sources(grid: pd.DataFrame) -> pd.DataFrame:
    """Per (model, target): the PT source with the highest mean R² at the largest FT size."""
    cells = at_largest_size(grid).dropna(subset=["r2_mean"])
    if cells.empty:
        return cells
    best = cells.loc[cells.groupby(["model", "dataset"])["r2_mean"].idxmax()]
    return best.sort_values(["model", "dataset"]).reset_index(drop=True)


def ablation_cells(table: pd.DataFrame, by: str) -> pd.DataFrame:
    """Rows of the cells (model, PT source, PT size, target, FT size, …) where ``by`` varied.

    The strategies and learning-rate tables also hold the plain runs of every grid cell; a
    comparison of levels must use only the cells where the levels compete, or the default
    level would be averaged over many more (and different) cells than the others. The
    learning-rate table's cells include the strategy (the paper varied the rate per strategy).
    Empty when ``by`` was never varied, i.e. the ablation was not run.
    """
    if table.empty:
        return table
    cell = [c for c in (*GRID_CELL, "strategy") if c in table.columns and c != by]
    varied = table.groupby(cell, dropna=False)[by].transform("nunique") >= 2
    return table[varied]


def mpt_transfer_rows(table: pd.DataFrame) -> pd.DataFrame:
    """MPT rows that are transfer: the model never saw the target's labels.

    The plan never fine-tunes such a pair, so this drops nothing from tlmat's own runs; a
    table built from other runs (or an older study) cannot pass a row whose target was
    pre-trained on into a summary or a figure.
    """
    if table.empty or "target_in_pretraining" not in table.columns:
        return table
    return table[table["target_in_pretraining"].astype("boolean").fillna(False).eq(False)]
