# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv when missing and
# installs the project into it (pip skips what is already there, so re-running is cheap).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install lint docs bench clean gpu-check gpu-check-dry

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ray-retina train

# The three tiers in order (tests/unit, tests/integration, tests/e2e), each in a pytest process of its own so
# that a tier's Ray clusters never outlive it. Every tier runs even when an earlier one failed (all failures
# reported); make fails if any did. `make test TIERS=integration PYTEST_ARGS="-k tune"` narrows it: with
# PYTEST_ARGS given, a tier where nothing is selected (pytest's exit code 5) is not a failure.
TIERS ?= unit integration e2e

test: $(STAMP)
	@rc=0; times=""; total0=$$(date +%s); for tier in $(TIERS); do \
		echo "$(BIN)/python -m pytest tests/$$tier -q --durations=15 $(PYTEST_ARGS)"; \
		t0=$$(date +%s); \
		$(BIN)/python -m pytest tests/$$tier -q --durations=15 $(PYTEST_ARGS); r=$$?; \
		times="$$times $$tier $$(( $$(date +%s) - t0 )) s;"; \
		if [ $$r -eq 5 ] && [ -n "$(if $(strip $(PYTEST_ARGS)),narrowed)" ]; then r=0; fi; \
		if [ $$r -ne 0 ]; then echo "tests/$$tier failed (exit $$r)"; rc=$$r; fi; \
	done; \
	echo "tier times:$$times total $$(( $$(date +%s) - total0 )) s"; exit $$rc

# The unit tier only: no Ray cluster, no services, under 2 minutes on two cores.
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests/unit -q --durations=15 $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check ray_retina tests jobs benchmarks
	$(BIN)/ruff format --check ray_retina tests jobs benchmarks

# Refresh docs/mlflow_compare.png and docs/model_registry.png on purpose (the tests themselves write under
# tmp_path only): the e2e sweep against a real MLflow server and its compare-runs page, then the export +
# registry + serve test and the registry's page (it needs the model the serve test registers, so the whole
# module runs). Headless chromium drives the MLflow UI; needs chromium.
docs: $(STAMP)
	RAY_RETINA_DOCS_DIR=$(CURDIR)/docs $(BIN)/python -m pytest tests/e2e/test_sweep_mlflow.py -q \
		-k test_compare_trials_in_mlflow_ui $(PYTEST_ARGS)
	RAY_RETINA_DOCS_DIR=$(CURDIR)/docs $(BIN)/python -m pytest tests/e2e/test_serve_model.py -q $(PYTEST_ARGS)

# The GPU check: correctness of the GPU path and the paper setting's numbers in < 5 min of device
# time; the table goes to stdout and bench_out/gpu_check.json. The dry run executes every path on the CPU.
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py

gpu-check-dry: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py --dry-run

clean:
	rm -rf $(VENV) data runs mlflow.db mlartifacts
