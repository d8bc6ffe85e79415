# ddump developer targets. `sh .ci/setup` first on a new machine (the README's commands do).
VENV    ?= .venv
PY      := $(VENV)/bin/python
PYTEST  := $(VENV)/bin/pytest

.PHONY: demo test lint bench deb deb-test

demo:
	sh .ci/demo

# The Debian package built, installed, smoke-tested and purged (about 20 s), then the suite.
test: lint
	sh packaging/deb-test.sh
	$(PYTEST) -q -ra -p no:cacheprovider tests

lint:
	$(VENV)/bin/ruff check ddump tests $(wildcard bench)
	$(VENV)/bin/ruff format --check ddump tests $(wildcard bench)
	$(VENV)/bin/mypy

bench:
	$(PY) bench/merge_vs_mergecap.py

deb:
	sh packaging/build-deb.sh

deb-test:
	sh packaging/deb-test.sh
