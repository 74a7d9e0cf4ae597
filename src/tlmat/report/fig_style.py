"""What every figure shares: labels, style, saving, and the small drawing helpers.

The figure modules (``fig_pairwise``, ``fig_ablations``, ``fig_mpt_chains``, ``fig_runs``,
``fig_published``) draw one family each on top of these; :mod:`tlmat.report.figures` picks
the figures to draw and calls them. Helpers here fix one look for all of them: a PT source
has the same colour in every facet, scratch is always the dark dashed line, R² axes are
clipped at :data:`R2_FLOOR`, and sizes and learning rates are ticked at the values used.
"""

from __future__ import annotations

import contextlib
import logging
import math
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullFormatter, StrMethodFormatter

from tlmat.files import atomic_path
from tlmat.report.names import FIGURE_FORMATS
from tlmat.report.tables import SCRATCH_SOURCE

# Batch figures on headless machines; never needs a display. Every figure module imports
# this one, and the backend is only resolved at the first figure, so this is early enough.
matplotlib.use("Agg")

log = logging.getLogger(__name__)

#: data-set key -> {"label", "units"} (:func:`tlmat.report.commands.dataset_meta`)
Meta = Mapping[str, Mapping[str, str]]
SCRATCH = SCRATCH_SOURCE
SCRATCH_COLOR = "0.15"
#: lowest R² drawn on curves and parity axes
R2_FLOOR = -1.0


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
    """Save in every format of :data:`FIGURE_FORMATS`, then close the figure.

    Each file is written atomically (:func:`tlmat.files.atomic_path`), so a killed job never
    leaves a truncated figure that looks finished; closing keeps long batches from leaking.
    """
    paths = [out_dir / f"{stem}.{fmt}" for fmt in FIGURE_FORMATS]
    try:
        for path, fmt in zip(paths, FIGURE_FORMATS, strict=True):
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format=fmt, bbox_inches="tight")
    finally:
        plt.close(fig)
    return paths


def facets(n: int, ncols: int = 3, size: tuple[float, float] = (4.2, 3.4)) -> tuple[Figure, list]:
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


def palette(keys: Sequence[object]) -> dict[object, tuple]:
    """One stable colour per key, so a PT source has the same colour in every facet."""
    colors = sns.color_palette("tab10" if len(keys) <= 10 else "husl", len(keys))
    return dict(zip(keys, colors, strict=True))


def curve(ax: Axes, x: pd.Series, table: pd.DataFrame, stat: str, **style: object) -> None:
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


def clip_r2_axis(ax: Axes, values: Sequence[float], floor: float = R2_FLOOR) -> None:
    """Keep the R² axis readable: values below ``floor`` (FT 10 reaches −1000) run off it."""
    finite = [v for v in values if np.isfinite(v)]
    if finite and min(finite) < floor:
        ax.set_ylim(bottom=floor, top=max(1.0, max(finite)) + 0.05)
        ax.text(0.02, 0.02, f"R² < {floor:g} off scale", transform=ax.transAxes, fontsize=8)


def legend_outside(fig: Figure, axes: Sequence[Axes], title: str, ncols: int = 4) -> None:
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


def log_x_at(ax: Axes, values: Sequence[float], fmt: str = "{x:g}") -> None:
    """Log x axis ticked at the values actually used (sizes, lrs), not at 2×10², 3×10², …"""
    ax.set_xscale("log")
    ticks = sorted({float(v) for v in values if pd.notna(v)})
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(StrMethodFormatter(fmt))
    ax.xaxis.set_minor_formatter(NullFormatter())
    if len(ticks) > 4:
        rotate_xticks(ax, 30)


def rotate_xticks(ax: Axes, angle: float = 35) -> None:
    """Slanted tick labels anchored at their tick, for long names that would overlap."""
    plt.setp(ax.get_xticklabels(), rotation=angle, ha="right", rotation_mode="anchor")


def skip(stem: str, why: str) -> list[Path]:
    """Log why a figure is not drawn; returns no files (a partial study still gets the rest)."""
    log.info("figure %s skipped: %s", stem, why)
    return []


def grouped_r2_bars(
    ax: Axes,
    cell: pd.DataFrame,
    levels: Sequence[str],
    sizes: Sequence[int],
    colors: Mapping[str, object],
) -> None:
    """One bar group per FT size, one bar (mean R² ± std) per ``source`` level of ``cell``
    (columns ``source``, ``size``, ``r2``, ``r2_std``), with the FT sizes as x ticks."""
    width = 0.8 / max(len(levels), 1)
    for k, level in enumerate(levels):
        sub = cell[cell["source"] == level].set_index("size").reindex(sizes)
        ax.bar(
            np.arange(len(sizes)) - 0.4 + width * (k + 0.5),
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
