"""Turn the per-run ``metrics.json`` files into the study's tables and a Markdown summary.

Every training run writes its own ``results/runs/<run-id>/metrics.json`` so that runs can be
executed, retried and cached independently. The paper's claims, however, are about averages
over random trials and about transfer learning (TL) *relative to* training from scratch, so
this module is the single place where runs are

* validated and collected into one frame (:func:`collect_runs`),
* selected into the study's families (pair-wise grid, FT-size sweep, PT-size sweep,
  fine-tuning strategies, learning rates) using :class:`StudyDefaults` to tell the "plain"
  runs apart from the ablations,
* summarised over trials (mean, sample std, 95 % t confidence half-width) and compared with
  the scratch baseline *trial by trial* (same model, target, FT size and trial, hence the same
  split and seed), which is what makes the gain and the paired t-test meaningful.

Conventions used by every table:

* ``gain_r2 = (r2_tl - r2_scratch) / |r2_scratch| * 100`` and
  ``gain_mae = (mae_scratch - mae_tl) / mae_scratch * 100`` per paired trial, then averaged
  over the pairs, so a positive gain always means TL is better.
* ``p_value`` is a two-sided paired t-test (:func:`scipy.stats.ttest_rel`) of TL vs scratch
  test MAE over the paired trials; it is NaN with fewer than two pairs.
* Every table carries ``model`` as its first key, so ALIGNN and CGCNN are never mixed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

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
GAIN_COLUMNS: tuple[str, ...] = (
    "scratch_r2_mean",
    "scratch_mae_mean",
    "n_pairs",
    "gain_r2",
    "gain_r2_std",
    "gain_mae",
    "gain_mae_std",
    "p_value",
    "test",
    "negative_transfer",
)
#: significance level of the ``negative_transfer`` flag
ALPHA = 0.05
PAIR_KEYS: tuple[str, ...] = ("model", "dataset", "size", "trial")
PAIRED_TEST = "paired t-test (scipy.stats.ttest_rel, two-sided) on test MAE, TL vs scratch"
SCRATCH_SOURCE = "scratch"

SCRATCH_KEYS: tuple[str, ...] = ("model", "dataset", "size")
GRID_KEYS: tuple[str, ...] = ("model", "pt_dataset", "pt_size", "dataset", "size")
FT_SWEEP_KEYS: tuple[str, ...] = ("model", "dataset", "source", "size")
PT_SWEEP_KEYS: tuple[str, ...] = GRID_KEYS
STRATEGY_KEYS: tuple[str, ...] = (*GRID_KEYS, "strategy")
LR_KEYS: tuple[str, ...] = (*GRID_KEYS, "lr")
MPT_KEYS: tuple[str, ...] = ("model", "pt_dataset", "dataset", "size", "strategy")
CHAIN_KEYS: tuple[str, ...] = ("model", "chain", "dataset", "size", "strategy")
MAPE_COLUMNS: tuple[str, ...] = ("mape_mean", "mape_std", "mape_ci95")
MPT_VS_PAIRWISE_COLUMNS: tuple[str, ...] = (
    "best_pairwise_source",
    "best_pairwise_r2_mean",
    "best_pairwise_mae_mean",
    "n_pairs_vs_pairwise",
    "gain_mae_vs_pairwise",
    "p_value_vs_pairwise",
    "test_vs_pairwise",
)
PAIRED_TEST_VS_PAIRWISE = (
    "paired t-test (scipy.stats.ttest_rel, two-sided) on test MAE, MPT vs best pair-wise source"
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
        return pd.DataFrame(columns=list(RUN_COLUMNS))
    frame = pd.DataFrame.from_records(records)
    _check_unique_run_ids(frame)
    extras = sorted(c for c in frame.columns if c not in RUN_COLUMNS)
    frame = frame[[*RUN_COLUMNS, *extras]]
    frame = _coerce_types(frame)
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


def paired_gains(
    r2_tl: Sequence[float],
    r2_scr: Sequence[float],
    mae_tl: Sequence[float],
    mae_scr: Sequence[float],
) -> tuple[np.ndarray, np.ndarray]:
    """Per-pair % gains of TL over scratch, signed so that positive means TL is better.

    R² gain is relative to ``|r2_scr|`` (scratch R² can be negative); it is NaN when the
    scratch R² is exactly zero rather than infinite.
    """
    r2_tl, r2_scr = np.asarray(r2_tl, float), np.asarray(r2_scr, float)
    mae_tl, mae_scr = np.asarray(mae_tl, float), np.asarray(mae_scr, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        gain_r2 = np.where(r2_scr != 0, (r2_tl - r2_scr) / np.abs(r2_scr) * 100.0, np.nan)
        gain_mae = np.where(mae_scr != 0, (mae_scr - mae_tl) / mae_scr * 100.0, np.nan)
    return gain_r2, gain_mae


def paired_p_value(mae_tl: Sequence[float], mae_scr: Sequence[float]) -> float:
    """Two-sided paired t-test p-value of TL vs scratch MAE; NaN with fewer than two pairs.

    Paired, because trial k of TL and of scratch share the split and seed, so the
    trial-to-trial variance cancels out of the difference. Also NaN when all differences are
    (numerically) equal: the t statistic is then infinite or 0/0 and a p-value of 0 would
    claim a certainty that two or three trials cannot give.
    """
    a, b = np.asarray(mae_tl, float), np.asarray(mae_scr, float)
    keep = ~(np.isnan(a) | np.isnan(b))
    if keep.sum() < 2:
        return math.nan
    diff = a[keep] - b[keep]
    if np.allclose(diff, diff[0], rtol=1e-9, atol=1e-12):
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # zero-variance differences
        return float(stats.ttest_rel(a[keep], b[keep]).pvalue)


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
            row.update(describe(group[column], short))
        rows.append(row)
    return pd.DataFrame(rows, columns=[*keys, *STAT_COLUMNS])


def _gain_row(paired: pd.DataFrame) -> dict[str, Any]:
    """Gain and p-value columns for one group of TL runs joined to their scratch twins."""
    gain_r2, gain_mae = paired_gains(
        paired["test_r2"], paired["test_r2_scr"], paired["test_mae"], paired["test_mae_scr"]
    )
    return {
        "scratch_r2_mean": describe(paired["test_r2_scr"], "r")["r_mean"],
        "scratch_mae_mean": describe(paired["test_mae_scr"], "m")["m_mean"],
        "n_pairs": len(paired),
        "gain_r2": describe(gain_r2, "g")["g_mean"],
        "gain_r2_std": describe(gain_r2, "g")["g_std"],
        "gain_mae": describe(gain_mae, "g")["g_mean"],
        "gain_mae_std": describe(gain_mae, "g")["g_std"],
        "p_value": paired_p_value(paired["test_mae"], paired["test_mae_scr"]),
        "test": PAIRED_TEST,
    }


def negative_transfer(gain_mae: pd.Series, p_value: pd.Series) -> pd.Series:
    """TL significantly worse than scratch: MAE gain < 0 and paired p < ALPHA (NaN p: False)."""
    gain = pd.to_numeric(gain_mae, errors="coerce")
    p = pd.to_numeric(p_value, errors="coerce")
    return ((gain < 0) & (p < ALPHA)).fillna(False).astype(bool)


def summarize_with_gain(
    tl: pd.DataFrame, scratch: pd.DataFrame, keys: Sequence[str]
) -> pd.DataFrame:
    """:func:`summarize` plus gain over scratch and the paired test, paired per trial.

    TL runs without a scratch twin still count in the mean/std columns but have
    ``n_pairs == 0`` and NaN gains.
    """
    summary = summarize(tl, keys)
    twins = scratch[[*PAIR_KEYS, "test_r2", "test_mae"]]
    paired = tl.merge(twins, on=list(PAIR_KEYS), how="inner", suffixes=("", "_scr"))
    gain_rows = [{**row, **_gain_row(group)} for row, group in _group_rows(paired, keys)]
    gains = pd.DataFrame(gain_rows, columns=[*keys, *GAIN_COLUMNS])
    out = summary.merge(gains, on=list(keys), how="left")
    out["n_pairs"] = pd.to_numeric(out["n_pairs"]).fillna(0).astype(int)
    out["test"] = PAIRED_TEST
    out["negative_transfer"] = negative_transfer(out["gain_mae"], out["p_value"])
    return out[[*keys, *STAT_COLUMNS, *GAIN_COLUMNS]]


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


def plain_finetune_runs(runs: pd.DataFrame, defaults: StudyDefaults) -> pd.DataFrame:
    """Fine-tuning runs with default strategy, learning rate and PT size."""
    ft = _finetune_at_default_pt_size(runs, defaults)
    return ft[(ft["strategy"] == defaults.strategy) & _lr_is(ft, defaults.lr)]


def _finetune_at_default_pt_size(runs: pd.DataFrame, defaults: StudyDefaults) -> pd.DataFrame:
    """PT-size default is resolved over *all* fine-tuning runs so every table agrees on it."""
    ft = _kind(runs, "finetune")
    return ft[_pt_size_is_default(ft, defaults.pt_size)]


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
    tl = ft[(ft["strategy"] == defaults.strategy) & _lr_is(ft, defaults.lr)]
    return summarize_with_gain(tl, scratch_runs(runs, defaults), PT_SWEEP_KEYS)


def strategies(runs: pd.DataFrame, defaults: StudyDefaults) -> pd.DataFrame:
    """Every fine-tuning strategy at the default lr and PT size, with gain."""
    ft = _finetune_at_default_pt_size(runs, defaults)
    tl = ft[_lr_is(ft, defaults.lr)]
    return summarize_with_gain(tl, scratch_runs(runs, defaults), STRATEGY_KEYS)


def learning_rate(runs: pd.DataFrame, defaults: StudyDefaults) -> pd.DataFrame:
    """Every fine-tuning learning rate at the default strategy and PT size, with gain."""
    ft = _finetune_at_default_pt_size(runs, defaults)
    tl = ft[ft["strategy"] == defaults.strategy]
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
        return {"n_pairs_vs_pairwise": 0, "test_vs_pairwise": PAIRED_TEST_VS_PAIRWISE}
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
    _, gain_mae = paired_gains(
        paired["test_r2"], paired["test_r2_ref"], paired["test_mae"], paired["test_mae_ref"]
    )
    return {
        "best_pairwise_source": best["pt_dataset"],
        "best_pairwise_r2_mean": best["r2_mean"],
        "best_pairwise_mae_mean": best["mae_mean"],
        "n_pairs_vs_pairwise": len(paired),
        "gain_mae_vs_pairwise": describe(gain_mae, "g")["g_mean"],
        "p_value_vs_pairwise": paired_p_value(paired["test_mae"], paired["test_mae_ref"]),
        "test_vs_pairwise": PAIRED_TEST_VS_PAIRWISE,
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
        {**row, **describe(group["test_mape"], "mape")}
        for row, group in _group_rows(tl, CHAIN_KEYS)
    ]
    table = table.merge(pd.DataFrame(mape), on=list(CHAIN_KEYS), how="left")
    table["n_stages"] = table["chain"].str.count(">")
    return table[columns]


def build_tables(runs: pd.DataFrame, defaults: StudyDefaults) -> dict[str, pd.DataFrame]:
    """All tables keyed by file stem (``runs`` included), in the order they are written."""
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


# ----------------------------------------------------------------------------- summary


def _fmt(value: Any, spec: str) -> str:
    """Format a number for Markdown, with an em dash for missing values."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "—"
    return format(value, spec)


def markdown_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """A GitHub-flavoured Markdown table (no tabulate dependency needed)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _label(key: Any, meta: Mapping[str, Mapping[str, str]] | None) -> str:
    """Human-readable data-set name, falling back to the upper-cased key."""
    info = (meta or {}).get(str(key), {})
    return f"{info.get('label', str(key).upper())} ({key})" if info else str(key).upper()


def at_largest_size(table: pd.DataFrame, by: Sequence[str] = ("model", "dataset")) -> pd.DataFrame:
    """Rows at the largest FT size of each target (targets differ in how much data they have)."""
    if table.empty:
        return table
    largest = table.groupby(list(by))["size"].transform("max")
    return table[table["size"] == largest]


def _grid_headline_rows(grid: pd.DataFrame) -> list[list[str]]:
    """Mean gains over all grid cells and over the largest-FT-size cells, per model."""
    rows = []
    for model, group in grid.groupby("model", sort=True):
        for scope, cells in (("all FT sizes", group), ("largest FT size", at_largest_size(group))):
            valid = cells.dropna(subset=["gain_mae"])
            rows.append(
                [
                    str(model),
                    scope,
                    str(len(cells)),
                    _fmt(cells["gain_r2"].mean(), "+.1f"),
                    _fmt(cells["gain_mae"].mean(), "+.1f"),
                    f"{int((valid['gain_mae'] > 0).sum())}/{len(valid)}",
                    f"{int((cells['p_value'] < 0.05).sum())}/{int(cells['p_value'].notna().sum())}",
                ]
            )
    return rows


def best_sources(grid: pd.DataFrame) -> pd.DataFrame:
    """Per (model, target): the PT source with the highest mean R² at the largest FT size."""
    cells = at_largest_size(grid).dropna(subset=["r2_mean"])
    if cells.empty:
        return cells
    best = cells.loc[cells.groupby(["model", "dataset"])["r2_mean"].idxmax()]
    return best.sort_values(["model", "dataset"]).reset_index(drop=True)


def _best_source_rows(grid: pd.DataFrame, meta: Mapping | None) -> list[list[str]]:
    return [
        [
            str(r.model),
            _label(r.dataset, meta),
            str(r.size),
            _label(r.pt_dataset, meta),
            f"{_fmt(r.r2_mean, '.3f')} ± {_fmt(r.r2_std, '.3f')}",
            _fmt(r.scratch_r2_mean, ".3f"),
            _fmt(r.gain_r2, "+.1f"),
            _fmt(r.gain_mae, "+.1f"),
        ]
        for r in best_sources(grid).itertuples(index=False)
    ]


def ablation_cells(table: pd.DataFrame, by: str) -> pd.DataFrame:
    """Rows of the cells (model, PT source, PT size, target, FT size) where ``by`` was varied.

    The strategies and learning-rate tables also hold the plain runs of every grid cell; a
    comparison of levels must use only the cells where the levels compete, or the default
    level would be averaged over many more (and different) cells than the others. Empty when
    ``by`` was never varied, i.e. the ablation was not run.
    """
    if table.empty:
        return table
    cell = ["model", "pt_dataset", "pt_size", "dataset", "size"]
    varied = table.groupby(cell, dropna=False)[by].transform("nunique") >= 2
    return table[varied]


def rank_by_gain(table: pd.DataFrame, by: str) -> pd.DataFrame:
    """Mean gains per (model, ``by``) over the ablation cells, best (highest MAE gain) first.

    MAE gain ranks because it is what the paired test is run on and because R² gain explodes
    for targets whose scratch R² is near zero.
    """
    table = ablation_cells(table, by)
    if table.empty:
        return pd.DataFrame(columns=["model", by, "cells", "gain_r2", "gain_mae"])
    ranked = (
        table.groupby(["model", by], dropna=False)
        .agg(cells=("gain_mae", "size"), gain_r2=("gain_r2", "mean"), gain_mae=("gain_mae", "mean"))
        .reset_index()
    )
    return ranked.sort_values(["model", "gain_mae"], ascending=[True, False], kind="stable")


def _ranked_rows(table: pd.DataFrame, by: str, spec: str = "") -> list[list[str]]:
    return [
        [
            str(r["model"]),
            _fmt(r[by], spec),
            str(r["cells"]),
            _fmt(r["gain_r2"], "+.1f"),
            _fmt(r["gain_mae"], "+.1f"),
        ]
        for _, r in rank_by_gain(table, by).iterrows()
    ]


def _best_lines(table: pd.DataFrame, by: str, what: str, spec: str = "") -> list[str]:
    """One 'Best <what>' sentence per model (the first row of the ranking)."""
    ranked = rank_by_gain(table, by).drop_duplicates("model")
    return [
        f"- **Best {what} ({r['model']})**: `{_fmt(r[by], spec)}` — mean MAE gain "
        f"{_fmt(r['gain_mae'], '+.1f')} %, mean R² gain {_fmt(r['gain_r2'], '+.1f')} %"
        for _, r in ranked.iterrows()
    ]


def _run_counts(runs: pd.DataFrame | None) -> str:
    if runs is None or runs.empty:
        return "No runs found."
    counts = runs["kind"].value_counts()
    parts = ", ".join(f"{counts.get(k, 0)} {k}" for k in KINDS)
    models = ", ".join(sorted(map(str, runs["model"].unique())))
    return f"{len(runs)} runs ({parts}); models: {models}."


def summary_markdown(
    tables: Mapping[str, pd.DataFrame], meta: Mapping[str, Mapping[str, str]] | None = None
) -> str:
    """The headline numbers as a short Markdown report (the tables hold the details).

    Args:
        tables: as returned by :func:`build_tables`; missing or empty families are reported as
            such instead of failing, so a partial study still gets a summary.
        meta: optional data-set metadata (``key -> {"label", "units"}``) for readable names.
    """
    grid = tables.get("pairwise_grid", pd.DataFrame())
    strat = tables.get("strategies", pd.DataFrame())
    lrs = tables.get("learning_rate", pd.DataFrame())
    pts = tables.get("pt_size_sweep", pd.DataFrame())
    parts = ["# Transfer-learning study: summary", "", _run_counts(tables.get("runs")), ""]
    parts += [
        "Gains are % improvements of TL over scratch, paired per trial (same model, target, "
        "FT size and trial) and averaged: R² gain = (R²_TL − R²_scr)/|R²_scr|·100, "
        "MAE gain = (MAE_scr − MAE_TL)/MAE_scr·100; positive = TL better. "
        f"Significance: {PAIRED_TEST}.",
        "",
    ]
    parts += _section(
        "Pair-wise PT → FT grid vs scratch",
        _grid_headline_rows(grid) if not grid.empty else [],
        [
            "model",
            "scope",
            "cells",
            "mean R² gain (%)",
            "mean MAE gain (%)",
            "TL better (MAE)",
            "p < 0.05",
        ],
    )
    parts += _section(
        "Best PT source per target (by mean R² at the largest FT size)",
        _best_source_rows(grid, meta) if not grid.empty else [],
        [
            "model",
            "target",
            "FT size",
            "best PT source",
            "R² (mean ± std)",
            "scratch R²",
            "R² gain (%)",
            "MAE gain (%)",
        ],
    )
    gain_header = ["cells", "mean R² gain (%)", "mean MAE gain (%)"]
    parts += _section(
        "Fine-tuning strategies (cells where strategies were compared; by mean MAE gain)",
        _ranked_rows(strat, "strategy"),
        ["model", "strategy", *gain_header],
        extra=_best_lines(strat, "strategy", "strategy"),
    )
    parts += _section(
        "Learning rate (cells where the lr was varied; by mean MAE gain)",
        _ranked_rows(lrs, "lr", "g"),
        ["model", "lr", *gain_header],
        extra=_best_lines(lrs, "lr", "learning rate", "g"),
    )
    parts += _section(
        "PT-size sweep (mean over targets and FT sizes)",
        _pt_size_rows(pts, meta),
        ["model", "PT source", "PT size", *gain_header],
    )
    parts += _section(
        "Multi-property pre-training (mean over targets and FT sizes)",
        _mpt_rows(tables.get("mpt", pd.DataFrame())),
        [
            "model",
            "MPT variant",
            "cells",
            "mean MAE gain vs scratch (%)",
            "mean MAE gain vs best pair-wise (%)",
            "better than best pair-wise (MAE)",
        ],
    )
    return "\n".join(parts).rstrip() + "\n"


def _mpt_rows(table: pd.DataFrame) -> list[list[str]]:
    """One line per (model, MPT variant): gains over scratch and over the best PT source."""
    if table.empty:
        return []
    rows = []
    for (model, variant), group in table.groupby(["model", "pt_dataset"], sort=True):
        vs = group["gain_mae_vs_pairwise"].astype(float)
        rows.append(
            [
                str(model),
                str(variant),
                str(len(group)),
                _fmt(group["gain_mae"].astype(float).mean(), "+.1f"),
                _fmt(vs.mean(), "+.1f"),
                f"{int((vs > 0).sum())}/{int(vs.notna().sum())}",
            ]
        )
    return rows


def _pt_size_rows(table: pd.DataFrame, meta: Mapping | None) -> list[list[str]]:
    if table.empty:
        return []
    agg = (
        table.groupby(["model", "pt_dataset", "pt_size"])
        .agg(cells=("gain_mae", "size"), gain_r2=("gain_r2", "mean"), gain_mae=("gain_mae", "mean"))
        .reset_index()
    )
    return [
        [
            str(r.model),
            _label(r.pt_dataset, meta),
            str(r.pt_size),
            str(r.cells),
            _fmt(r.gain_r2, "+.1f"),
            _fmt(r.gain_mae, "+.1f"),
        ]
        for r in agg.itertuples(index=False)
    ]


def _section(
    title: str, rows: list[list[str]], header: list[str], extra: Sequence[str] = ()
) -> list[str]:
    """A Markdown section: heading, optional bullet lines, then the table or a 'no runs' note."""
    lines = [f"## {title}", ""]
    if not rows:
        return [*lines, "_No runs in this family._", ""]
    if extra:
        lines += [*extra, ""]
    return [*lines, markdown_table(rows, header), ""]


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
    metric_files: Iterable[Path | str],
    out_dir: Path | str,
    defaults: StudyDefaults,
    meta: Mapping[str, Mapping[str, str]] | None = None,
) -> list[Path]:
    """Collect runs, build every table and write them (CSV) plus ``summary.md`` into ``out_dir``.

    A family without runs still gets its CSV with the header only, so downstream rules that
    declare these files as outputs always find them.

    Returns:
        Paths written: runs.csv, scratch.csv, pairwise_grid.csv, ft_size_sweep.csv,
        pt_size_sweep.csv, strategies.csv, learning_rate.csv, summary.md.
    """
    out_dir = Path(out_dir)
    tables = build_tables(collect_runs(metric_files), defaults)
    written = []
    for name, table in tables.items():
        path = out_dir / f"{name}.csv"
        atomic_write_text(path, table.to_csv(index=False, lineterminator="\n"))
        written.append(path)
    summary = out_dir / "summary.md"
    atomic_write_text(summary, summary_markdown(tables, meta))
    written.append(summary)
    log.info("wrote %d tables from %d runs to %s", len(written), len(tables["runs"]), out_dir)
    return written
