# pseudoseg — every target sets up .venv on first use (offline: torch comes from the local wheel store).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
OUT ?= out
# CONFIG=FILE: your settings, read over the shipped luigi.cfg; SET='section.key=value ...': single overrides.
CONFIG ?=
SET ?=
N ?= 2
PORT ?= 8082
STAGE ?= Ingest
IMAGES ?=
DATASET ?= $(notdir $(patsubst %/,%,$(IMAGES)))
PYTEST_ARGS ?=
# export-coco / preview default to the demo's sample set (after `make demo`).
DEMO_IMAGES := $(OUT)/demo/samples/images

export PYTHONHASHSEED := 0
SETTINGS = $(if $(CONFIG),--config $(abspath $(CONFIG))) $(foreach item,$(SET),--set $(item))

.PHONY: help venv cluster-deps test test-fast fidelity demo pseudo-labels export-coco preview eval luigid workers slurm bench lint clean

help:
	@echo "make demo | make test | make test-fast | make fidelity | make pseudo-labels STAGE=<Ingest|UseCaptions|UseSegments|FmbsegLabels|...> IMAGES=dir | make export-coco | make preview | make eval DATASET=voc21 METHOD=car ROOT=dir | make luigid [PORT=8082] | make workers N=2 STAGE=FullDAG IMAGES=dir [PORT=8082] | make slurm STAGE=FullDAG IMAGES=dir NODES=2 GPUS=4 [DRY_RUN=1] | make cluster-deps | make bench | pseudoseg stages lists every STAGE"

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,crf,s3]'
	touch $@

venv: $(STAMP)

# The single-node Slurm cluster the Slurm tests start (tests/slurmcluster.py): Debian's slurm-wlm and munge, installed
# when missing (needs root, as CI runs).
cluster-deps:
	@command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge; }

# Every core (-n auto; a test file stays on one worker, so its module fixtures are built once): ~13 min on 2 cores.
test: $(STAMP) cluster-deps
	$(PY) -m pytest -q -n auto --dist loadfile $(PYTEST_ARGS)

# Everything but the `slow` end-to-end runs (subprocesses, luigid, whole branches on tiny models): the quick loop
# while editing.
test-fast: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadfile -m "not slow" $(PYTEST_ARGS)

# Mutants as tests of the tests (tests/fidelity/mutants.py): each change of a README Fidelity row must make the
# tests it names fail; one line per mutant (killed / survived, seconds), status 1 if any survives or is stale.
# FIDELITY_JOBS=2 runs two mutants at once (each in its own scratch copy).
FIDELITY_JOBS ?= 1
fidelity: $(STAMP)
	$(PY) -m tests.fidelity --jobs $(FIDELITY_JOBS)

demo: $(STAMP)
	$(VENV)/bin/pseudoseg demo --out $(OUT) $(SETTINGS)

pseudo-labels: $(STAMP)
	@test -n "$(IMAGES)" || { echo "usage: make pseudo-labels STAGE=<stage> IMAGES=<dir|list|tars> [DATASET=name]"; exit 2; }
	$(VENV)/bin/pseudoseg run $(STAGE) --images $(IMAGES) --dataset $(DATASET) --out $(OUT) $(SETTINGS)

export-coco: $(STAMP)
	$(VENV)/bin/pseudoseg run ExportCoco --images $(or $(IMAGES),$(DEMO_IMAGES)) --dataset $(or $(DATASET),demo) --out $(OUT) $(SETTINGS)

preview: $(STAMP)
	$(VENV)/bin/pseudoseg run UsePreview --images $(or $(IMAGES),$(DEMO_IMAGES)) --dataset $(or $(DATASET),demo) --out $(OUT) $(SETTINGS)

# DATASET = benchmark (pipeline.eval.benchmarks.BENCHMARKS key), ROOT = its folder; fmbseg/use_sam/pseudo also need IMAGES + RUN (upstream run).
eval: $(STAMP)
	@test -n "$(ROOT)" || { echo "usage: make eval DATASET=voc21 METHOD=car|fmbseg|use_sam|pseudo ROOT=<dir> [LIMIT=0] [IMAGES=<dir> RUN=<name>]"; exit 2; }
	$(VENV)/bin/pseudoseg run Evaluate --images $(or $(IMAGES),$(ROOT)) --dataset $(or $(RUN),$(DATASET)) --out $(OUT) \
		--set Evaluate.benchmark=$(DATASET) --set Evaluate.data_root=$(abspath $(ROOT)) \
		--set Evaluate.method=$(or $(METHOD),car) --set Evaluate.limit=$(or $(LIMIT),0) $(SETTINGS)

luigid: $(STAMP)
	$(VENV)/bin/pseudoseg luigid --out $(OUT) --port $(PORT)

workers: $(STAMP)
	@test -n "$(IMAGES)" || { echo "usage: make workers N=2 STAGE=<stage> IMAGES=<dir> [DATASET=name]"; exit 2; }
	$(VENV)/bin/pseudoseg workers --n $(N) $(STAGE) --images $(IMAGES) --dataset $(DATASET) --out $(OUT) \
		--scheduler-port $(PORT) $(if $(GPUS),--gpus $(GPUS)) $(SETTINGS)

# STAGE on a Slurm cluster: luigid as one job, NODES array tasks of GPUS workers each (GPUS=0: WORKERS CPU workers);
# DRY_RUN=1 prints the sbatch scripts. SLURM_ARGS: more `pseudoseg slurm` options (--partition P --time T ...).
NODES ?= 1
GPUS ?= 0
slurm: $(STAMP)
	@test -n "$(IMAGES)" || { echo "usage: make slurm STAGE=<stage> IMAGES=<dir|list|tars|s3://...> [NODES=1] [GPUS=0] [DRY_RUN=1] [SLURM_ARGS='--partition gpu --time 4:00:00']"; exit 2; }
	$(VENV)/bin/pseudoseg slurm $(STAGE) --images $(IMAGES) --dataset $(DATASET) --out $(OUT) --nodes $(NODES) \
		--gpus-per-node $(GPUS) $(if $(WORKERS),--workers-per-node $(WORKERS)) $(if $(DRY_RUN),--dry-run) $(SLURM_ARGS) $(SETTINGS)

bench: $(STAMP)
	$(PY) -m bench.run --out bench/results

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline tasks models schemas tests bench

clean:
	rm -rf $(OUT) .pytest_cache
