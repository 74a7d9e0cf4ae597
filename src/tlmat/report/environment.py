"""Which software environments the aggregated runs came from (``environment.csv``).

Every ``metrics.json`` records the versions it was trained with (``versions``: Python, torch,
torch_geometric, NumPy, tlmat; flattened to ``versions.<name>`` by
:func:`tlmat.report.runs.collect_runs`). A gain over scratch compares runs with each other,
so when a study's runs were trained in different environments (a relock, a cluster with
another torch), part of a difference may be the software, not transfer learning. This table
makes that visible, one row per distinct environment, and :func:`warning_lines` puts a
warning at the top of ``summary.md`` when the tables mix environments.
"""

from __future__ import annotations

import pandas as pd

#: the packages every run records (:func:`tlmat.runs.versions`), as fixed columns
VERSION_KEYS: tuple[str, ...] = ("python", "torch", "torch_geometric", "numpy", "tlmat")
#: the columns of ``environment.csv``: any other recorded version goes into ``other``
ENVIRONMENT_COLUMNS: tuple[str, ...] = (
    "environment",
    *VERSION_KEYS,
    "other",
    "n_runs",
    "kinds",
    "example_run",
)
_PREFIX = "versions."
_UNKNOWN = ""  # runs that record no version of a package (published runs record none)


def _version_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """One string column per recorded package (missing = ``""``), plus ``other``."""
    recorded = sorted(c for c in runs.columns if c.startswith(_PREFIX))
    extra = [c for c in recorded if c.removeprefix(_PREFIX) not in VERSION_KEYS]
    frame = pd.DataFrame(index=runs.index)
    for key in VERSION_KEYS:
        column = f"{_PREFIX}{key}"
        frame[key] = runs[column].map(_text) if column in runs.columns else _UNKNOWN
    frame["other"] = [
        "; ".join(f"{c.removeprefix(_PREFIX)}={_text(v)}" for c, v in row.items() if _text(v))
        for _, row in runs[extra].iterrows()
    ]
    return frame


def _text(value: object) -> str:
    """A version as text; NaN/None (not recorded) as ``""``."""
    return _UNKNOWN if value is None or pd.isna(value) else str(value)


def environment_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per distinct environment among ``runs``, most runs first.

    Columns: :data:`ENVIRONMENT_COLUMNS`; ``environment`` numbers them (``env1`` has the
    most runs), ``kinds`` lists the run kinds trained in it and ``example_run`` names one run,
    so a stray environment can be traced to its runs.
    """
    if runs.empty:
        return pd.DataFrame(columns=list(ENVIRONMENT_COLUMNS))
    versions = _version_frame(runs)
    keys = [*VERSION_KEYS, "other"]
    versions["kind"] = runs["kind"].astype(str).to_numpy()
    versions["run_id"] = runs["run_id"].astype(str).to_numpy()
    rows = [
        {
            **dict(zip(keys, group_key, strict=True)),
            "n_runs": len(group),
            "kinds": ", ".join(sorted(group["kind"].unique())),
            "example_run": sorted(group["run_id"])[0],
        }
        for group_key, group in versions.groupby(keys, sort=True)
    ]
    table = pd.DataFrame(rows).sort_values("n_runs", ascending=False, kind="stable")
    table.insert(0, "environment", [f"env{i + 1}" for i in range(len(table))])
    return table[list(ENVIRONMENT_COLUMNS)].reset_index(drop=True)


def warning_lines(table: pd.DataFrame) -> list[str]:
    """A warning for ``summary.md`` when the runs came from several environments, else none.

    It names the packages whose versions differ, so the reader knows what to suspect.
    """
    if table is None or len(table) < 2:
        return []
    differ = [
        f"{key} {' / '.join(v or '?' for v in dict.fromkeys(table[key].astype(str)))}"
        for key in (*VERSION_KEYS, "other")
        if key in table.columns and table[key].astype(str).nunique() > 1
    ]
    return [
        f"**Warning: these tables mix runs from {len(table)} different software environments** "
        f"({'; '.join(differ)}; runs per environment: "
        f"{', '.join(str(n) for n in table['n_runs'])}). Differences between runs may partly "
        "come from the software; see `environment.csv`, and rerun the odd ones out "
        "(docs/install.md).",
        "",
    ]
