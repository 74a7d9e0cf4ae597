"""Every figure of the study, drawn from the tables: which to draw, for which model, and how.

Figures are drawn only from the CSV tables written by
:func:`tlmat.report.tables.write_tables` (plus ``history.csv``/``predictions.csv`` of
individual runs), never from in-memory state, so they can be redrawn without re-aggregating
and always show exactly what the tables say.

Every figure of :data:`tlmat.report.names.FIGURES` is written per model as
``<name>_<model>.png`` and ``.pdf``; the drawing itself lives in one module per family:

* :mod:`~tlmat.report.fig_pairwise`: ``pairwise_r2``, ``pairwise_mae``, ``r2_vs_ft_size``,
  ``r2_vs_pt_size``;
* :mod:`~tlmat.report.fig_ablations`: ``strategies``, ``learning_rate``, ``unfrozen_layers``;
* :mod:`~tlmat.report.fig_runs`: ``learning_curves``, ``parity`` (from per-run files);
* :mod:`~tlmat.report.fig_mpt_chains`: ``mpt``, ``chains``, ``chain_curves``;
* :mod:`~tlmat.report.fig_foundation`: ``foundation`` (the fine-tuned CHGNet);
* :mod:`~tlmat.report.fig_published`: ``published_parity``, ``trial_parity``;
* :mod:`~tlmat.report.fig_style`: labels, style and helpers they share.

A family without data is skipped with a log message, so a partial study still gets figures.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

from tlmat.report.cells import ablation_cells
from tlmat.report.fig_ablations import (
    plot_learning_rate,
    plot_strategies,
    plot_unfrozen_layers,
)
from tlmat.report.fig_foundation import plot_foundation
from tlmat.report.fig_mpt_chains import plot_chain_curves, plot_chains, plot_mpt
from tlmat.report.fig_pairwise import (
    plot_pairwise,
    plot_r2_vs_ft_size,
    plot_r2_vs_pt_size,
    swept_sources,
)
from tlmat.report.fig_published import plot_published_parity, plot_trial_parity
from tlmat.report.fig_runs import plot_learning_curves, plot_parity
from tlmat.report.fig_style import Meta, figure_style, save_figure, skip
from tlmat.report.names import FIGURE_TABLES, TABLE_NAMES
from tlmat.report.runs import collect_runs

log = logging.getLogger(__name__)


def load_tables(tables_dir: Path, runs_dir: Path) -> dict[str, pd.DataFrame]:
    """Read the aggregate tables; missing ones become empty (their figures are skipped).

    ``runs.csv`` falls back to collecting the ``metrics.json`` files under ``runs_dir``.
    """
    tables = {}
    for name in TABLE_NAMES:
        path = tables_dir / f"{name}.csv"
        tables[name] = pd.read_csv(path) if path.is_file() else pd.DataFrame()
        if not path.is_file():
            log.info("%s not found", path)
    if tables["runs"].empty and runs_dir.is_dir():
        tables["runs"] = collect_runs(sorted(runs_dir.rglob("metrics.json")))
    return tables


def _for_model(table: pd.DataFrame, model: str) -> pd.DataFrame:
    """Rows of one model; keeps the columns even when empty so lookups do not fail."""
    if "model" not in table.columns:
        return table
    return table[table["model"] == model]


def _models(tables: Mapping[str, pd.DataFrame]) -> list[str]:
    """Every model in any table: each gets its own set of figures (never mixed in one)."""
    found = {m for t in tables.values() if "model" in t.columns for m in t["model"].dropna()}
    return sorted(map(str, found))


def _draw(
    name: str, t: Mapping[str, pd.DataFrame], runs_dir: Path, meta: Meta, out: Path, stem: str
) -> list[Path]:
    """Dispatch one figure by name; returns the files written (none when skipped)."""
    match name:
        case "pairwise_r2" | "pairwise_mae":
            metric = name.removeprefix("pairwise_")
            return plot_pairwise(t["pairwise_grid"], t["scratch"], metric, meta, out, stem)
        case "r2_vs_ft_size":
            return plot_r2_vs_ft_size(t["ft_size_sweep"], meta, out, stem)
        case "r2_vs_pt_size":
            if not swept_sources(t["pt_size_sweep"]):
                return skip(stem, "no PT source with two or more PT sizes")
            return plot_r2_vs_pt_size(t["pt_size_sweep"], meta, out, stem)
        case "strategies" | "learning_rate" | "sampling":
            by = {"strategies": "strategy", "learning_rate": "lr", "sampling": "sampling"}[name]
            if ablation_cells(t[name], by).empty:
                return skip(stem, f"no cell where {by} was varied")
            if name == "learning_rate":
                return plot_learning_rate(t[name], meta, out, stem)
            return plot_strategies(t[name], meta, out, stem, by)
        case "unfrozen_layers":
            if t[name].empty or t[name]["freeze_before"].nunique() < 2:
                return skip(stem, "no cell with two or more values of freeze_before:N")
            return plot_unfrozen_layers(t[name], meta, out, stem)
        case "learning_curves":
            return plot_learning_curves(t["runs"], runs_dir, meta, out, stem)
        case "parity":
            return plot_parity(t["runs"], runs_dir, meta, out, stem)
        case "mpt":
            return plot_mpt(t["mpt"], meta, out, stem)
        case "chains":
            return plot_chains(t["chains"], meta, out, stem)
        case "chain_curves":
            return plot_chain_curves(t["chains"], t["runs"], runs_dir, meta, out, stem)
        case "foundation":
            return plot_foundation(t["foundation"], meta, out, stem)
        case "published_parity":
            return plot_published_parity(t["comparison"], meta, out, stem)
        case "trial_parity":
            return plot_trial_parity(t["trial_parity"], meta, out, stem)
    raise ValueError(f"unknown figure {name!r}")


def write_figures(
    tables_dir: Path,
    runs_dir: Path,
    out_dir: Path,
    meta: Meta,
    *,
    dpi: int = 200,
    names: Sequence[str] | None = None,
) -> list[Path]:
    """Draw every figure for every model; returns the PNG and PDF paths written.

    Args:
        tables_dir: directory with the CSVs of :func:`tlmat.report.tables.write_tables`.
        runs_dir: ``results/runs`` (``<run-id>/history.csv`` and ``predictions.csv``).
        out_dir: where ``<figure>_<model>.png``/``.pdf`` go.
        meta: data-set metadata ``key -> {"label", "units"}`` for axis labels.
        dpi: PNG resolution (PDFs are vector); lower it for quick previews and tests.
        names: figures to draw (default: every one of :data:`tlmat.report.names.FIGURES`).
    """
    tables_dir, runs_dir, out_dir = Path(tables_dir), Path(runs_dir), Path(out_dir)
    tables = load_tables(tables_dir, runs_dir)
    written: list[Path] = []
    with figure_style(dpi):
        for model in _models(tables):
            per_model = {name: _for_model(t, model) for name, t in tables.items()}
            for name in names or FIGURE_TABLES:
                needs = FIGURE_TABLES[name]
                stem = f"{name}_{model}"
                if per_model[needs].empty:
                    written += skip(stem, f"no rows in {needs}.csv")
                    continue
                written += _draw(name, per_model, runs_dir, meta, out_dir, stem)
    log.info("wrote %d figure files to %s", len(written), out_dir)
    return written


def write_placeholder(out_dir: Path, stem: str) -> list[Path]:
    """A page saying the figure has no data, for a figure the workflow declared as output.

    The workflow declares its figures from the enabled families before any run exists; when
    a family's runs cannot make its figure (e.g. a strategy study with one strategy), this
    file still appears, stating why it is empty, instead of failing the whole workflow.
    """
    return save_figure(_empty_figure(stem), Path(out_dir), stem)


def _empty_figure(stem: str) -> Figure:
    fig, ax = plt.subplots(figsize=(5, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, f"{stem}: no runs vary what this figure compares", ha="center", va="center")
    return fig
