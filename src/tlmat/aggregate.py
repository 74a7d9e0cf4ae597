"""Turn run records (our ``metrics.json`` files, or published runs) into the study's tables.

Every training run writes its own ``results/runs/<run-id>/metrics.json`` so that runs can be
executed, retried and cached independently. The paper's claims, however, are about averages
over random trials and about transfer learning (TL) *relative to* training from scratch, so
this module is the single place where runs are

* validated and collected into one frame (:func:`collect_runs`),
* selected into the study's families (pair-wise grid, FT-size sweep, PT-size sweep,
  fine-tuning strategies, learning rates) using :class:`StudyDefaults` to tell the "plain"
  runs apart from the ablations,
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
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tlmat.report import compare, headline, stats, summary

log = logging.getLogger(__name__)

REQUIRED_KEYS: tuple[str, ...] = (
    "run_id",
    "kind",
    "model",
    "dataset",
    "size",
    "trial",
    "seed",
    "pt_dataset",
    "pt_size",
    "strategy",
    "lr",
    "n_train",
    "n_val",
    "n_test",
    "test_r2",
    "test_mae",
    "test_mape",
    "best_epoch",
    "epochs_run",
    "best_val_loss",
    "wall_time_s",
    "device",
    "versions",
    "config_hash",
)
KINDS: tuple[str, ...] = ("scratch", "pretrain", "finetune", "mpt", "mpt_finetune", "chain")
INT_COLUMNS: tuple[str, ...] = (
    "size",
    "trial",
    "seed",
    "pt_size",
    "n_train",
    "n_val",
    "n_test",
    "best_epoch",
    "epochs_run",
)
FLOAT_COLUMNS: tuple[str, ...] = (
    "lr",
    "test_r2",
    "test_mae",
    "test_mape",
    "best_val_loss",
    "wall_time_s",
)
# Nested dicts (``versions``) are flattened into ``versions.<name>`` columns.
RUN_COLUMNS: tuple[str, ...] = tuple(k for k in REQUIRED_KEYS if k != "versions")

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
PAIR_KEYS: tuple[str, ...] = ("model", "dataset", "size", "trial")
SCRATCH_SOURCE = "scratch"
#: optional run-record columns: our metrics.json files leave them out
OPTIONAL_RUN_COLUMNS: dict[str, str | None] = {"family": None, "origin": "tlmat"}

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

#: File stem -> columns of every table written by :func:`write_tables` (besides runs.csv).
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


@dataclasses.dataclass(frozen=True)
class StudyDefaults:
    """The settings that make a fine-tuning run "plain" rather than part of an ablation.

    The pair-wise grid and the FT-size sweep must compare like with like, so they only use
    fine-tuning runs with the default strategy, learning rate and PT size; each ablation table
    relaxes exactly one of these.

    Attributes:
        pt_size: PT training-set size of the plain runs: one int for every source, a mapping
            ``pt_dataset -> size`` when the sources differ, or ``None`` for "the largest PT
            size of each (model, pt_dataset) among the fine-tuning runs" (i.e. the full set).
        lr: learning rate of the plain fine-tuning runs.
        strategy: fine-tuning strategy of the plain runs.
        scratch_lr: if set, only scratch runs with this learning rate form the baseline; needed
            only when scratch runs were repeated at several learning rates.
    """

    pt_size: int | Mapping[str, int] | None
    lr: float
    strategy: str = "full"
    scratch_lr: float | None = None


# ----------------------------------------------------------------------------- collection


def collect_runs(metric_files: Iterable[Path | str]) -> pd.DataFrame:
    """Read and validate ``metrics.json`` files into one frame, one row per run.

    Validation happens here, up front, because a single truncated or stale file would
    otherwise surface much later as a confusing NaN or a silently missing grid cell.

    Returns:
        Frame sorted by ``run_id`` with the contract's keys first (``versions`` flattened to
        ``versions.<package>``), then any extra keys in alphabetical order.

    Raises:
        ValueError: naming the file, if it is not valid JSON, not a JSON object, lacks
            required keys or has an unknown ``kind``; or if two files share a ``run_id``.
    """
    records = [_read_metrics(Path(p)) for p in metric_files]
    if not records:
        return pd.DataFrame(columns=[*RUN_COLUMNS, *OPTIONAL_RUN_COLUMNS])
    return run_frame(pd.DataFrame.from_records(records))


def run_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Run records in the one shape every table builder reads, whatever their origin.

    Our ``metrics.json`` files and the published per-run rows
    (:func:`tlmat.report.published.read_published_runs`) both end here: contract columns
    first, the optional ``family``/``origin`` columns filled in, then extras alphabetically.
    """
    _check_unique_run_ids(frame)
    frame = frame.copy()
    for column, default in OPTIONAL_RUN_COLUMNS.items():
        if column not in frame.columns:
            frame[column] = default
    fixed = [*RUN_COLUMNS, *OPTIONAL_RUN_COLUMNS]
    extras = sorted(c for c in frame.columns if c not in fixed)
    frame = _coerce_types(frame[[*fixed, *extras]])
    return frame.sort_values("run_id", kind="stable").reset_index(drop=True)


def _read_metrics(path: Path) -> dict[str, Any]:
    """Parse and validate one metrics file; the error names the file so it can be fixed."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ValueError(f"{path}: missing required keys: {', '.join(missing)}")
    if data["kind"] not in KINDS:
        raise ValueError(f"{path}: unknown kind {data['kind']!r} (expected one of {KINDS})")
    return _flatten(data)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to dotted keys and lists to JSON text, so every value fits a cell."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix=f"{name}."))
        elif isinstance(value, list | tuple):
            flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat


def _check_unique_run_ids(frame: pd.DataFrame) -> None:
    """Two files claiming one run id would be double-counted as two trials."""
    duplicated = frame.loc[frame["run_id"].duplicated(), "run_id"].unique()
    if len(duplicated):
        raise ValueError(f"duplicate run_id in metrics files: {', '.join(map(str, duplicated))}")


def _coerce_types(frame: pd.DataFrame) -> pd.DataFrame:
    """Use nullable ints so sizes stay ``800`` (not ``800.0``) even where some are null."""
    frame = frame.copy()
    for column in INT_COLUMNS:
        frame[column] = pd.to_numeric(frame[column]).astype("Int64")
    for column in FLOAT_COLUMNS:
        frame[column] = pd.to_numeric(frame[column]).astype(float)
    return frame


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


# ----------------------------------------------------------------------------- selection


def _kind(runs: pd.DataFrame, kind: str) -> pd.DataFrame:
    return runs[runs["kind"] == kind]


def _lr_is(frame: pd.DataFrame, lr: float) -> pd.Series:
    """Float-tolerant lr match: 1e-4 written by different code paths must still compare equal."""
    return pd.Series(np.isclose(frame["lr"].astype(float), lr, rtol=1e-6, atol=0.0), frame.index)


def _pt_size_is_default(frame: pd.DataFrame, pt_size: int | Mapping[str, int] | None) -> pd.Series:
    """Mask of fine-tuning runs whose PT size is the study default (see StudyDefaults)."""
    sizes = frame["pt_size"].astype("Float64")
    if pt_size is None:
        wanted = sizes.groupby([frame["model"], frame["pt_dataset"]]).transform("max")
    elif isinstance(pt_size, Mapping):
        wanted = frame["pt_dataset"].map(pt_size).astype("Float64")
    else:
        wanted = pd.Series(float(pt_size), index=frame.index, dtype="Float64")
    return (sizes == wanted).fillna(False).astype(bool)


def scratch_runs(runs: pd.DataFrame, defaults: StudyDefaults | None = None) -> pd.DataFrame:
    """The scratch baseline: one run per (model, dataset, size, trial).

    Raises:
        ValueError: if the baseline is ambiguous (several scratch runs share a trial), since
            silently averaging them would change every gain in the study.
    """
    scratch = _kind(runs, "scratch")
    if defaults is not None and defaults.scratch_lr is not None:
        scratch = scratch[_lr_is(scratch, defaults.scratch_lr)]
    clash = scratch[scratch.duplicated(list(PAIR_KEYS), keep=False)]
    if len(clash):
        raise ValueError(
            "ambiguous scratch baseline (set StudyDefaults.scratch_lr?): "
            + ", ".join(clash["run_id"].astype(str))
        )
    return scratch


def _by_family(ft: pd.DataFrame, families: Sequence[str], untagged: pd.Series) -> pd.DataFrame:
    """Tagged runs (published ones) by their family tag; untagged runs (ours) by ``untagged``.

    A published run states which of the paper's experiments it belongs to, so it needs no
    guessing from defaults (its learning rate is often not even recorded); our runs are shared
    between families and are placed by the study defaults instead.
    """
    if "family" not in ft.columns:  # a hand-built frame without the optional column
        return ft[untagged]
    tagged = ft["family"].notna()
    return ft[(tagged & ft["family"].isin(list(families))) | (~tagged & untagged)]


def plain_finetune_runs(runs: pd.DataFrame, defaults: StudyDefaults) -> pd.DataFrame:
    """Fine-tuning runs of the pair-wise grid: default strategy, learning rate and PT size."""
    ft = _kind(runs, "finetune")
    plain = (
        _pt_size_is_default(ft, defaults.pt_size)
        & (ft["strategy"] == defaults.strategy)
        & _lr_is(ft, defaults.lr)
    )
    return _by_family(ft, ["pairwise"], plain)


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
    ft = _kind(runs, "finetune")
    untagged = (ft["strategy"] == defaults.strategy) & _lr_is(ft, defaults.lr)
    tl = _by_family(ft, ["pairwise", "pt_size_sweep"], untagged)
    return summarize_with_gain(tl, scratch_runs(runs, defaults), PT_SWEEP_KEYS)


def strategies(runs: pd.DataFrame, defaults: StudyDefaults) -> pd.DataFrame:
    """Every fine-tuning strategy at the default lr and PT size, with gain."""
    ft = _kind(runs, "finetune")
    untagged = _pt_size_is_default(ft, defaults.pt_size) & _lr_is(ft, defaults.lr)
    tl = _by_family(ft, ["strategies"], untagged)
    return summarize_with_gain(tl, scratch_runs(runs, defaults), STRATEGY_KEYS)


def learning_rate(runs: pd.DataFrame, defaults: StudyDefaults) -> pd.DataFrame:
    """Every fine-tuning learning rate (per strategy) at the default PT size, with gain.

    Our learning-rate family runs the default strategy; the paper's also varied the rate of
    its new-head strategies, hence ``strategy`` is a key of this table.
    """
    ft = _kind(runs, "finetune")
    untagged = _pt_size_is_default(ft, defaults.pt_size) & (ft["strategy"] == defaults.strategy)
    tl = _by_family(ft, ["learning_rate"], untagged & ft["lr"].notna())
    return summarize_with_gain(tl, scratch_runs(runs, defaults), LR_KEYS)


def mpt_table(runs: pd.DataFrame, defaults: StudyDefaults) -> pd.DataFrame:
    """MPT fine-tunes per (variant, target, FT size, strategy): vs scratch and vs pair-wise.

    The pair-wise reference of a (model, target, FT size) cell is its best PT source in the
    pair-wise grid (highest mean test R²); the comparison is paired per trial like the gain
    over scratch, so the MPT and pair-wise runs of trial k share the FT subset and split.
    """
    columns = list(TABLE_COLUMNS["mpt"])
    tl = _kind(runs, "mpt_finetune")
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
    tl = _kind(runs, "chain")
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
    """All tables keyed by file stem (``runs`` included), in the order they are written.

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


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same directory + ``os.replace``.

    A workflow engine (or a reader) must never see a half-written table, even if this
    process is killed mid-write.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    declare these files as outputs always find them.

    Returns:
        Paths written: ``<table>.csv`` for every table of :func:`build_tables`, then summary.md.
    """
    out_dir = Path(out_dir)
    if not isinstance(runs, pd.DataFrame):
        runs = collect_runs(runs)
    tables = build_tables(runs, defaults, published)
    written = []
    for name, table in tables.items():
        path = out_dir / f"{name}.csv"
        atomic_write_text(path, table.to_csv(index=False, lineterminator="\n"))
        written.append(path)
    path = out_dir / "summary.md"
    atomic_write_text(path, summary.summary_markdown(tables, meta))
    written.append(path)
    log.info("wrote %d tables from %d runs to %s", len(written), len(tables["runs"]), out_dir)
    return written
