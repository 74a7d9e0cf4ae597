"""Your own property as a target: a CSV of ids and values beside CIF/POSCAR files, or a
matminer-format frame; every bad input is one line naming the file, and nothing is written."""

from __future__ import annotations

import pytest
from conftest import make_structures
from helpers import tiny_config

from tlmat.data import DataError, DatasetSpec, write_frame
from tlmat.runs import prepare_dataset
from tlmat.user_data import load_user_dataset


def _folder(tmp_path, n: int = 6):
    """n CIF files 1.cif … and a CSV of their ids and values (the last one as POSCAR)."""
    folder = tmp_path / "mine"
    folder.mkdir()
    structures = make_structures(n, seed=3)
    for ident, structure in enumerate(structures, start=1):
        if ident == n:
            structure.to(filename=str(folder / f"{ident}.vasp"), fmt="poscar")
        else:
            structure.to(filename=str(folder / f"{ident}.cif"))
    lines = ["id,value"] + [f"{i},{0.5 * i}" for i in range(1, n + 1)]
    (folder / "values.csv").write_text("\n".join(lines) + "\n")
    return folder, structures


def _spec(path, **extra) -> DatasetSpec:
    return DatasetSpec(key="mine", source="file", path=str(path), **extra)


def test_a_csv_beside_cif_and_poscar_files_is_a_data_set(tmp_path):
    folder, structures = _folder(tmp_path)
    frame = load_user_dataset(_spec(folder / "values.csv"))
    assert list(frame.index) == [1, 2, 3, 4, 5, 6]
    assert list(frame["target"]) == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    assert [len(s) for s in frame["structure"]] == [len(s) for s in structures]
    assert frame["structure"].iloc[-1].composition == structures[-1].composition


def test_a_matminer_frame_is_read_and_checked(tmp_path, structures):
    from conftest import make_frame

    frame = make_frame(5)
    write_frame(frame, tmp_path / "mine.json.gz")
    loaded = load_user_dataset(_spec(tmp_path / "mine.json.gz"))
    assert list(loaded.index) == list(frame.index)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda f: (f / "2.cif").write_text("data_x\nnot a cif\n"), "2.cif"),
        (lambda f: _csv(f, "id,value\n1,0.5\n2,\n"), "line 3 (id 2): missing value"),
        (lambda f: _csv(f, "id,value\n1,0.5\n1,0.7\n"), "duplicate id 1 (lines 2 and 3)"),
        (lambda f: _csv(f, "id,value\n1,0.5\n99,0.7\n"), "id 99): no structure file"),
        (lambda f: _csv(f, "id,value\n1,abc\n"), "value 'abc' is not a number"),
        (lambda f: _csv(f, "name,value\n1,0.5\n"), "needs columns 'id' and 'value'"),
    ],
    ids=["unparsable cif", "missing value", "duplicate id", "missing file", "bad value", "columns"],
)
def test_bad_inputs_are_one_line_naming_the_file(tmp_path, edit, message):
    folder, _ = _folder(tmp_path)
    edit(folder)
    with pytest.raises(DataError) as info:
        load_user_dataset(_spec(folder / "values.csv"))
    text = str(info.value)
    assert message in text and "\n" not in text
    assert str(folder) in text


def _csv(folder, text: str) -> None:
    (folder / "values.csv").write_text(text)


def test_fewer_structures_than_the_smallest_ft_size_stop_prepare_before_writing(tmp_path):
    folder, _ = _folder(tmp_path)
    config = tiny_config(
        tmp_path,
        [],
        "datasets={aa: {source: file, label: AA}, mine: {source: file, path: "
        f"{folder / 'values.csv'}, label: mine}}}}",
        "study.ft_sizes=[10, 100]",
        "study.datasets=[aa, mine]",
    )
    frame_out, splits_out = tmp_path / "out" / "mine.json.gz", tmp_path / "out" / "mine.json"
    with pytest.raises(DataError, match="fewer than the smallest FT size 10"):
        prepare_dataset(config, "mine", frame_out, splits_out)
    assert not frame_out.exists() and not splits_out.exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda f: (f / "2.cif").write_text("data_x\nnot a cif\n"), "2.cif"),
        (lambda f: _csv(f, "id,value\n1,0.5\n2,\n"), "missing value"),
        (lambda f: _csv(f, "id,value\n1,0.5\n1,0.7\n"), "duplicate id 1"),
    ],
    ids=["unparsable cif", "missing value", "duplicate id"],
)
def test_a_bad_file_stops_prepare_with_nothing_written(tmp_path, edit, message):
    folder, _ = _folder(tmp_path)
    edit(folder)
    config = tiny_config(
        tmp_path,
        [],
        "datasets={aa: {source: file, label: AA}, mine: {source: file, path: "
        f"{folder / 'values.csv'}, label: mine}}}}",
        "study.ft_sizes=[2]",
        "study.datasets=[aa, mine]",
    )
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message) as info:
        prepare_dataset(config, "mine", out / "mine.json.gz", out / "mine.json")
    assert "\n" not in str(info.value)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda f: f.set_axis([1, 1, 3, 4, 5]), "duplicate id 1"),
        (lambda f: f.assign(target=[0.1, None, 0.3, 0.4, 0.5]), "missing value"),
    ],
    ids=["duplicate id", "missing value"],
)
def test_a_bad_matminer_frame_is_one_line_naming_the_file(tmp_path, edit, message):
    from conftest import make_frame

    frame = make_frame(5)
    frame.index = [1, 2, 3, 4, 5]
    write_frame(edit(frame), tmp_path / "mine.json.gz")
    with pytest.raises(DataError, match=message) as info:
        load_user_dataset(_spec(tmp_path / "mine.json.gz"))
    assert "\n" not in str(info.value) and "mine.json.gz" in str(info.value)
