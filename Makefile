# `make test` on a fresh clone: creates .venv, installs everything, builds directclr._C, runs
# the whole suite. `make bench` runs the CPU benchmarks and appends rows to bench/results/.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: test build bench clean

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

# The extension compiles against the torch in .venv, so no isolated build environment.
build: $(INSTALLED)
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .

test: build
	$(BIN)/python -m pytest -q tests

bench: build
	$(BIN)/python bench/bench_loss.py
	$(BIN)/python bench/bench_spectrum.py
	$(BIN)/python bench/bench_data.py

clean:
	rm -rf build directclr/_C*.so *.egg-info
