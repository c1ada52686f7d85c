# Two commands do all set-up on a fresh machine:
#   make demo   - create .venv if missing, install, run the end-to-end CPU demo
#   make test   - create .venv if missing, install, lint and run the test suite
#   make test-compat TRANSFORMERS=5.17.0 - the same suite (minus slow tests) on another transformers release
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.coma-installed
DEMO_ARGS ?=
PYTEST_ARGS ?=
# test-compat: one venv per minor release (5.17.0 -> .venv-tf517), a stamp per exact pin.
TRANSFORMERS ?= 5.17.0
COMPAT_VENV := .venv-tf$(subst .,,$(basename $(TRANSFORMERS)))
COMPAT_STAMP := $(COMPAT_VENV)/.coma-installed-$(TRANSFORMERS)

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-compat lint clean

install: $(STAMP)

# torch is pinned and installed first: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/coma demo --out runs/demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/ruff check src tests scripts
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

$(COMPAT_STAMP): pyproject.toml
	test -x $(COMPAT_VENV)/bin/python || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(COMPAT_VENV)/bin/python -m pip install --quiet --disable-pip-version-check \
		-e ".[dev]" "transformers==$(TRANSFORMERS)"
	touch $(COMPAT_STAMP)

# Version-sensitive code is spread over loading, processors, rope ids, masks, checkpointing and export, so the
# whole non-slow suite runs (under a minute here); the slow ones (torchrun, full demo) reuse those code paths.
test-compat: $(COMPAT_STAMP)
	$(COMPAT_VENV)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	$(COMPAT_VENV)/bin/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
