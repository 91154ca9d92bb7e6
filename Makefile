# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench clean

$(VENV)/installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt pytest==9.2.0
	touch $@

demo: $(VENV)/installed
	$(PY) demo.py

test: $(VENV)/installed
	$(PY) -m pytest -q tests

bench: $(VENV)/installed
	$(PY) bench.py all

clean:
	rm -rf runs .cache
