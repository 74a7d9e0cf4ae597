"""Snakemake script: aggregate the study's metrics.json files into tables.

A script (not a shell command) because the full study has ~2,000 input files, more than
fits into one shell command line.
"""

import logging
from pathlib import Path

from tlmat.config import load_config
from tlmat.report.commands import aggregate_command

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO, force=True)  # noqa: F821
config = load_config([snakemake.input.config])  # noqa: F821
published = snakemake.input.published  # noqa: F821
aggregate_command(
    config,
    Path(snakemake.input.metrics[0]).parent,  # noqa: F821 - unused: the files are given
    Path(snakemake.output[0]).parent,  # noqa: F821
    [Path(p) for p in snakemake.input.metrics],  # noqa: F821
    Path(published[0]) if published else None,
)
