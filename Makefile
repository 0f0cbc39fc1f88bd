# `make test` on a fresh clone: creates .venv, installs everything, builds the C++ kernels, runs
# the whole suite. `make bench` runs the CPU benchmarks and appends rows to bench/results/.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: test build bench bench-plot gpu-report pretrain theory reproduce soak clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip setuptools wheel

$(INSTALLED): requirements.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	@# Fashion-MNIST (MIT) for the small real-data runs; optional where apt is absent or not root.
	@if command -v apt-get >/dev/null 2>&1 && [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } || \
	  echo "warning: could not apt-get install dataset-fashion-mnist"; fi
	touch $@

# pip's default flags (the package is pure Python at install); then the C++ CPU kernels are
# built once against .venv's torch into ~/.cache/directclr/native, so no test waits on it.
build: $(INSTALLED)
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/python -m directclr info --build

test: build
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

# A short DirectCLR run on Fashion-MNIST (resnet18, 32 px, d0 = 90 of 512), a few minutes on 2
# CPU cores; rerun to resume, PRETRAIN_ARGS to change it (e.g. PRETRAIN_ARGS="--max-steps 200
# --accept-changes max-steps": a resume refuses changed settings it is not told to accept).
PRETRAIN_ARGS ?= --max-steps 30
PROBE_ARGS ?=
pretrain: build
	$(BIN)/python -m directclr pretrain --data fashion-mnist --arch resnet18 \
	  --batch-size 128 --epochs 10 --lr 4.8 --warmup-epochs 1 --ckpt-every 10 \
	  --out runs/fashion-mnist $(PRETRAIN_ARGS)
	$(BIN)/python -m directclr probe --checkpoint runs/fashion-mnist/backbone.pt \
	  --data fashion-mnist --epochs 2 --limit 2000 $(PROBE_ARGS)
	@echo "metrics (one JSON row per step, epoch rows with spectra): runs/fashion-mnist/metrics.jsonl"
	@echo "probe result: runs/fashion-mnist/probe-backbone.json"

# The chaos soak (docs/reliability.md): tiny runs killed and signalled at random moments,
# relaunched, and compared bit for bit with the same runs left alone; summary in
# runs/soak/summary.json, exit 1 on any inexact or failed cycle. SOAK_ARGS="--minutes 5 --seed 2".
SOAK_ARGS ?= --minutes 30
soak: build
	$(BIN)/python -m directclr.soak $(SOAK_ARGS)

# The paper's linear-network theory (Sections 3-4): three simulations, JSON + PNG in docs/theory.
theory: build
	for experiment in strong-aug implicit-reg projector; do \
	  $(BIN)/python -m directclr theory $$experiment --out docs/theory || exit 1; done

# The paper's Tables 1-2 in miniature on Fashion-MNIST: the untrained backbone and every mode x 3
# seeds, 20 epochs for directclr, simclr-none and simclr-linear, 4 for the others (216 epochs of
# 8000 images), with the spectrum's training dynamics. About 4 CPU-hours: an epoch took 60 CPU-s
# (1 compute thread beside another job: 67 s), evaluation ~0.35 h; ~3.5 h on 2 cores (an estimate).
# Resumable. Results: docs/results/results.md, results.json, runs.json, spectra.png, dynamics.png.
reproduce: build
	$(BIN)/python -m directclr reproduce --out docs/results

# What the Triton kernels will cost on an H200, without a GPU: every kernel compiled for sm_90a
# and sm_80 in the specialization the JIT builds for real calls, its SASS read (registers,
# spills, loads, tensor instructions, issue per logit), its work counted under the interpreter,
# and an estimate against eager PyTorch -> bench/results/gpu_static.jsonl and a table.
gpu-report: build
	$(BIN)/python -m directclr.gpu_report

bench: build
	$(BIN)/python bench/bench_loss.py
	$(BIN)/python bench/bench_spectrum.py
	$(BIN)/python bench/bench_data.py
	$(BIN)/python bench/bench_train.py
	$(BIN)/python bench/plot_bench.py

# docs/benchmarks.png: time and memory against N, fused vs eager vs torch.compile, from the
# newest complete sweep of bench/results/bench_loss.jsonl per machine.
bench-plot: build
	$(BIN)/python bench/plot_bench.py

clean:
	rm -rf build *.egg-info "$${XDG_CACHE_HOME:-$$HOME/.cache}/directclr/native"
