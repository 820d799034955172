# Two commands do everything on a fresh Debian machine (as root):
#   make demo   - install what is missing, then run the demo
#   make test   - install what is missing, then run the test suite
# Both are idempotent: the set-up step only acts when something is missing or changed.

VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.fusemirror-installed
TSTAMP := $(VENV)/.fusemirror-test-installed

.PHONY: demo test setup bench clean

demo: $(STAMP)
	$(PY) tools/demo

test: $(TSTAMP)
	$(PY) -m pytest -q tests

setup: $(STAMP)

bench: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[bench]'
	$(PY) tools/bench

$(STAMP): pyproject.toml tools/setup.sh
	tools/setup.sh $(VENV)

# what only the tests need besides (PostgreSQL for the example the tests run)
$(TSTAMP): $(STAMP)
	tools/setup.sh $(VENV) test

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
