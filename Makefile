# `make demo` sets everything up (.venv from requirements-dev.txt) and runs the offline demo.
# `make test` runs the test suite; .ci/run runs exactly that.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

demo: setup
	$(PY) cli.py demo

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) bench.py

clean:
	rm -rf cache/demo_* data/demo artifacts/*.json checkpoints/*.pt
