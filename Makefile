# sweeplab: every target that needs Python creates .venv first (make install), so each is the only command
# needed on a fresh machine. Versions are pinned in constraints.txt (torch==2.13.0, a CPU build here).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SWEEPLAB := $(VENV)/bin/sweeplab
EXPERIMENT ?= experiments/training_loop_lab.yaml
SWEEP ?= sweeps/optimizer_hidden_noise.yaml
ARGS ?=
HOST ?= 127.0.0.1
PORT ?= 5000

.PHONY: install lint test test-fast docs run sweep ui server predict report bench screenshots clean help

help:
	@echo "make sweep    run the default sweep (sets up .venv on first use)"
	@echo "make test     run the test suite (make test-fast: without the tests marked slow)"
	@echo "make docs     build the documentation site into site/ (mkdocs --strict)"
	@echo "make lint     ruff check and ruff format --check over src, tests, benchmarks and experiments"
	@echo "make server   MLflow tracking server for many workers (BACKEND=postgresql+psycopg://..., HOST=)"
	@echo "make report   tables and pictures for the default sweep (reports/<study>/)"
	@echo "make predict  predict with the default sweep's champion (MODEL=..., ARGS='--x 1,2')"
	@echo "make ui       MLflow UI on http://127.0.0.1:5000 (HOST=, PORT=)"
	@echo "make run      train the seed's lab once (EXPERIMENT=..., ARGS='lr=0.1')"
	@echo "make bench    benchmarks, printed as ratios against the baseline"
	@echo "make screenshots  docs/*.png: the runs table and the report in headless Chromium"

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]' -c constraints.txt
	touch $@

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The documentation site: docs/*.md, the experiment and sweep references generated from the schema and the API
# reference from the docstrings (docs/gen_pages.py, mkdocstrings); --strict fails on a broken link or a missing page
docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet
	@echo "site/index.html"

$(VENV)/.docs-installed: $(VENV)/.installed pyproject.toml constraints.txt
	$(PY) -m pip install --quiet -e '.[docs]' -c constraints.txt
	touch $@

lint: install
	$(VENV)/bin/ruff check src tests benchmarks experiments
	$(VENV)/bin/ruff format --check src tests benchmarks experiments

run: install
	$(SWEEPLAB) run $(EXPERIMENT) $(ARGS)

sweep: install
	$(SWEEPLAB) sweep $(SWEEP) $(ARGS)

report: install
	$(SWEEPLAB) report $(SWEEP) $(ARGS)

MODEL ?= models:/optimizer_hidden_noise@champion

predict: install
	$(SWEEPLAB) predict $(MODEL) $(ARGS)

ui: install
	$(SWEEPLAB) ui $(SWEEP) --host $(HOST) --port $(PORT)

# BACKEND=postgresql+psycopg://USER@DBHOST/mlflow (password from $$PGPASSWORD or ~/.pgpass); default SQLite
BACKEND ?=
server: install
	$(SWEEPLAB) server --host $(HOST) --port $(PORT) $(if $(BACKEND),--backend-store-uri $(BACKEND))

bench: install
	$(PY) benchmarks/bench_run.py
	$(PY) benchmarks/bench_sweep.py
	$(PY) benchmarks/bench_report.py
	$(PY) benchmarks/bench_cluster.py
	$(PY) benchmarks/bench_vectorized.py
	$(PY) benchmarks/bench_members.py
	$(PY) benchmarks/bench_auto_search.py
	$(PY) benchmarks/bench_default_sweep.py
	$(PY) benchmarks/bench_user_model.py
	$(PY) benchmarks/bench_stacked.py
	$(PY) benchmarks/bench_cnn_members.py
	$(PY) benchmarks/bench_lazy.py
	$(PY) benchmarks/bench_confirm.py
	$(PY) benchmarks/bench_folds.py
	$(PY) benchmarks/bench_schedules.py
	$(PY) benchmarks/bench_tpe_batch.py
	$(PY) benchmarks/bench_compact.py
	$(PY) benchmarks/bench_halving.py

# docs/mlflow-ui.png and docs/report.png: the default sweep as headless Chromium shows it (Debian's chromium)
screenshots: install
	$(PY) docs/screenshots.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
