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

## demo: the whole DAG on the synthetic world, CPU only, no network. Jobs fork from a warm interpreter that has
## torch & co imported already (hnclip.pipeline.warm): ~8 s of imports per job would otherwise be most of the demo's time.
demo: $(BIN)/snakemake
	$(BIN)/python -m hnclip.pipeline.warm run -- $(BIN)/snakemake --profile profiles/demo --cores $(CORES)
	@echo
	@echo "Demo outputs (results/demo/; the thesis run writes results/thesis/):"
	@echo "  synthetic world, real formats   synth/{gqa,hnc,vqav2,textvqa,zeroshot}"
	@echo "  Parquet shards                  data/"
	@echo "  baseline + fine-tuned towers    baseline/, finetune/alpha~*/tau~*/seed~*/"
	@echo "  encoder evaluation              eval/<model>/{hnc,zeroshot,drift}.json"
	@echo "  LLaVA checkpoints, VQA scores   llava/<model>/, vqa/<model>/<dataset>/scores.json"
	@echo "  summary, tables, figures        tables/, figures/"
	@echo "  logs, benchmarks                logs/, benchmarks/"

## clean-demo: remove the demo run's directory (and nothing of any other run)
clean-demo:
	rm -rf results/demo

## test: unit tests, workflow tests (lint, dry runs, the demo DAG in a tmp dir), SLURM on a local cluster
test: $(BIN)/snakemake
	$(BIN)/python -m pytest -ra

test-fast: $(BIN)/snakemake
	$(BIN)/python -m pytest -ra -m "not slow"

lint: $(BIN)/snakemake
	$(BIN)/snakemake --lint
	$(BIN)/snakefmt --check Snakefile rules/

## figures, tables: rebuild from the existing result files, scheduling no model job
figures tables: $(BIN)/snakemake
	$(BIN)/snakemake $@ --profile profiles/demo --cores $(CORES) --rerun-triggers mtime \
		--config 'report={from_existing: true}'
