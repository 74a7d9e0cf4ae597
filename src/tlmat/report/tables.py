"""The study's tables, built from run records, and writing them with ``summary.md``.

The paper's claims are about averages over random trials and about transfer learning (TL)
*relative to* training from scratch, so this module is the single place where the runs of
each family (selected in :mod:`tlmat.report.runs`) are

* summarised over trials (mean, sample std, 95 % t confidence half-width) and compared with
  the scratch baseline: gains from the cell means, paired tests trial by trial (same model,
  target, FT size and trial, hence the same split and seed),
* set beside published results of the same cells (:mod:`tlmat.report.compare`) and written
  with the headline table and ``summary.md`` (:mod:`tlmat.report.summary`).

Conventions used by every table (the statistics live in :mod:`tlmat.report.stats`):

* ``gain_r2``/``gain_mae`` are % gains of the cell's trial means over the scratch cell's
  means, as the paper computed them; positive = TL better. ``unstable_r2_gain`` flags cells
  whose scratch R² mean is within ±0.1 of zero (their R² gain is left out of averages).
* ``p_mae_paired_t``/``p_r2_paired_t`` are two-sided paired t-tests over trials, and the
  ``…_holm`` columns their Holm–Bonferroni adjustment over the table's cells.
* Runs may carry a ``family`` tag (published runs do: the paper's experiment); a tagged run
  belongs to its family's tables only, an untagged one (ours) is placed by the study defaults.
* Every table carries ``model`` as its first key, so ALIGNN and CGCNN are never mixed.

The table and file names are registered in :mod:`tlmat.report.names`, which the workflow
reads too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from tlmat.files import atomic_write_text
from tlmat.report import compare, headline, stats, summary
from tlmat.report.names import SUMMARY_NAME, TABLE_NAMES
from tlmat.report.runs import (
    PAIR_KEYS,
    StudyDefaults,
    by_family,
    collect_runs,
    lr_is,
    of_kind,
    plain_finetune_runs,
    pt_size_is_default,
    scratch_runs,
)

log = logging.getLogger(__name__)

#: Short metric name -> metrics.json column; the order is the column order of every table.
METRICS: dict[str, str] = {"r2": "test_r2", "mae": "test_mae"}
STAT_COLUMNS: tuple[str, ...] = (
    "n",
    *(f"{m}_{s}" for m in METRICS for s in ("mean", "std", "ci95")),
)
PAIRED_COLUMNS: tuple[str, ...] = (
    "n_pairs",
    "d_r2_ci95",
    "d_mae_ci95",
    "p_mae_paired_t",
    "p_r2_paired_t",
)
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
#: ``source`` of the scratch rows of the FT-size sweep (the other rows name their PT source)
SCRATCH_SOURCE = "scratch"

SCRATCH_KEYS: tuple[str, ...] = ("model", "dataset", "size")
GRID_KEYS: tuple[str, ...] = ("model", "pt_dataset", "pt_size", "dataset", "size")
FT_SWEEP_KEYS: tuple[str, ...] = ("model", "dataset", "source", "size")
PT_SWEEP_KEYS: tuple[str, ...] = GRID_KEYS
STRATEGY_KEYS: tuple[str, ...] = (*GRID_KEYS, "strategy")
LR_KEYS: tuple[str, ...] = (*GRID_KEYS, "strategy", "lr")
MPT_KEYS: tuple[str, ...] = ("model", "pt_dataset", "dataset", "size", "strategy")
CHAIN_KEYS: tuple[str, ...] = ("model", "chain", "dataset", "size", "strategy")
MAPE_COLUMNS: tuple[str, ...] = ("mape_mean", "mape_std", "mape_ci95")
MPT_VS_PAIRWISE_COLUMNS: tuple[str, ...] = (
    "best_pairwise_source",
    "best_pairwise_r2_mean",
    "best_pairwise_mae_mean",
    "n_pairs_vs_pairwise",
    "gain_mae_vs_pairwise",
    "p_mae_paired_t_vs_pairwise",
    "p_mae_paired_t_vs_pairwise_holm",
)

#: Table name -> its columns, for every table of :data:`TABLE_NAMES` but ``runs`` (whose
#: columns are the run records', see :mod:`tlmat.report.runs`).
TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "scratch": (*SCRATCH_KEYS, *STAT_COLUMNS),
    "pairwise_grid": (*GRID_KEYS, *STAT_COLUMNS, *GAIN_COLUMNS),
    "ft_size_sweep": (*FT_SWEEP_KEYS, *STAT_COLUMNS),
    "pt_size_sweep": (*PT_SWEEP_KEYS, *STAT_COLUMNS, *GAIN_COLUMNS),
    "strategies": (*STRATEGY_KEYS, *STAT_COLUMNS, *GAIN_COLUMNS),
    "learning_rate": (*LR_KEYS, *STAT_COLUMNS, *GAIN_COLUMNS),
    "mpt": (*MPT_KEYS, *STAT_COLUMNS, *GAIN_COLUMNS, *MPT_VS_PAIRWISE_COLUMNS),
    "chains": (*CHAIN_KEYS, "n_stages", *STAT_COLUMNS, *MAPE_COLUMNS, *GAIN_COLUMNS),
    "headline": headline.HEADLINE_COLUMNS,
    "comparison": compare.COMPARISON_COLUMNS,
}


# ----------------------------------------------------------------------------- statistics


def _group_rows(frame: pd.DataFrame, keys: Sequence[str]) -> Iterable[tuple[dict, pd.DataFrame]]:
    """Yield ``({key: value}, group)`` with null keys kept (scratch rows have no PT source)."""
    for values, group in frame.groupby(list(keys), dropna=False, sort=True):
        yield dict(zip(keys, values, strict=True)), group


def summarize(frame: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Mean/std/CI of test R² and MAE over the runs (trials) in each group of ``keys``."""
    rows = []
    for row, group in _group_rows(frame, keys):
        row["n"] = len(group)
        for short, column in METRICS.items():
            row.update(stats.describe(group[column], short))
        rows.append(row)
    return pd.DataFrame(rows, columns=[*keys, *STAT_COLUMNS])


def summarize_with_gain(
    tl: pd.DataFrame, scratch: pd.DataFrame, keys: Sequence[str]
) -> pd.DataFrame:
    """:func:`summarize` plus the gain over scratch and paired tests, adjusted within the table.

    Gains are ratios of the cell's trial means (see :mod:`tlmat.report.stats`); the scratch
    mean is the scratch table's cell (same model, target and FT size, all its trials).
    Per-trial pairs (same trial, hence same split and seed) give the paired t-tests on MAE and
    on R² and the 95 % intervals of the gains; TL runs without a scratch twin count in the
    mean columns but have ``n_pairs == 0``. p-values are Holm-adjusted over the table's rows.
    """
    summary = summarize(tl, keys)
    base = summarize(scratch, SCRATCH_KEYS)[[*SCRATCH_KEYS, "n", "r2_mean", "mae_mean"]]
    base = base.rename(
        columns={"n": "scratch_n", "r2_mean": "scratch_r2_mean", "mae_mean": "scratch_mae_mean"}
    )
    out = summary.merge(base, on=list(SCRATCH_KEYS), how="left")
    out["gain_r2"] = [
        stats.relative_gain(t, s, lower_is_better=False)
        for t, s in zip(out["r2_mean"], out["scratch_r2_mean"], strict=True)
    ]
    out["gain_mae"] = [
        stats.relative_gain(t, s, lower_is_better=True)
        for t, s in zip(out["mae_mean"], out["scratch_mae_mean"], strict=True)
    ]
    out["unstable_r2_gain"] = stats.unstable_r2(out["scratch_r2_mean"].astype(float))
    tests = pd.DataFrame(
        [{**row, **_paired_row(group)} for row, group in _group_rows(_paired(tl, scratch), keys)],
        columns=[*keys, *PAIRED_COLUMNS],
    )
    out = out.merge(tests, on=list(keys), how="left")
    out["n_pairs"] = pd.to_numeric(out["n_pairs"]).fillna(0).astype(int)
    out["gain_r2_ci95"] = out["d_r2_ci95"] / out["scratch_r2_mean"].abs() * 100.0
    out["gain_mae_ci95"] = out["d_mae_ci95"] / out["scratch_mae_mean"] * 100.0
    for metric in METRICS:
        out[f"p_{metric}_paired_t_holm"] = stats.adjust_p_values(out[f"p_{metric}_paired_t"])
    out["negative_transfer"] = stats.negative_transfer(out["gain_mae"], out["p_mae_paired_t_holm"])
    return out[[*keys, *STAT_COLUMNS, *GAIN_COLUMNS]]


def _paired(tl: pd.DataFrame, scratch: pd.DataFrame) -> pd.DataFrame:
    """TL runs joined to the scratch run of the same trial (runs without a trial never pair)."""
    twins = scratch.dropna(subset=["trial"])[[*PAIR_KEYS, "test_r2", "test_mae"]]
    tl = tl.dropna(subset=["trial"])
    return tl.merge(twins, on=list(PAIR_KEYS), how="inner", suffixes=("", "_scr"))


def _paired_row(paired: pd.DataFrame) -> dict[str, Any]:
    """Pair count, 95 % half-widths of the paired differences and the two paired tests."""
    improvement_r2 = paired["test_r2"] - paired["test_r2_scr"]
    improvement_mae = paired["test_mae_scr"] - paired["test_mae"]
    return {
        "n_pairs": len(paired),
        "d_r2_ci95": stats.describe(improvement_r2, "d")["d_ci95"],
        "d_mae_ci95": stats.describe(improvement_mae, "d")["d_ci95"],
        "p_mae_paired_t": stats.paired_p_value(paired["test_mae"], paired["test_mae_scr"]),
        "p_r2_paired_t": stats.paired_p_value(paired["test_r2"], paired["test_r2_scr"]),
    }


# ----------------------------------------------------------------------------- tables


def scratch_table(runs: pd.DataFrame, defaults: StudyDefaults | None = None) -> pd.DataFrame:
    """Scratch baseline per (model, dataset, size): the reference every gain is measured from."""
    return summarize(scratch_runs(runs, defaults), SCRATCH_KEYS)


def pairwise_grid(runs: pd.DataFrame, defaults: StudyDefaults) -> pd.DataFrame:
    """PT source × FT target × FT size with gain over scratch: the study's main result."""
    tl = plain_finetune_runs(runs, defaults)
    return summarize_with_gain(tl, scratch_runs(runs, defaults), GRID_KEYS)


def ft_size_sweep(runs: pd.DataFrame, defaults: StudyDefaults) -> pd.DataFrame:
    """R²/MAE vs FT size per target, for each PT source and for scratch (``source='scratch'``).

    Scratch and TL share one long table so a plot can draw them as lines of one variable.
    """
    tl = plain_finetune_runs(runs, defaults).assign(source=lambda f: f["pt_dataset"])
    scratch = scratch_runs(runs, defaults).assign(source=SCRATCH_SOURCE)
    frames = [
        f for f in (summarize(tl, FT_SWEEP_KEYS), summarize(scratch, FT_SWEEP_KEYS)) if len(f)
    ]
    if not frames:
        return pd.DataFrame(columns=list(TABLE_COLUMNS["ft_size_sweep"]))
    out = pd.concat(frames, ignore_index=True)
    return out.sort_values(list(FT_SWEEP_KEYS), kind="stable").reset_index(drop=True)


def pt_size_sweep(runs: pd.DataFrame, defaults: StudyDefaults) -> pd.DataFrame:
    """Effect of the PT-set size: default strategy and lr, any PT size, with gain."""
    ft = of_kind(runs, "finetune")
    untagged = (ft["strategy"] == defaults.strategy) & lr_is(ft, defaults.lr)
    tl = by_family(ft, ["pairwise", "pt_size_sweep"], untagged)
    return summarize_with_gain(tl, scratch_runs(runs, defaults), PT_SWEEP_KEYS)


def strategies(runs: pd.DataFrame, defaults: StudyDefaults) -> pd.DataFrame:
    """Every fine-tuning strategy at the default lr and PT size, with gain."""
    ft = of_kind(runs, "finetune")
    untagged = pt_size_is_default(ft, defaults.pt_size) & lr_is(ft, defaults.lr)
    tl = by_family(ft, ["strategies"], untagged)
    return summarize_with_gain(tl, scratch_runs(runs, defaults), STRATEGY_KEYS)


def learning_rate(runs: pd.DataFrame, defaults: StudyDefaults) -> pd.DataFrame:
    """Every fine-tuning learning rate (per strategy) at the default PT size, with gain.

    Our learning-rate family runs the default strategy; the paper's also varied the rate of
    its new-head strategies, hence ``strategy`` is a key of this table.
    """
    ft = of_kind(runs, "finetune")
    untagged = pt_size_is_default(ft, defaults.pt_size) & (ft["strategy"] == defaults.strategy)
    tl = by_family(ft, ["learning_rate"], untagged & ft["lr"].notna())
    return summarize_with_gain(tl, scratch_runs(runs, defaults), LR_KEYS)


def mpt_table(runs: pd.DataFrame, defaults: StudyDefaults) -> pd.DataFrame:
    """MPT fine-tunes per (variant, target, FT size, strategy): vs scratch and vs pair-wise.

    The pair-wise reference of a (model, target, FT size) cell is its best PT source in the
    pair-wise grid (highest mean test R²); the comparison is paired per trial like the gain
    over scratch, so the MPT and pair-wise runs of trial k share the FT subset and split.
    """
    columns = list(TABLE_COLUMNS["mpt"])
    tl = of_kind(runs, "mpt_finetune")
    if tl.empty:
        return pd.DataFrame(columns=columns)
    table = summarize_with_gain(tl, scratch_runs(runs, defaults), MPT_KEYS)
    plain = plain_finetune_runs(runs, defaults)
    grid = summarize(plain, GRID_KEYS)
    rows = []
    for _, row in table.iterrows():
        rows.append(_vs_best_pairwise(row, tl, plain, grid))
    vs = pd.DataFrame(rows, columns=list(MPT_VS_PAIRWISE_COLUMNS), index=table.index)
    vs["p_mae_paired_t_vs_pairwise_holm"] = stats.adjust_p_values(vs["p_mae_paired_t_vs_pairwise"])
    return pd.concat([table, vs], axis=1)[columns]


def _vs_best_pairwise(
    row: pd.Series, mpt: pd.DataFrame, plain: pd.DataFrame, grid: pd.DataFrame
) -> dict[str, Any]:
    """Best pair-wise source of the row's cell and the paired MAE comparison with it."""
    cell = grid[
        (grid["model"] == row["model"])
        & (grid["dataset"] == row["dataset"])
        & (grid["size"] == row["size"])
    ]
    if cell.empty or cell["r2_mean"].isna().all():
        return {"n_pairs_vs_pairwise": 0}
    best = cell.loc[cell["r2_mean"].idxmax()]
    mine = mpt[
        (mpt["model"] == row["model"])
        & (mpt["pt_dataset"] == row["pt_dataset"])
        & (mpt["dataset"] == row["dataset"])
        & (mpt["size"] == row["size"])
        & (mpt["strategy"] == row["strategy"])
    ]
    theirs = plain[
        (plain["model"] == row["model"])
        & (plain["pt_dataset"] == best["pt_dataset"])
        & (plain["dataset"] == row["dataset"])
        & (plain["size"] == row["size"])
    ]
    paired = mine.merge(
        theirs[[*PAIR_KEYS, "test_r2", "test_mae"]], on=list(PAIR_KEYS), suffixes=("", "_ref")
    )
    return {
        "best_pairwise_source": best["pt_dataset"],
        "best_pairwise_r2_mean": best["r2_mean"],
        "best_pairwise_mae_mean": best["mae_mean"],
        "n_pairs_vs_pairwise": len(paired),
        "gain_mae_vs_pairwise": stats.relative_gain(
            row["mae_mean"], best["mae_mean"], lower_is_better=True
        ),
        "p_mae_paired_t_vs_pairwise": stats.paired_p_value(
            paired["test_mae"], paired["test_mae_ref"]
        ),
    }


def chains_table(runs: pd.DataFrame, defaults: StudyDefaults) -> pd.DataFrame:
    """Every chain stage (one row per chain prefix and trial group) with MAPE and gain.

    ``chain`` is the whole path, e.g. ``fe:941>bg:2000>ebg:100``; one-stage transfer
    (``bg:2000>ebg:100``) and scratch of the final target compare through the same gain
    columns, paired per trial.
    """
    columns = list(TABLE_COLUMNS["chains"])
    tl = of_kind(runs, "chain")
    if tl.empty:
        return pd.DataFrame(columns=columns)
    table = summarize_with_gain(tl, scratch_runs(runs, defaults), CHAIN_KEYS)
    mape = [
        {**row, **stats.describe(group["test_mape"], "mape")}
        for row, group in _group_rows(tl, CHAIN_KEYS)
    ]
    table = table.merge(pd.DataFrame(mape), on=list(CHAIN_KEYS), how="left")
    table["n_stages"] = table["chain"].str.count(">")
    return table[columns]


#: tables that get the published mean/std/n of the same cell, with their cell keys
COMPARED_KEYS: dict[str, tuple[str, ...]] = {
    "scratch": SCRATCH_KEYS,
    "pairwise_grid": GRID_KEYS,
    "ft_size_sweep": FT_SWEEP_KEYS,
    "pt_size_sweep": PT_SWEEP_KEYS,
    "strategies": STRATEGY_KEYS,
    "learning_rate": LR_KEYS,
}


def build_tables(
    runs: pd.DataFrame, defaults: StudyDefaults, published: pd.DataFrame | None = None
) -> dict[str, pd.DataFrame]:
    """Every table of :data:`~tlmat.report.names.TABLE_NAMES` (``runs`` included), by name.

    Args:
        runs: run records (:func:`collect_runs`, or published runs alone for the paper's
            own tables).
        defaults: what makes a fine-tune "plain" (see :class:`StudyDefaults`).
        published: published run records
            (:func:`tlmat.report.published.read_published_runs`); when given, every compared
            table gains the published cell's mean/std/n and our difference from it, and
            ``comparison`` lists every cell both have.
    """
    tables = _study_tables(runs, defaults)
    if published is not None:
        theirs = _study_tables(published, defaults)
        for name, keys in COMPARED_KEYS.items():
            tables[name] = compare.with_published(tables[name], theirs[name], keys)
    tables["headline"] = headline.headline_table(tables["pairwise_grid"])
    tables["comparison"] = compare.comparison_table(tables, defaults.pt_size)
    return tables


def _study_tables(runs: pd.DataFrame, defaults: StudyDefaults) -> dict[str, pd.DataFrame]:
    """The tables computed from one set of runs (ours, or the published ones to compare)."""
    return {
        "runs": runs,
        "scratch": scratch_table(runs, defaults),
        "pairwise_grid": pairwise_grid(runs, defaults),
        "ft_size_sweep": ft_size_sweep(runs, defaults),
        "pt_size_sweep": pt_size_sweep(runs, defaults),
        "strategies": strategies(runs, defaults),
        "learning_rate": learning_rate(runs, defaults),
        "mpt": mpt_table(runs, defaults),
        "chains": chains_table(runs, defaults),
    }


# ----------------------------------------------------------------------------- writing


def write_tables(
    runs: pd.DataFrame | Iterable[Path | str],
    out_dir: Path | str,
    defaults: StudyDefaults,
    meta: Mapping[str, Mapping[str, str]] | None = None,
    published: pd.DataFrame | None = None,
) -> list[Path]:
    """Build every table and write them (CSV) plus ``summary.md`` into ``out_dir``.

    Args:
        runs: run records, or ``metrics.json`` paths to :func:`collect_runs`.
        published: published run records to compare with (see :func:`build_tables`).

    A family without runs still gets its CSV with the header only, so downstream rules that
    declare these files as outputs always find them. Each file is written atomically
    (:func:`tlmat.files.atomic_write_text`): a reader never sees half a table.

    Returns:
        Paths written: ``<table>.csv`` for every table of :data:`TABLE_NAMES`, then summary.md.
    """
    out_dir = Path(out_dir)
    if not isinstance(runs, pd.DataFrame):
        runs = collect_runs(runs)
    tables = build_tables(runs, defaults, published)
    written = []
    for name in TABLE_NAMES:
        path = out_dir / f"{name}.csv"
        atomic_write_text(path, tables[name].to_csv(index=False, lineterminator="\n"))
        written.append(path)
    path = out_dir / SUMMARY_NAME
    atomic_write_text(path, summary.summary_markdown(tables, meta))
    written.append(path)
    log.info("wrote %d tables from %d runs to %s", len(written), len(tables["runs"]), out_dir)
    return written
