# carseg: cars from GeoTIFFs. `make help` lists the targets; INTERFACE.md is the contract.
#
# Make orders the stages; the CLI (python -m pipeline) lists the scenes of each folder and redoes
# only the scenes whose outputs are older than their inputs, settings or model. Scene names
# therefore never pass through Make, so any file name a GIS folder holds works (spaces, unicode,
# dots, .tif/.tiff/.TIF), and Make and the CLI always agree on one list of scenes.
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
MODEL_DIR ?= models/$(RUN)
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

RAW_IMAGES := $(DATA)/raw/images
LABELS := $(DATA)/raw/labels
CHIPS := $(DATA)/interim/chips
MASKS := $(DATA)/interim/masks
SETTINGS := $(DATA)/interim/settings
REPORT := $(REPORTS)/$(RUN)
MODEL := $(MODEL_DIR)/model.keras

# === Stage commands (each is incremental by itself) ===
TILE = $(CLI) tile $(call q,$(RAW_IMAGES)) $(call q,$(CHIPS)) \
  --settings $(call q,$(SETTINGS)/tile.json) $(CFG) $(BATCH)
MASK = $(CLI) masks $(call q,$(CHIPS)) $(call q,$(LABELS)) $(call q,$(MASKS)) \
  --images $(call q,$(RAW_IMAGES)) --settings $(call q,$(SETTINGS)/masks.json) $(CFG) $(BATCH)
INDEX = $(CLI) index $(call q,$(CHIPS)) $(call q,$(MASKS)) \
  --settings $(call q,$(SETTINGS)/masks.json) $(CFG)
TRAIN = $(CLI) train $(call q,$(CHIPS)) $(call q,$(MASKS)) $(call q,$(MODEL_DIR)) \
  --images $(call q,$(RAW_IMAGES)) --settings $(call q,$(MODEL_DIR)/settings.json) $(CFG)
PREDICT = $(CLI) predict $(call q,$(IMAGES)) --model-dir $(call q,$(MODEL_DIR)) \
  --out $(call q,$(OUT)) --settings $(call q,$(OUT)/settings/predict.json) $(CFG) $(BATCH)
VECTORS = $(CLI) vectors --out $(call q,$(OUT)) --images $(call q,$(IMAGES)) \
  --settings $(call q,$(OUT)/settings/vectors.json) $(CFG) $(BATCH)
BATCHP = $(CLI) batch --images $(call q,$(IMAGES)) --out $(call q,$(OUT)) \
  --model-dir $(call q,$(MODEL_DIR)) $(if $(strip $(ZONES)),--zones $(call q,$(ZONES))) \
  --settings $(call q,$(OUT)/settings/batch.json) $(CFG) $(BATCH)
EVALUATE = $(CLI) evaluate --out $(call q,$(OUT)) --truth $(call q,$(TRUTH)) \
  --settings $(call q,$(OUT)/settings/evaluate.json) $(CFG)
REPORTC = $(CLI) report $(call q,$(REPORT)) --model-dir $(call q,$(MODEL_DIR)) \
  --out $(call q,$(OUT)) --data $(call q,$(DATA)) --settings $(call q,$(REPORT)/settings.json) $(CFG)
# Refuse outputs that would write into or over an input, before any work.
GUARD = $(CLI) paths --data $(call q,$(DATA)) --images $(call q,$(IMAGES)) --out $(call q,$(OUT)) \
  --model-dir $(call q,$(MODEL_DIR)) --report $(call q,$(REPORT)) --truth $(call q,$(TRUTH)) \
  $(if $(strip $(ZONES)),--zones $(call q,$(ZONES)))

# $(call step,COMMAND): run a batch stage. Exit 3 means some scenes failed and the rest are
# done: the following stages still run on those, and the target fails at the end (rc=3).
step = { $(1) || { s=$$?; [ $$s -eq 3 ] || exit $$s; rc=3; }; }
# Training data to a model: chips, masks, index, then train (which says why it (re)trains);
# without training scenes, an existing bundle is used as it is.
TRAIN_ALL = if $(CLI) scenes --any $(call q,$(RAW_IMAGES)); then $(TILE); $(MASK); $(INDEX); fi; \
  $(TRAIN)
HAS_TRUTH = test -f $(call q,$(TRUTH))

.PHONY: help install install-dev guard sample tiles masks train predict vectors batch evaluate \
        report all demo bench bench-gpu test lint clean

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

guard: $(INSTALLED)
	@$(GUARD) $(CFG)

# === Stages ===
sample: guard ## write the generated sample scenes and labels into DATA
	@$(CLI) sample $(call q,$(DATA)) --settings $(call q,$(SETTINGS)/sample.json) $(CFG)

tiles: guard ## chips from every scene in DATA/raw/images
	@$(TILE)

masks: guard ## a binary car mask for every chip, from DATA/raw/labels
	@$(TILE); $(MASK); $(INDEX)

train: guard ## the model in MODEL_DIR (the only target, with all, that trains)
	@$(TRAIN_ALL)

predict: guard ## probability and mask rasters for every scene in IMAGES (never trains)
	@rc=0; $(call step,$(PREDICT)); exit $$rc

vectors: guard ## car polygons for every predicted scene (predicts first; never trains)
	@rc=0; $(call step,$(PREDICT)); $(call step,$(VECTORS)); exit $$rc

batch: guard ## one car layer, mosaics, counts and a STAC catalog for IMAGES (never trains)
	@rc=0; $(call step,$(PREDICT)); $(call step,$(VECTORS)); $(call step,$(BATCHP)); exit $$rc

evaluate: guard ## metrics of the predicted scenes against TRUTH (never trains)
	@rc=0; $(call step,$(PREDICT)); $(call step,$(VECTORS)); \
	  $(HAS_TRUTH) || { echo "error: $(TRUTH): ground truth not found" >&2; exit 2; }; \
	  $(EVALUATE); exit $$rc

report: guard ## an HTML report with plots and overlays (never trains)
	@rc=0; $(call step,$(PREDICT)); $(call step,$(VECTORS)); $(call step,$(BATCHP)); \
	  if $(HAS_TRUTH); then $(EVALUATE); fi; $(REPORTC); exit $$rc

all: guard ## train, predict + vectors + batch on IMAGES, evaluate where TRUTH exists, report
	@rc=0; $(TRAIN_ALL); $(call step,$(PREDICT)); $(call step,$(VECTORS)); \
	  $(call step,$(BATCHP)); if $(HAS_TRUTH); then $(EVALUATE); fi; $(REPORTC); \
	  echo "outputs:"; \
	  echo "  model        $(MODEL_DIR)/model.keras (+ metadata.json)"; \
	  echo "  probability  $(OUT)/probability/<scene>.tif"; \
	  echo "  masks        $(OUT)/masks/<scene>.tif"; \
	  echo "  cars         $(OUT)/cars/<scene>.gpkg, $(OUT)/cars/summary.csv"; \
	  echo "  batch        $(OUT)/batch/ (cars.gpkg, cars.parquet, mosaics, counts, catalog.json)"; \
	  if $(HAS_TRUTH); then echo "  metrics      $(OUT)/evaluation/metrics.json"; fi; \
	  echo "  report       $(REPORT)/index.html"; \
	  exit $$rc

# The demo has its own RUN (models/demo, reports/demo), so it never touches a user's default
# model, and `make predict IMAGES=new/ RUN=demo` predicts with it afterwards.
demo: ## sample, then all on the sample data with configs/demo.yaml and RUN=demo (2-core CPU)
	@$(MAKE) --no-print-directory sample CONFIG=configs/demo.yaml RUN=demo
	@$(MAKE) --no-print-directory all CONFIG=configs/demo.yaml RUN=demo

bench: $(INSTALLED_DEV) ## the benchmark suite; results under reports/bench/
	$(PY) -m bench $(CFG)

bench-gpu: $(INSTALLED) ## GPU training/prediction throughput (run on a GPU machine)
	$(PY) -m bench.gpu

test: $(INSTALLED_DEV) ## run the test suite (slow end-to-end tests included)
	$(PY) -m pytest -q

lint: $(INSTALLED_DEV) ## ruff
	$(PY) -m ruff check pipeline tests bench

# Only the pipeline's own folders under OUT go (a folder of the user's inside OUT stays), and only
# after the same guard as every stage: clean never deletes IMAGES, raw data or a model.
OUT_FOLDERS := probability masks cars batch evaluation settings logs .carseg-tmp
clean: guard ## remove generated data (interim, OUT's outputs) and this RUN's report; keeps raw data and models
	rm -rf $(call q,$(DATA)/interim) $(foreach d,$(OUT_FOLDERS),$(call q,$(OUT)/$(d))) \
	  $(call q,$(REPORT))
