"""Figures of the transfer-learning study, drawn from the aggregated tables.

Figures are drawn only from the CSV tables written by :func:`tlmat.aggregate.write_tables`
(plus ``history.csv``/``predictions.csv`` of individual runs), never from in-memory state, so
they can be redrawn without re-aggregating and always show exactly what the tables say.

Every figure is written per model as ``<name>_<model>.png`` and ``.pdf``:

* ``pairwise_r2`` / ``pairwise_mae``: heatmaps of the pair-wise grid at the largest FT size of
  each target (rows PT source + scratch, columns FT target), second panel % gain vs scratch;
* ``r2_vs_ft_size``: R² vs FT size, one facet per target, each PT source vs scratch;
* ``r2_vs_pt_size``: R² vs PT size for the sources with a PT-size sweep (FE, BG);
* ``strategies``: fine-tuning strategy bars (R² and MAE gain);
* ``learning_rate``: R² and MAE gain vs fine-tuning learning rate;
* ``learning_curves``: train/validation loss of scratch runs, one panel per data set;
* ``parity``: predicted vs true test values of the best run (highest R²) per target;
* ``mpt``: R² of MPT fine-tunes next to the best pair-wise source and scratch per target;
* ``chains``: final-target R², MAE and MAPE of each multi-stage chain next to scratch;
* ``chain_curves``: validation loss vs epoch of every stage of each chain.

A family without data is skipped with a log message, so a partial study still gets figures.
"""

from __future__ import annotations

import contextlib
import logging
import math
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # batch figures on headless machines; never needs a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FixedLocator, NullFormatter, StrMethodFormatter  # noqa: E402

from tlmat import aggregate  # noqa: E402
from tlmat.report import cells, compare  # noqa: E402

log = logging.getLogger(__name__)

Meta = Mapping[str, Mapping[str, str]]
FORMATS: tuple[str, ...] = ("png", "pdf")
SCRATCH = aggregate.SCRATCH_SOURCE
SCRATCH_COLOR = "0.15"
#: lowest R² drawn on curves and parity axes
R2_FLOOR = -1.0
TABLE_NAMES: tuple[str, ...] = ("runs", *aggregate.TABLE_COLUMNS)


# ----------------------------------------------------------------------------- labels/style


def prop_label(key: object, meta: Meta, *, units: bool = True) -> str:
    """'Formation energy (eV/atom)' from the data-set metadata; the key itself if unknown."""
    info = meta.get(str(key), {})
    label = info.get("label", str(key).upper())
    unit = info.get("units", "")
    return f"{label} ({unit})" if units and unit else label


def short_label(key: object, meta: Meta, width: int = 14) -> str:
    """Property name wrapped onto short lines, so tick labels of a 7×6 grid stay legible."""
    return textwrap.fill(prop_label(key, meta, units=False), width)


def pair_label(pt: object, target: object, meta: Meta) -> str:
    """'Formation energy → Dielectric constant' for a PT source / FT target pair."""
    return f"{prop_label(pt, meta, units=False)} → {prop_label(target, meta, units=False)}"


@contextlib.contextmanager
def figure_style(dpi: int = 200) -> Iterator[None]:
    """Readable defaults (font sizes, white grid) without touching global matplotlib state."""
    rc = {"savefig.dpi": dpi, "pdf.fonttype": 42, "axes.titlesize": 12, "legend.fontsize": 10}
    with (
        sns.axes_style("whitegrid"),
        sns.plotting_context("notebook", font_scale=0.95),
        plt.rc_context(rc),
    ):
        yield


def save_figure(fig: Figure, out_dir: Path, stem: str) -> list[Path]:
    """Save as PNG and PDF, then close the figure so long batches do not leak memory."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.{fmt}" for fmt in FORMATS]
    try:
        for path in paths:
            fig.savefig(path, bbox_inches="tight")
    finally:
        plt.close(fig)
    return paths


def _facets(n: int, ncols: int = 3, size: tuple[float, float] = (4.2, 3.4)) -> tuple[Figure, list]:
    """A grid of ``n`` axes (unused ones removed) with a constrained layout."""
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(size[0] * ncols, size[1] * nrows),
        squeeze=False,
        layout="constrained",
    )
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.remove()
    return fig, flat[:n]


def _palette(keys: Sequence[object]) -> dict[object, tuple]:
    """One stable colour per key, so a PT source has the same colour in every facet."""
    colors = sns.color_palette("tab10" if len(keys) <= 10 else "husl", len(keys))
    return dict(zip(keys, colors, strict=True))


def _curve(ax: Axes, x: pd.Series, table: pd.DataFrame, stat: str, **style: object) -> None:
    """Mean with markers and ± 95 % CI error bars over trials (none where n < 2)."""
    ax.errorbar(
        x,
        table[f"{stat}_mean"].to_numpy(float),
        yerr=table[f"{stat}_ci95"].fillna(0.0).to_numpy(float),
        marker="o",
        markersize=4,
        capsize=3,
        **style,
    )


def _clip_r2_axis(ax: Axes, values: Sequence[float], floor: float = R2_FLOOR) -> None:
    """Keep the R² axis readable: values below ``floor`` (FT 10 reaches −1000) run off it."""
    finite = [v for v in values if np.isfinite(v)]
    if finite and min(finite) < floor:
        ax.set_ylim(bottom=floor, top=max(1.0, max(finite)) + 0.05)
        ax.text(0.02, 0.02, f"R² < {floor:g} off scale", transform=ax.transAxes, fontsize=8)


def _legend_outside(fig: Figure, axes: Sequence[Axes], title: str, ncols: int = 4) -> None:
    """One legend for all facets below the plots (no duplicates, never over a title)."""
    handles: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(
            handles.values(),
            handles.keys(),
            title=title,
            loc="outside lower center",
            ncols=min(ncols, len(handles)),
        )


def _log_x_at(ax: Axes, values: Sequence[float], fmt: str = "{x:g}") -> None:
    """Log x axis ticked at the values actually used (sizes, lrs), not at 2×10², 3×10², …"""
    ax.set_xscale("log")
    ticks = sorted({float(v) for v in values if pd.notna(v)})
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(StrMethodFormatter(fmt))
    ax.xaxis.set_minor_formatter(NullFormatter())
    if len(ticks) > 4:
        _rotate_xticks(ax, 30)


def _rotate_xticks(ax: Axes, angle: float = 35) -> None:
    plt.setp(ax.get_xticklabels(), rotation=angle, ha="right", rotation_mode="anchor")


# ----------------------------------------------------------------------------- heatmaps


def _grid_at_largest_size(grid: pd.DataFrame) -> pd.DataFrame:
    return cells.at_largest_size(grid, by=("dataset",))


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
    colors = _palette(sources)
    fig, axes = _facets(len(targets))
    for ax, target in zip(axes, targets, strict=True):
        block = sweep[sweep["dataset"] == target]
        for source, lines in block.groupby("source", sort=True):
            lines = lines.sort_values("size")
            is_scratch = source == SCRATCH
            _curve(
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
        _log_x_at(ax, block["size"], "{x:.0f}")
        _clip_r2_axis(ax, block["r2_mean"])
        ax.set_title(prop_label(target, meta))
        ax.set_xlabel("Fine-tuning set size")
        ax.set_ylabel("Test R²")
    _legend_outside(fig, axes, "PT source")
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


def plot_r2_vs_pt_size(sweep: pd.DataFrame, meta: Meta, out_dir: Path, stem: str) -> list[Path]:
    """R² vs PT-set size per swept source; dotted lines mark each target's scratch R²."""
    sources = swept_sources(sweep)
    sweep = _sweep_ft_size(sweep[sweep["pt_dataset"].isin(sources)])
    targets = sorted(sweep["dataset"].unique())
    colors = _palette(targets)
    fig, axes = _facets(len(sources), ncols=2, size=(5.2, 3.8))
    for ax, source in zip(axes, sources, strict=True):
        block = sweep[sweep["pt_dataset"] == source]
        for (target, size), lines in block.groupby(["dataset", "size"], sort=True):
            lines = lines.sort_values("pt_size")
            label = f"{prop_label(target, meta, units=False)} (FT n={size})"
            _curve(ax, lines["pt_size"], lines, "r2", color=colors[target], label=label)
            scratch_r2 = lines["scratch_r2_mean"].dropna()
            if len(scratch_r2):
                ax.axhline(scratch_r2.iloc[0], color=colors[target], linestyle=":", linewidth=1)
        _log_x_at(ax, block["pt_size"], "{x:.0f}")
        _clip_r2_axis(ax, block["r2_mean"])
        ax.set_title(f"PT source: {prop_label(source, meta, units=False)}")
        ax.set_xlabel("Pre-training set size")
        ax.set_ylabel("Test R²")
    _legend_outside(fig, axes, "FT target (dotted line: scratch R²)", ncols=2)
    fig.suptitle("Test R² vs pre-training set size (mean ± 95 % CI over trials)")
    return save_figure(fig, out_dir, stem)


# ----------------------------------------------------------------------------- ablations


def _pairs_at_largest_size(table: pd.DataFrame) -> pd.DataFrame:
    """One FT size per (PT source, target) pair: the largest, as in the paper's ablations."""
    return cells.at_largest_size(table, by=("pt_dataset", "dataset"))


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


def plot_strategies(table: pd.DataFrame, meta: Meta, out_dir: Path, stem: str) -> list[Path]:
    """Test R² (± std) and MAE gain of each fine-tuning strategy, per PT → FT pair."""
    table = _pairs_at_largest_size(cells.ablation_cells(table, "strategy"))
    pairs = sorted(set(zip(table["pt_dataset"], table["dataset"], strict=True)))
    colors = _palette(sorted(table["strategy"].unique()))
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(max(7.0, 1.6 * len(pairs) + 3), 7.5), sharex=True, layout="constrained"
    )
    _grouped_bars(top, table, "strategy", "r2_mean", "r2_ci95", pairs, colors)
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
    _grouped_bars(bottom, table, "strategy", "gain_mae", "gain_mae_ci95", pairs, colors)
    bottom.axhline(0.0, color=SCRATCH_COLOR, linewidth=1)
    bottom.set_ylabel("MAE gain vs scratch (%)")
    bottom.set_xticks(x)
    bottom.set_xticklabels([textwrap.fill(pair_label(p, t, meta), 22) for p, t in pairs])
    _rotate_xticks(bottom, 25)
    _legend_outside(fig, [top], "Strategy", ncols=6)
    fig.suptitle("Fine-tuning strategies (largest FT size per pair)")
    return save_figure(fig, out_dir, stem)


def plot_learning_rate(table: pd.DataFrame, meta: Meta, out_dir: Path, stem: str) -> list[Path]:
    """Test R² and MAE gain vs fine-tuning learning rate, one line per pair (and strategy)."""
    table = _pairs_at_largest_size(cells.ablation_cells(table, "lr"))
    lines_by = ["pt_dataset", "dataset", "strategy"]
    keys = sorted(set(table[lines_by].itertuples(index=False, name=None)))
    several_strategies = table["strategy"].nunique() > 1
    colors = _palette(keys)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    for key, lines in table.groupby(lines_by, sort=True):
        lines = lines.sort_values("lr")
        label = pair_label(key[0], key[1], meta) + (f" ({key[2]})" if several_strategies else "")
        _curve(left, lines["lr"], lines, "r2", color=colors[key], label=label)
        right.plot(lines["lr"], lines["gain_mae"], marker="o", color=colors[key], label=label)
    for ax in (left, right):
        _log_x_at(ax, table["lr"])
        ax.set_xlabel("Fine-tuning learning rate")
    _clip_r2_axis(left, table["r2_mean"])
    left.set_ylabel("Test R² (mean ± 95 % CI)")
    right.set_ylabel("MAE gain vs scratch (%)")
    right.axhline(0.0, color=SCRATCH_COLOR, linewidth=1)
    _legend_outside(fig, [left], "PT → FT pair", ncols=2)
    fig.suptitle("Effect of the fine-tuning learning rate (largest FT size per pair)")
    return save_figure(fig, out_dir, stem)


# ----------------------------------------------------------------------------- published


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


# ----------------------------------------------------------------------------- MPT


def mpt_bars(table: pd.DataFrame) -> pd.DataFrame:
    """Long table (dataset, size, model_kind, r2, r2_std) for the MPT comparison figure.

    One bar per MPT variant and strategy, plus the scratch baseline and the best pair-wise
    source of the same cell (both taken from the MPT table's reference columns).
    """
    rows = []
    for (dataset, size), cell in table.groupby(["dataset", "size"], sort=True):
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
    colors = {"scratch": SCRATCH_COLOR, **_palette(order[1:])}
    fig, axes = _facets(len(targets), ncols=4, size=(4.0, 3.4))
    for ax, target in zip(axes, targets, strict=True):
        cell = bars[bars["dataset"] == target]
        sizes = sorted(cell["size"].unique())
        levels = [s for s in order if s in set(cell["source"]) or s.startswith("best")]
        width = 0.8 / max(len(levels), 1)
        for k, level in enumerate(levels):
            sub = cell[cell["source"] == level].set_index("size").reindex(sizes)
            x = np.arange(len(sizes)) - 0.4 + width * (k + 0.5)
            ax.bar(
                x,
                sub["r2"].to_numpy(float),
                width,
                yerr=sub["r2_std"].fillna(0.0).to_numpy(float),
                capsize=2,
                color=colors.get(level, "0.6"),
                label=level,
                edgecolor="white",
                linewidth=0.5,
            )
        ax.set_xticks(np.arange(len(sizes)))
        ax.set_xticklabels([str(s) for s in sizes])
        ax.set_xlabel("FT size")
        ax.set_title(prop_label(target, meta, units=False))
        ax.axhline(0.0, color="0.5", linewidth=0.6)
    axes[0].set_ylabel("Test R² (mean ± std)")
    _legend_outside(fig, axes, "Pre-training", ncols=3)
    fig.suptitle("Multi-property pre-training vs best pair-wise source vs scratch")
    return save_figure(fig, out_dir, stem)


# ----------------------------------------------------------------------------- per-run data


def _read_run_csv(runs_dir: Path, run_id: str, name: str) -> pd.DataFrame | None:
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
        history = _read_run_csv(runs_dir, str(run_id), "history.csv")
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
    fig, axes = _facets(len(curves))
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
    _legend_outside(fig, axes, "Scratch runs")
    fig.suptitle("Learning curves of the scratch models")
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
    fig, axes = _facets(len(chains), ncols=2, size=(5.2, 3.6))
    drawn = False
    for ax, chain in zip(axes, chains, strict=True):
        parts = chain.split(">")
        for k in range(1, len(parts) + 1):
            prefix = ">".join(parts[:k])
            match = stage_runs[(stage_runs["chain"] == prefix) & (stage_runs["trial"] == 1)]
            if match.empty:
                continue
            history = _read_run_csv(runs_dir, str(match["run_id"].iloc[0]), "history.csv")
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
        return _skip(stem, "no history.csv of chain stages")
    fig.suptitle("Validation loss across the stages of each chain (trial 1)")
    return save_figure(fig, out_dir, stem)


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
        preds = _read_run_csv(runs_dir, str(run["run_id"]), "predictions.csv")
        if preds is not None and len(preds):
            panels.append((run, preds))
    if not panels:
        log.info("parity plots skipped: no predictions.csv")
        return []
    fig, axes = _facets(len(panels), size=(4.0, 4.0))
    for ax, (run, preds) in zip(axes, panels, strict=True):
        _parity_panel(ax, run, preds, meta)
    fig.suptitle("Best model per target (highest test R²): test-set parity")
    return save_figure(fig, out_dir, stem)


# ----------------------------------------------------------------------------- entry point


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
        tables["runs"] = aggregate.collect_runs(sorted(runs_dir.rglob("metrics.json")))
    return tables


def _for_model(table: pd.DataFrame, model: str) -> pd.DataFrame:
    """Rows of one model; keeps the columns even when empty so lookups do not fail."""
    if "model" not in table.columns:
        return table
    return table[table["model"] == model]


def _models(tables: Mapping[str, pd.DataFrame]) -> list[str]:
    found = {m for t in tables.values() if "model" in t.columns for m in t["model"].dropna()}
    return sorted(map(str, found))


#: Figure name -> the table whose rows it needs (figures of an empty family are skipped).
FIGURES: dict[str, str] = {
    "pairwise_r2": "pairwise_grid",
    "pairwise_mae": "pairwise_grid",
    "r2_vs_ft_size": "ft_size_sweep",
    "r2_vs_pt_size": "pt_size_sweep",
    "strategies": "strategies",
    "learning_rate": "learning_rate",
    "learning_curves": "runs",
    "parity": "runs",
    "mpt": "mpt",
    "chains": "chains",
    "chain_curves": "chains",
    "published_parity": "comparison",
}
#: the figures the paper's published runs alone can make (they come without predictions,
#: histories, MPT or chains)
PUBLISHED_FIGURES: tuple[str, ...] = (
    "pairwise_r2",
    "pairwise_mae",
    "r2_vs_ft_size",
    "r2_vs_pt_size",
    "strategies",
    "learning_rate",
)


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
                return _skip(stem, "no PT source with two or more PT sizes")
            return plot_r2_vs_pt_size(t["pt_size_sweep"], meta, out, stem)
        case "strategies" | "learning_rate":
            by = "strategy" if name == "strategies" else "lr"
            if cells.ablation_cells(t[name], by).empty:
                return _skip(stem, f"no cell where {by} was varied")
            draw = plot_strategies if name == "strategies" else plot_learning_rate
            return draw(t[name], meta, out, stem)
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
        case "published_parity":
            return plot_published_parity(t["comparison"], meta, out, stem)
    raise ValueError(f"unknown figure {name!r}")


def _skip(stem: str, why: str) -> list[Path]:
    log.info("figure %s skipped: %s", stem, why)
    return []


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
        tables_dir: directory with the CSVs of :func:`tlmat.aggregate.write_tables`.
        runs_dir: ``results/runs`` (``<run-id>/history.csv`` and ``predictions.csv``).
        out_dir: where ``<figure>_<model>.png``/``.pdf`` go.
        meta: data-set metadata ``key -> {"label", "units"}`` for axis labels.
        dpi: PNG resolution (PDFs are vector); lower it for quick previews and tests.
        names: figures to draw (default: every one of :data:`FIGURES`).
    """
    tables_dir, runs_dir, out_dir = Path(tables_dir), Path(runs_dir), Path(out_dir)
    tables = load_tables(tables_dir, runs_dir)
    written: list[Path] = []
    with figure_style(dpi):
        for model in _models(tables):
            per_model = {name: _for_model(t, model) for name, t in tables.items()}
            for name in names or FIGURES:
                needs = FIGURES[name]
                stem = f"{name}_{model}"
                if per_model[needs].empty:
                    written += _skip(stem, f"no rows in {needs}.csv")
                    continue
                written += _draw(name, per_model, runs_dir, meta, out_dir, stem)
    log.info("wrote %d figure files to %s", len(written), out_dir)
    return written
