"""Figures of the extensions beyond pair-wise transfer: multi-property PT and chains.

* ``mpt``: R² of MPT fine-tunes next to the best pair-wise source and scratch per target;
* ``chains``: final-target R², MAE and MAPE of each multi-stage chain next to scratch;
* ``chain_curves``: validation loss vs epoch of every stage of each chain.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from tlmat.report.cells import mpt_transfer_rows
from tlmat.report.fig_runs import read_run_csv
from tlmat.report.fig_style import (
    SCRATCH_COLOR,
    Meta,
    facets,
    grouped_r2_bars,
    legend_outside,
    palette,
    prop_label,
    save_figure,
    skip,
)

# ----------------------------------------------------------------------------- MPT


def mpt_bars(table: pd.DataFrame) -> pd.DataFrame:
    """Long table (dataset, size, model_kind, r2, r2_std) for the MPT comparison figure.

    One bar per MPT variant and strategy, plus the scratch baseline and the best pair-wise
    source of the same cell (both taken from the MPT table's reference columns).
    """
    rows = []
    for (dataset, size), cell in mpt_transfer_rows(table).groupby(["dataset", "size"], sort=True):
        first = cell.iloc[0]
        rows.append((dataset, size, "scratch", first["scratch_r2_mean"], math.nan))
        if pd.notna(first.get("best_pairwise_source")):
            label = f"best pair-wise ({first['best_pairwise_source']})"
            rows.append((dataset, size, label, first["best_pairwise_r2_mean"], math.nan))
        for _, row in cell.iterrows():
            label = f"{row['pt_dataset']} ({row['strategy']})"
            rows.append((dataset, size, label, row["r2_mean"], row["r2_std"]))
    return pd.DataFrame(rows, columns=["dataset", "size", "source", "r2", "r2_std"])


def plot_mpt(table: pd.DataFrame, meta: Meta, out_dir: Path, stem: str) -> list[Path]:
    """Test R² of MPT fine-tunes vs the best pair-wise source and scratch, per target/FT size."""
    bars = mpt_bars(table)
    targets = sorted(bars["dataset"].unique())
    mpt_sources = sorted(s for s in bars["source"].unique() if s.startswith("mpt_"))
    order = [
        "scratch",
        *sorted(s for s in bars["source"].unique() if s.startswith("best")),
        *mpt_sources,
    ]
    colors = {"scratch": SCRATCH_COLOR, **palette(order[1:])}
    fig, axes = facets(len(targets), ncols=4, size=(4.0, 3.4))
    for ax, target in zip(axes, targets, strict=True):
        cell = bars[bars["dataset"] == target]
        sizes = sorted(cell["size"].unique())
        levels = [s for s in order if s in set(cell["source"]) or s.startswith("best")]
        grouped_r2_bars(ax, cell, levels, sizes, colors)
        ax.set_title(prop_label(target, meta, units=False))
        ax.axhline(0.0, color="0.5", linewidth=0.6)
    axes[0].set_ylabel("Test R² (mean ± std)")
    legend_outside(fig, axes, "Pre-training", ncols=3)
    fig.suptitle("Multi-property pre-training vs best pair-wise source vs scratch")
    return save_figure(fig, out_dir, stem)


# ----------------------------------------------------------------------------- chains


def final_chains(table: pd.DataFrame) -> pd.DataFrame:
    """Chain rows of the study's final targets: (dataset, size) cells no chain continues."""
    prefixes = set(table["chain"])
    return table[[not any(p.startswith(c + ">") for p in prefixes) for c in table["chain"]]]


def plot_chains(table: pd.DataFrame, meta: Meta, out_dir: Path, stem: str) -> list[Path]:
    """Final-target R², MAE and MAPE of each chain next to scratch (one-, two-stage...)."""
    finals = final_chains(table).sort_values(["dataset", "size", "n_stages", "chain"])
    cells = list(finals.groupby(["dataset", "size"], sort=True))
    fig, axes = plt.subplots(
        len(cells), 3, figsize=(12, 3.4 * len(cells)), squeeze=False, layout="constrained"
    )
    for row, ((dataset, size), group) in zip(axes, cells, strict=True):
        labels = ["scratch", *(c.replace(">", " → ") for c in group["chain"])]
        colors = [SCRATCH_COLOR, *sns.color_palette("tab10", len(group))]
        scratch_mape = math.nan  # the chain table carries scratch R²/MAE means only
        values = {
            "R²": (
                [group["scratch_r2_mean"].iloc[0], *group["r2_mean"]],
                [0.0, *group["r2_std"].fillna(0.0)],
            ),
            "MAE": (
                [group["scratch_mae_mean"].iloc[0], *group["mae_mean"]],
                [0.0, *group["mae_std"].fillna(0.0)],
            ),
            "MAPE": ([scratch_mape, *group["mape_mean"]], [0.0, *group["mape_std"].fillna(0.0)]),
        }
        for ax, (metric, (mean, std)) in zip(row, values.items(), strict=True):
            x = np.arange(len(labels))
            ax.bar(x, mean, yerr=std, color=colors, capsize=2, edgecolor="white")
            ax.set_xticks(x)
            ax.set_xticklabels([textwrap.fill(label, 18) for label in labels], fontsize=7)
            ax.set_ylabel(f"Test {metric}")
            ax.set_title(f"{prop_label(dataset, meta, units=False)} (FT {size}): {metric}")
    fig.suptitle("Multi-stage transfer: final target vs one-stage transfer and scratch")
    return save_figure(fig, out_dir, stem)


def plot_chain_curves(
    table: pd.DataFrame, runs: pd.DataFrame, runs_dir: Path, meta: Meta, out_dir: Path, stem: str
) -> list[Path]:
    """Validation loss vs epoch of every stage of every chain (trial 1), as in ParAIsite.

    Stage 1 is the pre-training run (its ``chain`` is ``<key>:<size>``); an external first
    stage has no run and is left out.
    """
    chains = sorted(final_chains(table)["chain"].unique())
    stage_runs = runs[runs["kind"].isin(["pretrain", "chain"])]
    fig, axes = facets(len(chains), ncols=2, size=(5.2, 3.6))
    drawn = False
    for ax, chain in zip(axes, chains, strict=True):
        parts = chain.split(">")
        for k in range(1, len(parts) + 1):
            prefix = ">".join(parts[:k])
            match = stage_runs[(stage_runs["chain"] == prefix) & (stage_runs["trial"] == 1)]
            if match.empty:
                continue
            history = read_run_csv(runs_dir, str(match["run_id"].iloc[0]), "history.csv")
            if history is None or history.empty:
                continue
            ax.plot(
                history["epoch"],
                history["val_loss"],
                marker=".",
                lw=1.2,
                label=f"stage {k}: {parts[k - 1]}",
            )
            drawn = True
        ax.set_yscale("log")
        ax.set_xlabel("Epoch")
        ax.set_ylabel("Validation loss (MSE, standardized)")
        ax.set_title(chain.replace(">", " → "), fontsize=9)
        ax.legend(fontsize=7)
    if not drawn:
        plt.close(fig)
        return skip(stem, "no history.csv of chain stages")
    fig.suptitle("Validation loss across the stages of each chain (trial 1)")
    return save_figure(fig, out_dir, stem)
