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

.PHONY: help venv test test-fast fidelity demo pseudo-labels export-coco preview eval luigid workers bench lint clean

help:
	@echo "make demo | make test | make test-fast | make fidelity | make pseudo-labels STAGE=<Ingest|UseCaptions|UseSegments|FmbsegLabels|...> IMAGES=dir | make export-coco | make preview | make eval DATASET=voc21 METHOD=car ROOT=dir | make luigid [PORT=8082] | make workers N=2 STAGE=FullDAG IMAGES=dir [PORT=8082] | make bench | pseudoseg stages lists every STAGE"

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,crf,s3]'
	touch $@

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Everything but the `slow` end-to-end runs (subprocesses, luigid, whole branches on tiny models): the quick loop
# while editing.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

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

bench: $(STAMP)
	$(PY) -m bench.run --out bench/results

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline tasks models schemas tests bench

clean:
	rm -rf $(OUT) .pytest_cache
