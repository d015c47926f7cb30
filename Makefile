# `make run` and `make test` each work on a fresh machine (docs/architecture.md, "Running").
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# dora starts nodes by `path:` (console scripts such as `openai-stream-server`
# and `echo-stream`) and runs `build:` commands (`pip install ...`) from PATH.
export PATH := $(abspath $(BIN)):$(PATH)
# With uv on PATH (dora-rs-cli installs it), dora resolves each node's `path:` with `uv run which`,
# which would first lock and sync the project into .venv: the venv is already what make installed.
export UV_NO_SYNC := 1

# Where torch comes from for `make qwenvl` (and `make test`): empty is PyPI's default build (CUDA
# on Linux, several GB); https://download.pytorch.org/whl/cpu on a CPU-only host;
# https://download.pytorch.org/whl/cu128 (or the index matching the driver) on a GPU host.
TORCH_INDEX_URL ?=
# The torch requirement `make qwenvl` installs, e.g. TORCH=torch==2.13.0.
TORCH ?= torch
TORCH_INDEX := $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))

# One stamp per set, so that neither target reinstalls each time; each set is installed again
# when a pyproject it depends on changes. The test set includes the run set.
RUN_STAMP := $(VENV)/.run-installed
TEST_STAMP := $(VENV)/.test-installed
QWENVL_STAMP := $(VENV)/.qwenvl-installed
RUN_DEPS := pyproject.toml protocol/pyproject.toml nodes/echo_stream/pyproject.toml

.PHONY: venv run test qwenvl run-qwenvl lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# What dataflow-stream.yml needs and no more (no torch, no test tools): the protocol, the server,
# echo_stream and dora-rs-cli for the `dora` command. openai-stream-protocol is not on PyPI, so it
# is named in the same pip command as the packages that depend on it. dora-rs-cli's one other
# requirement is uv (38 MB), used only by `dora build/run --uv`, whose users bring their own.
$(RUN_STAMP): $(BIN)/python $(RUN_DEPS)
	$(PIP) install -e protocol -e . -e nodes/echo_stream
	$(PIP) install --no-deps 'dora-rs-cli>=1.1,<1.2'
	touch $@

# Everything the tests exercise, both nodes included.
$(TEST_STAMP): $(BIN)/python $(RUN_DEPS) nodes/qwenvl_stream/pyproject.toml
	# torch first (on this machine `torch==2.13.0` is a CPU wheel on local disk): qwenvl_stream asks
	# for torch>=2.4, and with no torch installed pip would take PyPI's newest CUDA build (several GB).
	$(PIP) install $(TORCH_INDEX) torch==2.13.0
	$(PIP) install -e protocol -e '.[test]' -e nodes/echo_stream -e 'nodes/qwenvl_stream[test]'
	# dora-hub's dora-echo (legacy-compatibility test) pins numpy<2, which current pyarrow
	# cannot use; it needs only dora and pyarrow (docs/architecture.md, "Facts measured").
	$(PIP) install --no-deps dora-echo==0.5.0
	touch $@ $(RUN_STAMP)

# The Qwen2.5-VL node with torch from TORCH_INDEX_URL, chosen explicitly: torch and torchvision
# come from the same index, or pip would pair a CPU torch with a CUDA torchvision. A torch already
# installed that satisfies $(TORCH) is kept: `$(PIP) uninstall torch torchvision` to switch.
$(QWENVL_STAMP): $(RUN_STAMP) nodes/qwenvl_stream/pyproject.toml
	$(PIP) install $(TORCH_INDEX) '$(TORCH)' torchvision
	$(PIP) install -e protocol -e 'nodes/qwenvl_stream[gpu]'
	$(BIN)/python scripts/torch_info.py
	touch $@

venv: $(TEST_STAMP)

# `dora run` also runs each node's `build:` first (dora 1.1.0 does a pre-run build).
# The port comes from the environment: `OPENAI_STREAM_SERVER_PORT=9000 make run`.
run: $(RUN_STAMP)
	$(BIN)/dora run dataflow-stream.yml

qwenvl: $(QWENVL_STAMP)

run-qwenvl: $(QWENVL_STAMP)
	$(BIN)/dora run qwenvl.yml

lint: $(TEST_STAMP)
	$(BIN)/ruff check .

test: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# The benchmark harness (benchmarks/README.md), with the seed server to compare against:
# dora-openai-server pins numpy<2 like dora-echo, hence --no-deps.
bench: $(TEST_STAMP)
	$(PIP) install --no-deps dora-openai-server==0.5.0
	$(PIP) install fastapi
	$(BIN)/python -m benchmarks.run --runs 3 --markdown benchmarks/results.md --plot docs/bench.png

clean:
	rm -rf $(VENV) build dist out .pytest_cache .ruff_cache
	find . -path ./.git -prune -o \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
