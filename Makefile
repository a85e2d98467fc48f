# The README's two commands: `make demo` (the main job: origin, faultproxy and the browser demo) and
# `make test`; `make run` is faultproxy in front of the built-in SSE origin with a shipped profile.
# All create their own virtualenv on first use.
PY ?= python3
VENV ?= .venv
PROFILE ?= h2-rst-stream
PORT ?= 8080
TIME_SCALE ?= 1
PYTEST_ARGS ?=

BIN := $(VENV)/bin

.PHONY: setup run test system-deps bench demo clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/.installed

# Browser tests use Debian's chromium, and comparison tests real nginx; install them when missing.
system-deps:
	@bash scripts/system-deps.sh

run: setup
	$(BIN)/faultproxy run $(PROFILE) --builtin-origin --port $(PORT) --time-scale $(TIME_SCALE)

# The browser demo: the page, the built-in origin and faultproxy with TLS (HTTP/2); prints the URL to open.
demo: setup
	$(BIN)/faultproxy demo --port $(PORT)

test: setup system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup system-deps
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache
