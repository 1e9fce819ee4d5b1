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

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(TF_EXTRA),dev]"
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: install
	$(BIN)/python sample_data/make_cohort.py --out sample_data/cohort --n-per-class 10
	$(BIN)/wsi-pipeline run --slides sample_data/cohort --labels sample_data/cohort/labels.csv --out $(DEMO_OUT) --config workflows/demo.yaml

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/describe_throughput.py

clean:
	rm -rf $(DEMO_OUT) sample_data/cohort .pytest_cache
