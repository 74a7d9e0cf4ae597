"""Glue between the config and the aggregation/figure code (the `aggregate`/`figures` verbs)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from tlmat.data import DataError


def dataset_meta(config: Mapping) -> dict[str, dict[str, str]]:
    """Labels and units of every registered data set, for tables and figure axes."""
    return {
        key: {"label": entry.get("label", key), "units": entry.get("units", "")}
        for key, entry in config["datasets"].items()
    }


def study_defaults(config: Mapping):
    """The PT size, learning rate and strategy that define the plain pair-wise runs."""
    from tlmat.aggregate import StudyDefaults

    return StudyDefaults(
        pt_size=config["study"]["pt_size"],
        lr=config["finetune"]["lr"] or config["train"]["lr"],
        strategy=config["finetune"]["strategy"],
    )


def aggregate_command(
    config: Mapping, runs_dir: Path, out_dir: Path, metric_files: Sequence[Path]
) -> list[Path]:
    from tlmat.aggregate import write_tables

    files = list(metric_files) or sorted(Path(runs_dir).rglob("metrics.json"))
    if not files:
        raise DataError(f"{runs_dir}: no metrics.json files to aggregate")
    return write_tables(files, out_dir, study_defaults(config), dataset_meta(config))


def figures_command(config: Mapping, tables_dir: Path, runs_dir: Path, out_dir: Path) -> list[Path]:
    from tlmat.plots import write_figures

    if not (Path(tables_dir) / "runs.csv").is_file():
        raise DataError(f"{tables_dir}: no runs.csv; run `tlmat aggregate` first")
    return write_figures(tables_dir, runs_dir, out_dir, dataset_meta(config))
