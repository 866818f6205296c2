# carseg: cars from GeoTIFFs. `make help` lists the targets; INTERFACE.md is the contract.
#
# Make only names the folders; the CLI (python -m pipeline) lists the scenes of each folder and
# redoes only what changed (pipeline/runner.py). Scene names therefore never pass through Make,
# so any file name a GIS folder holds works (spaces, unicode, dots, .tif/.tiff/.TIF).
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DELETE_ON_ERROR:
MAKEFLAGS += --no-builtin-rules --warn-undefined-variables
.DEFAULT_GOAL := help

# === Variables (all optional) ===
DATA ?= data
CONFIG ?= configs/default.yaml
SET ?=
RUN ?= default
# RUN=base is the shipped base model (`make base` made it): it finds cars with no labels.
MODEL_DIR ?= $(if $(filter base,$(RUN)),pipeline/base_model,models/$(RUN))
IMAGES ?= $(DATA)/incoming
TRUTH ?= $(DATA)/truth/cars.gpkg
OUT ?= $(DATA)/processed
DASK_SCHEDULER ?=
WORKERS ?= $(shell nproc 2>/dev/null || echo 1)
ZONES ?=
PYTHON ?= python3
REPORTS ?= reports

VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
INSTALLED_DEV := $(VENV)/.installed-dev

# $(call q,PATH): PATH quoted for bash, whatever it holds.
q = '$(subst ','\'',$(1))'
# SET goes to the CLI as one string, so values with spaces survive (tile.bands=[1, 2, 3]).
CFG = --config $(call q,$(CONFIG)) $(if $(strip $(SET)),--sets $(call q,$(SET)))
BATCH = --workers $(WORKERS) $(if $(strip $(DASK_SCHEDULER)),--scheduler $(call q,$(DASK_SCHEDULER)))
CLI = $(PY) -m pipeline

REPORT := $(REPORTS)/$(RUN)

# === The one way in ===
# Every stage target runs `python -m pipeline run TARGET...`, which applies each stage's guard,
# lock and freshness rule (pipeline/runner.py), exactly as `python -m pipeline STAGE` by hand
# does. Several pipeline targets named in one command run as one chain, by the first of them:
# a scene that fails in predict does not keep the good scenes from vectors and batch, and the
# command exits non-zero at the end.
PATHS = --data $(call q,$(DATA)) --images $(call q,$(IMAGES)) --out $(call q,$(OUT)) \
  --model-dir $(call q,$(MODEL_DIR)) --report $(call q,$(REPORT)) --truth $(call q,$(TRUTH)) \
  $(if $(strip $(ZONES)),--zones $(call q,$(ZONES)))
PIPELINE_GOALS := sample tiles masks train predict vectors batch suggest evaluate report all
GOALS := $(filter $(PIPELINE_GOALS),$(MAKECMDGOALS))
# $(call chain,TARGET): the command's pipeline targets as one run, once (by the first).
chain = $(if $(filter $(1),$(firstword $(or $(GOALS),$(1)))),$(CLI) run $(or $(GOALS),$(1)) \
  $(PATHS) $(CFG) $(BATCH),true)

.PHONY: help install install-dev guard sample tiles masks train predict vectors batch suggest \
        evaluate report all base demo bench bench-gpu test lint clean

help: ## list every target with one line
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
	  awk 'BEGIN{FS=":.*## "} {printf "  %-12s %s\n", $$1, $$2}'
	@echo "Variables: DATA CONFIG SET RUN MODEL_DIR IMAGES TRUTH OUT DASK_SCHEDULER WORKERS ZONES"

# === Environment ===
install: $(INSTALLED) ## .venv with the package installed in editable mode

$(INSTALLED): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	@touch $@

install-dev: $(INSTALLED_DEV) ## install plus the dev extras (pytest, hypothesis, ruff, jax)

$(INSTALLED_DEV): $(INSTALLED) pyproject.toml
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

guard: $(INSTALLED) ## refuse outputs that would write into or over an input (every stage does)
	@$(CLI) paths $(PATHS)

# === Stages ===
sample: $(INSTALLED) ## write the generated sample scenes and labels into DATA
	@$(call chain,sample)

tiles: $(INSTALLED) ## chips from every scene in DATA/raw/images
	@$(call chain,tiles)

masks: $(INSTALLED) ## a binary car mask for every chip, from DATA/raw/labels
	@$(call chain,masks)

train: $(INSTALLED) ## the model in MODEL_DIR (the only target, with all, that trains)
	@$(call chain,train)

predict: $(INSTALLED) ## probability and mask rasters for every scene in IMAGES (never trains)
	@$(call chain,predict)

vectors: $(INSTALLED) ## car polygons for every predicted scene (predicts first; never trains)
	@$(call chain,vectors)

batch: $(INSTALLED) ## one car layer, mosaics, counts and a STAC catalog for IMAGES (never trains)
	@$(call chain,batch)

suggest: $(INSTALLED) ## squares to label next, ranked, in OUT/suggest/label_next.gpkg (never trains)
	@$(call chain,suggest)

evaluate: $(INSTALLED) ## metrics of the predicted scenes against TRUTH (never trains)
	@$(call chain,evaluate)

report: $(INSTALLED) ## an HTML report with plots and overlays (never trains)
	@$(call chain,report)

all: $(INSTALLED) ## train, predict + vectors + batch + suggest on IMAGES, evaluate where TRUTH exists, report
	@$(call chain,all)

# The base model (pipeline/base.py): generated scenes only, trained with configs/base.yaml in
# BASE, then copied into the package (pipeline/base_model/, committed), which RUN=base uses.
BASE ?= build/base
BASE_CONFIG ?= configs/base.yaml
BASE_SHIP ?= pipeline/base_model
base: $(INSTALLED) ## train the base model on generated scenes and ship it in pipeline/base_model (RUN=base uses it)
	@$(CLI) base --data $(call q,$(BASE)) --model-dir $(call q,$(BASE)/model) --ship $(call q,$(BASE_SHIP)) \
	  --config $(call q,$(BASE_CONFIG)) $(if $(strip $(SET)),--sets $(call q,$(SET))) $(BATCH)

# The demo has its own RUN (models/demo, reports/demo), so it never touches a user's default
# model, and `make predict IMAGES=new/ RUN=demo` predicts with it afterwards.
demo: ## sample, then all on the sample data with configs/demo.yaml and RUN=demo (2-core CPU), then the shipped base on the same scenes
	@$(MAKE) --no-print-directory sample CONFIG=configs/demo.yaml RUN=demo
	@$(MAKE) --no-print-directory all CONFIG=configs/demo.yaml RUN=demo
	@echo "the shipped base model (no training, no labels) on the same scenes:"
	@$(MAKE) --no-print-directory evaluate RUN=base OUT=$(DATA)/processed-base

bench: $(INSTALLED_DEV) ## the benchmark suite; results under reports/bench/
	$(PY) -m bench $(CFG)

bench-gpu: $(INSTALLED) ## GPU training/prediction throughput (run on a GPU machine)
	$(PY) -m bench.gpu

# The install (dev extras: pytest-timeout, hypothesis, jax, openvino) comes first, so no test's
# own `make` finds a stale stamp and pip-installs mid-run; every engine must import before a test
# runs (CI=1, set by .ci/run, also fails any skip: tests/conftest.py).
test: $(INSTALLED_DEV) ## run the test suite (slow end-to-end tests included)
	$(PY) -c 'import onnxruntime, openvino, pytest_timeout'
	$(PY) -m pytest -q

lint: $(INSTALLED_DEV) ## ruff
	$(PY) -m ruff check pipeline tests bench

# Only what a stage wrote goes (each stage's manifest lists its files): a user's own file or
# folder in OUT, CHIPS, MASKS or the report folder stays; raw data and models are never touched.
clean: $(INSTALLED) ## remove what the stages wrote (chips, masks, OUT's outputs, this RUN's report); keeps raw data, models and anything of yours
	@$(CLI) clean $(PATHS)
