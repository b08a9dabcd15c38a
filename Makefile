# Each target creates or refreshes .venv by itself: `make demo` and `make test` are the only commands a
# newcomer types. The torch pins are the wheels this machine kind has on disk (pip takes them offline).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: venv test test-slow lint demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]" $(TORCH)
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q -rs -m "not slow"

test-slow: $(STAMP)
	$(BIN)/pytest -q -rs -m slow

demo: $(STAMP)
	$(BIN)/python -m vitlab.demo --out runs/demo

# Speed lives here, never in the test suite. Results go to benchmarks/results/ with the command in each file.
bench: $(STAMP)
	$(BIN)/vitlab bench --models S/16,B/16 --batch 1,16 --repeats 3 --out benchmarks/results/inference_cpu.json
	$(BIN)/python benchmarks/data_pipeline.py --repeats 8

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
