# tlmat: `make demo` runs the quick study, `make test` the test suite.
# Both create .venv and install everything first when needed.
# torch (TORCH_SPEC, default torch==2.13.0) is installed before the rest, from pip's index
# (on plain PyPI under Linux that is the CUDA build; TORCH_INDEX=https://download.pytorch.org/whl/cpu
# picks the CPU one). `make demo` runs on the demo data in data/demo; DATA_DIR=... overrides.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 2
DATA_DIR ?=
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
SNAKE_ARGS ?=
PRESET ?= quick
PUBLISHED ?= data/published/published_runs.csv
PRESETS := $(basename $(notdir $(wildcard presets/*.yaml)))
# PRESET names presets/<name>.yaml for `make demo` (default quick): an unknown one is one line
ifeq ($(wildcard presets/$(PRESET).yaml),)
$(error unknown PRESET '$(PRESET)': there is no presets/$(PRESET).yaml (available: $(PRESETS)))
endif
# rules call `tlmat`: the venv's bin must be on PATH for Snakemake's shell commands
export PATH := $(abspath $(BIN)):$(PATH)

# DATA_DIR: a folder of <key>.json.gz frames + splits.json that replaces the preset's data.
# Empty (the default): `make demo` runs on the preset's own data, for the quick preset the
# demo subset shipped in data/demo (no network, no ../shared needed);
# `make demo DATA_DIR=../shared/data` runs the same study on the full offline pools.
DEMO_CONFIG := $(if $(DATA_DIR),--config data_dir=$(abspath $(DATA_DIR)) splits_file=$(abspath $(DATA_DIR))/splits.json,)

.PHONY: install test lint demo study paper clean-results

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || \
		$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/snakefmt --check Snakefile workflow
	$(BIN)/snakemake --lint --configfile presets/quick.yaml $(DEMO_CONFIG)

demo: install
	$(BIN)/snakemake --cores $(CORES) --configfile presets/$(PRESET).yaml $(DEMO_CONFIG) $(SNAKE_ARGS)

# the paper's tables and figures from its published per-run results alone (about a minute)
paper: install
	$(BIN)/snakemake --cores $(CORES) paper --config published_results=$(abspath $(PUBLISHED)) $(SNAKE_ARGS)

study: install
	$(BIN)/snakemake --cores $(CORES) $(SNAKE_ARGS)

clean-results:
	rm -rf results resources .snakemake
