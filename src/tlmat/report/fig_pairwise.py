"""Figures of the pair-wise study: grid heatmaps and the FT-size and PT-size sweeps.

* ``pairwise_r2`` / ``pairwise_mae``: heatmaps of the pair-wise grid at the largest FT size of
  each target (rows PT source + scratch, columns FT target), second panel % gain vs scratch;
* ``r2_vs_ft_size``: R² vs FT size, one facet per target, each PT source vs scratch;
* ``r2_vs_pt_size``: R² vs PT size for the sources with a PT-size sweep (FE, BG).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes

from tlmat.report.cells import at_largest_size
from tlmat.report.fig_style import (
    SCRATCH,
    SCRATCH_COLOR,
    Meta,
    clip_r2_axis,
    curve,
    facets,
    legend_outside,
    log_x_at,
    palette,
    prop_label,
    save_figure,
    short_label,
)

# ----------------------------------------------------------------------------- heatmaps


def _grid_at_largest_size(grid: pd.DataFrame) -> pd.DataFrame:
    return at_largest_size(grid, by=("dataset",))


def _column_labels(cells: pd.DataFrame, meta: Meta, *, units: bool) -> list[str]:
    """Target name (+ units for MAE) and the FT size shown, since it differs per target."""
    sizes = cells.groupby("dataset")["size"].max()
    labels = []
    for key, size in sizes.items():
        unit = meta.get(str(key), {}).get("units", "")
        suffix = f"\n({unit})" if units and unit else ""
        labels.append(f"{short_label(key, meta)}{suffix}\nn={size}")
    return labels


def _heatmap(
    ax: Axes,
    values: pd.DataFrame,
    annot: np.ndarray,
    cbar_label: str,
    labels: tuple[list[str], list[str]],
    **kwargs: object,
) -> None:
    """Annotated heatmap with a labelled colour bar and readable (rotated) tick labels."""
    sns.heatmap(
        values.astype(float),
        ax=ax,
        annot=annot,
        xticklabels=labels[0],
        yticklabels=labels[1],
        fmt="",
        annot_kws={"fontsize": 8},
        linewidths=0.5,
        linecolor="white",
        cbar_kws={"label": cbar_label},
        **kwargs,
    )
    ax.set_xlabel("Fine-tuning target (largest FT size)")
    ax.set_ylabel("Pre-training source")
    plt.setp(ax.get_xticklabels(), rotation=0, ha="center")  # labels are wrapped instead
    plt.setp(ax.get_yticklabels(), rotation=0)


def _scratch_row(cells: pd.DataFrame, scratch: pd.DataFrame, column: str) -> pd.Series:
    """Scratch value for each target at the FT size used in the heatmap."""
    wanted = cells.groupby("dataset")["size"].max()
    if scratch.empty or column not in scratch.columns:
        return pd.Series(np.nan, index=wanted.index)
    merged = scratch.merge(wanted.rename("size").reset_index(), on=["dataset", "size"])
    return merged.set_index("dataset")[column].reindex(wanted.index)


def _value_and_gain_tables(
    cells: pd.DataFrame, scratch: pd.DataFrame, metric: str
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Pivot mean, std (PT sources + scratch row) and gain (PT sources only) of ``metric``."""
    pivot = cells.pivot(index="pt_dataset", columns="dataset", values=f"{metric}_mean")
    std = cells.pivot(index="pt_dataset", columns="dataset", values=f"{metric}_std")
    gain = cells.pivot(index="pt_dataset", columns="dataset", values=f"gain_{metric}")
    pivot.loc[SCRATCH] = _scratch_row(cells, scratch, f"{metric}_mean")
    std.loc[SCRATCH] = _scratch_row(cells, scratch, f"{metric}_std")
    return pivot, std.reindex(pivot.index), gain


def _mean_std_annot(mean: pd.DataFrame, std: pd.DataFrame, spec: str) -> np.ndarray:
    text = np.full(mean.shape, "", dtype=object)
    for (i, j), value in np.ndenumerate(mean.to_numpy(float)):
        if not np.isnan(value):
            s = std.to_numpy(float)[i, j]
            text[i, j] = f"{value:{spec}}" + ("" if np.isnan(s) else f"\n±{s:{spec}}")
    return text


def _gain_annot(gain: pd.DataFrame, unstable: pd.DataFrame) -> np.ndarray:
    """'+5%' per cell; '†' marks an unstable R² gain (scratch R² near zero)."""
    text = np.full(gain.shape, "", dtype=object)
    flags = unstable.reindex_like(gain).fillna(False).to_numpy(bool)
    for (i, j), value in np.ndenumerate(gain.to_numpy(float)):
        if not np.isnan(value):
            text[i, j] = f"{value:+.0f}%" + ("†" if flags[i, j] else "")
    return text


def plot_pairwise(
    grid: pd.DataFrame, scratch: pd.DataFrame, metric: str, meta: Meta, out_dir: Path, stem: str
) -> list[Path]:
    """Heatmap of ``metric`` (r2 or mae) over PT source × FT target, and its % gain vs scratch.

    MAE has different units per target, so its colour is MAE / scratch MAE (annotated with the
    MAE itself): that keeps one colour scale meaningful across columns.
    """
    cells = _grid_at_largest_size(grid)
    mean, std, gain = _value_and_gain_tables(cells, scratch, metric)
    rows = [*sorted(gain.index), SCRATCH]
    mean, std = mean.reindex(rows), std.reindex(rows)
    gain = gain.reindex(sorted(gain.index))
    row_labels = [SCRATCH.capitalize() if r == SCRATCH else short_label(r, meta, 18) for r in rows]
    col_labels = _column_labels(cells, meta, units=metric == "mae")
    width = 3.0 + 1.25 * mean.shape[1]
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(2 * width, 1.6 + 0.75 * len(rows)), layout="constrained"
    )
    if metric == "r2":
        colored, cbar, kw = mean, "Test R² (mean over trials)", {"cmap": "viridis"}
    else:
        reference = mean.loc[SCRATCH].fillna(mean.drop(index=SCRATCH).mean())
        colored = mean / reference
        cbar, kw = "Test MAE / scratch MAE", {"cmap": "viridis_r"}
    annot = _mean_std_annot(mean, std, ".2f" if metric == "r2" else ".3g")
    _heatmap(left, colored, annot, cbar, (col_labels, row_labels), **kw)
    left.set_title(f"Test {'R²' if metric == 'r2' else 'MAE'} (mean ± std over trials)")
    # unstable R² gains (scratch R² near 0) would set the colour scale for every other cell
    unstable = cells.pivot(index="pt_dataset", columns="dataset", values="unstable_r2_gain")
    unstable = unstable.astype(bool) & (metric == "r2")
    scaled = gain.to_numpy(float)[~unstable.reindex_like(gain).fillna(False).to_numpy(bool)]
    limit = max(5.0, float(np.nanmax(np.abs(scaled), initial=0.0)))
    _heatmap(
        right,
        gain,
        _gain_annot(gain, unstable),
        f"{'R²' if metric == 'r2' else 'MAE'} gain vs scratch (%)",
        (col_labels, [short_label(r, meta, 18) for r in gain.index]),
        cmap="RdBu",
        center=0.0,
        vmin=-limit,
        vmax=limit,
    )
    note = "; † unstable: |scratch R²| < 0.1, off the colour scale" if unstable.any().any() else ""
    right.set_title(f"Gain over scratch (positive = TL better{note})")
    return save_figure(fig, out_dir, stem)


# ----------------------------------------------------------------------------- size sweeps


def plot_r2_vs_ft_size(sweep: pd.DataFrame, meta: Meta, out_dir: Path, stem: str) -> list[Path]:
    """R² vs FT-set size, one facet per target; each PT source against scratch (dashed)."""
    targets = sorted(sweep["dataset"].unique())
    sources = sorted(s for s in sweep["source"].unique() if s != SCRATCH)
    colors = palette(sources)
    fig, axes = facets(len(targets))
    for ax, target in zip(axes, targets, strict=True):
        block = sweep[sweep["dataset"] == target]
        for source, lines in block.groupby("source", sort=True):
            lines = lines.sort_values("size")
            is_scratch = source == SCRATCH
            curve(
                ax,
                lines["size"],
                lines,
                "r2",
                color=SCRATCH_COLOR if is_scratch else colors[source],
                linestyle="--" if is_scratch else "-",
                linewidth=2.2 if is_scratch else 1.4,
                zorder=3 if is_scratch else 2,
                label="Scratch" if is_scratch else prop_label(source, meta, units=False),
            )
        log_x_at(ax, block["size"], "{x:.0f}")
        clip_r2_axis(ax, block["r2_mean"])
        ax.set_title(prop_label(target, meta))
        ax.set_xlabel("Fine-tuning set size")
        ax.set_ylabel("Test R²")
    legend_outside(fig, axes, "PT source")
    fig.suptitle("Test R² vs fine-tuning set size (mean ± 95 % CI over trials)")
    return save_figure(fig, out_dir, stem)


def swept_sources(sweep: pd.DataFrame) -> list[str]:
    """PT sources with at least two PT sizes: the ones a PT-size sweep was run for."""
    counts = sweep.groupby("pt_dataset")["pt_size"].nunique()
    return sorted(counts[counts >= 2].index)


def _sweep_ft_size(sweep: pd.DataFrame) -> pd.DataFrame:
    """Per (source, target) keep the FT size with the most PT sizes (ties: the largest).

    The sweep is run at one FT size; the pair-wise runs at other FT sizes only add a single
    point at the default PT size and would clutter the lines.
    """
    keys = ["pt_dataset", "dataset"]
    counts = sweep.groupby([*keys, "size"])["pt_size"].nunique().rename("k").reset_index()
    chosen = counts.sort_values(["k", "size"]).drop_duplicates(keys, keep="last")
    return sweep.merge(chosen[[*keys, "size"]], on=[*keys, "size"])


def _trained_pt_size(table: pd.DataFrame) -> pd.Series:
    """The PT structures actually trained on (``pt_n``), else the requested PT size."""
    requested = table["pt_size"].astype(float)
    if "pt_n" not in table.columns:
        return requested
    return pd.to_numeric(table["pt_n"], errors="coerce").fillna(requested)


def plot_r2_vs_pt_size(sweep: pd.DataFrame, meta: Meta, out_dir: Path, stem: str) -> list[Path]:
    """R² vs PT-set size per swept source; dotted lines mark each target's scratch R²."""
    sources = swept_sources(sweep)
    sweep = _sweep_ft_size(sweep[sweep["pt_dataset"].isin(sources)])
    targets = sorted(sweep["dataset"].unique())
    colors = palette(targets)
    fig, axes = facets(len(sources), ncols=2, size=(5.2, 3.8))
    for ax, source in zip(axes, sources, strict=True):
        block = sweep[sweep["pt_dataset"] == source]
        for (target, size), lines in block.groupby(["dataset", "size"], sort=True):
            lines = lines.assign(x=_trained_pt_size(lines)).sort_values("x")
            label = f"{prop_label(target, meta, units=False)} (FT n={size})"
            curve(ax, lines["x"], lines, "r2", color=colors[target], label=label)
            scratch_r2 = lines["scratch_r2_mean"].dropna()
            if len(scratch_r2):
                ax.axhline(scratch_r2.iloc[0], color=colors[target], linestyle=":", linewidth=1)
        log_x_at(ax, _trained_pt_size(block), "{x:.0f}")
        clip_r2_axis(ax, block["r2_mean"])
        ax.set_title(f"PT source: {prop_label(source, meta, units=False)}")
        ax.set_xlabel("Pre-training structures (actually trained on)")
        ax.set_ylabel("Test R²")
    legend_outside(fig, axes, "FT target (dotted line: scratch R²)", ncols=2)
    fig.suptitle("Test R² vs pre-training set size (mean ± 95 % CI over trials)")
    return save_figure(fig, out_dir, stem)
