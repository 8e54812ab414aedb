# Set-up and everyday commands. Everything installs into .venv with pip: torch is pinned
# to 2.13.0, the CPU wheel pip finds on this machine (uv and poetry would download CUDA).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[train,dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default: MovieLens-100K, unified embedding at 10% of the
# collisionless budget. No Redis or other service needed.
demo: $(STAMP)
	$(BIN)/uembed train --dataset movielens100k --embedding unified --budget 0.1

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
