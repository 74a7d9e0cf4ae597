"""The foundation family: the shipped pre-trained CHGNet fine-tuned on every target, planned
beside the study model (run ids, sizes, strategies, its graphs and rule) and set beside it in
foundation.csv (hand-computed numbers), with the pre-training overlap stated per target."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
import pytest

from tlmat.config import load_config
from tlmat.plan import Layout, build_plan, count_table, foundation_overrides, ood_targets
from tlmat.report import foundation
from tlmat.report.runs import StudyDefaults

ROOT = Path(__file__).parents[1]
FT_ID = "foundation/chgnet-0.3.0/ft-{ds}-{size}/{strategy}-lr0.001/t{trial}"


def _config(*files: str, overrides: tuple[str, ...] = ()) -> dict:
    return load_config([ROOT / f for f in files], [*overrides])


# ----------------------------------------------------------------------------- plan


def test_the_family_fine_tunes_chgnet_on_every_target_size_strategy_and_trial():
    config = _config("config.yaml")
    plan = build_plan(config)
    ids = plan.requested["foundation"]
    targets = [*config["study"]["datasets"], *ood_targets(config)]
    assert "jarvis2d" in targets  # the OOD target too
    expected = {
        FT_ID.format(ds=ds, size=size, strategy=strategy, trial=t)
        for ds in targets
        for size in (10, 100, 200, 500, 800)
        for strategy in ("full", "new_head_freeze")
        for t in range(1, 6)
    }
    assert set(ids) == expected and len(ids) == 8 * 5 * 2 * 5
    counts = {family: (asked, new) for family, asked, new in plan.counts()}
    assert counts["foundation"] == (400, 400)  # no run shared with another family
    run = plan[FT_ID.format(ds="ph", size=100, strategy="new_head_freeze", trial=3)]
    assert (run.kind, run.dataset, run.size, run.trial) == ("finetune", "ph", 100, 3)
    assert (run.strategy, run.lr, run.arch, run.checkpoint) == (
        "new_head_freeze",
        1e-3,
        "chgnet",
        None,
    )
    # every (target, FT size) it fine-tunes has the study model's scratch runs to compare with
    scratch = set(plan.requested["scratch"])
    assert all(f"scratch/{plan[i].dataset}-{plan[i].size}/t{plan[i].trial}" in scratch for i in ids)


def test_its_runs_read_chgnet_graphs_and_start_from_no_checkpoint(tmp_path):
    config = _config("config.yaml", overrides=(f"resources_dir={tmp_path}",))
    plan = build_plan(config)
    layout = plan.layout
    inputs = plan.inputs(FT_ID.format(ds="dc", size=800, strategy="full", trial=1))
    key = layout.arch_graph_keys["chgnet"]
    assert key.startswith("chgnet-") and key != layout.graph_key
    assert inputs == {
        "graphs": [str(tmp_path / "graphs" / key / f"{layout.name('dc')}.pt")],
        "splits": [str(layout.splits("dc"))],
    }
    # the study's own runs keep the study model's graphs
    assert plan.inputs("scratch/dc-800/t1")["graphs"] == [str(layout.graphs("dc"))]
    # the --set overrides give a config whose own layout puts graphs there (what featurize and
    # the runs compute), and CHGNet's graph settings the same key
    assert foundation_overrides(config) == ["model.arch=chgnet", "model.chgnet_version=0.3.0"]
    chgnet = _config(
        "config.yaml", overrides=(f"resources_dir={tmp_path}", *foundation_overrides(config))
    )
    assert Layout.from_config(chgnet).graph_key == key
    cg = pytest.importorskip("tlmat.models.chgnet_graphs")
    assert key == "chgnet-" + cg.CHGNetGraphSettings().cache_key()


def test_the_family_is_off_unless_asked_for_and_counts_its_graphs():
    off = build_plan(_config("config.yaml", overrides=("study.families.foundation=false",)))
    assert "foundation" not in off.requested
    assert not any(run_id.startswith("foundation/") for run_id in off.runs)
    assert "chgnet graphs" not in count_table(off)
    assert load_config([], [])["study"]["families"]["foundation"] is False  # schema default
    on = build_plan(_config("config.yaml"))
    assert "| featurize (chgnet graphs) | 8 | 8 |" in count_table(on)
    assert len(on.runs) == len(off.runs) + 400


def test_targets_sizes_and_strategies_can_be_narrowed():
    plan = build_plan(
        _config(
            "config.yaml",
            overrides=(
                "study.foundation.targets=[fe, dc]",
                "study.foundation.ft_sizes=[100]",
                "study.foundation.strategies=[last_layer]",
                "study.foundation.chgnet_version=r2scan",
            ),
        )
    )
    assert sorted(plan.requested["foundation"]) == [
        f"foundation/chgnet-r2scan/ft-{ds}-100/last_layer-lr0.001/t{t}"
        for ds in ("dc", "fe")
        for t in range(1, 6)
    ]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("study.foundation.targets=[nope]", "study.foundation.targets names data set"),
        ("study.foundation.chgnet_version=9.9", "chgnet_version"),
        ("study.foundation.strategies=[all]", "strategies"),
    ],
)
def test_bad_foundation_settings_are_one_line(override, message):
    with pytest.raises(ValueError, match=message) as err:
        build_plan(_config("config.yaml", overrides=(override,)))
    assert "\n" not in str(err.value)


def test_in_mptrj_renames_no_prepared_data():
    """The overlap flag is for the report: it never re-prepares (or re-runs) a data set."""
    with_flag = Layout.from_config(_config("config.yaml"))
    flipped = Layout.from_config(_config("config.yaml", overrides=("datasets.fe.in_mptrj=false",)))
    assert with_flag.data_keys == flipped.data_keys


def test_run_ids_fit_the_foundation_rule_and_no_other():
    plan = build_plan(_config("config.yaml", "presets/quick.yaml"))
    ids = plan.requested["foundation"]
    rules = (ROOT / "workflow" / "rules" / "train.smk").read_text()
    patterns = dict(re.findall(r'rule (\w+):.*?run=r"([^"]+)"', rules, re.S))
    for run_id in ids:
        assert [r for r, p in patterns.items() if re.fullmatch(p, run_id)] == ["foundation"]
    # the quick preset: FT 100 only, both strategies, its three small targets, one trial
    targets = {plan[i].dataset for i in ids}
    assert {plan[i].size for i in ids} == {100} and len(ids) == 2 * len(targets)
    assert targets == {"dc", "ph", "mine"}


# ----------------------------------------------------------------------------- foundation.csv


def _run(run_id, kind, trial, r2, mae, model="alignn", **extra) -> dict:
    record = {
        "run_id": run_id,
        "kind": kind,
        "model": model,
        "dataset": "dc",
        "size": 100,
        "trial": trial,
        "pt_dataset": None,
        "pt_size": None,
        "strategy": None,
        "lr": 1e-3,
        "test_r2": r2,
        "test_mae": mae,
        "best_val_loss": 0.5,
        "sampling": "random",
        "family": None,
    }
    return record | extra


def _chgnet(trial, r2, mae, strategy="full", dataset="dc"):
    run_id = FT_ID.format(ds=dataset, size=100, strategy=strategy, trial=trial)
    return _run(
        run_id,
        "finetune",
        trial,
        r2,
        mae,
        model="chgnet",
        pt_dataset="chgnet",
        strategy=strategy,
        dataset=dataset,
    )


def _ft(src, trial, r2, mae, val):
    run_id = f"ft/pt-{src}-941/ft-dc-100/full-lr0.001/t{trial}"
    extra = {"pt_dataset": src, "pt_size": 941, "strategy": "full", "best_val_loss": val}
    return _run(run_id, "finetune", trial, r2, mae, **extra)


def _mpt(variant, trial, r2, mae, val):
    run_id = f"mpt/{variant}-all/ft-dc-100/new_head-lr0.001/t{trial}"
    extra = {"pt_dataset": f"mpt_{variant}", "strategy": "new_head", "best_val_loss": val}
    return _run(run_id, "mpt_finetune", trial, r2, mae, **extra)


RUNS = pd.DataFrame(
    [
        _run("scratch/dc-100/t1", "scratch", 1, 0.2, 1.0),
        _run("scratch/dc-100/t2", "scratch", 2, 0.4, 1.2),
        # bg has the better test scores, fe the lower validation loss: fe is the reference
        _ft("bg", 1, 0.9, 0.5, val=0.5),
        _ft("bg", 2, 0.95, 0.4, val=0.5),
        _ft("fe", 1, 0.5, 0.8, val=0.2),
        _ft("fe", 2, 0.6, 0.9, val=0.2),
        # likewise mpt_all (validation 0.1) over mpt_without_dc
        _mpt("without_dc", 1, 0.7, 0.6, val=0.3),
        _mpt("without_dc", 2, 0.8, 0.7, val=0.3),
        _mpt("all", 1, 0.1, 1.5, val=0.1),
        _mpt("all", 2, 0.2, 1.4, val=0.1),
        _chgnet(1, 0.8, 0.6),
        _chgnet(2, 0.9, 0.4),
        _chgnet(1, 0.3, 1.1, strategy="new_head_freeze"),
        _chgnet(2, 0.3, 1.4, strategy="new_head_freeze"),
        _chgnet(1, 0.5, 0.7, dataset="zz"),  # no in_mptrj entry, no reference runs
    ]
)
DEFAULTS = StudyDefaults(pt_size=941, lr=1e-3, in_mptrj={"dc": True})
# two-sided p of a paired t-test over 2 trials (df = 1, Cauchy): 1 - 2/pi atan(|t|)
P_DF1 = lambda t: 1 - 2 / math.pi * math.atan(abs(t))  # noqa: E731


def test_foundation_csv_sets_chgnet_beside_scratch_best_pairwise_and_best_mpt():
    table = foundation.foundation_table(RUNS, DEFAULTS)
    assert list(table.columns) == list(foundation.FOUNDATION_COLUMNS)
    assert list(zip(table["dataset"], table["strategy"], strict=True)) == [
        ("dc", "full"),
        ("dc", "new_head_freeze"),
        ("zz", "full"),
    ]
    assert set(table["model"]) == {"alignn"} and set(table["foundation"]) == {"chgnet-0.3.0"}
    row = table.iloc[0]
    assert table["pretraining_saw_test_structures"].tolist()[:2] == [True, True]
    assert pd.isna(table.iloc[2]["pretraining_saw_test_structures"])  # unknown: not listed
    assert row["n"] == 2 and row["r2_mean"] == pytest.approx(0.85)
    assert row["mae_mean"] == pytest.approx(0.5)
    # vs scratch (means 0.3, 1.1), paired per trial: MAE differences -0.4, -0.8 -> t = -3
    assert row["scratch_r2_mean"] == pytest.approx(0.3) and row["n_pairs"] == 2
    assert row["gain_r2"] == pytest.approx((0.85 - 0.3) / 0.3 * 100)
    assert row["gain_mae"] == pytest.approx((1.1 - 0.5) / 1.1 * 100)
    assert row["p_mae_paired_t"] == pytest.approx(P_DF1(3.0))
    # the best pair-wise source by validation loss (fe), never by test scores (bg)
    assert row["best_pairwise_source"] == "fe" and row["best_pairwise_pt_size"] == 941
    assert row["best_pairwise_val_loss"] == pytest.approx(0.2)
    assert row["best_pairwise_mae_mean"] == pytest.approx(0.85)
    assert row["gain_mae_vs_pairwise"] == pytest.approx((0.85 - 0.5) / 0.85 * 100)
    # MAE differences vs fe: -0.2, -0.5 -> mean -0.35, sd 0.3 sqrt(1/2): t = -0.35 / 0.15
    assert row["p_mae_paired_t_vs_pairwise"] == pytest.approx(P_DF1(0.35 / 0.15))
    # the best MPT model likewise: mpt_all, whose test scores are the worst
    assert (row["best_mpt"], row["best_mpt_strategy"]) == ("mpt_all", "new_head")
    assert row["gain_mae_vs_mpt"] == pytest.approx((1.45 - 0.5) / 1.45 * 100)
    assert row["n_pairs_vs_mpt"] == 2
    # Holm over the table's two tested rows (the zz row has no scratch twin)
    p = sorted([row["p_mae_paired_t"], table.iloc[1]["p_mae_paired_t"]])
    assert sorted(table["p_mae_paired_t_holm"].dropna()) == pytest.approx(
        sorted([min(1.0, 2 * p[0]), max(min(1.0, 2 * p[0]), p[1])])
    )
    lonely = table.iloc[2]
    assert lonely["n_pairs"] == 0 and pd.isna(lonely["best_pairwise_source"])


def test_foundation_runs_stay_out_of_every_other_table():
    from tlmat.report.tables import build_tables

    tables = build_tables(RUNS, DEFAULTS)
    assert len(tables["runs"]) == len(RUNS) and len(tables["foundation"]) == 3
    for name, table in tables.items():
        # runs and environment list every run; the recommendation weighs every option
        if name in ("runs", "foundation", "environment", "recommendation"):
            continue
        if "model" not in table.columns:
            continue
        assert "chgnet" not in set(table["model"].astype(str)), name
    assert set(tables["pairwise_grid"]["pt_dataset"]) == {"bg", "fe"}


def test_summary_states_the_overlap_beside_the_results():
    from tlmat.report.summary import summary_markdown

    table = foundation.foundation_table(RUNS, DEFAULTS)
    text = summary_markdown({"foundation": table})
    section = text.split("## Foundation model")[1].split("\n## ")[0]
    assert "MPtrj" in section and "test crystals were in its pre-training" in section
    assert "| alignn | chgnet-0.3.0 | full | yes | 1 | +54.5 | +41.2 | +65.5 |" in section
    assert "| alignn | chgnet-0.3.0 | full | unknown | 1 |" in section


def test_config_says_which_targets_chgnet_saw():
    datasets = _config("config.yaml")["datasets"]
    saw = foundation.in_mptrj(datasets)
    assert saw == {
        k: k != "jarvis2d" for k in ("pz", "dc", "ph", "ebg", "gv", "bg", "fe", "jarvis2d")
    }


def test_the_figure_is_drawn_from_the_table(tmp_path):
    pytest.importorskip("matplotlib")
    from tlmat.report.fig_foundation import foundation_bars, plot_foundation

    table = foundation.foundation_table(RUNS, DEFAULTS)
    bars = foundation_bars(table)
    dc = bars[bars["dataset"] == "dc"].set_index("source")["r2"]
    assert dc.to_dict() == pytest.approx(
        {
            "scratch": 0.3,
            "best pair-wise": 0.55,
            "best MPT": 0.15,
            "chgnet-0.3.0 (full)": 0.85,
            "chgnet-0.3.0 (new_head_freeze)": 0.3,
        }
    )
    written = plot_foundation(table, {}, tmp_path, "foundation_alignn")
    assert {p.name for p in written} == {"foundation_alignn.png", "foundation_alignn.pdf"}


# ----------------------------------------------------------------------------- CHGNet graphs


def test_atoms_without_neighbours_keep_their_structure_and_are_logged(caplog):
    """Every structure stays (test sets whole, trials paired with the study model's), the
    ones with atoms CHGNet sees without bonds are logged; a crystal without any bond is an
    error naming it."""
    pytest.importorskip("chgnet", reason="model.arch chgnet needs the chgnet package")
    import torch
    from pymatgen.core import Lattice, Structure
    from torch_geometric.data import Batch

    from tlmat.models import chgnet_graphs as cg
    from tlmat.models.chgnet import pretrained_chgnet_model

    box = Lattice.cubic(30.0)
    sites = [[0, 0, 0], [2.8, 0, 0], [15, 15, 15]]
    slab = Structure(box, ["Na", "Cl", "Na"], sites, coords_are_cartesian=True)
    pair = Structure(box, ["Na", "Cl"], [[0, 0, 0], [2.8, 0, 0]], coords_are_cartesian=True)
    settings = cg.CHGNetGraphSettings()
    with caplog.at_level("WARNING"):
        cache = cg.featurize_chgnet([slab, pair], [7, 8], [0.0, 1.0], settings, False)
    assert list(cache.ids) == [7, 8]
    assert "1 structure(s) with atoms that have no neighbour within 6 Å" in caplog.text
    model = pretrained_chgnet_model(heads=("x",)).eval()
    with torch.inference_mode():
        out = model(Batch.from_data_list(cache.graphs([7, 8])))["x"]
    assert out.shape == (2,) and torch.isfinite(out).all()
    gas = Structure(box, ["Na", "Cl"], [[0, 0, 0], [15, 15, 15]], coords_are_cartesian=True)
    with pytest.raises(ValueError, match="structure 9: no two atoms within"):
        cg.featurize_chgnet([gas], [9], [0.0], settings, False)
