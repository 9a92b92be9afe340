# Two commands do all set-up: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Tests and CI read MNIST from the local mirror beside the repository and never use the network.
TEST_MIRROR ?= $(abspath ../shared/data/mnist)
PROFILE ?= default
# Most tests wait on one training core, a server or a subprocess, so three test processes keep both cores busy
# (measured: 14 min against 16 with two); a file's tests share one process.
TEST_WORKERS ?= 3

.PHONY: run test lint bench bench-runners bench-drift bench-speed bench-recipe clean

$(BIN)/mnist-ae: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.test-extras: $(BIN)/mnist-ae
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

run: $(BIN)/mnist-ae
	$(BIN)/mnist-ae run --profile $(PROFILE)

test: $(VENV)/.test-extras
	$(BIN)/ruff check flows tasks tests bench
	$(BIN)/mypy
	MNIST_MIRROR=$(TEST_MIRROR) MNIST_AE_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: $(BIN)/mnist-ae
	$(BIN)/python bench/profiles.py

bench-runners: $(BIN)/mnist-ae
	$(BIN)/python bench/runners.py

bench-drift: $(BIN)/mnist-ae
	MNIST_MIRROR=$(TEST_MIRROR) $(BIN)/python bench/drift.py

bench-speed: $(BIN)/mnist-ae
	$(BIN)/python bench/speed.py

bench-recipe: $(BIN)/mnist-ae
	$(BIN)/python bench/recipe.py

clean:
	rm -rf $(VENV) artifacts/*/ artifacts/.[!.]* .pytest_cache
