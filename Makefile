# Every target sets itself up on a fresh machine: a virtual environment (unless one is
# active), torch==2.13.0 first when there is no CUDA GPU (an unpinned torch pulls several
# GB of CUDA wheels), then the package with its dev extras.
SHELL := /bin/bash
ifdef VIRTUAL_ENV
PY := python
else
PY := .venv/bin/python
endif
STAMP := $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)/.vmaescale-installed

.PHONY: setup test test-fast demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@if [ -z "$$VIRTUAL_ENV" ] && [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
	$(PY) -m pip install -q --upgrade pip
	@if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then \
		echo "no CUDA GPU: installing the CPU build torch==2.13.0 first"; \
		$(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

demo: setup
	PATH="$(dir $(PY)):$$PATH" bash launch/demo.sh

clean:
	rm -rf demo runs mlflow.db mlruns
