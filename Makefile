# Front door of the toolkit. Every target installs what it needs into a local venv on first use.
#   make demo                  extract -> train -> eval -> predict on the embedded sample (CPU, offline)
#   make serve [CHECKPOINT=...] web page to ground sentences in a video (default: the demo's checkpoint)
#   make test                  ruff, mypy and the test suite (what CI runs; installs the headless browser the
#                              r2 serve test drives when missing); GPU tests skip without CUDA
#   make test-gpu              only the GPU tests (pytest -m cuda), on a machine with CUDA
#   make extract DATASET=tacos extract CLIP tokens for data/tacos/ into cache/tacos/ (any other name than
#                              the six benchmarks is one's own data: the custom dataset, docs/custom-data.md)
#   make train  [PRESET=...]   train on a store (default: the embedded sample store)
#   make sweep  [GRID=...]     hyper-parameter sweep over a store
#   make bench                 benchmarks (scripts/bench_*.py)
#   make lint                  ruff
#   make clean                 remove the sample store and runs (cache/sample.zarr, runs/{demo,sample,sample-sweep})
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision must be a matching pair; this pair has CPU-capable wheels for Python 3.11.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

DATASET ?= sample
ARCH ?= ViT-B-32
LAYERS ?= 4
PRETRAINED ?= openai
FPS ?= auto
DEVICE ?= auto
CACHE ?= cache
RUNS ?= runs
DATA ?= data
GRID ?= --grid lr=1e-4,2.5e-4,5e-4 --grid loss_sal=0.05,0.1
SAMPLE := extract/sample

ifeq ($(DATASET),sample)
STORE ?= $(CACHE)/sample.zarr
PRESET ?= charades
EXTRACT_ARGS = --sample --out $(STORE)
# The sample has 4 training queries: batch 4 makes 1 optimizer step per epoch. A short run shortens the
# warm-up with the epochs (the preset's 500 warm-up steps would outlast 3 epochs x 1 step, and r2 train
# warns): here 1 warm-up step, then 2 steps at the full rate.
SET ?= --set epochs=3 --set batch_size=4 --set warmup=1 --set train.num_workers=0
else
# The six benchmarks by name; any other DATASET is one's own videos: the custom dataset and preset.
BENCHMARKS := qvhighlights charades tacos ego4d youtube tvsum
KIND := $(if $(filter $(DATASET),$(BENCHMARKS)),$(DATASET),custom)
# One naming rule for stores: cache/<dataset>/<ARCH>_<weights>_k<LAYERS>.zarr, <weights> = openai, random,
# random-SEED or a weights file's stem, so a random-weights test store never sits where the real one goes.
WEIGHTS_TAG := $(basename $(notdir $(subst :,-,$(PRETRAINED))))
SET ?=
STORE ?= $(CACHE)/$(DATASET)/$(ARCH)_$(WEIGHTS_TAG)_k$(LAYERS).zarr
PRESET ?= $(KIND)
# The annotation folder gives one file per split (the documented names first; r2 extract says which).
EXTRACT_ARGS = --dataset $(KIND) --videos $(DATA)/$(DATASET)/videos --annotations $(DATA)/$(DATASET) \
	--out $(STORE) --arch $(ARCH) --pretrained $(PRETRAINED) --layers $(LAYERS) --fps $(FPS) --device $(DEVICE)
endif
RUN ?= $(RUNS)/$(DATASET)
SWEEP ?= $(RUNS)/$(DATASET)-sweep
RESUME_FLAG = $(if $(RESUME),--resume,)

.PHONY: install demo test test-gpu extract train sweep bench lint clean

# The r2 commands these targets run name a way out of an error in make's terms (RESUME=1, RUN=...).
extract train sweep demo serve: export R2_VIA_MAKE := 1

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $(STAMP)

extract: $(STAMP)
	$(BIN)/r2 extract $(EXTRACT_ARGS)

train: $(STAMP)
	$(BIN)/r2 train --preset $(PRESET) --store $(STORE) --out $(RUN) --device $(DEVICE) $(RESUME_FLAG) $(SET)

sweep: $(STAMP)
	$(BIN)/r2 sweep --preset $(PRESET) --store $(STORE) --out $(SWEEP) --device $(DEVICE) $(GRID) $(SET)

bench: $(STAMP)
	$(BIN)/python scripts/bench_store.py
	$(BIN)/python scripts/bench_extract.py
	$(BIN)/python scripts/bench_train.py
	$(BIN)/python scripts/bench_sweep.py

# The main job on the embedded sample: two short real videos, random CLIP weights, CPU, offline.
# 8 epochs x 1 step (4 queries, batch 4); the warm-up takes the first 2 steps (docs/training.md, short runs).
DEMO_RUN := $(RUNS)/demo
DEMO_QUERY := person drinks from a red cup in the doorway.
demo: $(STAMP)
	$(BIN)/r2 extract --sample --out $(CACHE)/sample.zarr
	$(BIN)/r2 shards verify $(CACHE)/sample.zarr
	rm -rf $(DEMO_RUN)
	$(BIN)/r2 train --preset charades --store $(CACHE)/sample.zarr --out $(DEMO_RUN) --device cpu \
		--set epochs=8 --set batch_size=4 --set warmup=2 --set train.num_workers=0
	$(BIN)/r2 eval --dataset charades --predictions $(DEMO_RUN)/val_preds.jsonl \
		--annotations $(SAMPLE)/charades_sample_test.jsonl
	$(BIN)/r2 predict $(SAMPLE)/univtg_charades.mp4 "$(DEMO_QUERY)" --checkpoint $(DEMO_RUN)/best.pt \
		--device cpu --plot $(DEMO_RUN)/predict.png

# The grounding page on http://127.0.0.1:$(PORT)/ (r2 serve; docs/serve.md); after `make demo` it serves the demo's model.
CHECKPOINT ?= $(DEMO_RUN)/best.pt
HOST ?= 127.0.0.1
PORT ?= 8000
.PHONY: serve
serve: $(STAMP)
	@test -f "$(CHECKPOINT)" || { echo "no checkpoint at $(CHECKPOINT): run \`make demo\` first, or give one: make serve CHECKPOINT=runs/<run>/best.pt" >&2; exit 2; }
	$(BIN)/r2 serve --checkpoint $(CHECKPOINT) --host $(HOST) --port $(PORT) --device $(DEVICE)

# pytest's options (-q) are in pyproject.toml; one more -q here would hide its summary line.
test: $(STAMP)
	bash scripts/install_browser.sh
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest

test-gpu: $(STAMP)
	$(BIN)/pytest -m cuda

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(CACHE)/sample.zarr $(DEMO_RUN) $(RUNS)/sample $(RUNS)/sample-sweep
