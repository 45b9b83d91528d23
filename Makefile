# featurepipe: `make demo` runs the whole pipeline, `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTHON ?= python3

.PHONY: install demo test test-fast lint clean

$(STAMP): pyproject.toml constraints.txt setup.py featurepipe/online/_native.c
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  echo "python3 -m venv failed: installing python3-venv"; \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -q python3-venv >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q python3-venv >/dev/null; }; \
	    $(PYTHON) -m venv $(VENV); \
	  else echo "run: sudo apt-get install -y python3-venv"; exit 1; fi; }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m featurepipe.redis_server -- $(VENV)/bin/featurepipe demo $(DEMO_ARGS)

test: install
	$(PY) -m featurepipe.redis_server --ensure-binary
	$(VENV)/bin/ruff check featurepipe serving training tests
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check featurepipe serving training tests

clean:
	rm -rf .redis .pytest_cache feature_repo/data
