# Two commands from a fresh clone: `make demo` and `make test`. Both create .venv/ on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU wheel by default (no multi-GB CUDA download). With a GPU: make setup TORCH="torch --index-url ..."
TORCH ?= torch==2.13.0

.PHONY: setup demo test test-slow test-gpu lint clean

$(BIN)/nas: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(BIN)/nas

setup: $(BIN)/nas

# Until `nas run` lands: report every bundled space and architecture (params, MACs with attention).
demo: setup
	@for f in search_spaces/*.yaml search_spaces/archs/*.yaml; do $(BIN)/nas inspect $$f || exit 1; echo; done

lint: setup
	$(BIN)/ruff check nas tests experiments
	$(BIN)/ruff format --check nas tests experiments

test: lint
	$(BIN)/pytest -q

test-slow: setup
	$(BIN)/pytest -q -m slow

test-gpu: setup
	$(BIN)/pytest -q -m gpu

clean:
	rm -rf $(VENV) build *.egg-info
