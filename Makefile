# Two commands for a new user: `make run` (the main job) and `make test` (the whole suite).
# Both create .venv and install everything first. torch is pinned before anything else is
# installed: an unpinned torch (or uv / poetry) would download several GB of CUDA wheels.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
RUN_ARGS ?= --method cud --integrator rk3
# Parallel test workers: CI machines have 2 cores.
TEST_WORKERS ?= 2

.PHONY: install run test clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet $(TORCH_PIN) -e ".[test,diffusers]"
	$(BIN)/python -c "import torch, torchvision, distillkit, mlflow, pluggy, hypothesis"
	touch $(STAMP)

run: install
	$(BIN)/distillkit run $(RUN_ARGS)

test: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) -q

clean:
	rm -rf $(VENV) distillkit-runs .pytest_cache .hypothesis
