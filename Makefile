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

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check orpo_cli tests

clean:
	rm -rf runs .pytest_cache .ruff_cache
