#!/usr/bin/env bash
# Snakemake (--sdm conda) runs this inside the environment it has just made from
# envs/tlmat.yaml. That file holds the locked dependencies only: tlmat itself, which every
# rule calls, is this repository, installed editable from Snakemake's working directory
# (the repository root, where the Makefile and docs run it).
set -euo pipefail
test -f pyproject.toml || { echo "tlmat.post-deploy.sh: run snakemake from the repository root" >&2; exit 1; }
python -m pip install --quiet --no-deps -e .
