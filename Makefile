# vibevoice-pool: `make run` serves the demo pool (`make run MODEL=... [CONFIG=...]` a
# real checkpoint), `make test` runs the suite.
# Both create the virtual environment (.venv) themselves.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PORT   ?= 7860

.PHONY: setup run test test-fast lint format bench chromium clean image container-tools test-image

setup: $(STAMP)

# torch is pinned on its own first: on a machine without CUDA wheels the pin
# takes the CPU build; on a GPU machine the registry's CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,ray]'
	touch $(STAMP)

# `make run` serves the tiny demo model; `make run MODEL=<hub id or folder>` serves a
# real checkpoint with configs/vibevoice-1.5b.yaml, or the config file CONFIG names
# (CONFIG=configs/vibevoice-large.yaml for VibeVoice-Large); every GPU (GPUS=0,1 or
# GPUS=cpu:1 to choose).
MODEL  ?=
CONFIG ?= configs/vibevoice-1.5b.yaml
GPUS   ?=
run: setup
ifeq ($(strip $(MODEL)),)
	$(VENV)/bin/vibevoice-pool launch --config configs/demo.yaml --port $(PORT) $(if $(GPUS),--gpus $(GPUS))
else
	$(VENV)/bin/vibevoice-pool launch --config "$(CONFIG)" --model_path "$(MODEL)" --port $(PORT) $(if $(GPUS),--gpus $(GPUS))
endif

# What the tests need from Debian: chromium for the browser tests (never a
# downloaded browser build), unshare and ip for Ray's private network namespace.
chromium:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v ip >/dev/null 2>&1 || ! command -v unshare >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium iproute2 util-linux >/dev/null; \
	  else echo "The tests need Debian's chromium, iproute2 and util-linux: sudo apt-get install chromium iproute2 util-linux"; exit 1; fi; \
	fi

# The suite runs in TEST_JOBS processes (whole files to each: a module's shared server
# stays one), then the tests marked serial alone. TEST_JOBS=1 runs one file at a time.
TEST_JOBS ?= 2
test: setup chromium
	$(PY) -m pytest -q -ra -n $(TEST_JOBS) --dist loadfile -m "not serial"
	$(PY) -m pytest -q -ra -m serial

test-fast: setup
	$(PY) -m pytest -q -ra -m "not browser and not slow"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# `make image` builds the container image (Containerfile, docs/DEPLOY.md) with docker (when
# its daemon answers), podman or buildah, whichever is installed; IMAGE_TOOL=podman chooses.
# IMAGE names it; IMAGE_ARGS passes more, e.g. IMAGE_ARGS="--build-arg TORCH_VARIANT=cpu".
IMAGE      ?= vibevoice-pool:latest
IMAGE_ARGS ?=
IMAGE_TOOL ?=
image:
	@tool="$(IMAGE_TOOL)"; \
	if [ -z "$$tool" ]; then \
	  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then tool=docker; \
	  elif command -v podman >/dev/null 2>&1; then tool=podman; \
	  elif command -v buildah >/dev/null 2>&1; then tool=buildah; fi; \
	fi; \
	case "$$tool" in \
	  docker) set -- build ;; \
	  podman) set -- build --format docker ;; \
	  buildah) set -- bud --format docker ;; \
	  *) echo "make image needs docker, podman or buildah"; exit 1 ;; \
	esac; \
	echo "$$tool $$* -f Containerfile -t $(IMAGE) $(IMAGE_ARGS) ."; \
	$$tool "$$@" -f Containerfile -t $(IMAGE) $(IMAGE_ARGS) .

# The image test (tests/test_container.py, minutes): debootstrap makes the base, buildah
# builds the CPU image offline and runs the server in it. It needs root and Debian's tools.
container-tools:
	@if ! command -v buildah >/dev/null 2>&1 || ! command -v podman >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah podman debootstrap >/dev/null; \
	  else echo "The image test needs root and Debian's buildah, podman and debootstrap"; exit 1; fi; \
	fi

test-image: setup container-tools
	$(PY) -m pytest -q -ra -s -m container tests/test_container.py

# The benchmarks rewrite docs/PERFORMANCE.md and docs/img/ (plots need the bench extra);
# BENCH_ARGS passes options on, e.g. BENCH_ARGS="--keep /tmp/bench" keeps the raw figures.
bench: setup
	$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q -e '.[test,ray,bench]'
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
