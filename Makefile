# Every target installs what it needs on a fresh machine (uv, then .venv with the whole stack).
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
DEMO    := runs/tiny-lora

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@uv=$$(command -v uv || true); \
	if [ -z "$$uv" ]; then \
	  python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv; \
	  uv="python3 -m uv"; \
	fi; \
	$$uv venv --quiet --allow-existing $(VENV) && \
	$$uv pip install --quiet --compile-bytecode --python $(PY) -e '.[dev]'
	@touch $(STAMP)

demo: install
	$(VENV)/bin/orpo-tune train recipes/tiny-lora.yaml --force
	$(VENV)/bin/orpo-tune eval $(DEMO) --base
	$(VENV)/bin/orpo-tune export $(DEMO) --out exports/tiny-lora --force
	$(VENV)/bin/orpo-tune generate exports/tiny-lora --prompt "What colour is a banana?" --max-new-tokens 32

test: install
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

clean:
	rm -rf runs .pytest_cache .ruff_cache
