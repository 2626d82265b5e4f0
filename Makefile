# resetbench: `make bench` runs the default benchmark, `make test` runs the tests.
# Both create .venv (Python 3.10+) and install the project into it on first use; later runs
# reuse it (the stamp file is rebuilt only when pyproject.toml changes).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.resetbench-installed
EXTRAS ?= all,dev
ARGS   ?=

.PHONY: setup bench test test-fast plots clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	@touch $@

bench: $(STAMP)
	$(PY) run.py $(ARGS)

test: $(STAMP)
	RESETBENCH_REQUIRE_ALL=1 $(PY) -m pytest -q $(ARGS)

clean-venv:
	rm -rf $(VENV)
