# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip
PIP_INSTALL := $(PIP) install --quiet --disable-pip-version-check -c constraints.txt
STAMP := $(VENV)/.installed

.PHONY: install demo test docs-test lint docs clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) torch==2.14.1 torchvision==0.29.1
	$(PIP_INSTALL) -e ".[test,wsi,encoders,ecosystem,lazyslide,docs]"
	@# headless Chromium for the docs' browser test (Debian's package; skipped where absent)
	command -v chromium >/dev/null || (command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
	  >/dev/null) || echo "no chromium: the browser test of the docs will be skipped"
	touch $(STAMP)

demo: install
	$(VENV)/bin/histoprism demo --out demo_out

test: install
	$(VENV)/bin/python -m pytest -q -m "not docs"

# the documentation site built and its tutorials executed (~5 min); CI runs it after make test
docs-test: install
	$(VENV)/bin/python -m pytest -q -m docs

docs: install
	$(VENV)/bin/sphinx-build -W --keep-going -b html docs docs/_build/html
	@echo "open docs/_build/html/index.html"

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) demo_out build *.egg-info src/*.egg-info docs/_build docs/jupyter_execute
