# model-audit: `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS := test,samples,timm,hf,docs,pandas
# The exact versions the suite was run with (see tools/constraints.py); `make lock` refreshes it.
CONSTRAINTS := constraints.txt
# pytest-xdist: one worker per core, each with its share of the cores' threads (tests/conftest.py)
PYTEST_PARALLEL ?= -n auto --dist loadfile

.PHONY: demo test test-cpus docs lock samples bench clean chromium

$(STAMP): setup.cfg pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) --upgrade pip
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e '.[$(EXTRAS)]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/model-audit scan samples/digits-sgd.safetensors --probe samples/digits-probe.safetensors --out reports/demo
	@# A screenshot of the report, when a headless Chromium is at hand (reports/ is not tracked:
	@# the demo leaves a fresh clone clean; the documentation embeds a report made at build time).
	@rm -f reports/demo/screenshot.png
	@if command -v chromium >/dev/null 2>&1; then \
	  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
	    --disable-background-networking --disable-component-update --disable-sync \
	    --user-data-dir=$$(mktemp -d) --hide-scrollbars --window-size=1200,1600 \
	    --screenshot=reports/demo/screenshot.png file://$(CURDIR)/reports/demo/report.html \
	    >/dev/null 2>&1 || true; fi
	@if test -s reports/demo/screenshot.png; then echo "wrote reports/demo/screenshot.png"; \
	  else echo "note: no screenshot of the report (it needs chromium: make chromium)"; fi
	@echo "open reports/demo/report.html"

# The documentation site (site/), strict: a broken link or reference fails. Its demo report is
# made by the current code during the build (docs/hooks.py).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

test: $(STAMP) chromium
	@# the layers and no import cycle (.importlinter), before the suite
	$(VENV)/bin/lint-imports --no-cache
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir $$(mktemp -d)
	$(PY) -m pytest -q $(PYTEST_PARALLEL)

# The golden tests as another machine runs them: the kernels of a CPU without AVX-512
# (ATEN_CPU_CAPABILITY), one thread, the tests in a shuffled order. CI runs it after `make test`.
test-cpus: $(STAMP)
	ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider \
	  --random-order-seed=1 tests/test_golden.py
	ATEN_CPU_CAPABILITY=avx2 OMP_NUM_THREADS=2 $(PY) -m pytest -q -p no:cacheprovider \
	  --random-order-seed=2 tests/test_golden.py

# Refresh constraints.txt: a throw-away venv from setup.cfg's open ranges, then its versions.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade pip
	.venv-lock/bin/python -m pip install --quiet -e '.[$(EXTRAS)]'
	.venv-lock/bin/python tools/constraints.py > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf .venv-lock
	@echo "wrote $(CONSTRAINTS); run make test, then commit it"

# The report test renders the demo report in headless Chromium (Debian's package). Installing
# it needs root and the Debian mirror; when that fails the test skips and says why.
chromium:
	@command -v chromium >/dev/null 2>&1 || \
	  { (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
	    || echo "note: chromium could not be installed; the browser test will be skipped"; }

samples: $(STAMP)
	$(PY) samples/make_samples.py

bench: $(STAMP)
	$(PY) -m bench scan

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
