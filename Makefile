# Two commands from a fresh clone: `make demo` and `make test`. Both create .venv/ on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU wheel by default (no multi-GB CUDA download). With a GPU: make setup TORCH="torch --index-url ..."
TORCH ?= torch==2.13.0

.PHONY: setup docs demo test test-loaded test-slow test-gpu gpu-check test-postgres test-ray-cluster lint clean

$(BIN)/nas: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev,deploy]"
	touch $(BIN)/nas

setup: $(BIN)/nas

# The whole flow on the embedded `shapes` data (results/quickstart/); a rerun skips finished stages.
demo: setup
	$(BIN)/nas inspect search_spaces/archs/sd15.yaml
	$(BIN)/nas run experiments/quickstart.yaml

# docs/cli/<command>.txt: every command's full --help, from the settings models (a test fails when stale)
docs: setup
	$(BIN)/python -c "from nas.cli import write_help_pages; write_help_pages('docs/cli')"

# mypy: settings in pyproject.toml [tool.mypy] (checks nas/; cache in .mypy_cache/)
lint: setup
	$(BIN)/ruff check nas tests experiments
	$(BIN)/ruff format --check nas tests experiments
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

# The fast suite with every core kept busy by a spinning process beside it, as on a shared CI host:
# no test may hinge on speed.
test-loaded: lint
	@pids=""; for i in $$(seq $$(nproc)); do $(BIN)/python -c 'while True: pass' & pids="$$pids $$!"; done; \
	$(BIN)/pytest -q; rc=$$?; kill $$pids; exit $$rc

test-slow: setup
	$(BIN)/pytest -q -m slow

# The PostgreSQL tests alone, required to run (a throwaway server from Debian's postgresql package).
test-postgres: setup
	NAS_REQUIRE_POSTGRES=1 $(BIN)/pytest -q tests/search/test_scaleout_postgres.py

# A real multi-node Ray cluster on this machine (head, worker, a CPU-less A10G-typed latency node):
# placement, a killed worker node, a killed driver resumed. About 5-9 min on 2 cores; CI runs it.
test-ray-cluster: setup
	$(BIN)/pytest -q -m slow tests/search/test_ray_cluster.py

test-gpu: setup
	$(BIN)/pytest -q -m gpu

# One run on a CUDA machine, under 8 min: U-Net latency per runtime (SD 1.5, DeciDiffusion, BK-SDM),
# SD-size distillation steps, the decidiffusion.yaml latency table; writes results/gpu/<device>/.
# Any python with torch (CUDA) and the project's dependencies: make gpu-check GPU_PY=python
GPU_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	PYTHONPATH=. $(GPU_PY) experiments/benchmarks/gpu_check.py --out results/gpu

clean:
	rm -rf $(VENV) build *.egg-info
