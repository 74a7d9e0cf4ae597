"""Snakemake script: draw every declared figure from the aggregated tables."""

import logging
from pathlib import Path

from tlmat.config import load_config
from tlmat.report.commands import figures_command

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO, force=True)  # noqa: F821
config = load_config([snakemake.input.config])  # noqa: F821
figures_command(
    config,
    Path(snakemake.input[0]).parent,  # noqa: F821
    Path(snakemake.params.runs),  # noqa: F821
    Path(snakemake.output[0]).parent,  # noqa: F821
    snakemake.params.expect,  # noqa: F821
)
