"""Which pre-training to use for a target: every option ranked, and a one-line recommendation.

For each target and FT size (``recommendation.csv``), the options are every way the study
trained a model for that cell:

* ``scratch``;
* each pair-wise PT source with each strategy, learning rate, PT size and sampling it was
  fine-tuned with (the pair-wise grid, the strategy, learning-rate, PT-size and sampling
  studies alike);
* each MPT model whose pre-training did not see the target's labels (a model with the
  target among its sources is no transfer and is left out, as is any row whose sources are
  unknown unless its name, ``mpt_without_<target>``, or a target-only target, shows it never
  saw them);
* each chain ending at the target (by its path);
* the universal model (CHGNet, ``pt_dataset: chgnet``, the foundation family's runs).

**Ranking never reads the test set.** Options are ranked by their mean validation loss over
trials (``best_val_loss`` of ``metrics.json``: the masked MSE on standardised targets of the
cell's validation split, which every option of a trial shares, scratch and fine-tunes
alike), lowest first. The test set only gives what the top option is expected to reach: the
mean test R² with its 95 % t-interval over trials (:func:`tlmat.report.stats.describe`), and
the gain over scratch paired trial by trial (same split and seed): the mean R² difference
with its 95 % interval, the paper's ratio-of-means gains and the paired t-test on MAE.

Each row has its one-line reading, e.g. "pre-train on gv (PT 941) with strategy full;
expected R² 0.52 (95 % CI 0.41–0.63) at FT 100; +0.21 R² over scratch (95 % CI 0.08–0.34)";
the rank-1 row's is the recommendation (``summary.md``, section "Recommendation").
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from tlmat.report import stats
from tlmat.report.runs import StudyDefaults, scratch_runs

log = logging.getLogger(__name__)

#: the cell an option is ranked in
CELL_KEYS: tuple[str, ...] = ("dataset", "size")
#: what tells two options of a cell apart
OPTION_KEYS: tuple[str, ...] = (
    "model",
    "kind",
    "source",
    "pt_dataset",
    "pt_size",
    "strategy",
    "lr",
    "sampling",
)
RECOMMENDATION_COLUMNS: tuple[str, ...] = (
    *CELL_KEYS,
    "target_only",
    "rank",
    "option",
    *OPTION_KEYS,
    "n",
    "val_loss_mean",
    "val_loss_std",
    "r2_mean",
    "r2_std",
    "r2_ci95",
    "r2_low",
    "r2_high",
    "mae_mean",
    "mae_ci95",
    "scratch_model",
    "scratch_r2_mean",
    "scratch_mae_mean",
    "n_pairs",
    "d_r2_mean",
    "d_r2_ci95",
    "gain_r2",
    "gain_mae",
    "p_mae_paired_t",
    "line",
)
#: option kinds: training runs that end on the cell's target
OPTION_KINDS: tuple[str, ...] = ("scratch", "finetune", "mpt_finetune", "chain")
#: shipped pre-trained models fine-tuned as a "universal model" (the foundation family)
UNIVERSAL_MODELS: dict[str, str] = {"chgnet": "CHGNet"}
#: how many options per cell ``summary.md`` lists
TOP: int = 3


# ----------------------------------------------------------------------------- the table


def recommendation_table(runs: pd.DataFrame, defaults: StudyDefaults) -> pd.DataFrame:
    """Every option of every (target, FT size) ranked by mean validation loss (rank 1 first).

    Options without a validation loss (published runs record none) get no rank and come last.
    """
    columns = list(RECOMMENDATION_COLUMNS)
    options = option_runs(runs, defaults)
    if options.empty:
        return pd.DataFrame(columns=columns)
    scratch = _scratch_baseline(runs, defaults)
    rows = []
    for (dataset, size), cell in options.groupby(list(CELL_KEYS), sort=True):
        base = _baselines(scratch[(scratch["dataset"] == dataset) & (scratch["size"] == size)])
        summary = [_option_row(key, group, base, defaults) for key, group in _options(cell)]
        ranked = _rank(pd.DataFrame(summary))
        ranked.insert(0, "size", size)
        ranked.insert(0, "dataset", dataset)
        rows.append(ranked)
    table = pd.concat(rows, ignore_index=True).reindex(columns=columns)
    table["target_only"] = table["dataset"].isin(list(defaults.target_only))
    table["line"] = [option_line(row, defaults.lr) for _, row in table.iterrows()]
    table["rank"] = table["rank"].astype("Int64")
    return table[columns]


def option_runs(runs: pd.DataFrame, defaults: StudyDefaults) -> pd.DataFrame:
    """The runs that are options of their target's cell, with their ``source`` named.

    Left out: pre-training runs (PT and MPT models are no model of a target), fine-tunes of
    a target from a PT model of itself, and MPT fine-tunes whose model saw the target (see
    the module doc). A chain stage is an option for the data set it was trained on.
    """
    frame = runs[runs["kind"].isin(OPTION_KINDS)].copy()
    if frame.empty:
        return frame.assign(source=pd.Series(dtype=object))
    if "sampling" not in frame.columns:
        frame["sampling"] = "random"
    frame["sampling"] = frame["sampling"].fillna("random")
    frame = frame[~((frame["kind"] == "finetune") & (frame["pt_dataset"] == frame["dataset"]))]
    saw = _mpt_saw_target(runs, frame, defaults)
    if saw.any():
        dropped = sorted(
            set(frame.loc[saw, "pt_dataset"].astype(str) + "→" + frame.loc[saw, "dataset"])
        )
        log.info("recommendation: MPT models that saw their target left out: %s", dropped)
    frame = frame[~saw].copy()
    frame["source"] = [_source(row) for _, row in frame.iterrows()]
    return frame


def _mpt_saw_target(runs: pd.DataFrame, frame: pd.DataFrame, defaults: StudyDefaults) -> pd.Series:
    """True for MPT fine-tunes whose pre-training saw (or may have seen) the target's labels."""
    sources = _mpt_sources(runs)
    out = pd.Series(False, index=frame.index)
    for index, row in frame[frame["kind"] == "mpt_finetune"].iterrows():
        model, target = str(row["pt_dataset"]), str(row["dataset"])
        if model in sources:
            out[index] = target in sources[model]
        else:  # the MPT model's own record is not among the runs: only its name can tell
            unseen = model == f"mpt_without_{target}" or target in defaults.target_only
            out[index] = not unseen
    return out


def _mpt_sources(runs: pd.DataFrame) -> dict[str, tuple[str, ...]]:
    """MPT model name (``mpt_all``, …) -> the data sets it pre-trained on."""
    models = runs[runs["kind"] == "mpt"]
    if models.empty or "sources" not in models.columns:
        return {}
    out = {}
    for _, run in models.iterrows():
        sources = run["sources"]
        if isinstance(sources, str):
            sources = json.loads(sources)
        if isinstance(sources, Sequence):
            out[str(run["dataset"])] = tuple(str(s) for s in sources)
    return out


def _source(row: pd.Series) -> str:
    """What an option starts from: ``scratch``, ``gv:941``, ``mpt_all``, ``chgnet``, or a
    chain's path before its last stage (``fe:941>bg:2000``)."""
    if row["kind"] == "scratch":
        return "scratch"
    if row["kind"] == "chain" and isinstance(row.get("chain"), str) and ">" in row["chain"]:
        return row["chain"].rsplit(">", 1)[0]
    size = row.get("pt_size")
    if row["kind"] == "finetune" and size is not None and not pd.isna(size):
        return f"{row['pt_dataset']}:{int(size)}"
    return str(row["pt_dataset"])


def _scratch_baseline(runs: pd.DataFrame, defaults: StudyDefaults) -> pd.DataFrame:
    try:
        return scratch_runs(runs, defaults)
    except ValueError as err:  # an ambiguous baseline: rank without gains rather than fail
        log.warning("recommendation: no gains over scratch (%s)", err)
        return runs.iloc[0:0]


def _options(cell: pd.DataFrame):
    """(option key, its runs) of one cell; lr is matched with a tolerance."""
    cell = cell.copy()
    cell["_lr"] = cell["lr"].astype(float).round(12)
    keys = [k for k in OPTION_KEYS if k != "lr"] + ["_lr"]
    for values, group in cell.groupby(keys, dropna=False, sort=True):
        yield dict(zip(keys, values, strict=True)), group


def _option_row(
    key: Mapping[str, Any], group: pd.DataFrame, baselines: Baselines, defaults: StudyDefaults
) -> dict:
    row = {k: key[k] for k in OPTION_KEYS if k != "lr"}
    row["lr"] = group["lr"].iloc[0]
    row["option"] = _option_label(row, defaults.lr)
    row["n"] = len(group)
    val = stats.describe(group["best_val_loss"], "val_loss")
    row.update({"val_loss_mean": val["val_loss_mean"], "val_loss_std": val["val_loss_std"]})
    r2 = stats.describe(group["test_r2"], "r2")
    row.update(r2)
    row["r2_low"] = r2["r2_mean"] - r2["r2_ci95"]
    row["r2_high"] = r2["r2_mean"] + r2["r2_ci95"]
    mae = stats.describe(group["test_mae"], "mae")
    row.update({"mae_mean": mae["mae_mean"], "mae_ci95": mae["mae_ci95"]})
    row.update(_vs_scratch(row, group, baselines))
    return row


#: per scratch model of a cell: its trials' (R², MAE) by trial, and its means
Baselines = dict[str, tuple[dict[int, tuple[float, float]], float, float]]


def _baselines(scratch: pd.DataFrame) -> Baselines:
    """The cell's scratch runs per model, indexed by trial for pairing."""
    out: Baselines = {}
    for model, runs in scratch.groupby(scratch["model"].astype(str), sort=True):
        trials = {
            int(t): (float(r2), float(mae))
            for t, r2, mae in zip(runs["trial"], runs["test_r2"], runs["test_mae"], strict=True)
            if not pd.isna(t)
        }
        out[model] = (trials, float(runs["test_r2"].mean()), float(runs["test_mae"].mean()))
    return out


def _vs_scratch(option: Mapping[str, Any], group: pd.DataFrame, baselines: Baselines) -> dict:
    """The gain over the cell's scratch runs (of the option's model, else of the first
    model that has them), paired per trial (same split and seed)."""
    if option["kind"] == "scratch" or not baselines:
        return {"n_pairs": 0}
    model = str(option["model"]) if str(option["model"]) in baselines else sorted(baselines)[0]
    trials, r2_scratch, mae_scratch = baselines[model]
    pairs = [
        (float(r2), float(mae), *trials[int(t)])
        for t, r2, mae in zip(group["trial"], group["test_r2"], group["test_mae"], strict=True)
        if not pd.isna(t) and int(t) in trials
    ]
    r2, mae, r2_scr, mae_scr = (
        (list(column) for column in zip(*pairs, strict=True)) if pairs else ([], [], [], [])
    )
    diff = stats.describe([a - b for a, b in zip(r2, r2_scr, strict=True)], "d")
    return {
        "scratch_model": model,
        "scratch_r2_mean": r2_scratch,
        "scratch_mae_mean": mae_scratch,
        "n_pairs": len(pairs),
        "d_r2_mean": diff["d_mean"],
        "d_r2_ci95": diff["d_ci95"],
        "gain_r2": stats.relative_gain(group["test_r2"].mean(), r2_scratch, lower_is_better=False),
        "gain_mae": stats.relative_gain(
            group["test_mae"].mean(), mae_scratch, lower_is_better=True
        ),
        "p_mae_paired_t": stats.paired_p_value(mae, mae_scr),
    }


def _rank(cell: pd.DataFrame) -> pd.DataFrame:
    """Lowest mean validation loss first; ties by option name; no validation loss: no rank."""
    cell = cell.sort_values(["val_loss_mean", "option"], na_position="last", kind="stable")
    known = cell["val_loss_mean"].notna().to_numpy()
    cell["rank"] = [i + 1 if ok else pd.NA for i, ok in enumerate(known)]
    return cell.reset_index(drop=True)


def _option_label(option: Mapping[str, Any], default_lr: float | None = None) -> str:
    """``gv:941 full``, ``scratch``, ``mpt_all new_head``, ``chgnet full lr 0.0003`` …"""
    parts = [str(option["source"])]
    if option["kind"] != "scratch" and isinstance(option.get("strategy"), str):
        parts.append(str(option["strategy"]))
    if option["kind"] != "scratch" and _other_lr(option.get("lr"), default_lr):
        parts.append(f"lr {float(option['lr']):g}")
    if option.get("sampling") not in (None, "random") and not _missing(option.get("sampling")):
        parts.append(str(option["sampling"]))
    if option["kind"] == "scratch":
        parts.append(f"({option['model']})")
    return " ".join(parts)


# ----------------------------------------------------------------------------- one line


def option_line(row: Mapping[str, Any] | pd.Series, default_lr: float | None = None) -> str:
    """``pre-train on X with strategy Y; expected R² a (95 % CI b–c) at FT n`` and the gain.

    The learning rate is named when it is not ``default_lr`` (the study's fine-tune one).
    """
    size = int(row["size"])
    line = f"{_what(row, default_lr)}; expected R² {_num(row['r2_mean'])}"
    if _missing(row.get("r2_ci95")):
        trials = int(row["n"]) if not _missing(row.get("n")) else 0
        line += f" ({'one trial' if trials <= 1 else 'no spread'}: no interval)"
    else:
        line += f" (95 % CI {_num(row['r2_low'])}–{_num(row['r2_high'])})"
    line += f" at FT {size}"
    if row["kind"] != "scratch" and not _missing(row.get("d_r2_mean")):
        line += f"; {_signed(row['d_r2_mean'])} R² over scratch"
        if not _missing(row.get("d_r2_ci95")):
            low = row["d_r2_mean"] - row["d_r2_ci95"]
            high = row["d_r2_mean"] + row["d_r2_ci95"]
            line += f" (95 % CI {_signed(low)} to {_signed(high)})"
    return line


def _what(row: Mapping[str, Any], default_lr: float | None = None) -> str:
    kind, strategy = row["kind"], row.get("strategy")
    how = f" with strategy {strategy}" if isinstance(strategy, str) else ""
    lr = f" (lr {float(row['lr']):g})" if _other_lr(row.get("lr"), default_lr) else ""
    if kind == "scratch":
        return f"train from scratch ({row['model']})"
    source = str(row["source"])
    if kind == "mpt_finetune":
        return f"pre-train on the multi-property model {source}{how}{lr}"
    if kind == "chain":
        return f"pre-train along {source}{how}{lr}"
    if str(row.get("pt_dataset")) in UNIVERSAL_MODELS and source == str(row.get("pt_dataset")):
        return f"fine-tune the universal model {UNIVERSAL_MODELS[source]}{how}{lr}"
    dataset, _, size = source.partition(":")
    where = f"{dataset} (PT {size})" if size else dataset
    return f"pre-train on {where}{how}{lr}"


def _other_lr(lr: Any, default_lr: float | None) -> bool:
    """Whether a learning rate is worth naming: known, and not the study's default."""
    if _missing(lr):
        return False
    return default_lr is None or not math.isclose(float(lr), default_lr, rel_tol=1e-6)


def _missing(value: Any) -> bool:
    if value is None or value is pd.NA:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _num(value: Any) -> str:
    return "—" if _missing(value) else f"{float(value):.2f}"


def _signed(value: Any) -> str:
    return "—" if _missing(value) else f"{float(value):+.2f}"


# ----------------------------------------------------------------------------- summary.md


def summary_lines(
    table: pd.DataFrame, meta: Mapping[str, Mapping[str, str]] | None = None
) -> list[str]:
    """The "Recommendation" section of ``summary.md``.

    Target-only targets (yours, the out-of-domain ones) get their recommendation at every FT
    size and the top options; every other target gets its rank-1 option at its largest FT
    size.
    """
    lines = ["## Recommendation", ""]
    ranked = table[table["rank"].notna()] if not table.empty else table
    if ranked.empty:
        return [*lines, "_No runs with a validation loss to rank._", ""]
    lines += [
        "Per target and FT size, every option (scratch, each PT source × strategy, the MPT "
        "models that never saw the target, chains, the universal model) ranked by its mean "
        "validation loss over trials, never by the test set; the expected R² is the "
        "option's mean test R² with its 95 % t-interval over trials, and the gain over "
        "scratch is paired trial by trial (`recommendation.csv`).",
        "",
    ]
    own = ranked[ranked["target_only"].astype(bool)]
    for dataset, cells in own.groupby("dataset", sort=True):
        lines.append(f"**{_label(dataset, meta)}** (target-only)")
        lines.append("")
        for size, cell in cells.groupby("size", sort=True):
            best = cell.sort_values("rank").iloc[0]
            lines.append(f"* FT {int(size)}: {best['line']}")
        lines.append("")
        rows = [
            [
                str(int(r["size"])),
                str(int(r["rank"])),
                str(r["option"]),
                f"{float(r['val_loss_mean']):.3f}",
                _interval(r),
                _signed(r.get("d_r2_mean")),
                str(int(r["n"])),
            ]
            for _, r in cells.sort_values(["size", "rank"]).groupby("size").head(TOP).iterrows()
        ]
        header = [
            "FT size",
            "rank",
            "option",
            "val loss",
            "R² (95 % CI)",
            "ΔR² vs scratch",
            "trials",
        ]
        lines += [_markdown_table(rows, header), ""]
    others = _comparable_cells(ranked[~ranked["target_only"].astype(bool)])
    if not others.empty:
        largest = others[others["size"] == others.groupby("dataset")["size"].transform("max")]
        best = largest.sort_values("rank").groupby("dataset", sort=True).head(1)
        rows = [
            [
                _label(r["dataset"], meta),
                str(int(r["size"])),
                str(r["option"]),
                _interval(r),
                _signed(r.get("d_r2_mean")),
                str(int((largest["dataset"] == r["dataset"]).sum())),
            ]
            for _, r in best.sort_values("dataset").iterrows()
        ]
        header = [
            "target",
            "FT size",
            "rank-1 option",
            "R² (95 % CI)",
            "ΔR² vs scratch",
            "options ranked",
        ]
        lines += [
            "The other targets, at their largest FT size with a scratch baseline:",
            "",
            _markdown_table(rows, header),
            "",
        ]
    return lines


def _comparable_cells(ranked: pd.DataFrame) -> pd.DataFrame:
    """The cells that have a scratch run to compare with, all cells where none has.

    A cell without scratch is typically a chain's intermediate stage (``fe:941>bg:2000``
    fine-tunes bg at 2,000 structures, a size the study never trains from scratch): one
    option, nothing to rank it against, so it is no recommendation for the target.
    """
    has_scratch = ranked["kind"].eq("scratch").groupby([ranked[k] for k in CELL_KEYS])
    keep = has_scratch.transform("any")
    return ranked[keep] if keep.any() else ranked


def _interval(row: Mapping[str, Any]) -> str:
    if _missing(row.get("r2_ci95")):
        return _num(row["r2_mean"])
    return f"{_num(row['r2_mean'])} ({_num(row['r2_low'])}–{_num(row['r2_high'])})"


def _label(key: Any, meta: Mapping[str, Mapping[str, str]] | None) -> str:
    info = (meta or {}).get(str(key), {})
    return f"{info.get('label', key)} ({key})" if info else str(key)


def _markdown_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


__all__ = [
    "RECOMMENDATION_COLUMNS",
    "option_line",
    "option_runs",
    "recommendation_table",
    "summary_lines",
]
