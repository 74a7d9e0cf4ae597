"""``foundation.csv``: the fine-tuned pre-trained CHGNet beside the study model's transfer.

The foundation family (``tlmat.plan``, run ids ``foundation/chgnet-<version>/…``) fine-tunes
the CHGNet shipped with the chgnet package on every target. Its runs are ``finetune`` runs of
``model: chgnet`` whose PT source is the shipped model (``pt_dataset: chgnet``, no PT size).
Every other table keeps them out (:func:`without_foundation_runs`): they have no PT run of
the study and another architecture.

One row per (study model, foundation model, target, FT size, strategy). Unlike every other
table, a row deliberately sets two models side by side: ``model`` is the **study model**
(ALIGNN or CGCNN), whose scratch runs, best pair-wise source and best MPT model are the
references, and ``foundation`` names the fine-tuned model (``chgnet-0.3.0``) whose R²/MAE the
row's statistics are. The pairing is by trial as everywhere (same target, FT size and trial:
the same FT subset, split and seed), only across the two models. The statistics are those of
:mod:`tlmat.report.stats`: means of trials, ratio-of-means gains, paired t-tests, Holm within
the table, and the references are chosen as the MPT table chooses its pair-wise reference:
by the lowest mean **validation** loss, never by test scores.

``pretraining_saw_test_structures`` (from ``datasets.<key>.in_mptrj``): CHGNet was
pre-trained on MPtrj, built from Materials Project relaxations, so the test crystals of a
data set drawn from the Materials Project (and, for formation energy, nearly their labels)
were seen in its pre-training. Its gains on those targets are not transfer to unseen
crystals; ``summary.md`` says so beside the numbers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import pandas as pd

from tlmat.report import stats
from tlmat.report.runs import PAIR_KEYS, StudyDefaults, lr_is, of_kind, scratch_runs

#: PT source (``pt_dataset``) of runs fine-tuned from a shipped foundation model -> what it
#: was pre-trained on
FOUNDATION_SOURCES: dict[str, str] = {"chgnet": "MPtrj"}
FOUNDATION_KEYS: tuple[str, ...] = ("model", "foundation", "dataset", "size", "strategy")
_STATS = ("n", *(f"{m}_{s}" for m in ("r2", "mae") for s in ("mean", "std", "ci95")))


def _versus(prefix: str) -> tuple[str, ...]:
    """Columns of a reference chosen by validation loss and the paired comparison with it."""
    return (
        f"best_{prefix}_val_loss",
        f"best_{prefix}_n",
        f"best_{prefix}_r2_mean",
        f"best_{prefix}_r2_std",
        f"best_{prefix}_mae_mean",
        f"best_{prefix}_mae_std",
        f"n_pairs_vs_{prefix}",
        f"gain_r2_vs_{prefix}",
        f"gain_mae_vs_{prefix}",
        f"p_mae_paired_t_vs_{prefix}",
        f"p_mae_paired_t_vs_{prefix}_holm",
    )


FOUNDATION_COLUMNS: tuple[str, ...] = (
    *FOUNDATION_KEYS,
    "pretraining_saw_test_structures",
    *_STATS,
    *stats.GAIN_COLUMNS,
    "scratch_r2_std",
    "scratch_mae_std",
    "best_pairwise_source",
    "best_pairwise_pt_size",
    *_versus("pairwise"),
    "best_mpt",
    "best_mpt_strategy",
    *_versus("mpt"),
)


def is_foundation_run(runs: pd.DataFrame) -> pd.Series:
    """Fine-tunes of a shipped foundation model (``pt_dataset`` in FOUNDATION_SOURCES)."""
    if runs.empty:
        return pd.Series(False, index=runs.index, dtype=bool)
    return (runs["kind"] == "finetune") & runs["pt_dataset"].isin(list(FOUNDATION_SOURCES))


def without_foundation_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Every run but the foundation family's: what the other tables read."""
    return runs[~is_foundation_run(runs)]


def foundation_name(run_id: object, pt_dataset: object) -> str:
    """``chgnet-0.3.0`` from a run id ``foundation/chgnet-0.3.0/…``, else the PT source."""
    match = re.match(r"foundation/([^/]+)/", str(run_id))
    return match.group(1) if match else str(pt_dataset)


def foundation_table(runs: pd.DataFrame, defaults: StudyDefaults) -> pd.DataFrame:
    """foundation.csv from run records (the foundation runs and the study's own)."""
    columns = list(FOUNDATION_COLUMNS)
    mine = runs[is_foundation_run(runs)]
    if mine.empty:
        return pd.DataFrame(columns=columns)
    mine = mine.assign(
        foundation=[
            foundation_name(r, p) for r, p in zip(mine["run_id"], mine["pt_dataset"], strict=True)
        ]
    )
    study = without_foundation_runs(runs)
    models = sorted(map(str, study["model"].dropna().unique())) or sorted(
        map(str, mine["model"].unique())
    )
    scratch = scratch_runs(study, defaults)
    pairwise = _pairwise_candidates(study, defaults)
    mpt = of_kind(study, "mpt_finetune")
    rows = []
    for model in models:
        # the foundation runs under the study model's name: trial twins of its runs
        tl = mine.assign(model=model)
        for key, group in tl.groupby(list(FOUNDATION_KEYS[1:]), sort=True):
            row = {"model": model, **dict(zip(FOUNDATION_KEYS[1:], key, strict=True))}
            row["pretraining_saw_test_structures"] = defaults.in_mptrj.get(row["dataset"], pd.NA)
            row.update(_describe(group))
            cell = (model, row["dataset"], row["size"])
            row.update(_vs_scratch(group, _cell(scratch, *cell)))
            row.update(_vs_best(group, _cell(pairwise, *cell), ["pt_dataset"], "pairwise"))
            row.update(_vs_best(group, _cell(mpt, *cell), ["pt_dataset", "strategy"], "mpt"))
            rows.append(row)
    table = pd.DataFrame(rows)
    for metric in ("mae", "r2"):
        table[f"p_{metric}_paired_t_holm"] = stats.adjust_p_values(table[f"p_{metric}_paired_t"])
    for prefix in ("pairwise", "mpt"):
        p = table.get(f"p_mae_paired_t_vs_{prefix}", pd.Series(float("nan"), index=table.index))
        table[f"p_mae_paired_t_vs_{prefix}_holm"] = stats.adjust_p_values(p)
    table["negative_transfer"] = stats.negative_transfer(
        table["gain_mae"], table["p_mae_paired_t_holm"]
    )
    table["n_pairs"] = pd.to_numeric(table["n_pairs"]).fillna(0).astype(int)
    return table.reindex(columns=columns)


def _cell(frame: pd.DataFrame, model: str, dataset: str, size: Any) -> pd.DataFrame:
    return frame[
        (frame["model"] == model) & (frame["dataset"] == dataset) & (frame["size"] == size)
    ]


def _describe(group: pd.DataFrame, prefix: str = "") -> dict[str, float]:
    out = {f"{prefix}n": len(group)}
    for short, column in (("r2", "test_r2"), ("mae", "test_mae")):
        described = stats.describe(group[column], short)
        out.update({f"{prefix}{k}": v for k, v in described.items()})
    return out


def _pairs(mine: pd.DataFrame, theirs: pd.DataFrame) -> pd.DataFrame:
    """Trial twins (same model name, target, FT size and trial), ``_ref`` for the reference."""
    twins = theirs.dropna(subset=["trial"])[[*PAIR_KEYS, "test_r2", "test_mae"]]
    return mine.dropna(subset=["trial"]).merge(twins, on=list(PAIR_KEYS), suffixes=("", "_ref"))


def _vs_scratch(mine: pd.DataFrame, scratch: pd.DataFrame) -> dict[str, Any]:
    """The gain over the study model's scratch cell, as :mod:`tlmat.report.tables` has it."""
    ref = _describe(scratch, "scratch_")
    r2, mae = mine["test_r2"].mean(), mine["test_mae"].mean()
    paired = _pairs(mine, scratch)
    d_r2 = stats.describe(paired["test_r2"] - paired["test_r2_ref"], "d")["d_ci95"]
    d_mae = stats.describe(paired["test_mae_ref"] - paired["test_mae"], "d")["d_ci95"]
    scratch_r2, scratch_mae = ref["scratch_r2_mean"], ref["scratch_mae_mean"]
    return {
        "scratch_n": len(scratch),
        "scratch_r2_mean": scratch_r2,
        "scratch_mae_mean": scratch_mae,
        "scratch_r2_std": ref["scratch_r2_std"],
        "scratch_mae_std": ref["scratch_mae_std"],
        "n_pairs": len(paired),
        "gain_r2": stats.relative_gain(r2, scratch_r2, lower_is_better=False),
        "gain_r2_ci95": d_r2 / abs(scratch_r2) * 100.0 if scratch_r2 else float("nan"),
        "gain_mae": stats.relative_gain(mae, scratch_mae, lower_is_better=True),
        "gain_mae_ci95": d_mae / scratch_mae * 100.0 if scratch_mae else float("nan"),
        "unstable_r2_gain": bool(stats.unstable_r2(scratch_r2)) if len(scratch) else False,
        "p_mae_paired_t": stats.paired_p_value(paired["test_mae"], paired["test_mae_ref"]),
        "p_r2_paired_t": stats.paired_p_value(paired["test_r2"], paired["test_r2_ref"]),
    }


def _pairwise_candidates(runs: pd.DataFrame, defaults: StudyDefaults) -> pd.DataFrame:
    """Pair-wise fine-tunes (default strategy and lr) at the largest PT size each source was
    fine-tuned from on each cell: the MPT table's "maxed-out" candidates."""
    ft = of_kind(runs, "finetune")
    ft = ft[(ft["strategy"] == defaults.strategy) & lr_is(ft, defaults.lr)]
    if ft.empty:
        return ft
    largest = ft.groupby(["model", "pt_dataset", "dataset", "size"], dropna=False)["pt_size"]
    return ft[ft["pt_size"] == largest.transform("max")]


def _vs_best(mine: pd.DataFrame, cell: pd.DataFrame, by: list[str], prefix: str) -> dict[str, Any]:
    """The reference of ``cell`` with the lowest mean validation loss (grouped ``by``), and
    the paired comparison with it (``_vs_<prefix>`` columns)."""
    if cell.empty or cell["best_val_loss"].isna().all():
        return {f"n_pairs_vs_{prefix}": 0}
    loss = cell.groupby(by)["best_val_loss"].mean()
    best = loss.idxmin()
    best = best if isinstance(best, tuple) else (best,)
    theirs = cell[(cell[by] == pd.Series(best, index=by)).all(axis=1)]
    paired = _pairs(mine, theirs)
    ref = _describe(theirs, f"best_{prefix}_")
    out: dict[str, Any] = {
        f"best_{prefix}_val_loss": float(loss.min()),
        **{k: v for k, v in ref.items() if not k.endswith("_ci95")},
        f"n_pairs_vs_{prefix}": len(paired),
        f"gain_r2_vs_{prefix}": stats.relative_gain(
            mine["test_r2"].mean(), ref[f"best_{prefix}_r2_mean"], lower_is_better=False
        ),
        f"gain_mae_vs_{prefix}": stats.relative_gain(
            mine["test_mae"].mean(), ref[f"best_{prefix}_mae_mean"], lower_is_better=True
        ),
        f"p_mae_paired_t_vs_{prefix}": stats.paired_p_value(
            paired["test_mae"], paired["test_mae_ref"]
        ),
    }
    if prefix == "pairwise":
        out["best_pairwise_source"] = best[0]
        out["best_pairwise_pt_size"] = theirs["pt_size"].iloc[0]
    else:
        out["best_mpt"], out["best_mpt_strategy"] = best
    return out


def in_mptrj(datasets: Mapping[str, Mapping]) -> dict[str, bool]:
    """``datasets.<key>.in_mptrj`` of the registry entries that say it."""
    return {k: bool(e["in_mptrj"]) for k, e in datasets.items() if "in_mptrj" in e}


# ----------------------------------------------------------------------------- summary.md


def _fmt(value: Any, spec: str = "+.1f") -> str:
    return "—" if value is None or pd.isna(value) else format(value, spec)


def _seen(value: Any) -> str:
    return "unknown" if value is None or pd.isna(value) else ("yes" if value else "no")


def summary_lines(table: pd.DataFrame) -> list[str]:
    """The foundation section of ``summary.md``: mean MAE gains of the fine-tuned CHGNet
    over the study model's scratch, best pair-wise and best MPT cells, split by whether its
    pre-training saw the targets' test structures, with that caveat stated."""
    lines = ["## Foundation model: the fine-tuned pre-trained CHGNet beside the study model", ""]
    if table.empty:
        return [*lines, "_No runs in this family._", ""]
    lines += [
        "Each row compares two models on purpose: the shipped CHGNet fine-tuned on the target "
        "(`foundation`) against the study model's (`model`) scratch runs, best pair-wise "
        "source and best MPT model of the same cell (both chosen by validation loss), paired "
        f"per trial; significance: {stats.TEST_NAME} on MAE, {stats.ADJUSTMENT_NAME} within "
        "foundation.csv.",
        "",
        "**Overlap.** CHGNet was pre-trained on MPtrj, built from Materials Project "
        "relaxations. For targets drawn from the Materials Project (`seen in pre-training`: "
        "yes; `datasets.<key>.in_mptrj`), the test crystals were in its pre-training (set per "
        "data set, not checked crystal by crystal), and for formation energy nearly their "
        "labels too: its numbers there measure a model that saw the test structures, not "
        "transfer to unseen crystals. Only rows with `no` are a clean comparison.",
        "",
    ]
    header = [
        "model",
        "foundation",
        "strategy",
        "seen in pre-training",
        "cells",
        "MAE gain vs scratch (%)",
        "vs best pair-wise (%)",
        "vs best MPT (%)",
        "better than scratch (MAE)",
        "significantly better (Holm)",
    ]
    rows = []
    seen = table["pretraining_saw_test_structures"].map(_seen)
    keys = [table["model"], table["foundation"], table["strategy"], seen]
    for (model, name, strategy, saw), group in table.groupby(keys, sort=True):
        gain = group["gain_mae"].astype(float)
        better = stats.significant_improvement(gain, group["p_mae_paired_t_holm"])
        rows.append(
            [
                str(model),
                str(name),
                str(strategy),
                saw,
                str(len(group)),
                _fmt(gain.mean()),
                _fmt(group["gain_mae_vs_pairwise"].astype(float).mean()),
                _fmt(group["gain_mae_vs_mpt"].astype(float).mean()),
                f"{int((gain > 0).sum())}/{int(gain.notna().sum())}",
                f"{int(better.sum())}/{int(group['p_mae_paired_t_holm'].notna().sum())}",
            ]
        )
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]
