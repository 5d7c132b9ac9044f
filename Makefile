# beyond-icon: every target creates the environment it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint format bench bench-sne docs dist clean

# A .venv that is not this checkout's is made again, not trusted: one copied or moved with
# the checkout before its paths were made relative (tools/relocatable_venv.py) starts its
# scripts with the old path's python and imports the old src/, so its stamp would stand while
# every command failed (FileNotFoundError). Since then a copied .venv runs where it lands.
VENV_HERE := $(shell $(BIN)/python -c "import importlib.util as u, os, sys; s = u.find_spec('beyond_icon'); sys.exit(not (s and s.origin and os.path.realpath(s.origin).startswith(os.path.realpath('src') + os.sep)))" 2>/dev/null && test -x "$$(sed -n '1s/^..//p' $(BIN)/beyond-icon)" && echo yes)
ifneq ($(VENV_HERE),yes)
.PHONY: $(STAMP)
endif

$(STAMP): pyproject.toml tools/relocatable_venv.py
	$(PYTHON) -m venv $(if $(VENV_HERE),,--clear) $(VENV)
	$(BIN)/pip install --upgrade pip
	# The CPU build of torch lies on local disk for this torch version; a bare "torch" would pull CUDA.
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[dev]"
	# beyond-icon and the src/ path relative to the environment: a checkout copied or moved
	# with its .venv still runs (.venv/bin/beyond-icon, .venv/bin/python -m beyond_icon)
	$(BIN)/python tools/relocatable_venv.py $(VENV) src
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/beyond-icon demo --out runs/demo

# One pytest worker per core (pytest-xdist; tests that share a fixture stay on one worker):
# 7 min 20 s on 2 cores from a fresh clone (2026-12-01). TEST_WORKERS=0: one process.
TEST_WORKERS ?= auto
test: $(STAMP)
	$(BIN)/python -m pytest tests -n $(TEST_WORKERS) --dist loadgroup

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/ruff format --check src tests benchmarks tools

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks tools
	$(BIN)/ruff check --fix src tests benchmarks tools

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_loss.py

# openTSNE and UMAP side by side with parametric SNE (the optional "bench" extra).
bench-sne: $(STAMP)
	$(BIN)/pip install -e ".[bench]"
	$(BIN)/python benchmarks/bench_sne.py --data fashion-mnist --n-train 10000 --n-test 10000

# The documentation site (MkDocs + mkdocstrings, numpydoc docstrings) into site/; warnings fail.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict

# A wheel and an sdist in dist/ (tests/test_dist.py installs the wheel into a fresh venv).
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --no-isolation --outdir dist .

clean:
	rm -rf $(VENV) build dist site *.egg-info src/*.egg-info .pytest_cache
