"""The ``aggregate`` and ``figures`` verbs: config in, tables and figures out.

``tlmat aggregate``/``tlmat figures`` (:mod:`tlmat.cli`) and the workflow's scripts
(``workflow/scripts/aggregate.py``, ``figures.py``) call these; they only turn the config into
the arguments of :mod:`tlmat.report.tables` and :mod:`tlmat.report.figures`. Matplotlib is
imported only when figures are drawn, so aggregating does not pay for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from tlmat.config import finetune_lr, finetune_strategy
from tlmat.data import DataError
from tlmat.report.foundation import in_mptrj
from tlmat.report.published import read_published_runs
from tlmat.report.runs import StudyDefaults
from tlmat.report.tables import write_tables


def dataset_meta(config: Mapping) -> dict[str, dict[str, str]]:
    """Labels and units of every registered data set, for tables and figure axes."""
    return {
        key: {"label": entry.get("label", key), "units": entry.get("units", "")}
        for key, entry in config["datasets"].items()
    }


def study_defaults(config: Mapping) -> StudyDefaults:
    """The PT size, learning rate and strategy that define the plain pair-wise runs.

    The learning rate and strategy come from :mod:`tlmat.config`, which the plan and the
    training jobs use too: the tables must pick out exactly the runs the plan made plain.
    """
    return StudyDefaults(
        pt_size=config["study"]["pt_size"],
        lr=finetune_lr(config),
        strategy=finetune_strategy(config),
        lr_strategies=tuple(config["study"]["learning_rate"]["strategies"]),
        sampling=config["finetune"].get("sampling", "random"),
        target_only=tuple(
            sorted(key for key, entry in config["datasets"].items() if entry.get("target_only"))
        ),
        in_mptrj=in_mptrj(config["datasets"]),
    )


def aggregate_command(
    config: Mapping,
    runs_dir: Path,
    out_dir: Path,
    metric_files: Sequence[Path],
    published: Path | None = None,
) -> list[Path]:
    """Our runs' tables, compared with ``published`` (default: ``published_results``) if set."""
    files = list(metric_files) or sorted(Path(runs_dir).rglob("metrics.json"))
    if not files:
        raise DataError(f"{runs_dir}: no metrics.json files to aggregate")
    published = published or config.get("published_results")
    theirs = read_published_runs(published) if published else None
    return write_tables(files, out_dir, study_defaults(config), dataset_meta(config), theirs)


def paper_tables_command(config: Mapping, published: Path, out_dir: Path) -> list[Path]:
    """The paper's tables from its published per-run results alone (nothing is trained)."""
    runs = read_published_runs(published)
    return write_tables(runs, out_dir, study_defaults(config), dataset_meta(config))


def figures_command(
    config: Mapping,
    tables_dir: Path,
    runs_dir: Path,
    out_dir: Path,
    expected: Sequence[str] = (),
    names: Sequence[str] | None = None,
) -> list[Path]:
    """Draw every figure; an ``expected`` figure without data gets a page that says so.

    The Snakefile declares its figures from the enabled families; when a family's runs
    cannot make its figure (e.g. a strategy study with one strategy), the declared file
    still appears, stating why it is empty, instead of failing the whole workflow.
    """
    from tlmat.report.figures import write_figures, write_placeholder

    if not (Path(tables_dir) / "runs.csv").is_file():
        raise DataError(f"{tables_dir}: no runs.csv; run `tlmat aggregate` first")
    written = write_figures(tables_dir, runs_dir, out_dir, dataset_meta(config), names=names)
    stems = {path.stem for path in written}
    for stem in expected:
        if stem not in stems:
            written += write_placeholder(Path(out_dir), stem)
    return written
