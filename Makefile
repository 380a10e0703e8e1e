# hooktrace developer commands. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PIN ?= torch==2.13.0

.PHONY: install demo test test-servers check lint typecheck bench scale-sim gpu-check dashboards stack stack-down clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[dev,bench,report]' $(TORCH_PIN)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hooktrace run examples/train_transformer.py --steps 300

# The whole suite: the integration and e2e tests start real Prometheus and Alertmanager servers,
# so test-servers installs them first (Debian packages) or stops with the line to run.
test: test-servers $(STAMP)
	$(PY) -m pytest -q tests

test-servers:
	@bash tests/ensure_servers.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check hooktrace tests benchmarks examples grafana deploy
	$(VENV)/bin/ruff format --check hooktrace tests benchmarks examples grafana deploy

typecheck: $(STAMP)
	$(VENV)/bin/mypy

check: lint typecheck test

bench: $(STAMP)
	$(PY) benchmarks/bench_overhead.py --control
	$(PY) benchmarks/bench_anatomy.py
	$(PY) benchmarks/bench_attach.py
	$(PY) benchmarks/bench_grad_norms.py
	$(PY) benchmarks/bench_scrape.py
	$(PY) benchmarks/bench_spans.py
	$(PY) benchmarks/bench_memory.py

# 1,000 synthetic ranks scraped by a real Prometheus with the project's rules (README "Scale");
# a few minutes. Smaller: make scale-sim SCALE_ARGS="--ranks 100 --duration 90".
SCALE_ARGS ?=
scale-sim: test-servers $(STAMP)
	$(PY) benchmarks/scale_sim.py $(SCALE_ARGS)

gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

dashboards: $(STAMP)
	$(PY) grafana/build.py
	$(PY) deploy/k8s/generate.py

stack: $(STAMP)
	$(VENV)/bin/hooktrace stack up

stack-down: $(STAMP)
	$(VENV)/bin/hooktrace stack down

clean:
	rm -rf $(VENV) hooktrace-runs .pytest_cache .mypy_cache .ruff_cache
