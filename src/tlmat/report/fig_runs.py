"""Figures from the files of individual runs: ``learning_curves`` and ``parity``.

They read ``<run-id>/history.csv`` and ``predictions.csv`` under ``results/runs``; a missing
file leaves its run out (logged) rather than failing the figure.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes

from tlmat.report.fig_style import (
    SCRATCH_COLOR,
    Meta,
    facets,
    legend_outside,
    prop_label,
    save_figure,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- learning curves


def read_run_csv(runs_dir: Path, run_id: str, name: str) -> pd.DataFrame | None:
    """A run's CSV, or None (logged) if missing, so one absent file does not sink a figure."""
    path = runs_dir / run_id / name
    if not path.is_file():
        log.info("no %s for run %s; left out of the figure", name, run_id)
        return None
    return pd.read_csv(path)


def _scratch_histories(scratch: pd.DataFrame, runs_dir: Path) -> dict[str, list[pd.DataFrame]]:
    """history.csv of each run, grouped by data set; data sets without any are left out."""
    curves: dict[str, list[pd.DataFrame]] = {}
    for run_id, dataset in zip(scratch["run_id"], scratch["dataset"], strict=True):
        history = read_run_csv(runs_dir, str(run_id), "history.csv")
        if history is not None and len(history):
            curves.setdefault(str(dataset), []).append(history)
    return dict(sorted(curves.items()))


def plot_learning_curves(
    runs: pd.DataFrame, runs_dir: Path, meta: Meta, out_dir: Path, stem: str
) -> list[Path]:
    """Train/validation loss of the scratch runs at each data set's largest size (all trials)."""
    scratch = runs[runs["kind"] == "scratch"]
    scratch = scratch[scratch["size"] == scratch.groupby("dataset")["size"].transform("max")]
    curves = _scratch_histories(scratch, runs_dir)
    if not curves:
        log.info("learning curves skipped: no history.csv of scratch runs")
        return []
    fig, axes = facets(len(curves))
    for ax, (dataset, histories) in zip(axes, curves.items(), strict=True):
        for history in histories:
            ax.plot(
                history["epoch"], history["train_loss"], color="C0", alpha=0.7, lw=1, label="Train"
            )
            ax.plot(
                history["epoch"],
                history["val_loss"],
                color="C1",
                alpha=0.7,
                lw=1,
                ls="--",
                label="Validation",
            )
        size = int(scratch.loc[scratch["dataset"] == dataset, "size"].max())
        ax.set_yscale("log")
        ax.set_title(
            f"{prop_label(dataset, meta, units=False)} (n={size}, {len(histories)} trials)"
        )
        ax.set_xlabel("Epoch")
        ax.set_ylabel("Loss (MSE, standardized)")
    legend_outside(fig, axes, "Scratch runs")
    fig.suptitle("Learning curves of the scratch models")
    return save_figure(fig, out_dir, stem)


# ----------------------------------------------------------------------------- parity


def best_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The run with the highest test R² for each data set (any kind), sorted by data set."""
    valid = runs.dropna(subset=["test_r2"])
    if valid.empty:
        return valid
    best = valid.loc[valid.groupby("dataset")["test_r2"].idxmax()]
    return best.sort_values("dataset").reset_index(drop=True)


def _run_description(run: pd.Series, meta: Meta) -> str:
    """'scratch, n=800' / 'pre-training, n=941' / 'FT from Formation energy, n=800'."""
    size = f"n={run['size']}"
    if run["kind"] == "finetune":
        strategy = "" if run.get("strategy") in (None, "full") else f" ({run['strategy']})"
        return f"FT from {prop_label(run['pt_dataset'], meta, units=False)}{strategy}, {size}"
    return f"{'pre-training' if run['kind'] == 'pretrain' else 'scratch'}, {size}"


def _parity_panel(ax: Axes, run: pd.Series, preds: pd.DataFrame, meta: Meta) -> None:
    """Scatter of prediction vs target with the y = x line and the run's metrics."""
    ax.scatter(
        preds["target"], preds["prediction"], s=10, alpha=0.5, edgecolor="none", rasterized=True
    )
    values = np.concatenate([preds["target"].to_numpy(float), preds["prediction"].to_numpy(float)])
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    pad = 0.05 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color=SCRATCH_COLOR, lw=1, ls="--")
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_aspect("equal", adjustable="box")
    unit = meta.get(str(run["dataset"]), {}).get("units", "")
    unit_text = f" ({unit})" if unit else ""
    ax.set_xlabel(f"True value{unit_text}")
    ax.set_ylabel(f"Predicted value{unit_text}")
    ax.set_title(prop_label(run["dataset"], meta, units=False))
    description = _run_description(run, meta)
    text = f"R² = {run['test_r2']:.3f}\nMAE = {run['test_mae']:.3g}\n{description}"
    ax.text(
        0.04,
        0.96,
        text,
        transform=ax.transAxes,
        va="top",
        fontsize=9,
        bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8},
    )


def plot_parity(
    runs: pd.DataFrame, runs_dir: Path, meta: Meta, out_dir: Path, stem: str
) -> list[Path]:
    """Parity plots of the best run per target: shows *where* the best model errs."""
    panels = []
    for _, run in best_runs(runs).iterrows():
        preds = read_run_csv(runs_dir, str(run["run_id"]), "predictions.csv")
        if preds is not None and len(preds):
            panels.append((run, preds))
    if not panels:
        log.info("parity plots skipped: no predictions.csv")
        return []
    fig, axes = facets(len(panels), size=(4.0, 4.0))
    for ax, (run, preds) in zip(axes, panels, strict=True):
        _parity_panel(ax, run, preds, meta)
    fig.suptitle("Best model per target (highest test R²): test-set parity")
    return save_figure(fig, out_dir, stem)
