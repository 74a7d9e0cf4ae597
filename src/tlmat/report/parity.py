"""Each of our runs beside the published run of the same cell and trial (``make parity``).

``comparison.csv`` compares cell means; this table answers the question a user asks of a new
installation before spending a week of compute: does a run reproduce the paper's? Where the
data carry the paper's test ids and trial subsets (``splits_file``), our trial *k* trains on
the very structures of the published trial *k* and is tested on the same test set, so the
two numbers are directly comparable. Each row is one of our runs (scratch or fine-tune) with

* the published run of the same trial (R², MAE) and our difference from it, and
* the published cell over all its trials (n, mean ± std, min–max of R²), and whether our R²
  falls inside the published trial spread (min ≤ ours ≤ max) — the verdict counts these.

A published cell is matched on PT source, PT size, target, FT size and strategy; a fine-tune
also on the learning rate where the paper stated one (a cell the paper ran without a stated
rate matches any of ours). Where several experiments of the paper hold the same cell (its
strategy study re-used pair-wise runs), the first of :data:`FAMILY_ORDER` is taken.
"""

from __future__ import annotations

import math
from collections.abc import Hashable

import numpy as np
import pandas as pd

#: the experiments of the paper, in the order their runs stand for a cell
FAMILY_ORDER: tuple[str, ...] = (
    "scratch",
    "pairwise",
    "pt_size_sweep",
    "strategies",
    "learning_rate",
)
CELL_KEYS: tuple[str, ...] = ("pt_dataset", "pt_size", "dataset", "size", "strategy")
#: our run kinds that have published counterparts (MPT and chains have none)
COMPARED_KINDS: tuple[str, ...] = ("scratch", "finetune")
TRIAL_PARITY_COLUMNS: tuple[str, ...] = (
    "model",
    "kind",
    "pt_dataset",
    "pt_size",
    "dataset",
    "size",
    "strategy",
    "lr",
    "trial",
    "same_subset",
    "epochs_run",
    "r2",
    "mae",
    "published_trial_r2",
    "published_trial_mae",
    "delta_r2",
    "abs_delta_r2",
    "published_n",
    "published_r2_mean",
    "published_r2_std",
    "published_r2_min",
    "published_r2_max",
    "published_mae_mean",
    "published_mae_std",
    "inside_range",
    "run_id",
)


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def _key(row: pd.Series | dict, keys: tuple[str, ...] = CELL_KEYS) -> tuple[Hashable, ...]:
    """A cell key where every missing value (no PT source, no strategy) is one ``None``."""
    out = []
    for k in keys:
        value = row[k]
        if _missing(value):
            out.append(None)
        elif k in ("pt_size", "size"):
            out.append(int(value))
        else:
            out.append(str(value))
    return tuple(out)


def _published_cells(published: pd.DataFrame) -> dict[tuple, pd.DataFrame]:
    """Published runs by cell key (only the experiments that have our counterparts)."""
    rows = published[published["family"].isin(FAMILY_ORDER)]
    cells: dict[tuple, list[int]] = {}
    for position, (_, row) in enumerate(rows.iterrows()):
        cells.setdefault(_key(row), []).append(position)
    return {key: rows.iloc[positions] for key, positions in cells.items()}


def _cell_runs(candidates: pd.DataFrame, ours: pd.Series) -> pd.DataFrame:
    """The published runs that stand for our run's cell: same stated lr (else any unstated
    one) for a fine-tune, and one experiment only (the first of :data:`FAMILY_ORDER`)."""
    if ours["kind"] == "finetune":
        lr = candidates["lr"].astype(float)
        stated = candidates[np.isclose(lr, float(ours["lr"]), rtol=1e-6)]
        candidates = stated if len(stated) else candidates[lr.isna()]
    for family in FAMILY_ORDER:
        chosen = candidates[candidates["family"] == family]
        if len(chosen):
            return chosen
    return candidates.iloc[0:0]


def _row(ours: pd.Series, cell: pd.DataFrame) -> dict:
    """One row of the table: our run, its published trial twin and the published cell."""
    r2 = cell["test_r2"].astype(float)
    twin = cell[cell["trial"].astype("Float64") == ours["trial"]]
    twin_r2 = float(twin["test_r2"].iloc[0]) if len(twin) == 1 else math.nan
    twin_mae = float(twin["test_mae"].iloc[0]) if len(twin) == 1 else math.nan
    delta = float(ours["test_r2"]) - twin_r2
    return {
        **{k: ours[k] for k in ("model", "kind", *CELL_KEYS, "trial", "run_id")},
        "lr": ours["lr"] if ours["kind"] == "finetune" else math.nan,
        "same_subset": ours.get("splits_source") == "published",
        "epochs_run": ours["epochs_run"],
        "r2": float(ours["test_r2"]),
        "mae": float(ours["test_mae"]),
        "published_trial_r2": twin_r2,
        "published_trial_mae": twin_mae,
        "delta_r2": delta,
        "abs_delta_r2": abs(delta),
        "published_n": len(cell),
        "published_r2_mean": float(r2.mean()),
        "published_r2_std": float(r2.std(ddof=1)) if len(cell) > 1 else math.nan,
        "published_r2_min": float(r2.min()),
        "published_r2_max": float(r2.max()),
        "published_mae_mean": float(cell["test_mae"].astype(float).mean()),
        "published_mae_std": (
            float(cell["test_mae"].astype(float).std(ddof=1)) if len(cell) > 1 else math.nan
        ),
        "inside_range": bool(r2.min() <= float(ours["test_r2"]) <= r2.max()),
    }


def trial_parity_table(runs: pd.DataFrame, published: pd.DataFrame | None) -> pd.DataFrame:
    """Every scratch or fine-tune run of ours that has a published cell, run by run.

    Args:
        runs: our run records (:func:`tlmat.report.runs.collect_runs`).
        published: published run records
            (:func:`tlmat.report.published.read_published_runs`); None gives an empty table.
    """
    empty = pd.DataFrame(columns=list(TRIAL_PARITY_COLUMNS))
    if published is None or published.empty or runs.empty:
        return empty
    cells = _published_cells(published)
    ours = runs[runs["kind"].isin(COMPARED_KINDS) & (runs["origin"] != "published")]
    rows = []
    for _, run in ours.iterrows():
        cell = _cell_runs(cells.get(_key(run), published.iloc[0:0]), run)
        if len(cell):
            rows.append(_row(run, cell))
    if not rows:
        return empty
    table = pd.DataFrame(rows).reindex(columns=list(TRIAL_PARITY_COLUMNS))
    order = ["model", "kind", "dataset", "pt_dataset", "pt_size", "size", "strategy", "trial"]
    return table.sort_values(order, na_position="first", kind="stable").reset_index(drop=True)


def trial_parity_verdict(table: pd.DataFrame) -> str:
    """The one line ``make parity`` ends with: how many runs fall inside the published spread."""
    if table.empty:
        return "no run of this study has a published counterpart"
    inside = int(table["inside_range"].astype(bool).sum())
    twins = table["abs_delta_r2"].astype(float).dropna()
    twin_text = (
        f"; mean |ΔR²| to the same published trial {twins.mean():.3f} over {len(twins)} run(s)"
        if len(twins)
        else ""
    )
    cells = table[["model", *CELL_KEYS]].astype(str).drop_duplicates()
    what = "cells" if len(cells) == len(table) else "runs (cell × trial)"
    return (
        f"{inside} of {len(table)} {what} within the published trial spread (min–max of the "
        f"paper's trials){twin_text}"
    )
