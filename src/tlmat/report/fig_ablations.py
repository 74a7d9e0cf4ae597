"""Fine-tuning ablation figures: ``strategies`` (bars), ``learning_rate``, ``unfrozen_layers``.

Both compare levels only within the cells where the level was varied
(:func:`tlmat.report.cells.ablation_cells`), at the largest FT size of each PT → FT pair.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from tlmat.report.cells import ablation_cells, at_largest_size
from tlmat.report.fig_style import (
    SCRATCH_COLOR,
    Meta,
    clip_r2_axis,
    curve,
    legend_outside,
    log_x_at,
    pair_label,
    palette,
    rotate_xticks,
    save_figure,
)


def _pairs_at_largest_size(table: pd.DataFrame) -> pd.DataFrame:
    """One FT size per (PT source, target) pair: the largest, as in the paper's ablations."""
    return at_largest_size(table, by=("pt_dataset", "dataset"))


def _grouped_bars(
    ax: Axes,
    table: pd.DataFrame,
    hue: str,
    value: str,
    error: str | None,
    pairs: list[tuple],
    colors: Mapping,
) -> None:
    """Bars per pair (x) and ``hue`` level, with optional error bars from column ``error``."""
    levels = list(colors)
    width = 0.8 / len(levels)
    for k, level in enumerate(levels):
        sub = table[table[hue] == level].set_index(["pt_dataset", "dataset"])
        sub = sub.reindex(pairs)
        x = np.arange(len(pairs)) - 0.4 + width * (k + 0.5)
        yerr = sub[error].to_numpy(float) if error else None  # NaN (n < 2): no bar drawn
        ax.bar(
            x,
            sub[value].to_numpy(float),
            width,
            yerr=yerr,
            capsize=2,
            color=colors[level],
            label=str(level),
            edgecolor="white",
            linewidth=0.5,
        )


#: what the bars of each compared setting are called, and the figure's title
BAR_SETTINGS = {
    "strategy": ("Strategy", "Fine-tuning strategies (largest FT size per pair)"),
    "sampling": ("Sampling", "Random vs stratified FT subsets (largest FT size per pair)"),
}


def plot_strategies(
    table: pd.DataFrame, meta: Meta, out_dir: Path, stem: str, by: str = "strategy"
) -> list[Path]:
    """Test R² (± CI) and MAE gain of each fine-tuning strategy (or sampling method, ``by``),
    per PT → FT pair."""
    table = _pairs_at_largest_size(ablation_cells(table, by))
    pairs = sorted(set(zip(table["pt_dataset"], table["dataset"], strict=True)))
    colors = palette(sorted(table[by].unique()))
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(max(7.0, 1.6 * len(pairs) + 3), 7.5), sharex=True, layout="constrained"
    )
    _grouped_bars(top, table, by, "r2_mean", "r2_ci95", pairs, colors)
    scratch = table.drop_duplicates(["pt_dataset", "dataset"]).set_index(["pt_dataset", "dataset"])
    x = np.arange(len(pairs))
    scratch_r2 = scratch.reindex(pairs)["scratch_r2_mean"]
    top.hlines(
        scratch_r2,
        x - 0.45,
        x + 0.45,
        colors=SCRATCH_COLOR,
        linestyles="--",
        zorder=4,
        linewidth=1.8,
        label="Scratch",
    )
    top.set_ylabel("Test R² (mean ± 95 % CI)")
    _grouped_bars(bottom, table, by, "gain_mae", "gain_mae_ci95", pairs, colors)
    bottom.axhline(0.0, color=SCRATCH_COLOR, linewidth=1)
    bottom.set_ylabel("MAE gain vs scratch (%)")
    bottom.set_xticks(x)
    bottom.set_xticklabels([textwrap.fill(pair_label(p, t, meta), 22) for p, t in pairs])
    rotate_xticks(bottom, 25)
    legend_outside(fig, [top], BAR_SETTINGS[by][0], ncols=6)
    fig.suptitle(BAR_SETTINGS[by][1])
    return save_figure(fig, out_dir, stem)


def plot_learning_rate(table: pd.DataFrame, meta: Meta, out_dir: Path, stem: str) -> list[Path]:
    """Test R² and MAE gain vs fine-tuning learning rate, one line per pair (and strategy)."""
    table = _pairs_at_largest_size(ablation_cells(table, "lr"))
    lines_by = ["pt_dataset", "dataset", "strategy"]
    keys = sorted(set(table[lines_by].itertuples(index=False, name=None)))
    several_strategies = table["strategy"].nunique() > 1
    colors = palette(keys)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    for key, lines in table.groupby(lines_by, sort=True):
        lines = lines.sort_values("lr")
        label = pair_label(key[0], key[1], meta) + (f" ({key[2]})" if several_strategies else "")
        curve(left, lines["lr"], lines, "r2", color=colors[key], label=label)
        right.plot(lines["lr"], lines["gain_mae"], marker="o", color=colors[key], label=label)
    for ax in (left, right):
        log_x_at(ax, table["lr"])
        ax.set_xlabel("Fine-tuning learning rate")
    title = "Effect of the fine-tuning learning rate (largest FT size per pair)"
    return _save_sweep(fig, left, right, table, title, out_dir, stem)


def plot_unfrozen_layers(table: pd.DataFrame, meta: Meta, out_dir: Path, stem: str) -> list[Path]:
    """Test R² and MAE gain vs freeze_before:N (the paper's children before N frozen), one
    line per pair, at the largest FT size of each pair: do more unfrozen layers help?"""
    table = _pairs_at_largest_size(table)
    keys = sorted(set(table[["pt_dataset", "dataset"]].itertuples(index=False, name=None)))
    colors = palette(keys)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    for key, lines in table.groupby(["pt_dataset", "dataset"], sort=True):
        lines = lines.sort_values("freeze_before")
        label = pair_label(key[0], key[1], meta)
        curve(left, lines["freeze_before"], lines, "r2", color=colors[key], label=label)
        right.plot(
            lines["freeze_before"], lines["gain_mae"], marker="o", color=colors[key], label=label
        )
    for ax in (left, right):
        ax.set_xticks(range(1, 8))
        ax.set_xlabel("N of freeze_before:N (children 1..N-1 frozen; 7 = final layer only)")
    title = "Effect of the number of unfrozen layers (largest FT size per pair)"
    return _save_sweep(fig, left, right, table, title, out_dir, stem)


def _save_sweep(
    fig: Figure,
    left: Axes,
    right: Axes,
    table: pd.DataFrame,
    title: str,
    out_dir: Path,
    stem: str,
) -> list[Path]:
    """The shared frame of a one-setting sweep: R² (left) and MAE gain (right) per pair."""
    clip_r2_axis(left, table["r2_mean"])
    left.set_ylabel("Test R² (mean ± 95 % CI)")
    right.set_ylabel("MAE gain vs scratch (%)")
    right.axhline(0.0, color=SCRATCH_COLOR, linewidth=1)
    legend_outside(fig, [left], "PT → FT pair", ncols=2)
    fig.suptitle(title)
    return save_figure(fig, out_dir, stem)
