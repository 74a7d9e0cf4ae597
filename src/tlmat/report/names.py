"""Names the report code and the workflow share: tables, figures, run kinds. One registry each.

The workflow (``workflow/rules/aggregate.smk``) declares these files as rule outputs and the
report code writes them; both read the names from here, so a table or figure added in one
place cannot be missing from the other. Snakemake imports this module every time it parses
the workflow, so it must stay plain Python: no pandas, matplotlib or torch (a test checks).
"""

from __future__ import annotations

from typing import NamedTuple

from tlmat.plan import KINDS

#: every table written by :func:`tlmat.report.tables.write_tables`, as ``<name>.csv``, in the
#: order they are built and written (``runs`` is the run records themselves)
TABLE_NAMES: tuple[str, ...] = (
    "runs",
    "scratch",
    "pairwise_grid",
    "ft_size_sweep",
    "pt_size_sweep",
    "strategies",
    "unfrozen_layers",
    "learning_rate",
    "sampling",
    "mpt",
    "chains",
    "foundation",
    "headline",
    "comparison",
    "trial_parity",
    "environment",
    "recommendation",
)
#: the one-page findings written next to the tables
SUMMARY_NAME = "summary.md"

#: run kinds of a ``metrics.json`` (anything else is rejected when runs are collected)
#: the kinds of run a study plans (one list: tlmat.plan's)
RUN_KINDS: tuple[str, ...] = KINDS


class FigureSource(NamedTuple):
    """What one figure is drawn from.

    Attributes:
        table: the table whose rows it needs; with no rows (for a model) it is skipped.
        family: the study family whose runs make it, which decides whether the workflow
            declares it: ``None`` = always, ``"published"`` = when published results are
            configured, else ``config["study"]["families"][family]``.
    """

    table: str
    family: str | None


#: every figure, written per model as ``<name>_<model>.<format>``, in drawing order
FIGURES: dict[str, FigureSource] = {
    "pairwise_r2": FigureSource("pairwise_grid", "pairwise"),
    "pairwise_mae": FigureSource("pairwise_grid", "pairwise"),
    "r2_vs_ft_size": FigureSource("ft_size_sweep", "pairwise"),
    "r2_vs_pt_size": FigureSource("pt_size_sweep", "pt_size_sweep"),
    "strategies": FigureSource("strategies", "strategies"),
    "unfrozen_layers": FigureSource("unfrozen_layers", "unfrozen_layers"),
    "learning_rate": FigureSource("learning_rate", "learning_rate"),
    "sampling": FigureSource("sampling", "sampling"),
    "learning_curves": FigureSource("runs", None),
    "parity": FigureSource("runs", None),
    "mpt": FigureSource("mpt", "mpt"),
    "chains": FigureSource("chains", "chains"),
    "chain_curves": FigureSource("chains", "chains"),
    "foundation": FigureSource("foundation", "foundation"),
    "published_parity": FigureSource("comparison", "published"),
    "trial_parity": FigureSource("trial_parity", "published"),
}
#: figure -> the table it is drawn from
FIGURE_TABLES: dict[str, str] = {name: source.table for name, source in FIGURES.items()}
#: figure -> the study family whose runs it needs (see :class:`FigureSource`)
FIGURE_FAMILIES: dict[str, str | None] = {name: src.family for name, src in FIGURES.items()}
#: every figure is written in each of these formats (PNG for viewing, PDF for print)
FIGURE_FORMATS: tuple[str, ...] = ("png", "pdf")

#: the model of the published runs (the paper trained ALIGNN only)
PUBLISHED_MODEL = "alignn"
#: the figures the paper's published runs alone can make (they come without predictions,
#: histories, MPT or chains): what ``make paper`` draws
PUBLISHED_FIGURES: tuple[str, ...] = (
    "pairwise_r2",
    "pairwise_mae",
    "r2_vs_ft_size",
    "r2_vs_pt_size",
    "strategies",
    "learning_rate",
)
