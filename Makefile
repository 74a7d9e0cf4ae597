# tlmat: `make demo` runs the quick study, `make test` the test suite.
# Both create .venv and install everything first when needed.
# torch (TORCH_SPEC, default torch==2.13.0) is installed before the rest, from pip's index
# (on plain PyPI under Linux that is the CUDA build; TORCH_INDEX=https://download.pytorch.org/whl/cpu
# picks the CPU one; it must match requirements/torch.txt), then exactly the versions of
# requirements/lock.txt, which `make lock` regenerates with pip-compile (docs/install.md).
# `make demo` runs on the demo data in data/demo; DATA_DIR=... overrides.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 2
DATA_DIR ?=
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
LOCK := requirements/lock.txt
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

.PHONY: install lock test lint demo study paper parity clean-results

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || \
		$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
	$(BIN)/python -m pip install --quiet -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

# after changing pyproject.toml's dependencies or requirements/torch.txt; LOCK_ARGS=--upgrade
# (or --upgrade-package NAME) takes newer releases. Needs pip's index (network).
lock: install
	$(BIN)/python -m tlmat.envlock lock $(LOCK_ARGS)

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

# Parity with the paper, run by run (docs/results.md, "Parity, run by run"): the paper's ALIGNN on the cells
# whose published trial subsets and test ids are in the data, trials 1..TRIALS (default 1);
# ends with the run-by-run table and the verdict (results/parity/tables/trial_parity.csv).
TRIALS ?= 1
PARITY_DATA := $(or $(DATA_DIR),$(TLMAT_SHARED_DATA),../shared/data)
PARITY_TRIALS := resources/parity-trials-$(TRIALS).yaml

parity: install
	@test -f "$(PARITY_DATA)/splits.json" || { echo "make parity: $(PARITY_DATA)/splits.json not found; give DATA_DIR=<folder with the seven <key>.json.gz frames and the paper's splits.json>" >&2; exit 2; }
	@mkdir -p resources && printf 'study:\n  trials: %s\n' "$(TRIALS)" > $(PARITY_TRIALS)
	$(BIN)/snakemake --cores $(CORES) --configfile presets/parity.yaml $(PARITY_TRIALS) --config data_dir=$(abspath $(PARITY_DATA)) splits_file=$(abspath $(PARITY_DATA))/splits.json $(SNAKE_ARGS)
	@sed -n '/^## Parity with the published runs, trial by trial/,/^## [^P]/p' results/parity/tables/summary.md

study: install
	$(BIN)/snakemake --cores $(CORES) $(SNAKE_ARGS)

clean-results:
	rm -rf results resources .snakemake
