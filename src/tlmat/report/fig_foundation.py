"""The ``foundation`` figure: the fine-tuned pre-trained CHGNet beside the study model.

Per target, test R² (mean ± std over trials) at each FT size of scratch, the best pair-wise
source and the best MPT model of the study model (both chosen by validation loss), and the
fine-tuned CHGNet under each strategy, all read from ``foundation.csv``. A target whose test
structures CHGNet's pre-training (MPtrj) saw is titled so: its bars are no transfer to unseen
crystals.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from tlmat.report.fig_style import (
    SCRATCH_COLOR,
    Meta,
    clip_r2_axis,
    facets,
    grouped_r2_bars,
    legend_outside,
    palette,
    prop_label,
    save_figure,
)


def foundation_bars(table: pd.DataFrame) -> pd.DataFrame:
    """Long table (dataset, size, source, r2, r2_std): the bars of the figure."""
    rows = []
    for (dataset, size), cell in table.groupby(["dataset", "size"], sort=True):
        first = cell.iloc[0]
        rows.append((dataset, size, "scratch", first["scratch_r2_mean"], first["scratch_r2_std"]))
        for prefix, label in (("pairwise", "best pair-wise"), ("mpt", "best MPT")):
            if pd.notna(first.get(f"best_{prefix}_r2_mean")):
                rows.append(
                    (
                        dataset,
                        size,
                        label,
                        first[f"best_{prefix}_r2_mean"],
                        first[f"best_{prefix}_r2_std"],
                    )
                )
        for _, row in cell.iterrows():
            label = f"{row['foundation']} ({row['strategy']})"
            rows.append((dataset, size, label, row["r2_mean"], row["r2_std"]))
    return pd.DataFrame(rows, columns=["dataset", "size", "source", "r2", "r2_std"])


def _seen(table: pd.DataFrame, dataset: str) -> bool:
    flags = table.loc[table["dataset"] == dataset, "pretraining_saw_test_structures"]
    return bool(flags.dropna().astype(bool).any())


def plot_foundation(table: pd.DataFrame, meta: Meta, out_dir: Path, stem: str) -> list[Path]:
    """Test R² of the fine-tuned CHGNet vs scratch, best pair-wise and best MPT, per target."""
    bars = foundation_bars(table)
    targets = sorted(bars["dataset"].unique())
    fixed = ["scratch", "best pair-wise", "best MPT"]
    order = [*fixed, *sorted(s for s in bars["source"].unique() if s not in fixed)]
    colors = {"scratch": SCRATCH_COLOR, **palette(order[1:])}
    fig, axes = facets(len(targets), ncols=4, size=(4.0, 3.4))
    for ax, target in zip(axes, targets, strict=True):
        cell = bars[bars["dataset"] == target]
        sizes = sorted(cell["size"].unique())
        levels = [s for s in order if s in set(cell["source"])]
        grouped_r2_bars(ax, cell, levels, sizes, colors)
        seen = "\n(test structures in CHGNet's pre-training)" if _seen(table, target) else ""
        ax.set_title(prop_label(target, meta, units=False) + seen, fontsize=9)
        ax.axhline(0.0, color="0.5", linewidth=0.6)
        clip_r2_axis(ax, [v for v in cell["r2"].astype(float) if not math.isnan(v)])
    axes[0].set_ylabel("Test R² (mean ± std)")
    legend_outside(fig, axes, "Model", ncols=3)
    model = table["model"].iloc[0] if len(table) else ""
    fig.suptitle(f"Fine-tuned pre-trained CHGNet vs {model}: scratch, best pair-wise, best MPT")
    return save_figure(fig, out_dir, stem)
