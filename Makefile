# Two commands on a fresh machine: `make demo` (the whole pipeline on the embedded default) and `make test`.
# Both install into .venv/ on first use, at the versions in constraints.txt: what CI tested.
VENV ?= .venv
BIN := $(VENV)/bin
PY ?= python3

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build. GPU nodes install their own.
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/apollo-ray run --config ray_config.yaml

test: $(BIN)/.installed
	$(BIN)/pytest

# Plant known bugs one at a time in a temporary copy and check that the tests catch each (~5 min; not part of CI).
mutants: $(BIN)/.installed
	$(BIN)/python bench/mutants.py

# Re-resolve the dependencies of pyproject.toml (within its upper bounds) in a scratch venv and rewrite the lock.
lock:
	rm -rf .lock-venv && $(PY) -m venv .lock-venv
	.lock-venv/bin/pip install -q --upgrade pip
	.lock-venv/bin/pip install -q torch==2.13.0
	.lock-venv/bin/pip install -q -e '.[dev]'
	{ sed -n '1,2p' constraints.txt; .lock-venv/bin/pip freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints.new
	mv constraints.new constraints.txt && rm -rf .lock-venv
	@echo "constraints.txt rewritten: run 'make test demo' (after 'rm -rf $(VENV)') before committing it"

.PHONY: install demo test lock mutants
