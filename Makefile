# One-command entry points. Every target installs what it needs into .venv first (idempotent).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The CPU wheel of this pin is on disk here; GPU users install their CUDA torch before `make install`.
TORCH_SPEC ?= torch==2.13.0
DA3_SPEC   ?= depth-anything-3==0.1.1

.PHONY: install browser system-deps test test-fast test-e2e demo serve-local bench lint protocol clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	# depth-anything-3 declares numpy<2, moviepy, xformers, open3d and a CUDA torch, none of which the network needs.
	$(PY) -m pip install -q --no-deps "$(DA3_SPEC)"
	# Compile the pose graph's numba kernels into their disk cache once (~25 s here), not at a first solve.
	$(PY) -c "from serve_app.recon.posegraph import warm_up; print(f'pose-graph kernels ready in {warm_up():.0f} s')"
	touch $(STAMP)

install: $(STAMP)

# Debian chromium for the browser tests (Playwright drives it; no-op when present). The same script as CI.
browser:
	bash .ci/install-chromium

# Debian redis-server for the redis session backend's tests (the tests start their own on a free port).
system-deps: browser
	bash .ci/install-redis

# Two tiers: the fast one (pure logic, no Ray, under a minute) first, then the rest: end to end (real Ray Serve,
# browser, Redis, notebook; tests/conftest.py marks every test that uses a Ray fixture `ray`) and the pure tests
# marked `slow` (the DA3 network, long synthetic streams).
test: test-fast test-e2e

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not ray and not slow" tests

test-e2e: $(STAMP) system-deps
	$(PY) -m pytest -q -m "ray or slow" tests

demo: $(STAMP)
	$(PY) -m serve_app.demo --config configs/local.yaml --output out/demo.ply

serve-local: $(STAMP)
	$(VENV)/bin/serve run configs/local.yaml

bench: $(STAMP)
	$(PY) bench/serving.py
	$(PY) bench/accuracy.py

lint: $(STAMP)
	$(VENV)/bin/ruff check serve_app clients tests bench

# Regenerate the protocol's copies (clients' constants, docs tables) from serve_app/protocol + serve_app/errors.py.
protocol: $(STAMP)
	$(PY) -m serve_app.protocol.codegen

clean:
	rm -rf $(VENV) out .pytest_cache
