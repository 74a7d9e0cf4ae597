"""The ``published_parity`` figure: our cell means against the paper's, cell by cell."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from tlmat.report import compare
from tlmat.report.fig_style import (
    R2_FLOOR,
    SCRATCH_COLOR,
    Meta,
    save_figure,
)


def plot_published_parity(
    comparison: pd.DataFrame, meta: Meta, out_dir: Path, stem: str
) -> list[Path]:
    """Our cell means vs the published ones: one marker per cell, coloured by table (family)."""
    counts = compare.comparison_summary(comparison)
    tol = compare.R2_TOLERANCE
    fig, ax = plt.subplots(figsize=(6.2, 6.0), layout="constrained")
    x = comparison["published_r2_mean"].astype(float).clip(lower=R2_FLOOR)
    y = comparison["r2_mean"].astype(float).clip(lower=R2_FLOOR)
    sns.scatterplot(
        x=x, y=y, hue=comparison["table"], style=comparison["table"], ax=ax, s=36, alpha=0.85
    )
    ax.plot([R2_FLOOR, 1], [R2_FLOOR, 1], color=SCRATCH_COLOR, linewidth=1, label="identity")
    ax.fill_between(
        [R2_FLOOR, 1],
        [R2_FLOOR - tol, 1 - tol],
        [R2_FLOOR + tol, 1 + tol],
        color="0.5",
        alpha=0.15,
        linewidth=0,
        label=f"±{tol}",
    )
    ax.set_xlim(R2_FLOOR - 0.05, 1.05)
    ax.set_ylim(R2_FLOOR - 0.05, 1.05)
    ax.set_aspect("equal")
    ax.set_xlabel("Published test R² (cell mean)")
    ax.set_ylabel("Our test R² (cell mean)")
    ax.legend(title="table", fontsize=8, loc="upper left")
    ax.set_title(
        f"{counts['within']} of {counts['cells']} cells within ±{tol} R² of the published mean"
        f"\n(values below {R2_FLOOR:g} drawn at {R2_FLOOR:g})",
        fontsize=10,
    )
    return save_figure(fig, out_dir, stem)
