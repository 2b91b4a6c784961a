# Quick start: `make run` (set up, then list the model zoo) and `make test` (set up, lint, then run the tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test setup clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

run: setup
	$(BIN)/flatten-timm models
	@echo "The command is $(BIN)/flatten-timm; 'source $(BIN)/activate' puts it and its python on your PATH."

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n auto tests

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
