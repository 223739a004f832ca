# The README's commands. Everything runs from the project's own virtualenv.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install demo test lint schemas bench clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test,dev]'
	touch $@

demo: install
	$(PY) -m consumer.demo

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check consumer contracts tests
	$(PY) -m ruff format --check consumer contracts tests
	$(PY) -m mypy

schemas: install
	$(PY) -m contracts.generate

bench: install
	$(PY) -m tests.bench.comfyui
	$(PY) -m tests.bench.service
	$(PY) -m tests.bench.scheduling

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache data
