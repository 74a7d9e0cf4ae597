"""The figures against the published runs: ``published_parity`` (our cell means against the
paper's) and ``trial_parity`` (each run against the published trials of its cell)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from tlmat.report import compare
from tlmat.report.fig_style import (
    R2_FLOOR,
    SCRATCH_COLOR,
    Meta,
    save_figure,
    short_label,
    skip,
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


#: up to this many runs the trial-parity figure shows one row per run; above, a scatter
TRIAL_ROWS_DRAWN = 40


def plot_trial_parity(table: pd.DataFrame, meta: Meta, out_dir: Path, stem: str) -> list[Path]:
    """Each run's R² against the published trial spread of its cell (``make parity``).

    One row per run: the grey bar spans the published trials (min–max), the open marker is
    the published mean, the cross the published run of the same trial, the dot ours (green
    inside the spread, red outside). A study with many runs gets a scatter instead: ours
    against the published run of the same trial.
    """
    from tlmat.report.parity import trial_parity_verdict

    if table.empty:
        return skip(stem, "no run with a published counterpart")
    if len(table) > TRIAL_ROWS_DRAWN:
        return _trial_scatter(table, out_dir, stem, trial_parity_verdict(table))
    labels = [_run_label(r, meta) for r in table.itertuples(index=False)]
    y = range(len(table))
    fig, ax = plt.subplots(figsize=(7.0, 1.2 + 0.42 * len(table)), layout="constrained")
    ax.hlines(
        y,
        table["published_r2_min"],
        table["published_r2_max"],
        color="0.7",
        linewidth=6,
        label="published trials (min–max)",
    )
    ax.scatter(
        table["published_r2_mean"],
        y,
        facecolors="none",
        edgecolors="0.3",
        s=50,
        label="published mean",
        zorder=3,
    )
    ax.scatter(
        table["published_trial_r2"],
        y,
        marker="x",
        color="0.1",
        s=40,
        label="published, same trial",
        zorder=3,
    )
    inside = table["inside_range"].astype(bool)
    ax.scatter(
        table["r2"],
        y,
        c=np.where(inside, "tab:green", "tab:red"),
        s=45,
        zorder=4,
        label="ours (green: inside the spread)",
    )
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("Test R²")
    ax.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=2, frameon=False)
    title = textwrap.fill(trial_parity_verdict(table), 80)
    ax.set_title(title, fontsize=9, loc="left", pad=36)
    return save_figure(fig, out_dir, stem)


def _run_label(row, meta: Meta) -> str:
    target = f"{short_label(row.dataset, meta)} {int(row.size)}"
    source = "scratch" if row.kind == "scratch" else f"{row.pt_dataset}:{int(row.pt_size)}→"
    return f"{source} {target} (t{int(row.trial)})"


def _trial_scatter(table: pd.DataFrame, out_dir: Path, stem: str, title: str) -> list[Path]:
    fig, ax = plt.subplots(figsize=(6.2, 6.0), layout="constrained")
    x = table["published_trial_r2"].astype(float).clip(lower=R2_FLOOR)
    yv = table["r2"].astype(float).clip(lower=R2_FLOOR)
    hue = table["inside_range"].map({True: "inside spread", False: "outside spread"})
    sns.scatterplot(x=x, y=yv, hue=hue, ax=ax, s=24, alpha=0.8)
    ax.plot([R2_FLOOR, 1], [R2_FLOOR, 1], color=SCRATCH_COLOR, linewidth=1)
    ax.set_xlabel("Published test R² (same cell and trial)")
    ax.set_ylabel("Our test R²")
    ax.set_title(title, fontsize=9)
    return save_figure(fig, out_dir, stem)
