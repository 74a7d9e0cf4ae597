"""``summary.md``: the study's findings in a page, led by the headline table.

Every number here is read from the tables (never recomputed differently), every
"significant" uses Holm-adjusted p-values, and R² averages leave out the cells whose R² gain
is unstable, saying how many.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from tlmat.report import compare, environment, foundation, parity, recommendation, stats
from tlmat.report.cells import ablation_cells, best_sources, mpt_transfer_rows
from tlmat.report.findings import FINDINGS_HEADER, findings_rows, study_scale
from tlmat.report.names import RUN_KINDS

Meta = Mapping[str, Mapping[str, str]]


def _fmt(value: Any, spec: str) -> str:
    """Format a number for Markdown, with an em dash for missing values."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, spec)


def markdown_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """A GitHub-flavoured Markdown table (no tabulate dependency needed)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _label(key: Any, meta: Meta | None) -> str:
    """Human-readable data-set name, falling back to the upper-cased key."""
    info = (meta or {}).get(str(key), {})
    return f"{info.get('label', str(key).upper())} ({key})" if info else str(key).upper()


def _section(
    title: str, rows: list[list[str]], header: list[str], extra: Sequence[str] = ()
) -> list[str]:
    """A Markdown section: heading, optional bullet lines, then the table or a 'no runs' note."""
    lines = [f"## {title}", ""]
    if not rows:
        return [*lines, "_No runs in this family._", ""]
    if extra:
        lines += [*extra, ""]
    return [*lines, markdown_table(rows, header), ""]


def _stable_r2_mean(cells: pd.DataFrame) -> float:
    """Mean R² gain over the cells whose scratch R² is not near zero."""
    stable = cells[~cells["unstable_r2_gain"].astype(bool)]
    return float(stable["gain_r2"].astype(float).mean()) if len(stable) else math.nan


def _unstable_count(cells: pd.DataFrame) -> int:
    return int(cells["unstable_r2_gain"].astype(bool).sum()) if len(cells) else 0


# ----------------------------------------------------------------------------- sections


def _run_counts(runs: pd.DataFrame | None) -> str:
    if runs is None or runs.empty:
        return "No runs found."
    counts = runs["kind"].value_counts()
    parts = ", ".join(f"{counts.get(k, 0)} {k}" for k in RUN_KINDS)
    models = ", ".join(sorted(map(str, runs["model"].unique())))
    return f"{len(runs)} runs ({parts}); models: {models}."


def _headline_rows(table: pd.DataFrame) -> list[list[str]]:
    return [
        [
            str(r.model),
            str(r.definition),
            str(r.unstable_r2_cells),
            f"{r.cells_r2}/{r.cells}",
            _fmt(r.gain_r2, "+.1f"),
            _fmt(r.gain_mae, "+.1f"),
            f"{r.tl_better_mae}/{r.cells}",
            f"{r.significant_better_mae}/{r.cells}",
            str(r.negative_transfer),
            f"{r.paper_gain_r2:+.1f} / {r.paper_gain_mae:+.1f}",
        ]
        for r in table.itertuples(index=False)
    ]


def _grid_rows(grid: pd.DataFrame) -> list[list[str]]:
    """Per model: cells, how many TL beats scratch in, significantly (Holm), and the reverse."""
    rows = []
    for model, cells in grid.groupby("model", sort=True):
        valid = cells.dropna(subset=["gain_mae"])
        better = stats.significant_improvement(cells["gain_mae"], cells["p_mae_paired_t_holm"])
        rows.append(
            [
                str(model),
                str(len(cells)),
                f"{int((valid['gain_mae'] > 0).sum())}/{len(valid)}",
                f"{int(better.sum())}/{int(cells['p_mae_paired_t_holm'].notna().sum())}",
                str(int(cells["negative_transfer"].astype(bool).sum())),
                str(_unstable_count(cells)),
            ]
        )
    return rows


def _best_source_rows(grid: pd.DataFrame, meta: Meta | None) -> list[list[str]]:
    return [
        [
            str(r.model),
            _label(r.dataset, meta),
            str(r.size),
            _label(r.pt_dataset, meta),
            f"{_fmt(r.r2_mean, '.3f')} ± {_fmt(r.r2_std, '.3f')}",
            _fmt(r.scratch_r2_mean, ".3f"),
            "unstable" if r.unstable_r2_gain else _fmt(r.gain_r2, "+.1f"),
            _fmt(r.gain_mae, "+.1f"),
        ]
        for r in best_sources(grid).itertuples(index=False)
    ]


def rank_by_gain(table: pd.DataFrame, by: str) -> pd.DataFrame:
    """Mean gains per (model, ``by``) over the ablation cells, best (highest MAE gain) first.

    MAE gain ranks because it is what the paired test is run on and because R² gain is
    unstable for targets whose scratch R² is near zero; the R² mean leaves such cells out.
    """
    table = ablation_cells(table, by)
    columns = ["model", by, "cells", "unstable", "gain_r2", "gain_mae"]
    if table.empty:
        return pd.DataFrame(columns=columns)
    rows = [
        {
            "model": model,
            by: level,
            "cells": len(cells),
            "unstable": _unstable_count(cells),
            "gain_r2": _stable_r2_mean(cells),
            "gain_mae": cells["gain_mae"].astype(float).mean(),
        }
        for (model, level), cells in table.groupby(["model", by], dropna=False)
    ]
    ranked = pd.DataFrame(rows, columns=columns)
    return ranked.sort_values(["model", "gain_mae"], ascending=[True, False], kind="stable")


def _ranked_rows(table: pd.DataFrame, by: str, spec: str = "") -> list[list[str]]:
    return [
        [
            str(r["model"]),
            _fmt(r[by], spec),
            str(r["cells"]),
            _fmt(r["gain_r2"], "+.1f"),
            _fmt(r["gain_mae"], "+.1f"),
            str(r["unstable"]),
        ]
        for _, r in rank_by_gain(table, by).iterrows()
    ]


def _best_lines(table: pd.DataFrame, by: str, what: str, spec: str = "") -> list[str]:
    """One 'Best <what>' sentence per model (the first row of the ranking)."""
    ranked = rank_by_gain(table, by).drop_duplicates("model")
    return [
        f"- **Best {what} ({r['model']})**: `{_fmt(r[by], spec)}` — mean MAE gain "
        f"{_fmt(r['gain_mae'], '+.1f')} %, mean R² gain {_fmt(r['gain_r2'], '+.1f')} %"
        for _, r in ranked.iterrows()
    ]


def _pt_size_rows(table: pd.DataFrame, meta: Meta | None) -> list[list[str]]:
    """One line per (model, PT source, PT size) over the cells run at several PT sizes.

    The table also holds every grid cell at the default PT size (other targets, other FT
    sizes); averaging those beside the few swept cells would compare different cells, so
    only the cells where the PT size varied count (as for strategies and learning rates).
    """
    table = ablation_cells(table, "pt_size")
    if table.empty:
        return []
    return [
        [
            str(model),
            _label(source, meta),
            str(pt_size),
            _trained_n(cells),
            str(len(cells)),
            _fmt(_stable_r2_mean(cells), "+.1f"),
            _fmt(cells["gain_mae"].astype(float).mean(), "+.1f"),
            str(_unstable_count(cells)),
        ]
        for (model, source, pt_size), cells in table.groupby(
            ["model", "pt_dataset", "pt_size"], sort=True
        )
    ]


def _trained_n(cells: pd.DataFrame) -> str:
    """The PT structures actually trained on (``pt_n``; a size beyond the pool is capped)."""
    if "pt_n" not in cells.columns:
        return "—"
    trained = pd.to_numeric(cells["pt_n"], errors="coerce").dropna().astype(int).unique()
    return "/".join(str(n) for n in sorted(trained)) or "—"


def _mpt_rows(table: pd.DataFrame) -> list[list[str]]:
    """One line per (model, MPT variant): gains over scratch and over the best PT source."""
    table = mpt_transfer_rows(table)
    if table.empty:
        return []
    rows = []
    for (model, variant), group in table.groupby(["model", "pt_dataset"], sort=True):
        vs = group["gain_mae_vs_pairwise"].astype(float)
        significant = stats.significant_improvement(vs, group["p_mae_paired_t_vs_pairwise_holm"])
        rows.append(
            [
                str(model),
                str(variant),
                str(len(group)),
                _fmt(group["gain_mae"].astype(float).mean(), "+.1f"),
                _fmt(vs.mean(), "+.1f"),
                f"{int((vs > 0).sum())}/{int(vs.notna().sum())}",
                f"{int(significant.sum())}/{int(vs.notna().sum())}",
            ]
        )
    return rows


def _comparison_lines(comparison: pd.DataFrame) -> list[str]:
    """The published-comparison section (only when published results were given)."""
    if comparison.empty:
        return []
    counts = compare.comparison_summary(comparison)
    rows = [
        [
            table,
            str(len(cells)),
            str(int(cells[f"within_{compare.R2_TOLERANCE}_r2"].sum())),
            _fmt(cells["delta_r2"].astype(float).mean(), "+.3f"),
            _fmt(cells["delta_r2"].astype(float).abs().median(), ".3f"),
        ]
        for table, cells in comparison.groupby("table", sort=False)
    ]
    return [
        "## Comparison with the published runs",
        "",
        f"{counts['within']} of {counts['cells']} cells that both studies have are within "
        f"±{compare.R2_TOLERANCE} test R² of the published mean (mean |ΔR²| "
        f"{_fmt(counts['mean_abs_delta_r2'], '.3f')}; ΔR² = ours − published; details in "
        "comparison.csv, figure published_parity). Cells match on every key but the model, so "
        "a smaller model or fewer epochs than the paper's shows up here as a gap.",
        "",
        markdown_table(rows, ["table", "cells", "within ±0.05", "mean ΔR²", "median |ΔR²|"]),
        "",
    ]


#: up to this many runs, the summary lists the trial-parity table itself (else: trial_parity.csv)
TRIAL_PARITY_LISTED = 40


def trial_parity_lines(table: pd.DataFrame) -> list[str]:
    """Run-by-run parity with the published runs (``make parity`` prints this section)."""
    if table.empty:
        return []
    lines = [
        "## Parity with the published runs, trial by trial",
        "",
        f"**{parity.trial_parity_verdict(table)}.** Each of our runs beside the published "
        "run of the same cell and trial (same training subset and test set where the data "
        "carry the paper's splits: same subset = yes) and the published cell over its trials "
        "(trial_parity.csv, figure trial_parity).",
        "",
    ]
    if len(table) > TRIAL_PARITY_LISTED:
        return lines
    rows = [
        [
            "scratch" if r.kind == "scratch" else f"{r.pt_dataset}:{int(r.pt_size)}",
            f"{r.dataset}:{int(r.size)}",
            str(r.strategy) if r.kind != "scratch" else "",
            str(int(r.trial)),
            "yes" if r.same_subset else "no",
            _fmt(r.r2, ".3f"),
            _fmt(r.published_trial_r2, ".3f"),
            _fmt(r.published_r2_mean, ".3f") + " ± " + _fmt(r.published_r2_std, ".3f"),
            _fmt(r.published_r2_min, ".3f") + "–" + _fmt(r.published_r2_max, ".3f"),
            _fmt(r.mae, ".4f"),
            _fmt(r.published_trial_mae, ".4f"),
            "yes" if r.inside_range else "no",
        ]
        for r in table.itertuples(index=False)
    ]
    header = [
        "PT",
        "target",
        "strategy",
        "trial",
        "same subset",
        "R²",
        "published R² (trial)",
        "published R² mean ± std",
        "published range",
        "MAE",
        "published MAE (trial)",
        "inside range",
    ]
    return [*lines, markdown_table(rows, header), ""]


def summary_markdown(tables: Mapping[str, pd.DataFrame], meta: Meta | None = None) -> str:
    """The headline numbers as a short Markdown report (the tables hold the details).

    Args:
        tables: as returned by :func:`tlmat.report.tables.build_tables`; missing or empty families
            are reported as such, so a partial study still gets a summary.
        meta: optional data-set metadata (``key -> {"label", "units"}``) for readable names.
    """
    empty = pd.DataFrame()
    grid = tables.get("pairwise_grid", empty)
    strat = tables.get("strategies", empty)
    unfrozen = tables.get("unfrozen_layers", empty)
    lrs = tables.get("learning_rate", empty)
    gain_header = ["cells", "mean R² gain (%)", "mean MAE gain (%)", "unstable R² cells"]
    parts = ["# Transfer-learning study: summary", "", _run_counts(tables.get("runs")), ""]
    parts += environment.warning_lines(tables.get("environment", empty))
    parts += _section(
        "Headline: mean gain of pair-wise TL over scratch",
        _headline_rows(tables.get("headline", empty)),
        [
            "model",
            "cells averaged",
            "unstable R² cells",
            "cells in R² mean",
            "R² gain (%)",
            "MAE gain (%)",
            "TL better (MAE)",
            "significantly better",
            "negative transfer",
            "paper's claim R² / MAE (%)",
        ],
    )
    parts += [
        "Gains are the paper's: per cell, (mean R²_TL − mean R²_scratch)/|mean R²_scratch| and "
        "(mean MAE_scratch − mean MAE_TL)/mean MAE_scratch, means over trials, in %; positive = "
        "TL better; then averaged over cells. Cells with |mean scratch R²| < "
        f"{stats.UNSTABLE_R2} have an unstable R² gain: flagged (`unstable_r2_gain`) and left "
        'out of R² averages, with the count given. "Significantly" better or worse '
        f"(negative transfer) means MAE gain > 0 (< 0) with a {stats.TEST_NAME} on MAE whose "
        f"p-value, {stats.ADJUSTMENT_NAME}-adjusted over the cells of its table, is < "
        f"{stats.ALPHA}.",
        "",
    ]
    scale = study_scale(tables.get("runs"))
    smoke = " At smoke scale they check that every comparison runs; they are not evidence."
    parts += _section(
        f"The paper's findings, tested here ({scale})",
        findings_rows(tables),
        list(FINDINGS_HEADER),
        extra=[
            "Each finding of the paper beside what these runs show, by the stated criterion."
            + (smoke if scale.startswith("smoke") else "")
        ],
    )
    parts += _section(
        "Pair-wise PT → FT grid vs scratch",
        _grid_rows(grid) if not grid.empty else [],
        [
            "model",
            "cells",
            "TL better (MAE)",
            "significantly better (Holm)",
            "negative transfer (Holm)",
            "unstable R² cells",
        ],
    )
    parts += _section(
        "Best PT source per target (by mean R² at the largest FT size)",
        _best_source_rows(grid, meta) if not grid.empty else [],
        [
            "model",
            "target",
            "FT size",
            "best PT source",
            "R² (mean ± std)",
            "scratch R²",
            "R² gain (%)",
            "MAE gain (%)",
        ],
    )
    parts += _section(
        "Fine-tuning strategies (cells where strategies were compared; by mean MAE gain)",
        _ranked_rows(strat, "strategy"),
        ["model", "strategy", *gain_header],
        extra=_best_lines(strat, "strategy", "strategy"),
    )
    parts += _section(
        "Unfrozen layers: freeze_before:N, children 1..N-1 frozen (by mean MAE gain)",
        _ranked_rows(unfrozen, "freeze_before"),
        ["model", "N", *gain_header],
        extra=_best_lines(unfrozen, "freeze_before", "N of freeze_before:N"),
    )
    parts += _section(
        "Learning rate (cells where the lr was varied; by mean MAE gain)",
        _ranked_rows(lrs, "lr", "g"),
        ["model", "lr", *gain_header],
        extra=_best_lines(lrs, "lr", "learning rate", "g"),
    )
    parts += _section(
        "PT-size sweep (cells run at several PT sizes; mean over their targets and FT sizes)",
        _pt_size_rows(tables.get("pt_size_sweep", empty), meta),
        ["model", "PT source", "PT size", "trained on", *gain_header],
    )
    parts += _section(
        "Multi-property pre-training (mean over targets and FT sizes)",
        _mpt_rows(tables.get("mpt", empty)),
        [
            "model",
            "MPT variant",
            "cells",
            "mean MAE gain vs scratch (%)",
            "mean MAE gain vs best pair-wise (%)",
            "better than best pair-wise (MAE)",
            "significantly better (Holm)",
        ],
    )
    parts += foundation.summary_lines(tables.get("foundation", empty))
    parts += recommendation.summary_lines(tables.get("recommendation", empty), meta)
    parts += _comparison_lines(tables.get("comparison", empty))
    parts += trial_parity_lines(tables.get("trial_parity", empty))
    return "\n".join(parts).rstrip() + "\n"
