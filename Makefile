# Set-up and everyday commands. Everything installs into .venv with pip: torch is pinned
# to 2.13.0, the CPU wheel pip finds on this machine (uv and poetry would download CUDA).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install system-deps demo test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[train,dev]'
	touch $(STAMP)

install: $(STAMP)

# Servers the tests start on their own loopback ports (never the machine's own instances).
system-deps:
	@command -v redis-server >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }

# The main job on the embedded default: serve the demo bundle (MovieLens-100K, unified
# embedding at 10%, trained and exported the first time) on http://127.0.0.1:8000.
# No Redis or other service needed.
demo: $(STAMP)
	$(BIN)/uembed serve

test: $(STAMP) system-deps
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
