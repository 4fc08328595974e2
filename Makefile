# Two commands on a fresh machine: `make quickstart` and `make test` (each sets up what it needs).
SHELL := /bin/bash
ENV := bash scripts/with_env.sh
QUICKSTART_OUT ?= outputs/quickstart
PYTEST_ARGS ?=
PYTEST_WORKERS ?= 2

.PHONY: setup quickstart test test-fast benchmarks mlflow-ui clean help

help:
	@echo "make quickstart  - set up, then run Neon end to end on the embedded default (Fashion-MNIST)"
	@echo "make test        - set up, then run the test suite (real Ray, DeepSpeed, MLflow, torch-fidelity)"
	@echo "make test-fast   - the tests not marked slow"
	@echo "make benchmarks  - every benchmark at its quick CPU size, one table each (benchmarks/README.md: full sizes)"
	@echo "make mlflow-ui   - open the quickstart's MLflow store at http://127.0.0.1:5000"

setup:
	@$(ENV) neon-ray --help >/dev/null && echo "environment ready"

quickstart:
	@$(ENV) neon-ray run quickstart --output $(QUICKSTART_OUT)

# Two pytest workers (pytest-xdist): most tests wait on process and Ray start-up rather than compute, so two at
# a time finish sooner on the 2-core machine; tests/conftest.py hands out the long ones first. PYTEST_WORKERS=0:
# one test at a time.
test:
	@$(ENV) python -m pytest tests -n $(PYTEST_WORKERS) --dist load --maxschedchunk 1 --durations=25 $(PYTEST_ARGS)

test-fast:
	@$(ENV) python -m pytest tests -m "not slow" -n $(PYTEST_WORKERS) --dist load $(PYTEST_ARGS)

# Every benchmark at the quick size its section of benchmarks/README.md gives (about an hour on the 2-core
# machine; search_cost.py alone is ~15 min); that README has each one's full-size command and measured table.
# One benchmark: make benchmarks BENCHMARKS=sampling
BENCHMARKS ?= sampling ray_overhead driver_memory host_allocator zero3_buffers finetune_memory gpu_throughput fault_drills search_cost
ARGS_sampling := --threads 1
ARGS_driver_memory := --n 200 --steps 3 --size 32
ARGS_finetune_memory := --models dit-tiny,xar-tiny --steps 2
ARGS_gpu_throughput := --tiny
benchmarks: $(addprefix benchmark-,$(BENCHMARKS))

benchmark-%:
	@echo "== python benchmarks/$*.py $(ARGS_$*)"
	@$(ENV) python benchmarks/$*.py $(ARGS_$*)

mlflow-ui:
	@$(ENV) mlflow ui --backend-store-uri sqlite:///$(abspath $(QUICKSTART_OUT))/mlflow.db

clean:
	rm -rf outputs .pytest_cache build dist neon_ray.egg-info
