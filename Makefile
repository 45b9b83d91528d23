# featurepipe: `make demo` runs the whole pipeline, `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTHON ?= python3

.PHONY: install demo notebooks redis-stop test test-fast lint clean

$(STAMP): pyproject.toml constraints.txt setup.py featurepipe/core/_native.c
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

# Without REDIS_URL the online store is the repo's own redis-server (feature_repo/.redis/),
# started on demand and left running: `featurepipe redis status|stop`, or `make redis-stop`.
demo: install
	$(PY) -m featurepipe.redis_server --ensure-binary >/dev/null
	$(VENV)/bin/featurepipe demo $(DEMO_ARGS)

# Jupyter on 127.0.0.1 with the repo and its online store set (run `make demo` first).
notebooks: install
	$(VENV)/bin/featurepipe notebooks $(NOTEBOOK_ARGS)

redis-stop: install
	$(VENV)/bin/featurepipe redis stop

# Two pytest-xdist workers (TEST_WORKERS=0: one process); each module, and all of Spark's
# tests, on one worker (tests/conftest.py groups them).
TEST_WORKERS ?= 2
test: lint
	$(PY) -m featurepipe.redis_server --ensure-binary
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m fast $(PYTEST_ARGS)

# ruff, then mypy on featurepipe, serving and training (its settings: [tool.mypy] in pyproject.toml)
lint: install
	$(VENV)/bin/ruff check featurepipe serving training tests benchmarks
	$(VENV)/bin/mypy

clean:
	-[ -x $(VENV)/bin/featurepipe ] && $(VENV)/bin/featurepipe redis stop
	rm -rf .redis feature_repo/.redis .pytest_cache feature_repo/data
