"""Our tables beside the published ones: the same cell, our mean and theirs, and the gap.

Cells match on every key of a table except ``model`` (the quick study's small CGCNN is set
beside the paper's ALIGNN on purpose: that is how far the smoke-scale study is from the
paper). A published run whose learning rate the paper did not record matches any of ours.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

#: |ΔR²| within which our cell counts as reproducing the published one
R2_TOLERANCE = 0.05
PUBLISHED_COLUMNS: tuple[str, ...] = (
    "published_n",
    "published_r2_mean",
    "published_r2_std",
    "published_mae_mean",
    "published_mae_std",
    "delta_r2",
    "delta_mae",
)
#: tables compared cell by cell (ft_size_sweep repeats scratch + grid cells, MPT/chains have no
#: published counterpart), in the order comparison.csv lists them
COMPARED_TABLES: tuple[str, ...] = (
    "scratch",
    "pairwise_grid",
    "pt_size_sweep",
    "strategies",
    "learning_rate",
)
COMPARISON_COLUMNS: tuple[str, ...] = (
    "table",
    "model",
    "pt_dataset",
    "pt_size",
    "dataset",
    "size",
    "strategy",
    "lr",
    "n",
    "r2_mean",
    "mae_mean",
    *PUBLISHED_COLUMNS,
    f"within_{R2_TOLERANCE}_r2",
)


def with_published(
    ours: pd.DataFrame, published: pd.DataFrame, keys: Sequence[str]
) -> pd.DataFrame:
    """``ours`` plus the published mean/std/n of the same cell and our difference from it."""
    match_keys = [k for k in keys if k != "model"]
    theirs = published[[*match_keys, "n", "r2_mean", "r2_std", "mae_mean", "mae_std"]].rename(
        columns={c: f"published_{c}" for c in ("n", "r2_mean", "r2_std", "mae_mean", "mae_std")}
    )
    if "lr" in match_keys:
        merged = _merge_lr_wildcard(ours, theirs, match_keys)
    else:
        merged = ours.merge(theirs, on=match_keys, how="left")
    merged["delta_r2"] = merged["r2_mean"] - merged["published_r2_mean"]
    merged["delta_mae"] = merged["mae_mean"] - merged["published_mae_mean"]
    return merged[[*ours.columns, *PUBLISHED_COLUMNS]]


def _merge_lr_wildcard(
    ours: pd.DataFrame, theirs: pd.DataFrame, keys: Sequence[str]
) -> pd.DataFrame:
    """Left-merge on ``keys``; published cells without a recorded lr match on the other keys.

    A cell of ours can match both a stated-lr and an unstated-lr published cell only if the
    paper ran it twice; the stated one wins then.
    """
    stated = theirs[theirs["lr"].notna()]
    unstated = theirs[theirs["lr"].isna()].drop(columns="lr")
    without_lr = [k for k in keys if k != "lr"]
    exact = ours.merge(stated, on=list(keys), how="left")
    loose = ours.merge(unstated.drop_duplicates(without_lr), on=without_lr, how="left")
    missing = exact["published_n"].isna().to_numpy()
    for column in [c for c in stated.columns if c.startswith("published_")]:
        exact.loc[missing, column] = loose.loc[missing, column].to_numpy()
    return exact


def comparison_table(
    tables: Mapping[str, pd.DataFrame], default_pt_size: int | Mapping | None
) -> pd.DataFrame:
    """Every cell that we and the paper both have, one row per (table, cell).

    The PT-size sweep's rows at the default PT size are the grid's cells and are listed once,
    under ``pairwise_grid``.
    """
    frames = []
    for name in COMPARED_TABLES:
        table = tables.get(name, pd.DataFrame())
        if table.empty or "published_n" not in table.columns:
            continue
        table = table[table["published_n"].notna()]
        if name == "pt_size_sweep" and isinstance(default_pt_size, int):
            table = table[table["pt_size"] != default_pt_size]
        frames.append(table.assign(table=name))
    if not frames:
        return pd.DataFrame(columns=list(COMPARISON_COLUMNS))
    out = pd.concat(frames, ignore_index=True).reindex(columns=list(COMPARISON_COLUMNS))
    out[f"within_{R2_TOLERANCE}_r2"] = np.abs(out["delta_r2"].astype(float)) <= R2_TOLERANCE
    return out


def comparison_summary(comparison: pd.DataFrame) -> dict[str, float]:
    """Counts for the summary and the parity figure title: cells, within tolerance, mean |ΔR²|."""
    delta = comparison["delta_r2"].astype(float).dropna()
    return {
        "cells": len(delta),
        "within": int((delta.abs() <= R2_TOLERANCE).sum()),
        "mean_abs_delta_r2": float(delta.abs().mean()) if len(delta) else float("nan"),
    }
