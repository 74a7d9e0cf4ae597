"""Data layer: loading errors, cleaning counts, splits (published and generated)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import make_frame
from pymatgen.core import Lattice, Structure

from tlmat.data import (
    DataError,
    DatasetSpec,
    clean,
    duplicate_counts,
    make_splits,
    read_frame,
    resolve_duplicates,
    subset_ids,
    train_val_split,
    write_frame,
)
from tlmat.sources import load_dataset


def test_frame_round_trip(tmp_path):
    frame = make_frame(5)
    write_frame(frame, tmp_path / "x.json.gz")
    back = read_frame(tmp_path / "x.json.gz")
    assert list(back.columns) == ["structure", "target"]
    assert back.index.tolist() == frame.index.tolist()
    assert np.allclose(back["target"], frame["target"])
    assert back["structure"].iloc[2] == frame["structure"].iloc[2]


def test_not_matminer_format_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.json.gz"
    pd.DataFrame({"a": [1]}).to_json(bad, compression="gzip")
    with pytest.raises(DataError, match=r"bad\.json\.gz: .*") as info:
        read_frame(bad)
    assert "\n" not in str(info.value)
    not_json = tmp_path / "junk.json.gz"
    not_json.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="junk.json.gz: not a matminer-format frame"):
        read_frame(not_json)


def test_data_dir_frame_is_used_without_download(tmp_path):
    frame = make_frame(4)
    write_frame(frame, tmp_path / "dc.json.gz")
    spec = DatasetSpec(key="dc", source="matminer", name="dielectric_constant", target="poly_total")
    loaded = load_dataset(spec, tmp_path)
    assert len(loaded) == 4


def test_file_source_without_path_explains_what_to_supply():
    spec = DatasetSpec(key="ebg", source="file")
    with pytest.raises(DataError, match="datasets.ebg: source 'file' needs structures you supply"):
        load_dataset(spec, None)


def test_unknown_dataset_key():
    with pytest.raises(DataError, match="unknown data set key 'xx'"):
        DatasetSpec.from_config({"datasets": {"dc": {"source": "matminer"}}}, "xx")


def test_clean_counts_and_drops():
    frame = make_frame(6)
    frame["target"] = frame["target"].astype(object)
    frame.loc[1, "target"] = np.nan
    frame.loc[2, "target"] = "abc"
    frame.at[3, "structure"] = {"not": "a structure"}
    duplicate = frame.loc[[4]].copy()
    duplicate.index = [100]
    frame = pd.concat([frame, duplicate])
    cleaned, counts = clean(frame, "x", drop_bad_records=True)
    assert counts == {
        "input": 7,
        "duplicate_ids": 0,
        "non_finite_target": 2,
        "bad_structure": 1,
        "exact_duplicates": 1,
        "test_twins": 0,
        "kept": 3,
    }
    assert cleaned.index.tolist() == [0, 4, 5]
    assert cleaned["target"].dtype == float


def test_an_exact_twin_with_a_lower_id_leaves_and_the_published_test_id_stays():
    frame = make_frame(5, start_id=10)
    twin = frame.loc[[13]].copy()  # same structure and target as test id 13, lower id
    twin.index = [2]
    subset_twin = frame.loc[[11]].copy()  # twin of pool id 11, which a published subset names
    subset_twin.index = [1]
    frame = pd.concat([frame, twin, subset_twin])
    aliases: dict[int, int] = {}
    cleaned, counts = clean(frame, "x", test_ids=[13, 14], subset_ids=[11], aliases=aliases)
    assert 13 in cleaned.index and 2 not in cleaned.index
    assert 11 in cleaned.index and 1 not in cleaned.index
    assert counts["exact_duplicates"] == 2 and counts["test_twins"] == 1
    assert aliases == {2: 13, 1: 11}
    assert duplicate_counts(aliases, [13, 14]) == {
        "n_duplicates_dropped": 2,
        "n_test_twins_dropped": 1,
    }
    # without published ids: the lowest id is kept, as before
    assert sorted(clean(frame, "x")[0].index) == [1, 2, 10, 12, 14]


def test_two_published_test_ids_that_are_twins_are_both_kept():
    assert resolve_duplicates([[5, 3, 9, 1]], test_ids=[5, 9]) == {3: 5, 1: 5}
    assert resolve_duplicates([[5, 3, 1]], subset_ids=[3]) == {5: 3, 1: 3}
    assert resolve_duplicates([[5, 3, 1]]) == {5: 1, 3: 1}


def test_generated_splits_are_seeded_and_disjoint():
    ids = list(range(200))
    a = make_splits(ids, "dc", seed=1, test_fraction=0.1)
    b = make_splits(ids, "dc", seed=1, test_fraction=0.1)
    c = make_splits(ids, "dc", seed=2, test_fraction=0.1)
    assert a == b and a["test"] != c["test"] and len(a["test"]) == 20
    subset = subset_ids(a, ids, 50, trial=1)
    assert len(subset) == 50 and not set(subset) & set(a["test"])
    assert subset == subset_ids(a, ids, 50, trial=1)
    assert subset != subset_ids(a, ids, 50, trial=2)
    with pytest.raises(
        DataError, match=r"dc: a subset of 1000 was requested, but the data set has 200"
    ):
        subset_ids(a, ids, 1000, trial=1)
    capped = subset_ids(a, ids, 1000, trial=1, cap=True)
    assert sorted(capped) == sorted(set(ids) - set(a["test"]))


def test_published_splits_reused_exactly():
    ids = list(range(50))
    published = {"test": [0, 1, 2, 3, 4], "trials": {"trial1": {"10": list(range(10, 20))}}}
    splits = make_splits(ids, "ph", seed=1, test_fraction=0.1, published=published)
    assert splits["source"] == "published" and splits["test"] == [0, 1, 2, 3, 4]
    assert subset_ids(splits, ids, 10, trial=1) == list(range(10, 20))
    other = subset_ids(splits, ids, 20, trial=1)  # not published: seeded draw outside test
    assert len(other) == 20 and not set(other) & set(published["test"])


def test_published_splits_absent_test_falls_back_partial_is_error():
    ids = list(range(50))
    absent = make_splits(ids, "bg", 1, 0.1, published={"test": [900, 901], "trials": {}})
    assert absent["source"] == "generated" and len(absent["test"]) == 5
    with pytest.raises(DataError, match="1 of 2 test ids of 'bg' are missing"):
        make_splits(ids, "bg", 1, 0.1, published={"test": [1, 901], "trials": {}})
    with pytest.raises(DataError, match=r"bg.trials.trial1.10 has 1 ids that are not in the data"):
        make_splits(ids, "bg", 1, 0.1, published={"test": [1], "trials": {"trial1": {"10": [999]}}})


def test_train_val_split():
    train, val = train_val_split(range(100), 0.1, 0, "x")
    assert len(train) == 90 and len(val) == 10 and not set(train) & set(val)
    train, val = train_val_split(range(10), 0.1, 0, "x")
    assert len(train) == 9 and len(val) == 1
    with pytest.raises(DataError):
        train_val_split([1], 0.1, 0)


def test_real_splits_file_matches_data(shared_data):
    splits = json.loads((shared_data / "splits.json").read_text())
    frame = read_frame(shared_data / "ph.json.gz")
    made = make_splits(frame.index, "ph", 42, 0.1, splits["ph"])
    assert made["source"] == "published" and len(made["test"]) == 127
    assert len(subset_ids(made, frame.index, 800, 1)) == 800


def _overlapping_structure() -> Structure:
    return Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.05, 0.0, 0.0]])  # 0.2 Å


@pytest.mark.parametrize(
    ("broken", "reason"),
    [
        ({"target": float("inf")}, "id 2: target is not a finite number"),
        ({"target": "n/a"}, "id 2: target is not a finite number"),
        ({"structure": {"not": "a structure"}}, "id 2: unparsable structure"),
        ({"structure": Structure(Lattice.cubic(3.0), [], [])}, "id 2: zero sites"),
        ({"structure": _overlapping_structure()}, "id 2: atoms closer than 0.5 Å"),
    ],
)
def test_a_bad_record_is_one_line_naming_the_data_set_id_and_fix(broken, reason):
    frame = make_frame(5)
    frame["target"] = frame["target"].astype(object)
    for column, value in broken.items():
        frame.at[2, column] = value
    with pytest.raises(DataError) as info:
        clean(frame, "pz")
    message = str(info.value)
    assert message.startswith("datasets.pz: 1 bad record(s): ") and reason in message
    assert "drop_bad_records: true" in message and "\n" not in message
    cleaned, counts = clean(frame, "pz", drop_bad_records=True)
    assert 2 not in cleaned.index and counts["kept"] == 4


def test_periodic_images_count_as_overlapping_atoms():
    # 0.3 Å apart only through the periodic boundary
    structure = Structure(Lattice.cubic(5.0), ["O", "O"], [[0.01, 0, 0], [0.95, 0, 0]])
    frame = make_frame(3)
    frame.at[1, "structure"] = structure
    with pytest.raises(DataError, match="id 1: atoms closer than 0.5"):
        clean(frame, "dc")
