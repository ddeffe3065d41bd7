# model-audit: `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test samples bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,samples]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/model-audit scan samples/digits-sgd.safetensors --probe samples/digits-probe.safetensors --out reports/demo
	@echo "open reports/demo/report.html"

test: $(STAMP)
	$(PY) -m pytest -q

samples: $(STAMP)
	$(PY) samples/make_samples.py

bench: $(STAMP)
	$(PY) -m bench scan

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
