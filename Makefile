# Two commands on a fresh machine:
#   make demo   creates .venv, installs the package with the pinned versions, runs the demo DAG
#   make test   creates .venv if needed, installs the test extras, runs pytest
# Pins live in constraints.txt only.
PYTHON ?= python3
VENV ?= .venv
CORES ?= 2
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)

.PHONY: demo test lint schema benchmarks clean-demo

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e .
	touch $@

# The browser test of `slidechat serve` needs Chromium and its driver (Debian packages); installed where this
# machine allows it, otherwise that one test is skipped with the reason.
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { timeout 600 apt-get install -y -q chromium chromium-driver || \
	    { timeout 600 apt-get update -q && timeout 600 apt-get install -y -q chromium chromium-driver; }; } >/dev/null 2>&1 || \
	  echo "make test: could not install chromium + chromium-driver; the browser test of slidechat serve will be skipped"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/snakemake --cores $(CORES) all

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

lint: $(VENV)/.installed-test
	$(BIN)/snakemake --lint
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/python -m wsicore.settings workflow/schemas/stages.schema.yaml --check

# After adding or changing a field of a stage's settings dataclass: regenerate the stage config blocks.
schema: $(VENV)/.installed
	$(BIN)/python -m wsicore.settings workflow/schemas/stages.schema.yaml

benchmarks: $(VENV)/.installed-test
	for f in benchmarks/bench_*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

clean-demo:
	rm -rf results .snakemake
