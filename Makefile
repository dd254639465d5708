# Two commands on a fresh machine: `make demo` (the whole pipeline on the embedded default) and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build. GPU nodes install their own.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/apollo-ray run --config ray_config.yaml

test: $(BIN)/.installed
	$(BIN)/pytest

.PHONY: install demo test
