# ddump developer targets. `sh .ci/setup` first on a new machine (the README's commands do).
VENV    ?= .venv
PY      := $(VENV)/bin/python
PYTEST  := $(VENV)/bin/pytest

.PHONY: demo test lint bench deb deb-test screenshot

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

# The README's picture of Wireshark capturing two hosts through ddump-extcap: the real GUI under
# Xvfb, two workers in network namespaces (root; about 1 min).
SCREENSHOT_PACKAGES := wireshark-qt xvfb x11-apps xdotool imagemagick
screenshot:
	@dpkg-query -W $(SCREENSHOT_PACKAGES) >/dev/null 2>&1 \
		|| DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SCREENSHOT_PACKAGES) >/dev/null
	$(PY) -m tests.wireshark_screenshot docs/wireshark-ddump.png
