"""environment.csv and the summary's warning: which software environments the runs came from.

A gain compares runs with each other; runs trained with another torch or NumPy may differ for
that reason alone, so the aggregate must say when its runs mix environments.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from test_aggregate import DEFAULTS, scratch, write_run

from tlmat.report.environment import ENVIRONMENT_COLUMNS, environment_table, warning_lines
from tlmat.report.runs import collect_runs
from tlmat.report.tables import write_tables

OLD = {"python": "3.11.7", "torch": "2.13.0+cpu", "numpy": "2.4.6", "tlmat": "0.1.0"}
NEW = {**OLD, "torch": "2.14.1"}


def test_two_environments_give_two_rows_and_a_warning(tmp_path: Path) -> None:
    runs = [
        write_run(tmp_path / "runs", scratch("dc", 800, 1, 0.5, 1.0, versions=OLD)),
        write_run(tmp_path / "runs", scratch("dc", 800, 2, 0.6, 2.0, versions=OLD)),
        write_run(tmp_path / "runs", scratch("dc", 800, 3, 0.7, 3.0, versions=NEW)),
    ]
    out = tmp_path / "tables"
    write_tables(runs, out, DEFAULTS)

    table = pd.read_csv(out / "environment.csv", dtype=str, keep_default_na=False)
    assert list(table.columns) == list(ENVIRONMENT_COLUMNS)
    assert len(table) == 2
    assert table["torch"].tolist() == ["2.13.0+cpu", "2.14.1"]  # most runs first
    assert table["n_runs"].astype(int).tolist() == [2, 1]
    assert table["example_run"].tolist()[1] == "scratch/dc-800/t3"

    summary = (out / "summary.md").read_text()
    assert "Warning: these tables mix runs from 2 different software environments" in summary
    assert "torch 2.13.0+cpu / 2.14.1" in summary
    assert "numpy" not in summary.split("Warning")[1].split("\n")[0]  # only what differs


def test_one_environment_one_row_no_warning(tmp_path: Path) -> None:
    runs = [
        write_run(tmp_path / "runs", scratch("dc", 800, t, 0.5, 1.0, versions=OLD)) for t in (1, 2)
    ]
    out = tmp_path / "tables"
    write_tables(runs, out, DEFAULTS)
    assert len(pd.read_csv(out / "environment.csv")) == 1
    assert "Warning: these tables mix" not in (out / "summary.md").read_text()


def test_unrecorded_and_extra_versions(tmp_path: Path) -> None:
    # published runs record no versions; a run may record more packages than the usual five
    runs = collect_runs(
        [
            write_run(
                tmp_path, scratch("dc", 800, 1, 0.5, 1.0, versions={**OLD, "chgnet": "0.4.2"})
            ),
            write_run(tmp_path, scratch("dc", 800, 2, 0.5, 1.0, versions=OLD)),
        ]
    )
    table = environment_table(runs)
    assert sorted(table["other"]) == ["", "chgnet=0.4.2"]
    assert "other " in warning_lines(table)[0]
    no_versions = runs.drop(columns=[c for c in runs.columns if c.startswith("versions.")])
    assert len(environment_table(no_versions)) == 1
    assert environment_table(runs.iloc[0:0]).columns.tolist() == list(ENVIRONMENT_COLUMNS)
