"""Build the example user target (data/demo/my-target) from the offline pools (../shared/data).

    .venv/bin/python data/demo/my-target/build.py [SOURCE]

SOURCE is the folder of the full offline pools (``gv.json.gz`` + ``splits.json``): the
argument, else TLMAT_DATA_DIR, else ``../shared/data`` next to the repository. See README.md
next to this script for what the example is and why these structures.

"My property" is gv (log10 shear modulus, min-max scaled as in the pools) on crystals that
are in the paper's gv **test** set but not in the demo's gv frame: no gv pre-training pool
holds them, neither the demo's (they are not in its frame) nor the full pools' (a test
structure never enters the pool), so a gv PT model has never seen these crystals.

Written, deterministically (seeded choice, sorted ids, gzip header without name and mtime):

* ``values.csv`` + ``structures/<id>.cif``: :data:`N_CSV` structures in the CSV + CIF format
  of a user's own property (``presets/my-target.yaml``);
* ``frame.json.gz``: :data:`N_FRAME` structures (the CSV's among them) as a matminer-format
  frame (``presets/quick.yaml``: its FT size 500 needs more than 500 structures after the
  test set, more than one CIF file each would fit in data/demo).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import shutil
import sys
import zlib
from pathlib import Path

import numpy as np
from matminer.utils.io import load_dataframe_from_json, store_dataframe_as_json
from pymatgen.io.cif import CifWriter

SEED = 42
PROPERTY = "gv"
N_FRAME = 600
N_CSV = 150
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
DEFAULT_SOURCE = REPO.parent / "shared" / "data"


def source_dir(argv: list[str]) -> Path:
    if argv:
        return Path(argv[0])
    return Path(os.environ.get("TLMAT_DATA_DIR") or DEFAULT_SOURCE)


def demo_ids() -> set[int]:
    path = REPO / "data" / "demo" / f"{PROPERTY}.json.gz"
    data = json.loads(gzip.decompress(path.read_bytes()))
    return {int(i) for i in data["index"]}


def choose(candidates: set[int], n: int) -> list[int]:
    pool = np.asarray(sorted(candidates), dtype=np.int64)
    rng = np.random.default_rng([SEED, zlib.crc32(b"my-target")])
    return sorted(int(i) for i in rng.choice(pool, size=n, replace=False))


def write_frame(frame, path: Path) -> None:
    """matminer's store_dataframe_as_json, re-gzipped with a fixed header (mtime 0, no name)."""
    raw = path.with_name("raw-" + path.name)
    store_dataframe_as_json(frame, str(raw), compression="gz", orient="split", pbar=False)
    payload = gzip.decompress(raw.read_bytes())
    raw.unlink()
    with (
        open(path, "wb") as handle,
        gzip.GzipFile(filename="", mode="wb", fileobj=handle, mtime=0, compresslevel=9) as gz,
    ):
        gz.write(payload)


def main(argv: list[str]) -> int:
    source = source_dir(argv)
    frame = load_dataframe_from_json(str(source / f"{PROPERTY}.json.gz"), pbar=False)
    frame.index = frame.index.astype(np.int64)
    test = {int(i) for i in json.loads((source / "splits.json").read_text())[PROPERTY]["test"]}
    candidates = (test & set(frame.index.tolist())) - demo_ids()
    ids = choose(candidates, N_FRAME)
    subset = frame.loc[ids, ["structure", "target"]]
    write_frame(subset, HERE / "frame.json.gz")
    csv_ids = choose(set(ids), N_CSV)
    folder = HERE / "structures"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["id", "value"])
    for ident in csv_ids:
        (folder / f"{ident}.cif").write_text(str(CifWriter(subset.at[ident, "structure"])))
        writer.writerow([ident, repr(float(subset.at[ident, "target"]))])
    (HERE / "values.csv").write_text(out.getvalue())
    print(f"{PROPERTY}: {len(candidates)} candidates; frame {len(ids)}, CSV + CIF {len(csv_ids)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
