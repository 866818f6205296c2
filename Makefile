# carseg: cars from GeoTIFFs. `make help` lists the targets; INTERFACE.md is the contract.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DELETE_ON_ERROR:
.SECONDARY:
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
PYTHON ?= python3
REPORTS ?= reports

VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
INSTALLED_DEV := $(VENV)/.installed-dev
CFG = --config $(CONFIG) $(foreach s,$(SET),--set $(s))
BATCH = --workers $(WORKERS) $(if $(DASK_SCHEDULER),--scheduler $(DASK_SCHEDULER))
CLI = $(PY) -m pipeline

RAW_IMAGES := $(DATA)/raw/images
LABELS := $(DATA)/raw/labels
CHIPS := $(DATA)/interim/chips
MASKS := $(DATA)/interim/masks
SETTINGS := $(DATA)/interim/settings
REPORT := $(REPORTS)/$(RUN)

TRAIN_SCENES := $(sort $(wildcard $(RAW_IMAGES)/*.tif))
LABEL_FILES := $(sort $(foreach e,gpkg geojson shp parquet,$(wildcard $(LABELS)/*.$(e))))
SCENE_CHIPS := $(patsubst $(RAW_IMAGES)/%.tif,$(CHIPS)/%/chips.gpkg,$(TRAIN_SCENES))
SCENE_MASKS := $(patsubst $(RAW_IMAGES)/%.tif,$(MASKS)/%/masks.json,$(TRAIN_SCENES))
INDEX := $(CHIPS)/index.gpkg
MODEL := $(MODEL_DIR)/model.keras

BATCH_SCENES := $(sort $(wildcard $(IMAGES)/*.tif))
PROBS := $(patsubst $(IMAGES)/%.tif,$(OUT)/probability/%.tif,$(BATCH_SCENES))
PMASKS := $(patsubst $(IMAGES)/%.tif,$(OUT)/masks/%.tif,$(BATCH_SCENES))
CARS := $(patsubst $(IMAGES)/%.tif,$(OUT)/cars/%.gpkg,$(BATCH_SCENES))
SUMMARY := $(OUT)/cars/summary.csv
METRICS := $(OUT)/evaluation/metrics.json
HTML := $(REPORT)/index.html

# Batch outputs are written atomically scene by scene; when one scene of a batch fails, the
# finished scenes are kept (precious) rather than deleted with the failed recipe.
.PRECIOUS: $(SCENE_CHIPS) $(SCENE_MASKS) $(PROBS) $(PMASKS) $(CARS) $(SUMMARY)

.PHONY: help install install-dev sample tiles masks train predict vectors evaluate report all \
        demo bench bench-gpu test lint clean FORCE

help: ## list every target with one line
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
	  awk 'BEGIN{FS=":.*## "} {printf "  %-12s %s\n", $$1, $$2}'
	@echo "Variables: DATA CONFIG SET RUN MODEL_DIR IMAGES TRUTH OUT DASK_SCHEDULER WORKERS"

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

# === Settings stamps: rewritten only when a stage's settings change, so Make redoes only the
# stages whose settings did (changing train.epochs never redoes tiling). ===
$(SETTINGS)/%.json: FORCE | $(INSTALLED)
	@$(CLI) settings $* $@ $(CFG)

$(MODEL_DIR)/settings.json: FORCE | $(INSTALLED)
	@$(CLI) settings train $@ $(CFG)

$(OUT)/settings/%.json: FORCE | $(INSTALLED)
	@$(CLI) settings $* $@ $(CFG)

$(REPORT)/settings.json: FORCE | $(INSTALLED)
	@$(CLI) settings report $@ $(CFG)

FORCE:

# $(call need,LIST,MESSAGE): fail with one clear line when LIST is empty.
need = $(if $(strip $(1)),:,echo "error: $(2)" >&2; exit 2)

# === Stages ===
sample: $(DATA)/sample-manifest.json ## write the generated sample scenes and labels into DATA

$(DATA)/sample-manifest.json: $(SETTINGS)/sample.json | $(INSTALLED)
	$(CLI) sample $(DATA) $(CFG)

tiles: $(SCENE_CHIPS) ## chips from every scene in DATA/raw/images
	@$(call need,$(TRAIN_SCENES),$(RAW_IMAGES): no training scenes (*.tif))

$(SCENE_CHIPS) &: $(TRAIN_SCENES) $(SETTINGS)/tile.json | $(INSTALLED)
	$(CLI) tile $(RAW_IMAGES) $(CHIPS) --settings $(SETTINGS)/tile.json $(CFG) $(BATCH)

masks: $(INDEX) ## a binary car mask for every chip, from DATA/raw/labels

$(SCENE_MASKS) &: $(SCENE_CHIPS) $(LABEL_FILES) $(SETTINGS)/masks.json | $(INSTALLED)
	$(CLI) masks $(CHIPS) $(LABELS) $(MASKS) --settings $(SETTINGS)/masks.json $(CFG) $(BATCH)

$(INDEX): $(SCENE_MASKS)
	$(CLI) index $(CHIPS) $(MASKS) $(CFG)

train: $(MODEL) ## the model in MODEL_DIR

# Without training scenes in DATA (a bundle trained elsewhere), the model is taken as it is.
$(MODEL): $(if $(TRAIN_SCENES),$(INDEX) $(MODEL_DIR)/settings.json)
	@$(call need,$(TRAIN_SCENES),$(RAW_IMAGES): no training scenes (*.tif) and no model in $(MODEL_DIR))
	$(CLI) train $(CHIPS) $(MASKS) $(MODEL_DIR) $(CFG)

predict: $(PROBS) ## probability and mask rasters for every scene in IMAGES
	@$(call need,$(BATCH_SCENES),$(IMAGES): no GeoTIFF scenes (*.tif) to predict)

# One recipe for the whole batch (so Dask sees every scene); it redoes only stale scenes.
$(PROBS) $(PMASKS) &: $(BATCH_SCENES) $(MODEL) $(OUT)/settings/predict.json
	$(CLI) predict $(IMAGES) --model-dir $(MODEL_DIR) --out $(OUT) \
	  --settings $(OUT)/settings/predict.json $(CFG) $(BATCH)

vectors: $(SUMMARY) ## car polygons for every predicted scene

$(CARS) $(SUMMARY) &: $(PMASKS) $(OUT)/settings/vectors.json
	$(CLI) vectors --out $(OUT) --settings $(OUT)/settings/vectors.json $(CFG) $(BATCH)

evaluate: $(METRICS) ## metrics of the predicted scenes against TRUTH

$(METRICS): $(SUMMARY) $(wildcard $(TRUTH)) $(OUT)/settings/evaluate.json
	@test -f $(TRUTH) || { echo "error: $(TRUTH): ground truth not found" >&2; exit 2; }
	$(CLI) evaluate --out $(OUT) --truth $(TRUTH) $(CFG)

report: $(HTML) ## an HTML report with plots and overlays

$(HTML): $(MODEL) $(SUMMARY) $(wildcard $(METRICS)) $(REPORT)/settings.json
	$(CLI) report $(REPORT) --model-dir $(MODEL_DIR) --out $(OUT) --data $(DATA) $(CFG)

all: ## train, predict + vectors on IMAGES, evaluate where TRUTH exists, report
	$(MAKE) --no-print-directory train
	$(MAKE) --no-print-directory vectors
	$(if $(wildcard $(TRUTH)),$(MAKE) --no-print-directory evaluate)
	$(MAKE) --no-print-directory report
	@echo "outputs:"
	@echo "  model        $(MODEL_DIR)/model.keras (+ metadata.json)"
	@echo "  probability  $(OUT)/probability/<scene>.tif"
	@echo "  masks        $(OUT)/masks/<scene>.tif"
	@echo "  cars         $(OUT)/cars/<scene>.gpkg, $(SUMMARY)"
	@$(if $(wildcard $(TRUTH)),echo "  metrics      $(METRICS)")
	@echo "  report       $(HTML)"

demo: ## sample, then all on the sample data with configs/demo.yaml (2-core CPU)
	$(MAKE) --no-print-directory sample CONFIG=configs/demo.yaml
	$(MAKE) --no-print-directory all CONFIG=configs/demo.yaml

bench: $(INSTALLED_DEV) ## the benchmark suite; results under reports/bench/
	$(PY) -m bench $(CFG)

bench-gpu: $(INSTALLED) ## GPU training/prediction throughput (run on a GPU machine)
	$(PY) -m bench.gpu

test: $(INSTALLED_DEV) ## run the test suite (slow end-to-end tests included)
	$(PY) -m pytest -q

lint: $(INSTALLED_DEV) ## ruff
	$(PY) -m ruff check pipeline tests bench

clean: ## remove generated data (interim, OUT) and this RUN's report; keeps raw data and models
	rm -rf $(DATA)/interim $(OUT) $(REPORT)
