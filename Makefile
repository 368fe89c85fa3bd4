# `make demo` and `make test` create .venv when it is missing, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORES ?= 2

.PHONY: demo test test-fast lint figures tables clean-demo

$(BIN)/snakemake: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

## demo: the whole DAG on the synthetic world, CPU only, no network
demo: $(BIN)/snakemake
	$(BIN)/snakemake --profile profiles/demo --cores $(CORES)
	@echo
	@echo "Demo outputs:"
	@echo "  synthetic world (real formats):  results/demo/synth/"
	@ls -d results/demo/* 2>/dev/null | sed 's/^/  /'

## test: unit tests, workflow tests (lint, dry runs, the demo DAG in a tmp dir), SLURM on a local cluster
test: $(BIN)/snakemake
	$(BIN)/python -m pytest -ra

test-fast: $(BIN)/snakemake
	$(BIN)/python -m pytest -ra -m "not slow"

lint: $(BIN)/snakemake
	$(BIN)/snakemake --lint
	$(BIN)/snakefmt --check Snakefile rules/

figures tables: $(BIN)/snakemake
	$(BIN)/snakemake --profile profiles/demo --cores $(CORES) $@
