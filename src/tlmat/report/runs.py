"""Run records: ``metrics.json`` files read into one frame, and the runs each table uses.

Every training run writes its own ``results/runs/<run-id>/metrics.json`` so that runs can be
executed, retried and cached independently; the paper's published runs arrive as rows of a
CSV (:mod:`tlmat.report.published`). Both end up here, in one frame of one shape
(:func:`collect_runs`, :func:`run_frame`), which every table of :mod:`tlmat.report.tables`
reads.

The second half selects runs into the study's families. :class:`StudyDefaults` tells the
"plain" fine-tunes of the pair-wise grid apart from the ablations (other strategy, learning
rate or PT size); runs that carry a ``family`` tag (published ones: the paper's experiment)
belong to their family's tables only, untagged runs (ours) are placed by the defaults.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tlmat.report.names import RUN_KINDS

REQUIRED_KEYS: tuple[str, ...] = (
    "run_id",
    "kind",
    "model",
    "dataset",
    "size",
    "trial",
    "seed",
    "pt_dataset",
    "pt_size",
    "strategy",
    "lr",
    "n_train",
    "n_val",
    "n_test",
    "test_r2",
    "test_mae",
    "test_mape",
    "best_epoch",
    "epochs_run",
    "best_val_loss",
    "wall_time_s",
    "device",
    "versions",
    "config_hash",
)
INT_COLUMNS: tuple[str, ...] = (
    "size",
    "trial",
    "seed",
    "pt_size",
    "n_train",
    "n_val",
    "n_test",
    "best_epoch",
    "epochs_run",
)
FLOAT_COLUMNS: tuple[str, ...] = (
    "lr",
    "test_r2",
    "test_mae",
    "test_mape",
    "best_val_loss",
    "wall_time_s",
)
# Nested dicts (``versions``) are flattened into ``versions.<name>`` columns.
RUN_COLUMNS: tuple[str, ...] = tuple(k for k in REQUIRED_KEYS if k != "versions")
#: optional run-record columns: our metrics.json files leave them out
OPTIONAL_RUN_COLUMNS: dict[str, str | None] = {
    "family": None,
    "origin": "tlmat",
    "sampling": "random",  # how the run's subset was drawn (older runs: random)
}
#: what makes two runs trial twins (same split and seed): a TL run and its scratch run
PAIR_KEYS: tuple[str, ...] = ("model", "dataset", "size", "trial")


@dataclasses.dataclass(frozen=True)
class StudyDefaults:
    """The settings that make a fine-tuning run "plain" rather than part of an ablation.

    The pair-wise grid and the FT-size sweep must compare like with like, so they only use
    fine-tuning runs with the default strategy, learning rate and PT size; each ablation table
    relaxes exactly one of these.

    Attributes:
        pt_size: PT training-set size of the plain runs: one int for every source, a mapping
            ``pt_dataset -> size`` when the sources differ, or ``None`` for "the largest PT
            size of each (model, pt_dataset) among the fine-tuning runs" (i.e. the full set).
        lr: learning rate of the plain fine-tuning runs.
        strategy: fine-tuning strategy of the plain runs.
        lr_strategies: strategies of the learning-rate study (``study.learning_rate.
            strategies``); empty means ``strategy`` alone.
        scratch_lr: if set, only scratch runs with this learning rate form the baseline; needed
            only when scratch runs were repeated at several learning rates.
        sampling: how the plain fine-tunes drew their subsets (``finetune.sampling``); fine-tunes
            drawn otherwise belong to the sampling table only.
        target_only: the target-only data sets (a user's own property, the out-of-domain
            targets): the recommendation (:mod:`tlmat.report.recommendation`) leads with them.
        in_mptrj: data set -> whether its structures come from the Materials Project, which
            CHGNet's pre-training set MPtrj is built from (``datasets.<key>.in_mptrj``;
            foundation.csv's ``pretraining_saw_test_structures``); unlisted: unknown.
    """

    pt_size: int | Mapping[str, int] | None
    lr: float
    strategy: str = "full"
    scratch_lr: float | None = None
    lr_strategies: tuple[str, ...] = ()
    sampling: str = "random"
    target_only: tuple[str, ...] = ()
    in_mptrj: Mapping[str, bool] = dataclasses.field(default_factory=dict, hash=False)


# ----------------------------------------------------------------------------- collection


def collect_runs(metric_files: Iterable[Path | str]) -> pd.DataFrame:
    """Read and validate ``metrics.json`` files into one frame, one row per run.

    Validation happens here, up front, because a single truncated or stale file would
    otherwise surface much later as a confusing NaN or a silently missing grid cell.

    Returns:
        Frame sorted by ``run_id`` with the contract's keys first (``versions`` flattened to
        ``versions.<package>``), then any extra keys in alphabetical order.

    Raises:
        ValueError: naming the file, if it is not valid JSON, not a JSON object, lacks
            required keys or has an unknown ``kind``; or if two files share a ``run_id``.
    """
    records = [_read_metrics(Path(p)) for p in metric_files]
    if not records:
        return pd.DataFrame(columns=[*RUN_COLUMNS, *OPTIONAL_RUN_COLUMNS])
    return run_frame(pd.DataFrame.from_records(records))


def run_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Run records in the one shape every table builder reads, whatever their origin.

    Our ``metrics.json`` files and the published per-run rows
    (:func:`tlmat.report.published.read_published_runs`) both end here: contract columns
    first, the optional ``family``/``origin`` columns filled in, then extras alphabetically.
    """
    _check_unique_run_ids(frame)
    frame = frame.copy()
    for column, default in OPTIONAL_RUN_COLUMNS.items():
        if column not in frame.columns:
            frame[column] = default
    fixed = [*RUN_COLUMNS, *OPTIONAL_RUN_COLUMNS]
    extras = sorted(c for c in frame.columns if c not in fixed)
    frame = _coerce_types(frame[[*fixed, *extras]])
    return frame.sort_values("run_id", kind="stable").reset_index(drop=True)


def _read_metrics(path: Path) -> dict[str, Any]:
    """Parse and validate one metrics file; the error names the file so it can be fixed."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ValueError(f"{path}: missing required keys: {', '.join(missing)}")
    if data["kind"] not in RUN_KINDS:
        raise ValueError(f"{path}: unknown kind {data['kind']!r} (expected one of {RUN_KINDS})")
    return _flatten(data)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to dotted keys and lists to JSON text, so every value fits a cell."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix=f"{name}."))
        elif isinstance(value, list | tuple):
            flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat


def _check_unique_run_ids(frame: pd.DataFrame) -> None:
    """Two files claiming one run id would be double-counted as two trials."""
    duplicated = frame.loc[frame["run_id"].duplicated(), "run_id"].unique()
    if len(duplicated):
        raise ValueError(f"duplicate run_id in metrics files: {', '.join(map(str, duplicated))}")


def _coerce_types(frame: pd.DataFrame) -> pd.DataFrame:
    """Use nullable ints so sizes stay ``800`` (not ``800.0``) even where some are null."""
    frame = frame.copy()
    for column in INT_COLUMNS:
        frame[column] = pd.to_numeric(frame[column]).astype("Int64")
    for column in FLOAT_COLUMNS:
        frame[column] = pd.to_numeric(frame[column]).astype(float)
    return frame


# ----------------------------------------------------------------------------- selection


def of_kind(runs: pd.DataFrame, kind: str, sampling: str | None = None) -> pd.DataFrame:
    """The runs of one kind (``scratch``, ``finetune``, …), drawn with ``sampling`` if given."""
    runs = runs[runs["kind"] == kind]
    if sampling is None or "sampling" not in runs.columns:
        return runs
    return runs[runs["sampling"].fillna("random") == sampling]


def with_default_sampling(runs: pd.DataFrame, defaults: StudyDefaults) -> pd.DataFrame:
    """Every run but the fine-tunes whose subsets were drawn otherwise than the plain ones
    (``defaults.sampling``): what every table but the sampling table reads, so the others
    never mix subsets drawn two ways."""
    if "sampling" not in runs.columns:
        return runs
    other = (runs["kind"] == "finetune") & (runs["sampling"].fillna("random") != defaults.sampling)
    return runs[~other]


def lr_is(frame: pd.DataFrame, lr: float) -> pd.Series:
    """Float-tolerant lr match: 1e-4 written by different code paths must still compare equal."""
    return pd.Series(np.isclose(frame["lr"].astype(float), lr, rtol=1e-6, atol=0.0), frame.index)


def pt_size_is_default(frame: pd.DataFrame, pt_size: int | Mapping[str, int] | None) -> pd.Series:
    """Mask of fine-tuning runs whose PT size is the study default (see StudyDefaults)."""
    sizes = frame["pt_size"].astype("Float64")
    if pt_size is None:
        wanted = sizes.groupby([frame["model"], frame["pt_dataset"]]).transform("max")
    elif isinstance(pt_size, Mapping):
        wanted = frame["pt_dataset"].map(pt_size).astype("Float64")
    else:
        wanted = pd.Series(float(pt_size), index=frame.index, dtype="Float64")
    return (sizes == wanted).fillna(False).astype(bool)


def scratch_runs(runs: pd.DataFrame, defaults: StudyDefaults | None = None) -> pd.DataFrame:
    """The scratch baseline: one run per (model, dataset, size, trial).

    Raises:
        ValueError: if the baseline is ambiguous (several scratch runs share a trial), since
            silently averaging them would change every gain in the study.
    """
    scratch = of_kind(runs, "scratch")
    if defaults is not None and defaults.scratch_lr is not None:
        scratch = scratch[lr_is(scratch, defaults.scratch_lr)]
    clash = scratch[scratch.duplicated(list(PAIR_KEYS), keep=False)]
    if len(clash):
        raise ValueError(
            "ambiguous scratch baseline (set StudyDefaults.scratch_lr?): "
            + ", ".join(clash["run_id"].astype(str))
        )
    return scratch


def by_family(ft: pd.DataFrame, families: Sequence[str], untagged: pd.Series) -> pd.DataFrame:
    """Tagged runs (published ones) by their family tag; untagged runs (ours) by ``untagged``.

    A published run states which of the paper's experiments it belongs to, so it needs no
    guessing from defaults (its learning rate is often not even recorded); our runs are shared
    between families and are placed by the study defaults instead.
    """
    if "family" not in ft.columns:  # a hand-built frame without the optional column
        return ft[untagged]
    tagged = ft["family"].notna()
    return ft[(tagged & ft["family"].isin(list(families))) | (~tagged & untagged)]


def plain_finetune_runs(runs: pd.DataFrame, defaults: StudyDefaults) -> pd.DataFrame:
    """Fine-tuning runs of the pair-wise grid: default strategy, learning rate and PT size."""
    ft = of_kind(runs, "finetune")
    plain = (
        pt_size_is_default(ft, defaults.pt_size)
        & (ft["strategy"] == defaults.strategy)
        & lr_is(ft, defaults.lr)
    )
    return by_family(ft, ["pairwise"], plain)
