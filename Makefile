# Set-up is part of every target: a fresh machine with only Python needs nothing else.
PY     ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fxcc-installed

.PHONY: setup demo test lint bench-llama

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first, pinned: a bare torch requirement would pull the CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[models,dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/fxcc bench minilm --threads 2

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

bench-llama: $(STAMP)
	$(BIN)/fxcc bench llama --threads 2
