# One command sets everything up: a local virtual environment with the CPU build of torch 2.13.0,
# then initsearch (editable) and its test extra.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install run test lint ui clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# The default study (sklearn's digits, offline). Extra Hydra overrides: make run ARGS="n_trials=10"
run: install
	$(PY) -m initsearch $(ARGS)

# The whole test suite.
test: install
	$(PY) -m pytest -q $(ARGS)

# The checks CI runs besides the tests: ruff, and the folder rules (import-linter contracts in pyproject.toml).
lint: install
	$(VENV)/bin/ruff check .
	cd $(CURDIR) && PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/lint-imports

# The MLflow UI on the default local store (http://127.0.0.1:5000).
ui: install
	@echo "open the link a study printed (MLflow runs: ...), or choose 'Model training' in the UI's sidebar"
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache build
