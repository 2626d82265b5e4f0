# resetbench: `make bench` runs the default benchmark, `make test` runs the tests.
# Both create .venv (Python 3.11+) and install the project into it on first use; later runs
# reuse it (the stamp file is rebuilt only when pyproject.toml changes).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.resetbench-installed
EXTRAS ?= all,dev,peers
ARGS   ?=

.PHONY: setup bench test docs plots tables kernels study sweeps exercise clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	@touch $@

bench: $(STAMP)
	$(PY) run.py $(ARGS)

test: $(STAMP) docs
	RESETBENCH_REQUIRE_ALL=1 $(PY) -m pytest -q $(ARGS)

# rewrite README.md's kernel table (between <!-- kernels:start/end -->) from conf/backend/*.yaml
docs: $(STAMP)
	$(PY) -m benchmarks.docs

clean-venv:
	rm -rf $(VENV)

# redraw every figure in results/figures from the committed tables in results/tables
plots: $(STAMP)
	$(PY) -m benchmarks.plots

# rebuild results/tables from the newest sweeps of each experiment under results/runs
tables: $(STAMP)
	$(PY) -m benchmarks.results results/runs --latest --experiments all

# the fair study: tune learning rates per strategy, then every strategy x backend x seed, for the
# LSTM and the GRU (about two and a half hours on 2 CPU cores); then make tables plots. The plans
# come from conf/study/ in the order python -m benchmarks.registry studies gives (a plan that
# reuses another's tuned rates, lr_from, runs after it)
study: $(STAMP)
	plans=$$($(PY) -m benchmarks.registry studies) || exit $$?; \
	for p in $$plans; do $(PY) -m benchmarks.study conf/study/$$p.yaml || exit $$?; done

# every experiment sweep but the study's, one job at a time (the names come from conf/experiment/:
# python -m benchmarks.registry sweeps; about an hour on 2 CPU cores); then make tables plots
sweeps: $(STAMP)
	names=$$($(PY) -m benchmarks.registry sweeps) || exit $$?; \
	for e in $$names; do $(PY) run.py -m +experiment=$$e || exit $$?; done

# kernel benchmark: every backend's kernels vs its native no-reset layer, matmul peaks
# (ARGS="--cells lstm,gru" adds the GRU rows)
# (results/tables/kernels.csv, matmul.csv, results/figures/kernels.png; with ARGS="--cells lstm,gru
# --densities 0,0.03,0.1,0.3 --rounds 3" and the peers extra it took 25 min on 2 CPU cores)
kernels: $(STAMP)
	$(PY) -m benchmarks.kernels $(ARGS)

# the README's "Adding a backend" guide done in a scratch clone (a backend = one module + one yaml);
# ARGS=--full runs the whole test suite there
exercise: $(STAMP)
	$(PY) -m tests.add_backend_exercise $(ARGS)
