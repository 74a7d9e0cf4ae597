"""Where a data set's raw frame comes from: a local ``<key>.json.gz`` in ``data_dir``, a
file you supply (:mod:`tlmat.user_data`), matminer or jarvis-tools.

One dispatcher above :mod:`tlmat.data` (frames, cleaning, splits) and :mod:`tlmat.user_data`
(your own property), so neither has to import the other.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from tlmat.data import DataError, DatasetSpec, load_jarvis, load_matminer, read_frame
from tlmat.user_data import load_user_dataset

log = logging.getLogger(__name__)


def load_dataset(spec: DatasetSpec, data_dir: str | os.PathLike | None) -> pd.DataFrame:
    """Raw frame of one data set: ``<data_dir>/<key>.json.gz`` first, else its source."""
    if data_dir is not None:
        local = Path(data_dir) / f"{spec.key}.json.gz"
        if local.is_file():
            log.info("%s: using local frame %s", spec.key, local)
            return read_frame(local)
    if spec.source == "file":
        if not spec.path:
            raise DataError(
                f"datasets.{spec.key}: source 'file' needs structures you supply: set "
                f"datasets.{spec.key}.path to a matminer-format frame (columns structure, "
                f"target) or a CSV (id, value) beside CIF/POSCAR files, or put "
                f"{spec.key}.json.gz into data_dir"
            )
        return load_user_dataset(spec)  # checks naming the file
    if spec.source == "matminer":
        return load_matminer(spec)
    if spec.source == "jarvis":
        return load_jarvis(spec)
    raise DataError(f"datasets.{spec.key}: unknown source {spec.source!r}")
