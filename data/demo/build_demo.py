"""Build the demo data set (data/demo) from the offline data pools (../shared/data).

    .venv/bin/python data/demo/build_demo.py [SOURCE] [--out DIR]

SOURCE is the folder of the full offline pools (``<prop>.json.gz`` + ``splits.json``): the
argument, else the environment variable TLMAT_DATA_DIR (or TLMAT_SHARED_DATA, the tests'
name for it), else ``../shared/data`` next to the repository. The output (default: the
folder of this script) gets one matminer-format frame per property and a ``splits.json`` in
the source's schema, restricted to the kept ids. See README.md next to this script for
what is kept and why.

The build is deterministic: every choice comes from a generator seeded by SEED and the
property, rows are sorted by id and the gzip header carries no file name and mtime 0, so
two builds from the same source are byte-identical.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
from matminer.utils.io import load_dataframe_from_json, store_dataframe_as_json

SEED = 42
PROPERTIES = ("bg", "fe", "gv", "ph", "dc", "pz", "ebg")
REPO = Path(__file__).resolve().parents[2]
DEFAULT_SOURCE = REPO.parent / "shared" / "data"
MAX_BYTES = 10 * 1024 * 1024

#: Trial subsets always kept (presets/quick.yaml: trial 1, FT sizes 100 and 500).
KEEP_TRIALS = {"trial1": ("100", "500")}

#: Per property: ``test`` = "paper" (the paper's whole test set), an int n (a seeded n of the
#: paper's test ids) or ("pool", n) (n seeded kept ids: bg/fe, whose test structures were
#: never published); ``pool`` = "all" (every structure outside the test set) or the number of
#: structures outside the test set to keep: the published trial-1 subsets of 100 and 500 and
#: the published pre-train subset, filled up with a seeded draw. The pools leave a margin over
#: the quick preset's largest size (bg/fe 2000: a PT sweep size and a chain FT stage; gv/ebg
#: 941: the PT size) for duplicate crystals collapsed by `tlmat prepare` and pool entries
#: excluded from pre-training as the same crystal as another data set's test structure.
PLAN: dict[str, dict] = {
    "bg": {"test": ("pool", 150), "pool": 2100},
    "fe": {"test": ("pool", 150), "pool": 2100},
    "gv": {"test": 150, "pool": 1050},
    "ebg": {"test": "paper", "pool": 1050},
    "ph": {"test": "paper", "pool": "all"},
    "dc": {"test": "paper", "pool": "all"},
    "pz": {"test": "paper", "pool": "all"},
}

ABOUT = (
    "Demo subset of the offline pools (see data/demo/README.md), same schema as the source "
    "splits.json: per property 'test' = held-out test ids (a subset of the paper's test ids, "
    "or for bg/fe, whose test structures were never published, ids drawn from the pool), "
    "'trials' / 'pretrain' / 'other_subsets' = the source's published subsets whose ids are "
    "all kept, 'demo' = how this property was cut (counts in the source and here)."
)


def rng(prop: str, label: str) -> np.random.Generator:
    return np.random.default_rng([SEED, zlib.crc32(prop.encode()), zlib.crc32(label.encode())])


def seeded_choice(prop: str, label: str, candidates, n: int) -> list[int]:
    """n ids of ``candidates`` (sorted first, so only the set matters), in sorted order."""
    pool = np.asarray(sorted(int(i) for i in candidates), dtype=np.int64)
    if n > len(pool):
        raise SystemExit(f"{prop}: {label}: need {n} ids, only {len(pool)} candidates")
    return sorted(int(i) for i in rng(prop, label).choice(pool, size=n, replace=False))


def select(prop: str, frame_ids: set[int], entry: dict) -> tuple[list[int], set[int], dict]:
    """(test ids, kept ids, demo note) of one property."""
    plan = PLAN[prop]
    paper_test = [int(i) for i in entry["test"]]
    present_test = [i for i in paper_test if i in frame_ids]
    outside = frame_ids - set(paper_test)
    required = {
        int(i)
        for trial, sizes in KEEP_TRIALS.items()
        for s in sizes
        for i in entry["trials"][trial][s]
    }
    required |= {int(i) for ids in entry.get("pretrain", {}).values() for i in ids}
    if not required <= outside:
        raise SystemExit(f"{prop}: a published subset has ids outside the frame's pool")

    if plan["test"] == "paper":
        if len(present_test) != len(paper_test):
            raise SystemExit(f"{prop}: the source lacks some of the paper's test structures")
        test = present_test
        how = f"the paper's whole test set ({len(test)})"
    elif isinstance(plan["test"], int):
        chosen = set(seeded_choice(prop, "test", present_test, plan["test"]))
        test = [i for i in paper_test if i in chosen]  # the published order
        how = f"a seeded {len(test)} of the paper's {len(paper_test)} test ids"
    else:
        if present_test:
            raise SystemExit(f"{prop}: the source has test structures; plan a paper test set")
        test = seeded_choice(prop, "test", outside - required, plan["test"][1])
        outside -= set(test)
        how = (
            f"{len(test)} ids drawn from the pool outside the kept trial-1 and pre-train "
            f"subsets (the paper's {len(paper_test)} test structures were never published)"
        )

    if plan["pool"] == "all":
        pool = set(outside)
    else:
        fill = plan["pool"] - len(required)
        pool = required | set(seeded_choice(prop, "pool", outside - required, fill))
    note = {
        "test": how,
        "source_structures": len(frame_ids),
        "source_pool": len(frame_ids) - len(present_test),
        "kept_structures": len(pool) + len(test),
        "kept_pool": len(pool),
    }
    return test, pool | set(test), note


def demo_entry(entry: dict, test: list[int], kept: set[int], note: dict, paper_test) -> dict:
    """The property's splits.json entry: test ids + published subsets that are wholly kept."""
    test_set = set(test)

    def usable(ids) -> bool:
        ids = {int(i) for i in ids}
        return ids <= kept and not ids & test_set

    source = entry.get("test_source", "json")
    if len(test) < len(paper_test) and test_set <= set(paper_test):
        source = f"{source}; demo: {note['test']}"
    elif not test_set <= set(paper_test):
        source = f"demo: {note['test']}"
    out = {"test": test, "test_source": source, "trials": {}}
    for trial, sizes in entry.get("trials", {}).items():
        kept_sizes = {s: [int(i) for i in ids] for s, ids in sizes.items() if usable(ids)}
        if kept_sizes:
            out["trials"][trial] = kept_sizes
    for section in ("pretrain", "other_subsets"):
        kept_named = {
            name: [int(i) for i in ids]
            for name, ids in entry.get(section, {}).items()
            if usable(ids)
        }
        if kept_named:
            out[section] = kept_named
    multi = {
        trial: {s: [int(i) for i in ids] for s, ids in sizes.items() if usable(ids)}
        for trial, sizes in entry.get("multiprop_trials_differing_from_pairwise", {}).items()
    }
    if any(multi.values()):
        out["multiprop_trials_differing_from_pairwise"] = {t: s for t, s in multi.items() if s}
    out["demo"] = note
    return out


def write_frame(frame: pd.DataFrame, path: Path) -> None:
    """matminer's store_dataframe_as_json, re-gzipped with a fixed header (mtime 0, no name)."""
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        raw = Path(tmp) / path.name
        store_dataframe_as_json(frame, str(raw), compression="gz", orient="split", pbar=False)
        payload = gzip.decompress(raw.read_bytes())
    tmp_path = path.with_name(path.name + ".tmp")
    with (
        open(tmp_path, "wb") as handle,
        gzip.GzipFile(filename="", mode="wb", fileobj=handle, mtime=0, compresslevel=9) as gz,
    ):
        gz.write(payload)
    os.replace(tmp_path, path)


def check_round_trip(expected: pd.DataFrame, path: Path) -> None:
    """The written frame reads back as the source rows: ids, species, lattice and fractional
    coordinates to 1e-10, targets bit-identical."""
    back = load_dataframe_from_json(str(path), pbar=False)
    problem = None
    if list(back.index) != list(expected.index) or list(back.columns) != ["structure", "target"]:
        problem = "ids or columns differ"
    elif not np.array_equal(back["target"].to_numpy(), expected["target"].to_numpy()):
        problem = "targets differ"
    else:
        for jid, a, b in zip(expected.index, expected["structure"], back["structure"], strict=True):
            if (
                a.atomic_numbers != b.atomic_numbers
                or not np.allclose(a.lattice.matrix, b.lattice.matrix, rtol=0, atol=1e-10)
                or not np.allclose(a.frac_coords, b.frac_coords, rtol=0, atol=1e-10)
            ):
                problem = f"structure {jid} differs"
                break
    if problem:
        raise SystemExit(f"build_demo: {path} does not read back as written: {problem}")


def dump_splits(splits: dict) -> str:
    """JSON with one key per line and every id list on one line (readable diffs)."""
    text = json.dumps(splits, indent=1)
    return (
        re.sub(
            r"\[\s*([-0-9,\s]+?)\s*\]",
            lambda m: "[" + ", ".join(re.split(r",\s*", m.group(1).strip())) + "]",
            text,
        )
        + "\n"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "source",
        nargs="?",
        type=Path,
        default=Path(
            os.environ.get("TLMAT_DATA_DIR")
            or os.environ.get("TLMAT_SHARED_DATA")
            or DEFAULT_SOURCE
        ),
        help="folder of the full offline pools (default: $TLMAT_DATA_DIR, else "
        "$TLMAT_SHARED_DATA as the tests use it, else ../shared/data next to the repository)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args(argv)
    source, out = args.source, args.out
    if not (source / "splits.json").is_file():
        print(
            f"build_demo: {source}/splits.json not found; pass the source folder", file=sys.stderr
        )
        return 2
    out.mkdir(parents=True, exist_ok=True)
    splits = json.loads((source / "splits.json").read_text())
    demo = {"_about": ABOUT}
    for prop in PROPERTIES:
        frame = load_dataframe_from_json(str(source / f"{prop}.json.gz"), pbar=False)
        frame.index = frame.index.astype(np.int64)
        entry = splits[prop]
        test, kept, note = select(prop, set(frame.index.tolist()), entry)
        demo[prop] = demo_entry(entry, test, kept, note, [int(i) for i in entry["test"]])
        subset = frame.loc[sorted(kept), ["structure", "target"]]
        write_frame(subset, out / f"{prop}.json.gz")
        check_round_trip(subset, out / f"{prop}.json.gz")
        print(
            f"{prop}: kept {len(subset)} of {len(frame)} structures "
            f"({note['kept_pool']} pool + {len(test)} test)"
        )
    (out / "splits.json").write_text(dump_splits(demo))
    total = sum((out / f"{p}.json.gz").stat().st_size for p in PROPERTIES)
    total += (out / "splits.json").stat().st_size
    print(f"total {total / 1e6:.2f} MB in {out}")
    if total > MAX_BYTES:
        print(f"build_demo: the demo data exceed {MAX_BYTES} bytes", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
