"""The study plan without Snakemake: runs per family, inputs, groups, checks, and the
documents (job-count table, SLURM profile) that must agree with it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tlmat.config import load_config
from tlmat.plan import Layout, build_plan, count_table

ROOT = Path(__file__).parents[1]
OFFLINE = ["data_dir=/nonexistent-offline-dir"]  # no JARVIS 2D frame: the OOD target skipped


def _config(*files: str, overrides: tuple[str, ...] = ()) -> dict:
    return load_config([ROOT / f for f in files], [*overrides])


def test_full_study_runs_per_family():
    plan = build_plan(_config("config.yaml"))
    counts = {family: (asked, new) for family, asked, new in plan.counts()}
    # 8 targets (7 + JARVIS 2D) x 5 FT sizes x 5 trials
    assert counts["scratch"] == (200, 200)
    # 7 PT models at 941 + 7 x 7 targets x 5 sizes x 5 trials
    assert counts["pairwise"] == (7 + 1225, 7 + 1225)
    # FE/BG at 5 PT sizes (941 shared with the grid) x 6 targets at FT 800 x 5 trials
    assert counts["pt_size_sweep"] == (10 + 300, 10 + 300)
    assert counts["strategies"] == (3 + 500, 400)  # 3 sources; the `full` runs are the grid's
    # 4 pairs x freeze_before:1..7 x 5 sizes x 5 trials; the PT models are the grid's
    assert counts["unfrozen_layers"] == (3 + 700, 700)
    # 5 pairs x 3 strategies x 4 rates at FT 500 x 5 trials; `full` at 1e-3 is the grid's and
    # `new_head_freeze` at 1e-3 on the 4 strategy pairs the strategy study's
    assert counts["learning_rate"] == (4 + 300, 300 - 25 - 20)
    # 4 pairs x random/stratified at FT 500, lr 1e-4 x 5 trials; random is the lr study's
    assert counts["sampling"] == (3 + 40, 20)
    # 8 models; X only from without_X, JARVIS 2D only from all: 8 targets x 5 sizes x 5 trials
    assert counts["mpt"] == (8 + 200, 8 + 200)
    # 3 stage runs x 5 trials, + FE:941 -> EBG:800 straight (the grid's), beside the chain;
    # the FE and BG PT models are the sweep's
    assert counts["chains"] == (2 + 15 + 5, 15)
    # the shipped CHGNet on 8 targets x 5 sizes x 2 strategies x 5 trials (no PT run)
    assert counts["foundation"] == (400, 400)
    kinds = {kind: len(plan.of_kind(kind)) for kind in ("pretrain", "finetune", "chain")}
    finetunes = 1225 + 300 + 400 + 700 + 255 + 20 + 400
    assert kinds == {"pretrain": 17, "finetune": finetunes, "chain": 15}


def test_quick_study_runs_per_family():
    plan = build_plan(_config("config.yaml", "presets/quick.yaml", overrides=OFFLINE))
    assert plan.notes == [
        "OOD target jarvis2d skipped: /nonexistent-offline-dir/jarvis2d.json.gz not found"
    ]
    counts = {family: new for family, _, new in plan.counts()}
    assert counts == {
        "scratch": 16,  # 7 data sets + mine (the user-target example, target-only) x 2 sizes
        "pairwise": 7 + 84 + 14,  # the 7 x 6 grid, + every source -> mine, at FT 100 and 500
        "pt_size_sweep": 2 + 12,
        "strategies": 16,  # 4 pairs x the paper's 5 strategies, `full` the grid's
        "unfrozen_layers": 3,  # BG -> DC at FT 100, freeze_before:1, 4, 7
        "learning_rate": 8,  # 2 pairs x 3 rates x 2 strategies, 1e-3 the grid's and strategies'
        "sampling": 1,  # BG -> DC at FT 100, stratified; the random run is the grid's
        "mpt": 2 + 2 + 2,  # without_dc -> dc, without_ebg -> ebg, all -> mine (target-only)
        "chains": 3,
        "foundation": 2 * 3,  # dc, ph, mine x full, new_head_freeze at FT 100
    }
    assert len(plan.runs) == sum(counts.values()) == 178


def test_runs_know_their_inputs_and_groups(tmp_path):
    config = _config(
        "config.yaml", "presets/quick.yaml", overrides=(*OFFLINE, f"resources_dir={tmp_path}")
    )
    plan = build_plan(config)
    layout = Layout.from_config(config)
    ft = plan["ft/pt-bg-941/ft-dc-100/full-lr0.001/t1"]
    assert (ft.kind, ft.dataset, ft.size, ft.strategy, ft.lr) == (
        "finetune",
        "dc",
        100,
        "full",
        0.001,
    )
    assert ft.group == plan[ft.checkpoint].group == "pt.bg-941-t1"
    inputs = plan.inputs(ft.id)
    assert inputs["checkpoint"] == str(layout.runs / "pt/bg-941/t1/model.pt")
    assert inputs["graphs"] == [str(layout.graphs("dc"))] and "overlap" not in inputs
    # as in the paper, PT keeps other sets' test crystals; the clean preset excludes them
    assert "overlap" not in plan.inputs("pt/bg-941/t1")
    clean = build_plan(_config("config.yaml", "presets/quick.yaml", "presets/clean.yaml"))
    assert "overlap" in clean.inputs("pt/bg-941/t1")
    mpt = plan["mpt/without_dc-300/pt/t1"]
    assert "dc" not in mpt.sources and len(plan.inputs(mpt.id)["graphs"]) == 6
    # a leave-one-out model has no head for the left-out target: full -> new_head
    assert "mpt/without_dc-300/ft-dc-100/new_head-lr0.001/t1" in plan.runs
    # never fine-tuned on a target whose labels it pre-trained on, nor on another's target
    mpt_fts = [run for run in plan.runs.values() if run.kind == "mpt_finetune"]
    assert all(run.dataset not in plan[run.checkpoint].sources for run in mpt_fts)
    assert {(plan[r.checkpoint].variant, r.dataset) for r in mpt_fts} == {
        ("without_dc", "dc"),
        ("without_ebg", "ebg"),
        ("all", "mine"),
    }
    stage3 = plan["chain/fe-941.bg-2000.ebg-100/t1"]
    assert (
        stage3.checkpoint == "chain/fe-941.bg-2000/t1"
        and plan[stage3.checkpoint].checkpoint == "pt/fe-941/t1"
    )
    assert "scratch/ebg-100/t1" in plan.runs and "scratch/bg-2000/t1" not in plan.runs
    # a stage feeding another is pre-training for it; the final stage is not
    assert plan["chain/fe-941.bg-2000/t1"].intermediate and not stage3.intermediate
    assert "ft/pt-fe-941/ft-ebg-100/full-lr0.001/t1" in plan.requested["chains"]  # one-stage
    clean = build_plan({**config, "exclude_test_overlap": True})
    assert "overlap" in clean.inputs("chain/fe-941.bg-2000/t1")
    assert "overlap" not in clean.inputs(stage3.id)
    with pytest.raises(KeyError, match="not part of the study"):
        plan["ft/nope/t1"]


def test_prepared_files_are_named_by_what_they_depend_on(tmp_path):
    base = _config("config.yaml", overrides=(f"resources_dir={tmp_path}", "data_dir=A"))
    other = _config("config.yaml", overrides=(f"resources_dir={tmp_path}", "data_dir=B"))
    a, b = Layout.from_config(base), Layout.from_config(other)
    assert a.frame("fe") != b.frame("fe") and a.graphs("fe") != b.graphs("fe")
    assert (
        a.frame("fe").name.startswith("fe-") and Layout.dataset_of(a.frame("fe").name[:-8]) == "fe"
    )
    assert a.overlap(["fe", "bg"]) != b.overlap(["fe", "bg"])
    model = _config(
        "config.yaml", overrides=(f"resources_dir={tmp_path}", "data_dir=A", "model.hidden=64")
    )
    assert Layout.from_config(model).frame("fe") == a.frame("fe")  # the model is not data


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("study.datasets=[fe, zz]", r"study.datasets names data set\(s\) \['zz'\] missing"),
        (
            "study.strategies.pairs=[[fe, fe]]",
            r"study.strategies.pairs has \['fe', 'fe'\]: source == target",
        ),
        ("study.learning_rate.pairs=[[jarvis2d, fe]]", "uses target-only data set"),
        ("study.pt_size_sweep.sources=[jarvis2d]", "uses target-only data set"),
        ("study.mpt.variants=[without_zz]", "unknown variant 'without_zz'"),
        (
            "study.chains=[{stages: ['ext:foo', 'fe:100']}]",
            "ext:foo names no entry of external_checkpoints",
        ),
        ("study.chains=[{stages: ['fe:941', 'ext:foo']}]", "only the first stage may be ext"),
        (
            "study.chains=[{stages: ['fe:941', 'bg:100']}, "
            "{stages: ['fe:941', 'bg:100'], strategy: last_layer}]",
            "shared with another chain that uses another strategy",
        ),
        ("study.ood_targets=[fe]", "must be marked target_only: true"),
        (
            "study.unfrozen_layers.pairs=[[jarvis2d, fe]]",
            r"study.unfrozen_layers.pairs uses target-only data set",
        ),
        ("model.arch=cgcnn", "study.strategies.names has unfreeze_3body, but a cgcnn model"),
    ],
)
def test_config_errors_are_one_line(override, message):
    config = _config("config.yaml", overrides=(override,))
    with pytest.raises(ValueError, match=message) as err:
        build_plan(config)
    assert "\n" not in str(err.value)


def test_unfrozen_layers_run_ids_fit_the_finetune_rule():
    plan = build_plan(_config("config.yaml", "presets/quick.yaml", overrides=OFFLINE))
    runs = [plan[i] for i in plan.requested["unfrozen_layers"] if i.startswith("ft/")]
    assert [r.strategy for r in runs] == ["freeze_before:1", "freeze_before:4", "freeze_before:7"]
    assert [r.id for r in runs][1] == "ft/pt-bg-941/ft-dc-100/freeze_before4-lr0.001/t1"
    rule = (ROOT / "workflow" / "rules" / "train.smk").read_text()
    pattern = re.search(r'rule finetune:.*?run=r"([^"]+)"', rule, re.S).group(1)
    assert all(re.fullmatch(pattern, r.id) and ":" not in r.id for r in runs)


def _marked_table(text: str, name: str) -> str:
    match = re.search(rf"<!-- plan: {re.escape(name)} -->\n(.*?)\n<!-- /plan -->", text, re.S)
    assert match, f"docs/workflow.md has no <!-- plan: {name} --> table"
    return match.group(1).strip()


@pytest.mark.parametrize(
    ("name", "files", "overrides"),
    [
        ("config.yaml", ["config.yaml"], ()),
        ("presets/quick.yaml", ["config.yaml", "presets/quick.yaml"], ()),
    ],
)
def test_docs_job_counts_are_generated_from_the_plan(name, files, overrides):
    """docs/workflow.md shows `python -m tlmat.plan <files>` verbatim."""
    expected = count_table(build_plan(_config(*files, overrides=overrides)))
    assert _marked_table((ROOT / "docs" / "workflow.md").read_text(), name) == expected


def test_slurm_profile_names_real_rules_and_groups():
    profile = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    rules = set()
    for path in (ROOT / "workflow" / "rules").glob("*.smk"):
        rules |= set(re.findall(r"^rule (\w+):", path.read_text(), re.M))
    assert set(profile["set-threads"]) <= rules
    assert set(profile["set-resources"]) <= rules
    plan = build_plan(_config("config.yaml"))
    groups = {run.group for run in plan.runs.values() if run.group}
    named = {str(entry).split("=")[0] for entry in profile.get("group-components", [])}
    assert named <= groups, f"profile groups {sorted(named - groups)} are never assigned"
    # every group is one PT model and fine-tunes of that model: one connected component
    for group in groups:
        members = [run for run in plan.runs.values() if run.group == group]
        pts = [run for run in members if run.kind == "pretrain"]
        assert len(pts) == 1 and re.fullmatch(r"pt\.[a-z0-9_]+-\d+-t\d+", group)
        assert all(run.checkpoint == pts[0].id for run in members if run is not pts[0])


def test_mpt_pretrains_on_every_structure_by_default():
    plan = build_plan(_config("config.yaml"))
    model = plan["mpt/without_dc-all/pt/t1"]  # study.mpt.pt_size: null, as the paper
    assert model.size >= 10**9 and "dc" not in model.sources  # capped at each source's pool
    assert plan["mpt/without_dc-all/ft-dc-800/new_head-lr0.001/t1"].checkpoint == model.id
