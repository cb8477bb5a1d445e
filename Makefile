# fss — common tasks. `make help` lists them.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.DEFAULT_GOAL := help
.PHONY: help install run test test-all lint format bench clean clean-cache

help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY) ## Create .venv and install fss with its dev extras (editable)
	$(PY) -m pip install -e '.[dev]'

run: install ## The main job: HSNet trained and tested on the synthetic benchmark
	$(PY) run.py

test: ## Fast test suite (what CI runs)
	$(PY) -m pytest

test-all: ## Every test, the slow ones included
	$(PY) -m pytest -m ''

lint: ## ruff
	$(PY) -m ruff check src tests benchmarks run.py

format: ## ruff format + import sorting
	$(PY) -m ruff check --fix src tests benchmarks run.py

bench: ## Inference benchmark table (CPU, and GPU when present)
	$(PY) benchmarks/bench_inference.py

clean: ## Remove logs and build files (keeps the venv and the cached trunks / base learners)
	rm -rf logs outputs multirun .pytest_cache .ruff_cache src/*.egg-info

clean-cache: ## Remove the cached stage outputs (trained trunks, base learners, split lists) in .cache
	rm -rf .cache
