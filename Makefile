# Set-up is part of every target: a fresh machine with only Python needs nothing else.
PY     ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fxcc-installed

.PHONY: setup demo test lint bench-llama bench-gpu

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first, pinned: a bare torch requirement would pull the CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[models,dev,tvm,tune,triton]'
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

# On a CUDA machine, with that machine's own torch (the set-up above installs the CPU build): fxcc runs from
# this checkout through a package folder under build/, nothing is installed. Llama prefill and decode-shaped
# step, bf16: eager, torch.compile (default, max-autotune-no-cudagraphs, reduce-overhead) and fxcc.
GPU_SITE := build/gpu-site
bench-gpu:
	rm -rf $(GPU_SITE) && mkdir -p $(GPU_SITE)
	cp -r compiler $(GPU_SITE)/fxcc && for d in passes codegen autotune; do cp -r $$d $(GPU_SITE)/fxcc/$$d; done
	PYTHONPATH=$(GPU_SITE) $(PY) benchmarks/llama_gpu.py --json build/bench-gpu.json
