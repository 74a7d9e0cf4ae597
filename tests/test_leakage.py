"""Leakage control: the same crystal is found across data sets (not by id) and kept out of PT."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import make_frame, synthetic_target
from helpers import tiny_config
from pymatgen.core import Lattice, Structure

from tlmat.data import make_splits, read_frame, write_frame
from tlmat.leakage import (
    crystal_labels,
    dedupe_prepared,
    find_overlap,
    leakage_table,
    load_overlap,
    structure_matcher,
    vacuum_axis,
)
from tlmat.runs import (
    RunSpec,
    ensure_inputs,
    execute_run,
    prepare_dataset,
    pretrain_pool_exclusions,
    pretrain_subset_ids,
)


def _rocksalt() -> Structure:
    return Structure.from_spacegroup(
        "Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]
    )


def _cscl_type() -> Structure:
    """NaCl in the CsCl (B2) structure: same composition, different crystal."""
    return Structure(Lattice.cubic(3.3), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def _copy(structure: Structure) -> Structure:
    """The same crystal written differently: a 2x1x1 supercell, translated, strained 1 %."""
    copy = structure.copy()
    copy.make_supercell([2, 1, 1])
    copy.translate_sites(list(range(len(copy))), [0.13, 0.07, 0.02])
    copy.scale_lattice(copy.volume * 1.01)
    return copy


def test_supercell_translated_copy_matches_but_polymorph_does_not():
    labels = crystal_labels([_rocksalt(), _cscl_type(), _copy(_rocksalt()), _copy(_cscl_type())])
    assert labels.tolist() == [0, 1, 0, 1]


def _entry(frame: pd.DataFrame, structure: Structure, new_id: int) -> pd.DataFrame:
    row = pd.DataFrame(
        {"structure": [structure], "target": [synthetic_target(structure)]}, index=[new_id]
    )
    return pd.concat([frame, row])


def _two_datasets(tmp_path):
    """aa and bb; aa's test entry 3 sits (as a supercell, id 1999) in bb's pool."""
    aa = make_frame(12, seed=10)
    bb = _entry(make_frame(12, seed=11, start_id=1000), _copy(aa.loc[3, "structure"]), 1999)
    data = tmp_path / "data"
    write_frame(aa, data / "aa.json.gz")
    write_frame(bb, data / "bb.json.gz")
    splits = {"aa": {"test": [3, 4]}, "bb": {"test": [1000, 1001]}}
    (data / "splits.json").write_text(json.dumps(splits))
    return tiny_config(
        tmp_path,
        ["aa", "bb"],
        f"splits_file={data / 'splits.json'}",
        f"results_dir={tmp_path / 'results'}",
        "study={datasets: [aa, bb], families: {pt_size_sweep: false, strategies: false, "
        "learning_rate: false}}",
    )


def test_guard_removes_a_test_structure_found_with_another_id_in_another_pool(tmp_path):
    config = _two_datasets(tmp_path)
    path = ensure_inputs(config, ["aa", "bb"], overlap=True).overlap
    overlap = load_overlap(path)
    assert overlap.excluded("bb") == {1999} and overlap.excluded("aa") == set()
    assert overlap.clusters == [[("aa", 3), ("bb", 1999)]]
    table = pd.read_csv(path.with_name("leakage.csv"))
    row = table.set_index(["pt_pool", "ft_test"]).loc[("bb", "aa")]
    assert (row["n_pool"], row["n_test"], row["n_overlap"]) == (11, 2, 1)
    assert row["fraction"] == pytest.approx(1 / 11)
    assert table["n_overlap"].sum() == 1 and len(table) == 2

    excluded = pretrain_pool_exclusions(config, "bb", path)
    pool = [i for i in range(1000, 1012) if i not in (1000, 1001)] + [1999]
    splits = {"dataset": "bb", "seed": 1, "test": [1000, 1001], "trials": {}}
    assert 1999 not in pretrain_subset_ids(splits, pool, 11, 1, excluded)
    published = {**splits, "trials": {"trial1": {"5": [1002, 1999, 1003, 1004, 1005]}}}
    assert pretrain_subset_ids(published, pool, 5, 1, excluded) == [1002, 1003, 1004, 1005]
    assert pretrain_pool_exclusions({**config, "exclude_test_overlap": False}, "bb", None) == set()

    spec = RunSpec("pt/bb", "bb", 11, 1, tmp_path / "pt", kind="pretrain", epochs=1)
    metrics = execute_run(config, spec, progress=False)
    assert metrics["n_excluded_overlap"] == 1 and metrics["n_train"] + metrics["n_val"] == 10


def test_counts_over_pairs_and_clusters_of_several_datasets():
    base = make_frame(6, seed=3)
    frames = {
        "a": base.iloc[:3],
        "b": _entry(make_frame(4, seed=4, start_id=100), _copy(base.iloc[0]["structure"]), 7),
        "c": _entry(make_frame(4, seed=5, start_id=200), base.iloc[0]["structure"], 8),
    }
    overlap = find_overlap(
        {"a": (frames["a"], [0]), "b": (frames["b"], [100]), "c": (frames["c"], [8])},
        progress=False,
    )
    # a0 (a's test) = b7 (b's pool) = c8 (c's test): b7 is excluded; a0 is a's test entry
    assert overlap.clusters == [[("a", 0), ("b", 7), ("c", 8)]]
    assert overlap.exclude == {"a": [], "b": [7], "c": []}
    table = leakage_table(overlap).set_index(["pt_pool", "ft_test"])
    assert table.loc[("b", "a"), "n_overlap"] == 1 and table.loc[("b", "c"), "n_overlap"] == 1
    assert table.loc[("a", "c"), "n_overlap"] == 0  # a0 is a's own test entry, not pool
    assert len(table) == 6


def test_duplicates_inside_a_dataset_collapse_to_the_published_test_member():
    frame = make_frame(6, seed=7)
    frame = _entry(frame, _copy(frame.loc[4, "structure"]), 2_000)  # twin of test entry 4
    frame = _entry(frame, _copy(frame.loc[1, "structure"]), 3_000)  # twin of pool entry 1
    published = {"test": [4, 5], "trials": {"trial1": {"3": [2_000, 3_000, 2]}}}
    kept, remapped, aliases = dedupe_prepared(frame, "x", published)
    assert aliases == {2_000: 4, 1: 3_000}
    # test entry 4 is kept over its twin; of 1 and 3000 the published subset's member is kept
    assert sorted(kept.index) == [0, 2, 3, 4, 5, 3_000]
    # the test entry's twin leaves the subset (it would train on a test crystal)
    assert remapped["trials"]["trial1"]["3"] == [3_000, 2]
    assert kept.loc[4, "target"] == frame.loc[4, "target"]
    splits = make_splits(kept.index, "x", 1, 0.2, remapped)
    assert splits["source"] == "published" and splits["test"] == [4, 5]


def test_lowest_id_kept_without_published_splits():
    frame = make_frame(3, seed=8, start_id=10)
    frame = _entry(frame, frame.loc[11, "structure"].copy(), 5)
    kept, published, aliases = dedupe_prepared(frame, "x", None)
    assert sorted(kept.index) == [5, 10, 12] and published is None and aliases == {11: 5}


def test_exact_and_crystal_duplicates_follow_one_policy_and_are_on_record(tmp_path):
    """A published test id whose exact twin has a lower id stays; the twin leaves the pool,
    and both duplicate steps' counts are written into the splits file."""
    frame = make_frame(12, seed=9, start_id=10)
    frame = _entry(frame, frame.loc[14, "structure"].copy(), 1)  # exact twin of test id 14
    frame = _entry(frame, _copy(frame.loc[15, "structure"]), 2)  # crystal twin of test id 15
    frame = _entry(frame, _copy(frame.loc[16, "structure"]), 3)  # crystal twin of pool id 16
    data = tmp_path / "data"
    write_frame(frame, data / "aa.json.gz")
    published = {"aa": {"test": [14, 15], "trials": {"trial1": {"4": [1, 2, 3, 17]}}}}
    (data / "splits.json").write_text(json.dumps(published))
    config = tiny_config(tmp_path, ["aa"], f"splits_file={data / 'splits.json'}")
    frame_path, splits_path = tmp_path / "aa.json.gz", tmp_path / "aa.json"
    prepare_dataset(config, "aa", frame_path, splits_path)
    splits = json.loads(splits_path.read_text())
    assert splits["source"] == "published" and splits["test"] == [14, 15]
    assert splits["n_duplicates_dropped"] == 3 and splits["n_test_twins_dropped"] == 2
    assert splits["trials"]["trial1"]["4"] == [3, 17]  # test twins left, 3 kept over 16
    assert sorted(read_frame(frame_path).index) == [3, 10, 11, 12, 13, 14, 15, *range(17, 22)]


def _mos2(c: float, a: float = 3.16, phase: str = "2H", shift: float = 0.0) -> Structure:
    """A MoS2 monolayer in a cell of height ``c`` (Å) along z: vacuum = c - 3.1 Å."""
    dz = 1.56 / c
    top, bottom = (
        ([2 / 3, 1 / 3], [2 / 3, 1 / 3]) if phase == "2H" else ([2 / 3, 1 / 3], [1 / 3, 2 / 3])
    )
    coords = [[0, 0, 0.5 + shift], [*top, 0.5 + dz + shift], [*bottom, 0.5 - dz + shift]]
    return Structure(Lattice.hexagonal(a, c), ["Mo", "S", "S"], coords)


def test_slabs_match_by_their_layer_whatever_the_vacuum_padding():
    """docs/data.md: slabs are rebuilt with a fixed vacuum and matched without volume
    scaling, so one layer in two cells is one crystal, and another layer of the same
    composition (1T instead of 2H, or a 7 % larger lattice) is not."""
    same = [_mos2(18), _mos2(28, shift=0.3), _mos2(18, a=3.18)]
    distinct = [_mos2(18, phase="1T"), _mos2(18, a=3.40)]
    assert all(vacuum_axis(s) is not None for s in same + distinct)
    assert vacuum_axis(_rocksalt()) is None
    assert crystal_labels(same + distinct, progress=False).tolist() == [0, 0, 0, 1, 2]
    # what volume scaling did: 2H = 1T, and the vacuum padding decided the match
    bulk = structure_matcher()
    assert bulk.fit(same[0], distinct[0]) and not bulk.fit(same[0], same[1])
    # a slab is never the same crystal as a bulk structure of its composition
    bulk_mos2 = _mos2(6.2)
    assert vacuum_axis(bulk_mos2) is None
    assert len(set(crystal_labels([same[0], bulk_mos2], progress=False).tolist())) == 2


def test_real_data_overlap_is_plausible(shared_data):
    """dc/pz (full data sets, published tests) and bg/fe share Materials Project crystals."""
    splits = json.loads((shared_data / "splits.json").read_text())
    frames = {ds: read_frame(shared_data / f"{ds}.json.gz") for ds in ("dc", "pz", "bg", "fe")}
    # bg/fe: only formulas both carry (keeps the test fast); bg's test set is drawn as in prepare
    formula = {
        ds: frames[ds]["structure"].map(lambda s: s.composition.reduced_formula)
        for ds in ("bg", "fe")
    }
    shared = sorted(set(formula["bg"]) & set(formula["fe"]))[:400]
    for ds in ("bg", "fe"):
        frames[ds] = frames[ds][formula[ds].isin(shared)]
    bg_test = make_splits(frames["bg"].index, "bg", 42, 0.1)["test"]
    entries = {
        "dc": (frames["dc"], splits["dc"]["test"]),
        "pz": (frames["pz"], splits["pz"]["test"]),
        "bg": (frames["bg"], bg_test),
        "fe": (frames["fe"], []),
    }
    overlap = find_overlap(entries, progress=False)
    table = leakage_table(overlap).set_index(["pt_pool", "ft_test"])
    assert table.loc[("fe", "bg"), "n_overlap"] > 0 and table.loc[("bg", "fe"), "n_overlap"] == 0
    assert 0 < table.loc[("dc", "pz"), "n_overlap"] <= 94
    assert 0 < table.loc[("pz", "dc"), "n_overlap"] <= 106
    assert (table["fraction"] < 0.5).all()
    sizes = np.array([len(c) for c in overlap.clusters])
    assert (sizes >= 2).all() and len(overlap.clusters) > 50


def test_unusable_overlap_file_is_one_clear_error(tmp_path):
    path = tmp_path / "overlap.json"
    with pytest.raises(FileNotFoundError, match="run `tlmat leakage` first"):
        load_overlap(path)
    path.write_text(json.dumps({"datasets": ["a"], "exclude": {}}))
    with pytest.raises(ValueError, match=r"overlap.json: not an overlap file \(KeyError"):
        load_overlap(path)


def test_an_intermediate_chain_stage_leaves_out_other_test_crystals(tmp_path):
    """A chain stage that feeds another stage is pre-training for it: like a PT run it never
    trains on a crystal that is another data set's test structure (bb's 1999 = aa's test 3)."""
    config = _two_datasets(tmp_path)
    inputs = ensure_inputs(config, ["bb"], overlap=True)
    execute_run(config, RunSpec("pt/aa-8/t1", "aa", 8, 1, tmp_path / "pt", "pretrain", epochs=1))
    stage = RunSpec(
        "chain/aa-8.bb-10/t1",
        "bb",
        10,  # the whole pool once 1999 is out: every other pool entry must be there
        1,
        tmp_path / "stage",
        kind="chain",
        checkpoint=tmp_path / "pt" / "model.pt",
        strategy="full",
        epochs=1,
    )
    metrics = execute_run(config, stage, inputs=inputs)
    assert metrics["n_excluded_overlap"] == 1
    chosen = json.loads((tmp_path / "stage" / "subset_ids.json").read_text())
    pool = {i for i in range(1000, 1012)} - {1000, 1001}
    assert set(chosen["train"] + chosen["val"]) == pool  # 1999 absent, nothing else missing
