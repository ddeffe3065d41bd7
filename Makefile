# model-audit: `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test samples bench clean chromium

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,samples,timm,hf]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/model-audit scan samples/digits-sgd.safetensors --probe samples/digits-probe.safetensors --out reports/demo
	@# A screenshot of the report for the README, when a headless Chromium is at hand.
	@if command -v chromium >/dev/null 2>&1; then \
	  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
	    --disable-background-networking --disable-component-update --disable-sync \
	    --user-data-dir=$$(mktemp -d) --hide-scrollbars --window-size=1200,1600 \
	    --screenshot=reports/demo/screenshot.png file://$(CURDIR)/reports/demo/report.html \
	    >/dev/null 2>&1 || echo "note: the screenshot could not be made"; fi
	@echo "open reports/demo/report.html"

test: $(STAMP) chromium
	$(PY) -m pytest -q

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
