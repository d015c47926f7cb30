# `make run` and `make test` each work on a fresh machine (DESIGN.md, "Running").
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# dora starts nodes by `path:` (console scripts such as `openai-stream-server`
# and `echo-stream`) and runs `build:` commands (`pip install ...`) from PATH.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: venv run test lint bench clean

venv: $(VENV)/.installed

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

# Reinstalls only when a pyproject changes, so `make test` is quick once set up.
$(VENV)/.installed: $(BIN)/python pyproject.toml nodes/echo_stream/pyproject.toml nodes/qwenvl_stream/pyproject.toml
	# CPU torch first (its wheel lies on this machine's disk): qwenvl_stream asks for torch>=2.4, and
	# with no torch installed pip would take PyPI's newest CUDA build (several GB).
	$(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e '.[test]' -e nodes/echo_stream -e 'nodes/qwenvl_stream[test]'
	# dora-hub's dora-echo (legacy-compatibility test) pins numpy<2, which current pyarrow
	# cannot use; it needs only dora and pyarrow (DESIGN.md, measured facts).
	$(BIN)/python -m pip install --no-deps dora-echo==0.5.0
	touch $@

# `dora run` also runs each node's `build:` first (dora 1.1.0 does a pre-run build).
run: venv
	$(BIN)/dora run dataflow-stream.yml

lint: venv
	$(BIN)/ruff check .

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# The benchmark harness (benchmarks/README.md), with the seed server to compare against:
# dora-openai-server pins numpy<2 like dora-echo, hence --no-deps.
bench: venv
	$(BIN)/python -m pip install --no-deps dora-openai-server==0.5.0
	$(BIN)/python -m pip install fastapi
	$(BIN)/python -m benchmarks.run --runs 3 --markdown benchmarks/results.md --plot docs/bench.png

clean:
	rm -rf $(VENV) build dist out .pytest_cache .ruff_cache
	find . -path ./.git -prune -o \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
