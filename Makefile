# Two entry points: `make demo` and `make test`. Each creates .venv and installs on first use.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip >/dev/null
	$(BIN)/pip install -c constraints.txt -e '.[test]'
	touch $(STAMP)

.PHONY: install demo test bench browser
install: $(STAMP)

demo: $(STAMP)
	$(BIN)/neurostore demo

# Headless Chromium for the browser tests (tests/test_browser.py); installed once, idempotent.
browser:
	command -v chromium >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium)

# Two worker processes or more (one per core): each test file runs whole in one of them, so its
# fixtures are made once; the demo store and the wheel are shared by all (tests/conftest.py).
test: $(STAMP) browser
	$(BIN)/pytest -q -n auto --dist loadfile

bench: $(STAMP)
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done
