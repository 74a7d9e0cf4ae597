"""Published per-run results as run records: the paper's runs go through our tables unchanged.

The reference study's public repository ships one test-set prediction file per run; a CSV of
those runs (one row each, R² and MAE recomputed from the predictions; the shipped copy is
``data/published/published_runs.csv``, whose README gives its provenance) is read here into
the same run records as our ``metrics.json`` files (:func:`tlmat.report.runs.run_frame`). Each
record keeps the paper's experiment as its ``family`` tag, so a run lands in exactly the table
of the experiment it was made for (the paper's strategy study re-used the trial-5 pair-wise
runs as its ALL-UF bars, for example, and those must not be averaged into the grid twice).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from tlmat.report.names import PUBLISHED_MODEL
from tlmat.report.runs import run_frame

#: the paper's strategy codes -> tlmat strategy names (docs/study.md, "Fine-tune strategies")
STRATEGY_CODES: dict[str, str | None] = {
    "ALL-UF": "full",
    "LAST-LAY": "last_layer",
    "2B": "unfreeze_2body",
    "3B": "unfreeze_3body",
    "NPH": "new_head_freeze",
    "NPH-freeze1": "new_head",
    "NPH-freeze6": "new_head_freeze",
    "scratch": None,
}
#: the file's experiment -> tlmat study family
EXPERIMENT_FAMILIES: dict[str, str] = {
    "scratch": "scratch",
    "pairwise_pt941": "pairwise",
    "large_pt": "pt_size_sweep",
    "ft_strategy": "strategies",
    "learning_rate": "learning_rate",
}
REQUIRED_COLUMNS: tuple[str, ...] = (
    "experiment",
    "pt_property",
    "pt_size",
    "ft_property",
    "ft_size",
    "strategy",
    "learning_rate",
    "trial",
    "n_test",
    "r2",
    "mae",
    "source_path",
)
NUMERIC_COLUMNS: tuple[str, ...] = ("ft_size", "n_test", "r2", "mae")


def read_published_runs(path: Path | str) -> pd.DataFrame:
    """Read a published per-run CSV into run records (see :func:`tlmat.report.runs.run_frame`).

    Raises:
        ValueError: one line naming the file and the problem (missing columns, unknown
            experiment or strategy code, a non-numeric or missing metric, duplicate paths).
        FileNotFoundError: if the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: published results file not found")
    try:
        rows = pd.read_csv(path, dtype={"pt_property": str, "dup_group": str})
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable CSV ({exc})") from exc
    _check(rows, path)
    return run_frame(pd.DataFrame([_record(row) for row in rows.itertuples(index=False)]))


def _check(rows: pd.DataFrame, path: Path) -> None:
    """Every problem that would otherwise turn into a silent NaN cell, as one line."""
    missing = [c for c in REQUIRED_COLUMNS if c not in rows.columns]
    if missing:
        raise ValueError(f"{path}: missing columns: {', '.join(missing)}")
    for column, known in (("experiment", EXPERIMENT_FAMILIES), ("strategy", STRATEGY_CODES)):
        unknown = sorted(set(rows[column].astype(str)) - set(known))
        if unknown:
            raise ValueError(
                f"{path}: unknown {column} {', '.join(unknown)} "
                f"(expected one of {', '.join(known)})"
            )
    for column in NUMERIC_COLUMNS:
        values = pd.to_numeric(rows[column], errors="coerce")
        bad = rows.index[values.isna()]
        if len(bad):
            raise ValueError(
                f"{path}: column {column} is missing or not a number in row {bad[0] + 2} "
                f"({rows.loc[bad[0], 'source_path']})"
            )
    duplicated = rows["source_path"][rows["source_path"].duplicated()]
    if len(duplicated):
        raise ValueError(f"{path}: source_path {duplicated.iloc[0]} appears twice")


def _optional(value: object) -> object:
    """NaN/empty cells (no PT source, no stated lr or trial) become None."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "none":
        return None
    return value


def _record(row) -> dict:
    """One run record; fields the file cannot know (seed, epochs, wall time) stay empty."""
    scratch = row.experiment == "scratch"
    return {
        "run_id": "published/" + str(row.source_path).rsplit("/", 1)[0],
        "kind": "scratch" if scratch else "finetune",
        "model": PUBLISHED_MODEL,
        "dataset": row.ft_property,
        "size": int(row.ft_size),
        "trial": _optional(row.trial),
        "seed": None,
        "pt_dataset": None if scratch else _optional(row.pt_property),
        "pt_size": None if scratch else _optional(row.pt_size),
        "strategy": STRATEGY_CODES[row.strategy],
        "lr": _optional(row.learning_rate),
        "n_train": None,
        "n_val": None,
        "n_test": int(row.n_test),
        "test_r2": float(row.r2),
        "test_mae": float(row.mae),
        "test_mape": None,
        "best_epoch": None,
        "epochs_run": None,
        "best_val_loss": None,
        "wall_time_s": None,
        "device": None,
        "config_hash": None,
        "family": EXPERIMENT_FAMILIES[row.experiment],
        "origin": "published",
        "dup_group": _optional(getattr(row, "dup_group", None)),
        "source_path": row.source_path,
    }
