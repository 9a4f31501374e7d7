# posttrain — two commands on a fresh machine (Python 3.11):
#   make demo   installs into .venv and runs the offline demo pipeline end to end
#   make test   installs into .venv (with test extras) and runs every test, slow ones included
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-fast smoke mlflow-ui clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# requirements.lock pins every transitive dependency to the set tested together.
$(VENV)/.install-stamp: $(BIN)/python pyproject.toml requirements.lock
	$(BIN)/pip install --quiet -c requirements.lock -e '.[test]'
	touch $@

install: $(VENV)/.install-stamp

demo: install
	$(BIN)/posttrain run configs/demo.yaml

smoke: install
	$(BIN)/posttrain run configs/smoke.yaml

test: install
	$(BIN)/python -m pytest -v --durations=15

test-fast: install
	$(BIN)/python -m pytest -m "not slow" -q

mlflow-ui:
	$(BIN)/mlflow ui --backend-store-uri sqlite:///artifacts/mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf artifacts
