"""config.yaml runs the paper's protocol: every key of the protocol table in docs/study.md
has, in config.yaml, the value that table gives as ours."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tlmat.config import load_config

ROOT = Path(__file__).resolve().parents[1]
#: keys the table must cover: the optimisation the paper ran
REQUIRED = {
    "study.pt_size",
    "study.ft_sizes",
    "study.trials",
    "train.epochs",
    "train.batch_size",
    "train.batch_size_by_size",
    "train.pretrain_lr",
    "finetune.lr",
    "train.lr",
    "train.select",
    "exclude_test_overlap",
    "study.learning_rate.lrs",
    "study.learning_rate.strategies",
    "study.learning_rate.ft_size",
}


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def protocol_rows() -> list[dict[str, str]]:
    """The rows of the first table under '## Protocol' in docs/study.md, by header."""
    text = (ROOT / "docs" / "study.md").read_text()
    section = text.split("\n## Protocol\n", 1)[1]
    table: list[str] = []
    for line in section.splitlines():  # the first table: its contiguous "|" lines
        if line.startswith("|"):
            table.append(line)
        elif table:
            break
    header = _cells(table[0])
    return [dict(zip(header, _cells(line), strict=True)) for line in table[2:]]


def _code(cell: str) -> str | None:
    found = re.search(r"`([^`]+)`", cell)
    return found.group(1) if found else None


def _lookup(config: dict, dotted: str):
    value = config
    for part in dotted.split("."):
        assert isinstance(value, dict) and part in value, f"{dotted}: no such config key"
        value = value[part]
    return value


def test_table_has_the_columns_and_keys():
    rows = protocol_rows()
    assert {"item", "paper", "paper's file", "config key", "ours"} <= set(rows[0])
    keys = {_code(row["config key"]) for row in rows} - {None}
    assert keys >= REQUIRED, REQUIRED - keys


@pytest.mark.parametrize(
    "row", [r for r in protocol_rows() if _code(r["config key"])], ids=lambda r: r["item"]
)
def test_config_yaml_has_the_tables_values(row):
    config = load_config([ROOT / "config.yaml"])
    key, ours = _code(row["config key"]), _code(row["ours"])
    assert ours is not None, f"{row['item']}: no value in the 'ours' column"
    assert _lookup(config, key) == yaml.safe_load(ours), (key, ours)
