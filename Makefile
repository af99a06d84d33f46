# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv when missing and
# installs the project into it (pip skips what is already there, so re-running is cheap).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ray-retina train

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --durations=15 $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check ray_retina tests jobs benchmarks

clean:
	rm -rf $(VENV) data runs mlflow.db mlartifacts
