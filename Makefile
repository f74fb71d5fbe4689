# Set-up is part of every target: a fresh machine with only Python needs nothing else.
PY     ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fxcc-installed

.PHONY: gpu-site setup lock demo test lint bench-breadth bench-breadth-gpu bench-llama bench-quality bench-token-merge bench-mp bench-dycl search-minilm bench-gpu bench-generate-gpu bench-mp-gpu bench-tp-gpu bench-int8-gemv bench-int4-gpu bench-int4-sweep

EXTRAS := .[models,dev,tvm,tune,triton]
LOCK   := requirements.lock

# Every version comes from the lock file (the set the suite last passed with), build tools included:
# the editable install builds without isolation, so no unpinned setuptools is fetched at build time.
$(STAMP): pyproject.toml $(LOCK)
	$(PY) -m venv $(VENV)
	# torch first, pinned: a bare torch requirement would pull the CUDA build
	$(BIN)/pip install -q -c $(LOCK) torch==2.13.0 setuptools wheel
	$(BIN)/pip install -q -c $(LOCK) --no-build-isolation -e '$(EXTRAS)'
	touch $(STAMP)

setup: $(STAMP)

# Refresh the lock: the newest releases pyproject.toml's ranges admit (torch stays 2.13.0, the CPU build),
# installed into a scratch venv; the suite runs there, and only a passing set is written to $(LOCK).
LOCK_VENV := build/lock-venv
lock:
	rm -rf $(LOCK_VENV) && $(PY) -m venv $(LOCK_VENV)
	echo torch==2.13.0 > $(LOCK_VENV)/torch-pin.txt  # only torch is held: everything else goes to its newest
	$(LOCK_VENV)/bin/pip install -q --upgrade -c $(LOCK_VENV)/torch-pin.txt torch setuptools wheel
	$(LOCK_VENV)/bin/pip install -q --upgrade --upgrade-strategy eager -c $(LOCK_VENV)/torch-pin.txt \
	    --no-build-isolation -e '$(EXTRAS)'
	$(LOCK_VENV)/bin/python -m pytest -q -n 2 --dist loadfile --durations=25
	{ sed -n '1,3p' $(LOCK); $(LOCK_VENV)/bin/pip freeze --exclude-editable --all | grep -v -e '^fxcc=' -e '^pip=' \
	    | sed 's/^torch==\([0-9.]*\)+.*/torch==\1/'; } > $(LOCK).new && mv $(LOCK).new $(LOCK)
	@echo "$(LOCK) refreshed; run 'rm -rf $(VENV) && make test' to use it"

demo: $(STAMP)
	$(BIN)/fxcc bench minilm --threads 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25

lint: $(STAMP)
	$(BIN)/ruff check .

bench-llama: $(STAMP)
	$(BIN)/fxcc bench llama --threads 2

# the breadth suite (benchmarks/breadth/): 100 non-transformer modules, eager / torch.compile / fxcc
bench-breadth: $(STAMP)
	mkdir -p build
	$(BIN)/fxcc bench breadth --threads 2 --json build/breadth-cpu.json

# approximate passes on MiniLM: speed vs cosine / ranking agreement, the layer-skip{speedup=} check, a PNG
bench-quality: $(STAMP)
	$(BIN)/python benchmarks/quality.py --threads 2 --reps 40

bench-token-merge: $(STAMP)
	$(BIN)/python benchmarks/token_merge.py --threads 2 --r 4 8 16 --reps 30

bench-mp: $(STAMP)
	$(BIN)/python benchmarks/mixed_precision.py --reps 20

bench-dycl: $(STAMP)
	$(BIN)/python benchmarks/dycl.py --threads 2 --reps 15

# plan search on MiniLM, then the plan applied in a new process
search-minilm: $(STAMP)
	mkdir -p build
	$(BIN)/fxcc search examples/minilm.py:model --inputs examples/minilm.py:inputs --output build/minilm.plan.json \
	    --knobs layer-skip --trials 6 --reps 5 --threads 2
	$(BIN)/python benchmarks/plan_reproduce.py examples/minilm.py build/minilm.plan.json --threads 2 --reps 10

# On a CUDA machine, with that machine's own torch (the set-up above installs the CPU build): fxcc runs from
# this checkout through a package folder under build/, nothing is installed. Llama prefill and decode-shaped
# step, bf16: eager, torch.compile (default, max-autotune-no-cudagraphs, reduce-overhead) and fxcc.
GPU_SITE := build/gpu-site
gpu-site:
	rm -rf $(GPU_SITE) && mkdir -p $(GPU_SITE)
	cp -r compiler $(GPU_SITE)/fxcc && for d in passes codegen autotune; do cp -r $$d $(GPU_SITE)/fxcc/$$d; done
	mkdir -p $(GPU_SITE)/benchmarks && cp -r benchmarks/breadth $(GPU_SITE)/benchmarks/breadth

bench-gpu: gpu-site
	PYTHONPATH=$(GPU_SITE) $(PY) benchmarks/llama_gpu.py --json build/bench-gpu.json

# the breadth suite on the GPU, bf16: eager, torch.compile (default, reduce-overhead) and fxcc
bench-breadth-gpu: gpu-site
	PYTHONPATH=$(GPU_SITE) $(PY) -c "import sys; from fxcc.cli import main; sys.exit(main(sys.argv[1:]))" \
	    bench breadth --json build/breadth-gpu.json

# issue 19's GPU goal table: greedy generation (Llama 2048/8192, 16 layers, bf16, prompt 512, 256 new tokens) at
# batch 1 and 8; eager, torch.compile reduce-overhead (static cache), fxcc's static-cache forward and its own loop
bench-generate-gpu: gpu-site
	mkdir -p build
	for b in 1 8; do FXCC_DECODE_LOOP=all PYTHONPATH=$(GPU_SITE) $(PY) -c \
	    "import sys; from fxcc.cli import main; sys.exit(main(sys.argv[1:]))" bench generate --device cuda \
	    --batch $$b --new-tokens 256 --reps 3 --engines eager,torch.compile:reduce-overhead,fxcc:static,fxcc:loop \
	    --json build/generate-gpu-b$$b.json || exit 1; done

# int8 weight-only decode and fp8 prefill against fxcc's bf16 build
bench-mp-gpu: gpu-site
	PYTHONPATH=$(GPU_SITE) $(PY) benchmarks/mixed_precision_gpu.py --json build/bench-mp-gpu.json

# two GPUs: TP=1 and TP=2 unfused / fused AllReduce-RMSNorm / fused + token split, no NVLink multicast
bench-tp-gpu: gpu-site
	NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
	    PYTHONPATH=$(GPU_SITE) $(PY) benchmarks/tp_gpu.py --json build/tp-gpu.json

# int8 decode GEMV configs per Llama decode shape: correctness of each, time, GB/s, against the bf16 library GEMM
bench-int8-gemv: gpu-site
	PYTHONPATH=$(GPU_SITE) $(PY) benchmarks/int8_gemv_sweep.py --json build/int8-gemv.json

# the int4 GEMV: epilogue check, then its configs per Llama-1B decode shape next to bf16 and the int8 GEMV
bench-int4-gpu: gpu-site
	PYTHONPATH=$(GPU_SITE) $(PY) benchmarks/int4_gpu_check.py

# the int4 GEMV's inner loops (issue 22) per Llama-1B decode shape at M = 1 and 8, next to its default, int8 and bf16
bench-int4-sweep: gpu-site
	mkdir -p build
	PYTHONPATH=$(GPU_SITE) $(PY) benchmarks/int4_sweep.py --json build/int4-sweep.json
