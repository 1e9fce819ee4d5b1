# Everything a fresh machine needs: `make demo` and `make test` create .venv and install the package first.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# One TensorFlow flavour per environment (tensorflow and tensorflow-cpu break each other); CPU build on Linux.
TF_EXTRA ?= $(if $(filter Darwin,$(shell uname -s)),tf,tf-cpu)
STAMP := $(VENV)/.installed-$(TF_EXTRA)
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=

.PHONY: install browser demo test test-quick bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(TF_EXTRA),dev]"
	$(BIN)/python -m compileall -q pipeline >/dev/null  # bytecode as an installed package has it (no recompiling per command)
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: install
	$(BIN)/python sample_data/make_cohort.py --out sample_data/cohort --n-per-class 20 --stain-batch --artefacts
	$(BIN)/wsi-pipeline run --slides sample_data/cohort --labels sample_data/cohort/labels.csv --out $(DEMO_OUT) --config workflows/demo.yaml

# The browser tests (the report, the viewer) drive Debian's Chromium through Playwright (the dev extra; no
# `playwright install`): install the package when we can (root + apt), otherwise those tests skip with a message.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1; } || \
	  echo "chromium could not be installed: the browser tests (report, viewer) will be skipped"

test: install browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The quick set: everything but the tests marked slow (trainings, whole runs on Dask clusters); a few minutes.
test-quick: install browser
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/describe_throughput.py

clean:
	rm -rf $(DEMO_OUT) sample_data/cohort .pytest_cache
