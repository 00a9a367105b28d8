# nfqlb developer entry points; each works on a fresh Debian 12 machine as root.
#
#   make test    Debian packages (only the missing ones), .venv, the native build, then pytest
#   make demo    the same setup, then demo/run.py (DEMO_ARGS="--mode dnat" for another mode)
#   make bench   the same setup, then bench/lab_bench.py (installs wrk, haproxy, iperf3 and
#                conntrack if missing; BENCH_ARGS="--paths kernel-dnat,nfqlb-dnat --rounds 1")
#   make deps    only the Debian packages (scripts/install-deps.sh)
#   make venv    only .venv with nfqlb installed editable, with its test extras, and the
#                native build (python -m nfqlb.build_native: the hot modules compiled with
#                mypyc for the sources as they are; nothing to do if built)
#   make clean   remove .venv
#
# PYTHON picks the interpreter for the venv; PYTEST_ARGS are passed to pytest. NFQLB_PURE=1
# runs plain Python (and lets a failed native build pass).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nfqlb-installed
PYTEST_ARGS ?=
DEMO_ARGS ?=
BENCH_ARGS ?=

NATIVE = $(PY) -m nfqlb.build_native || [ -n "$$NFQLB_PURE" ]

.PHONY: test demo deps venv clean

test: $(STAMP)
	@$(NATIVE)
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	@$(NATIVE)
	$(PY) demo/run.py $(DEMO_ARGS)

.PHONY: bench
bench: $(STAMP)
	@$(NATIVE)
	$(PY) bench/lab_bench.py $(BENCH_ARGS)

deps:
	@PYTHON=$(PYTHON) bash scripts/install-deps.sh

venv: $(STAMP)
	@$(NATIVE)

# Reinstalled when pyproject.toml changes (new dependencies or entry points); new modules
# need nothing, the install is editable.
$(STAMP): pyproject.toml | deps
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo '*' > $(VENV)/.gitignore
	@echo "pip install -e '.[test,native]' into $(VENV)"
	@set -o pipefail; $(PY) -m pip install -q -e '.[test,native]' 2>&1 \
		| { grep -v 'is ignored: it is neither a file nor a directory' || true; }
	@touch $@

clean:
	rm -rf $(VENV)
