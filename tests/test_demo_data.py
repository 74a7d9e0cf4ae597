"""The shipped demo data (data/demo) is complete, small and enough for presets/quick.yaml.

No training and no structure parsing except one small frame: ids are read from the JSON of
each frame, so the whole module runs in a few seconds.
"""

from __future__ import annotations

import gzip
import json
from functools import cache
from pathlib import Path

import pytest

from tlmat.config import load_config
from tlmat.data import read_frame

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
PROPERTIES = ("bg", "fe", "gv", "ph", "dc", "pz", "ebg")
MAX_BYTES = 10 * 1024 * 1024
# places in a splits.json entry that hold id lists of training subsets
SUBSET_SECTIONS = (
    "trials",
    "pretrain",
    "other_subsets",
    "multiprop_trials_differing_from_pairwise",
)


@cache
def splits() -> dict:
    return json.loads((DEMO / "splits.json").read_text())


@cache
def frame_ids(prop: str) -> tuple[int, ...]:
    """The index of a demo frame, read from its JSON (orient 'split') without the structures."""
    data = json.loads(gzip.decompress((DEMO / f"{prop}.json.gz").read_bytes()))
    assert data["columns"] == ["structure", "target"], prop
    assert len(data["index"]) == len(data["data"]), prop
    return tuple(int(i) for i in data["index"])


def subsets(entry: dict) -> dict[str, list[int]]:
    """Every training subset of a splits entry, by a readable name."""
    found = {}
    for section in SUBSET_SECTIONS:
        for name, value in entry.get(section, {}).items():
            if isinstance(value, dict):  # trial -> size -> ids
                found.update({f"{section}.{name}.{size}": ids for size, ids in value.items()})
            else:
                found[f"{section}.{name}"] = value
    return found


@cache
def quick_config() -> dict:
    return load_config([ROOT / "config.yaml", ROOT / "presets" / "quick.yaml"])


def preset_sizes() -> tuple[dict[str, int], dict[str, int]]:
    """Largest (fine-tune, pre-train) size the quick preset asks of each data set.

    Fine-tune sizes are hard requirements (a too-large one is an error); pre-training sizes
    are "up to" (capped at the pool), as in the paper's PT on up to 100K.
    """
    config = quick_config()
    study, families = config["study"], config["study"]["families"]
    sources = [d for d in study["datasets"] if not config["datasets"][d].get("target_only")]
    ft: dict[str, int] = {}
    pt: dict[str, int] = {}

    def need(table, ds, size):
        table[ds] = max(table.get(ds, 0), int(size))

    for ds in study["datasets"]:
        for size in study["ft_sizes"]:
            need(ft, ds, size)
    if families["pairwise"]:
        for src in sources:
            need(pt, src, study["pt_size"])
    if families["pt_size_sweep"]:
        sweep = study["pt_size_sweep"]
        for src in sweep["sources"]:
            for size in sweep["sizes"]:
                need(pt, src, size)
            for ds in study["datasets"]:
                if ds != src:
                    need(ft, ds, sweep["ft_size"])
    if families["strategies"]:
        for src, ds in study["strategies"]["pairs"]:
            need(pt, src, study["pt_size"])
            for size in study["strategies"]["ft_sizes"] or study["ft_sizes"]:
                need(ft, ds, size)
    if families["learning_rate"]:
        for src, ds in study["learning_rate"]["pairs"]:
            need(pt, src, study["pt_size"])
            need(ft, ds, study["learning_rate"]["ft_size"])
    if families["mpt"]:
        mpt = study["mpt"]
        for src in mpt["sources"] or sources:
            need(pt, src, mpt["pt_size"] or study["pt_size"])
        for ds in mpt["targets"] or study["datasets"]:
            for size in mpt["ft_sizes"] or study["ft_sizes"]:
                need(ft, ds, size)
    if families["chains"]:
        for chain in study["chains"]:
            first, *later = chain["stages"]
            if not first.startswith("ext:"):
                need(pt, *first.split(":"))
            for stage in later:
                need(ft, *stage.split(":"))
    return ft, pt


def test_demo_files_exist_and_are_small():
    expected = [DEMO / f"{p}.json.gz" for p in PROPERTIES]
    expected += [DEMO / "splits.json", DEMO / "README.md", DEMO / "build_demo.py"]
    missing = [str(p.relative_to(ROOT)) for p in expected if not p.is_file()]
    assert not missing, f"missing demo files: {missing}"
    total = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert total <= MAX_BYTES, f"data/demo holds {total} bytes (limit {MAX_BYTES})"


@pytest.mark.parametrize("prop", PROPERTIES)
def test_frame_is_deterministic_gzip(prop):
    """Rebuilding gives byte-identical files: no file name and mtime 0 in the gzip header."""
    header = (DEMO / f"{prop}.json.gz").read_bytes()[:10]
    assert header[:2] == b"\x1f\x8b"
    assert header[3] & 0x08 == 0, f"{prop}: the gzip header names a file"
    assert header[4:8] == b"\0\0\0\0", f"{prop}: the gzip header has an mtime"


def test_frame_reads_with_the_project_reader():
    frame = read_frame(DEMO / "pz.json.gz")
    assert list(frame.columns) == ["structure", "target"]
    assert list(frame.index) == list(frame_ids("pz"))


@pytest.mark.parametrize("prop", PROPERTIES)
def test_splits_ids_are_in_the_frame_and_test_is_disjoint(prop):
    ids = frame_ids(prop)
    assert list(ids) == sorted(set(ids)), f"{prop}: ids not unique and sorted"
    present = set(ids)
    entry = splits()[prop]
    test = [int(i) for i in entry["test"]]
    assert test and len(set(test)) == len(test)
    assert set(test) <= present, f"{prop}: test ids missing from the frame"
    for name, members in subsets(entry).items():
        members = {int(i) for i in members}
        assert members <= present, f"{prop}.{name}: ids missing from the frame"
        assert not members & set(test), f"{prop}.{name}: shares ids with the test set"


def test_preset_uses_the_demo_data():
    config = quick_config()
    assert Path(config["data_dir"]) == Path("data/demo")
    assert Path(config["splits_file"]) == Path("data/demo/splits.json")
    assert set(PROPERTIES) >= set(config["study"]["datasets"])


def test_published_trial_subsets_for_every_preset_fine_tune_size():
    config = quick_config()
    study = config["study"]
    for ds in study["datasets"]:
        for trial in range(1, study["trials"] + 1):
            for size in study["ft_sizes"]:
                subset = splits()[ds]["trials"].get(f"trial{trial}", {}).get(str(size))
                assert subset is not None, f"{ds}: no published trial{trial} subset of {size}"
                assert len(subset) == size


def test_pools_meet_the_preset_sizes():
    """Pool outside the test set >= every FT size, and >= every PT size unless the demo keeps
    the whole source pool (pz has 847 structures outside its test set: PT 941 is capped there
    exactly as on the full data)."""
    ft, pt = preset_sizes()
    short = []
    for ds in sorted(set(ft) | set(pt)):
        entry = splits()[ds]
        pool = len(set(frame_ids(ds)) - {int(i) for i in entry["test"]})
        if ft.get(ds, 0) > pool:
            short.append(f"{ds}: FT {ft[ds]} > pool {pool}")
        source_pool = entry["demo"]["source_pool"]
        if min(pt.get(ds, 0), source_pool) > pool:
            short.append(f"{ds}: PT {pt[ds]} > pool {pool} (source pool {source_pool})")
    assert not short, "; ".join(short)
    # the preset's largest sizes really are asked for (guards the size bookkeeping above)
    assert pt["bg"] >= 2000 and pt["fe"] >= 2000 and ft["bg"] >= 2000 and ft["ebg"] >= 500
