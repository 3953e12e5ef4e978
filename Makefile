# Two commands: `make run` (set up + whole pipeline) and `make test` (set up + tests).
# DATA=path/to/file.mat overrides the data file; by default the scripts read
# data/miyawaki_structured_28x28.mat and fall back to the simulated set without it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA_ARG := $(if $(DATA),--data $(DATA),)

.PHONY: run test clean
run: $(VENV)/.installed
	$(BIN)/python miyawaki_dataset_loader.py $(DATA_ARG)
	$(BIN)/python miyawaki_dual_encoder.py $(DATA_ARG)
	$(BIN)/python miyawaki_evaluation.py $(DATA_ARG)
	$(BIN)/python miyawaki_generative_backend.py $(DATA_ARG)

# the tests run torch and BLAS on one thread each (tests/conftest.py): one pytest process per core
# (pytest-xdist, at most 4) uses the 2-core CI's second core; loadgroup hands out tests one by
# one, but keeps those that share a module fixture (marked xdist_group) in one process (README,
# Tests and CI)
test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadgroup

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $@

clean:
	rm -rf outputs/*
