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
* Every table carries ``model`` as its first key, so ALIGNN and CGCNN are never mixed. The
  one deliberate exception is ``foundation.csv``: each row sets the fine-tuned CHGNet (column
  ``foundation``) beside the study model named in ``model`` (:mod:`tlmat.report.foundation`).

The table and file names are registered in :mod:`tlmat.report.names`, which the workflow
reads too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from tlmat.files import atomic_write_text
from tlmat.report import (
    compare,
    environment,
    foundation,
    headline,
    parity,
    recommendation,
    stats,
    summary,
)
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
    with_default_sampling,
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
GAIN_COLUMNS = stats.GAIN_COLUMNS
#: ``source`` of the scratch rows of the FT-size sweep (the other rows name their PT source)
SCRATCH_SOURCE = "scratch"

SCRATCH_KEYS: tuple[str, ...] = ("model", "dataset", "size")
GRID_KEYS: tuple[str, ...] = ("model", "pt_dataset", "pt_size", "dataset", "size")
FT_SWEEP_KEYS: tuple[str, ...] = ("model", "dataset", "source", "size")
PT_SWEEP_KEYS: tuple[str, ...] = GRID_KEYS
STRATEGY_KEYS: tuple[str, ...] = (*GRID_KEYS, "strategy")
#: freeze_before = N of the strategy freeze_before:N (the paper's children 1..N-1 frozen)
UNFROZEN_KEYS: tuple[str, ...] = (*GRID_KEYS, "freeze_before")
FREEZE_BEFORE = "freeze_before:"
LR_KEYS: tuple[str, ...] = (*GRID_KEYS, "strategy", "lr")
SAMPLING_KEYS: tuple[str, ...] = (*LR_KEYS, "sampling")
#: a sampling row beside the random draws of its cell (same pair, sizes, strategy and lr)
VS_RANDOM_COLUMNS: tuple[str, ...] = (
    "n_pairs_vs_random",
    "gain_mae_vs_random",
    "p_mae_paired_t_vs_random",
)
MPT_KEYS: tuple[str, ...] = ("model", "pt_dataset", "dataset", "size", "strategy")
CHAIN_KEYS: tuple[str, ...] = ("model", "chain", "dataset", "size", "strategy")
MAPE_COLUMNS: tuple[str, ...] = ("mape_mean", "mape_std", "mape_ci95")
#: what an MPT fine-tune's model pre-trained on: whether the target's own labels were among
#: them (never, by the plan) and how many labels there were
MPT_PT_COLUMNS: tuple[str, ...] = ("target_in_pretraining", "pt_labels")
#: a chain of 3+ stages beside the one-stage transfer from its first stage to its target
#: (fe:941>ebg:800 beside fe:941>bg:5000>ebg:800), paired per trial
ONE_STAGE_COLUMNS: tuple[str, ...] = (
    "one_stage_chain",
    "one_stage_n",
    "one_stage_r2_mean",
    "one_stage_mae_mean",
    "gain_mae_vs_one_stage",
    "p_mae_paired_t_vs_one_stage",
)
MPT_VS_PAIRWISE_COLUMNS: tuple[str, ...] = (
    "best_pairwise_source",
    "best_pairwise_pt_size",
    "best_pairwise_pt_labels",
    "best_pairwise_val_loss",
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
    "pt_size_sweep": (*PT_SWEEP_KEYS, "pt_n", *STAT_COLUMNS, *GAIN_COLUMNS),
    "strategies": (*STRATEGY_KEYS, *STAT_COLUMNS, *GAIN_COLUMNS),
    "unfrozen_layers": (*UNFROZEN_KEYS, "unfrozen_children", *STAT_COLUMNS, *GAIN_COLUMNS),
    "learning_rate": (*LR_KEYS, *STAT_COLUMNS, *GAIN_COLUMNS),
    "sampling": (*SAMPLING_KEYS, *STAT_COLUMNS, *GAIN_COLUMNS, *VS_RANDOM_COLUMNS),
    "mpt": (
        *MPT_KEYS,
        *MPT_PT_COLUMNS,
        *STAT_COLUMNS,
        *GAIN_COLUMNS,
        *MPT_VS_PAIRWISE_COLUMNS,
    ),
    "chains": (
        *CHAIN_KEYS,
        "n_stages",
        *STAT_COLUMNS,
        *MAPE_COLUMNS,
        *GAIN_COLUMNS,
        *ONE_STAGE_COLUMNS,
    ),
    "foundation": foundation.FOUNDATION_COLUMNS,
    "headline": headline.HEADLINE_COLUMNS,
    "comparison": compare.COMPARISON_COLUMNS,
    "trial_parity": parity.TRIAL_PARITY_COLUMNS,
    "environment": environment.ENVIRONMENT_COLUMNS,
    "recommendation": recommendation.RECOMMENDATION_COLUMNS,
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
    table = summarize_with_gain(tl, scratch_runs(runs, defaults), PT_SWEEP_KEYS)
    return _actual_pt_sizes(table, tl)


def _actual_pt_sizes(table: pd.DataFrame, tl: pd.DataFrame) -> pd.DataFrame:
    """``pt_n``: the structures the PT models really trained on (NaN where unrecorded, as in
    published runs). PT sizes above the pool train on the pool as one and the same run
    (tlmat.runs.capped_to_pool), so of the sizes that cap to the same pool only the
    smallest is kept: one row per size actually trained on, never replicates labelled
    with sizes that never were."""
    columns = list(TABLE_COLUMNS["pt_size_sweep"])
    if "pt_n" not in tl.columns:
        return table.assign(pt_n=pd.NA)[columns]
    actual = tl.groupby(list(PT_SWEEP_KEYS), dropna=False)["pt_n"].mean().rename("pt_n")
    table = table.merge(actual.reset_index(), on=list(PT_SWEEP_KEYS), how="left")[columns]
    recorded = table["pt_n"].notna()
    cell = ["model", "pt_dataset", "dataset", "size", "pt_n"]
    capped = recorded & table.sort_values("pt_size").duplicated(cell).reindex(table.index)
    if capped.any():
        log.info("PT-size sweep: %d rows capped to a pool already listed, dropped", capped.sum())
    return table[~capped].reset_index(drop=True)


def strategies(runs: pd.DataFrame, defaults: StudyDefaults) -> pd.DataFrame:
    """Every fine-tuning strategy at the default lr and PT size, with gain (the
    ``freeze_before:N`` sweep has its own table, :func:`unfrozen_layers`)."""
    ft = of_kind(runs, "finetune")
    untagged = pt_size_is_default(ft, defaults.pt_size) & lr_is(ft, defaults.lr)
    untagged &= ~_is_freeze_before(ft)
    tl = by_family(ft, ["strategies"], untagged)
    return summarize_with_gain(tl, scratch_runs(runs, defaults), STRATEGY_KEYS)


def _is_freeze_before(ft: pd.DataFrame) -> pd.Series:
    return ft["strategy"].fillna("").astype(str).str.startswith(FREEZE_BEFORE)


def unfrozen_layers(runs: pd.DataFrame, defaults: StudyDefaults) -> pd.DataFrame:
    """The ``freeze_before:N`` sweep at the default lr and PT size, with gain: one row per
    grid cell and N, ``unfrozen_children`` = 8 - N of the paper's seven ALIGNN children
    train (N = 1: all; N = 7: the final layer only)."""
    columns = list(TABLE_COLUMNS["unfrozen_layers"])
    ft = of_kind(runs, "finetune")
    sweep = pt_size_is_default(ft, defaults.pt_size) & lr_is(ft, defaults.lr)
    tl = ft[sweep & _is_freeze_before(ft)]
    if tl.empty:
        return pd.DataFrame(columns=columns)
    n = tl["strategy"].astype(str).str.removeprefix(FREEZE_BEFORE).astype(int)
    tl = tl.assign(freeze_before=n)
    table = summarize_with_gain(tl, scratch_runs(runs, defaults), UNFROZEN_KEYS)
    table["unfrozen_children"] = 8 - table["freeze_before"].astype(int)
    return table[columns]


def learning_rate(runs: pd.DataFrame, defaults: StudyDefaults) -> pd.DataFrame:
    """Every fine-tuning learning rate (per strategy) at the default PT size, with gain.

    The family runs every strategy of ``study.learning_rate.strategies`` (the paper's: full,
    new_head and new_head_freeze), hence ``strategy`` is a key of this table.
    """
    ft = of_kind(runs, "finetune")
    strategies = list(defaults.lr_strategies) or [defaults.strategy]
    untagged = pt_size_is_default(ft, defaults.pt_size) & ft["strategy"].isin(strategies)
    tl = by_family(ft, ["learning_rate"], untagged & ft["lr"].notna())
    return summarize_with_gain(tl, scratch_runs(runs, defaults), LR_KEYS)


def sampling_table(runs: pd.DataFrame, defaults: StudyDefaults) -> pd.DataFrame:
    """Random vs stratified FT subsets (``study.sampling``), with gain over scratch.

    Rows are the fine-tune cells (pair, PT and FT size, strategy, lr) that have a run drawn
    other than at random, one row per sampling method, the random one included. Scratch
    baselines draw at random, so a stratified row's gain compares other subsets; the
    ``…_vs_random`` columns compare it with the random row of its cell, paired per trial
    (same PT model, seed and FT size, another subset).
    """
    columns = list(TABLE_COLUMNS["sampling"])
    ft = of_kind(runs, "finetune", sampling=None)
    if ft.empty or "sampling" not in ft.columns:
        return pd.DataFrame(columns=columns)
    sampling = ft["sampling"].fillna("random")
    cell_keys = list(LR_KEYS)
    cells = ft[cell_keys].astype(str).agg("|".join, axis=1)
    studied = cells.isin(set(cells[sampling != "random"]))
    tl = by_family(ft.assign(sampling=sampling), ["sampling"], studied & ft["lr"].notna())
    if tl.empty:
        return pd.DataFrame(columns=columns)
    table = summarize_with_gain(tl, scratch_runs(runs, defaults), SAMPLING_KEYS)
    rows = [_vs_random(row, tl) for _, row in table.iterrows()]
    vs = pd.DataFrame(rows, columns=list(VS_RANDOM_COLUMNS), index=table.index)
    return pd.concat([table, vs], axis=1)[columns]


def _vs_random(row: pd.Series, tl: pd.DataFrame) -> dict[str, Any]:
    """The MAE of a sampling row against the random row of its cell, paired per trial."""
    if row["sampling"] == "random":
        return {"n_pairs_vs_random": 0}
    same = pd.Series(True, index=tl.index)
    for key in ("model", "pt_dataset", "pt_size", "dataset", "size", "strategy"):
        same &= tl[key] == row[key]
    same &= lr_is(tl, row["lr"])
    mine = tl[same & (tl["sampling"] == row["sampling"])]
    random = tl[same & (tl["sampling"] == "random")]
    paired = mine.merge(
        random[[*PAIR_KEYS, "test_mae"]], on=list(PAIR_KEYS), suffixes=("", "_random")
    )
    if random.empty:
        return {"n_pairs_vs_random": 0}
    return {
        "n_pairs_vs_random": len(paired),
        "gain_mae_vs_random": stats.relative_gain(
            row["mae_mean"], random["test_mae"].mean(), lower_is_better=True
        ),
        "p_mae_paired_t_vs_random": stats.paired_p_value(
            paired["test_mae"], paired["test_mae_random"]
        ),
    }


def mpt_table(runs: pd.DataFrame, defaults: StudyDefaults) -> pd.DataFrame:
    """MPT fine-tunes per (variant, target, FT size, strategy): vs scratch and vs pair-wise.

    ``target_in_pretraining`` says whether the MPT model saw the target's labels (the plan
    never fine-tunes such a pair; a row that says true came from elsewhere and is not
    transfer); ``pt_labels`` counts the labels it pre-trained on. The pair-wise reference is
    the paper's "maxed-out" model: per PT source its largest PT size fine-tuned on the cell,
    and of those the source with the lowest mean validation loss, never the best test R².
    The comparison is paired per trial, like the gain over scratch.
    """
    columns = list(TABLE_COLUMNS["mpt"])
    tl = of_kind(runs, "mpt_finetune")
    if tl.empty:
        return pd.DataFrame(columns=columns)
    table = summarize_with_gain(tl, scratch_runs(runs, defaults), MPT_KEYS)
    pretrained = _mpt_pretraining(runs)
    table["target_in_pretraining"] = [
        ds in pretrained[pt][0] if pt in pretrained else pd.NA
        for pt, ds in zip(table["pt_dataset"], table["dataset"], strict=True)
    ]
    table["pt_labels"] = [pretrained.get(pt, ((), pd.NA))[1] for pt in table["pt_dataset"]]
    candidates = _maxed_out_candidates(runs, defaults)
    rows = [_vs_best_pairwise(row, tl, candidates, runs) for _, row in table.iterrows()]
    vs = pd.DataFrame(rows, columns=list(MPT_VS_PAIRWISE_COLUMNS), index=table.index)
    vs["p_mae_paired_t_vs_pairwise_holm"] = stats.adjust_p_values(vs["p_mae_paired_t_vs_pairwise"])
    return pd.concat([table, vs], axis=1)[columns]


def _mpt_pretraining(runs: pd.DataFrame) -> dict[str, tuple[tuple[str, ...], Any]]:
    """MPT model name -> (its source data sets, the labels it trained on)."""
    models = of_kind(runs, "mpt")
    if models.empty or "sources" not in models.columns:
        return {}
    out = {}
    for _, run in models.drop_duplicates("dataset").iterrows():
        sources = run["sources"]
        if isinstance(sources, str):
            sources = json.loads(sources)
        labels = run.get("n_train_labels", pd.NA)
        out[run["dataset"]] = (tuple(sources or ()), labels)
    return out


def _maxed_out_candidates(runs: pd.DataFrame, defaults: StudyDefaults) -> pd.DataFrame:
    """Pair-wise fine-tunes (default strategy and lr, any PT size) at the largest PT size
    each source was fine-tuned from on each (model, target, FT size) cell."""
    ft = of_kind(runs, "finetune")
    ft = ft[(ft["strategy"] == defaults.strategy) & lr_is(ft, defaults.lr)]
    if ft.empty:
        return ft
    cell = ["model", "pt_dataset", "dataset", "size"]
    largest = ft.groupby(cell, dropna=False)["pt_size"].transform("max")
    return ft[ft["pt_size"] == largest]


def _vs_best_pairwise(
    row: pd.Series, mpt: pd.DataFrame, candidates: pd.DataFrame, runs: pd.DataFrame
) -> dict[str, Any]:
    """The maxed-out pair-wise model of the row's cell and the paired MAE comparison."""
    cell = candidates[
        (candidates["model"] == row["model"])
        & (candidates["dataset"] == row["dataset"])
        & (candidates["size"] == row["size"])
    ]
    if cell.empty or "best_val_loss" not in cell.columns or cell["best_val_loss"].isna().all():
        return {"n_pairs_vs_pairwise": 0}
    by_source = cell.groupby("pt_dataset").agg(
        val_loss=("best_val_loss", "mean"),
        pt_size=("pt_size", "first"),
        r2_mean=("test_r2", "mean"),
        mae_mean=("test_mae", "mean"),
    )
    best_source = by_source["val_loss"].idxmin()
    best = by_source.loc[best_source]
    mine = mpt[
        (mpt["model"] == row["model"])
        & (mpt["pt_dataset"] == row["pt_dataset"])
        & (mpt["dataset"] == row["dataset"])
        & (mpt["size"] == row["size"])
        & (mpt["strategy"] == row["strategy"])
    ]
    theirs = cell[cell["pt_dataset"] == best_source]
    paired = mine.merge(
        theirs[[*PAIR_KEYS, "test_r2", "test_mae"]], on=list(PAIR_KEYS), suffixes=("", "_ref")
    )
    pt = of_kind(runs, "pretrain")
    pt = pt[(pt["dataset"] == best_source) & (pt["size"] == best["pt_size"])]
    return {
        "best_pairwise_source": best_source,
        "best_pairwise_pt_size": best["pt_size"],
        "best_pairwise_pt_labels": pt["n_train"].mean() if not pt.empty else pd.NA,
        "best_pairwise_val_loss": best["val_loss"],
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
    ft = of_kind(runs, "finetune")
    one_stage = [_vs_one_stage(row, tl, ft[lr_is(ft, defaults.lr)]) for _, row in table.iterrows()]
    table = pd.concat(
        [table, pd.DataFrame(one_stage, columns=list(ONE_STAGE_COLUMNS), index=table.index)],
        axis=1,
    )
    return table[columns]


def _vs_one_stage(row: pd.Series, chains: pd.DataFrame, finetunes: pd.DataFrame) -> dict:
    """The one-stage transfer from the chain's first stage straight to its final target."""
    stages = str(row["chain"]).split(">")
    if len(stages) < 3 or "chain" not in finetunes.columns:
        return {}
    direct = f"{stages[0]}>{stages[-1]}"
    theirs = finetunes[
        (finetunes["chain"] == direct)
        & (finetunes["model"] == row["model"])
        & (finetunes["strategy"] == row["strategy"])
    ]
    if theirs.empty:
        return {"one_stage_chain": direct, "one_stage_n": 0}
    mine = chains[(chains["chain"] == row["chain"]) & (chains["model"] == row["model"])]
    paired = mine.merge(theirs[[*PAIR_KEYS, "test_mae"]], on=list(PAIR_KEYS), suffixes=("", "_ref"))
    mae = theirs["test_mae"].mean()
    return {
        "one_stage_chain": direct,
        "one_stage_n": len(theirs),
        "one_stage_r2_mean": theirs["test_r2"].mean(),
        "one_stage_mae_mean": mae,
        "gain_mae_vs_one_stage": stats.relative_gain(row["mae_mean"], mae, lower_is_better=True),
        "p_mae_paired_t_vs_one_stage": stats.paired_p_value(
            paired["test_mae"], paired["test_mae_ref"]
        ),
    }


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
    tables["foundation"] = foundation.foundation_table(
        with_default_sampling(runs, defaults), defaults
    )
    if published is not None:
        theirs = _study_tables(published, defaults)
        for name, keys in COMPARED_KEYS.items():
            tables[name] = compare.with_published(tables[name], theirs[name], keys)
    tables["headline"] = headline.headline_table(tables["pairwise_grid"])
    tables["comparison"] = compare.comparison_table(tables, defaults.pt_size)
    tables["trial_parity"] = parity.trial_parity_table(runs, published)
    tables["environment"] = environment.environment_table(runs)
    # every run, stratified draws included: each (source, strategy, lr, sampling) is an option
    tables["recommendation"] = recommendation.recommendation_table(runs, defaults)
    return tables


def _study_tables(runs: pd.DataFrame, defaults: StudyDefaults) -> dict[str, pd.DataFrame]:
    """The tables computed from one set of runs (ours, or the published ones to compare)."""
    # foundation runs (the shipped CHGNet fine-tuned: another model, no PT run of the study)
    # are in `runs` and foundation.csv only; the sampling table reads every subset draw
    every, others = runs, foundation.without_foundation_runs(runs)
    runs = with_default_sampling(others, defaults)
    return {
        "runs": every,
        "scratch": scratch_table(runs, defaults),
        "pairwise_grid": pairwise_grid(runs, defaults),
        "ft_size_sweep": ft_size_sweep(runs, defaults),
        "pt_size_sweep": pt_size_sweep(runs, defaults),
        "strategies": strategies(runs, defaults),
        "unfrozen_layers": unfrozen_layers(runs, defaults),
        "learning_rate": learning_rate(runs, defaults),
        "sampling": sampling_table(others, defaults),
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
