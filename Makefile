# Two commands do all the set-up on a fresh machine:
#   make demo   installs, then validate -> stats -> train -> export -> chat on data/sample.jsonl
#               with the tiny model (CPU, about a minute)
#   make test   installs, then runs the CPU test suite (what CI runs)
PY ?= python3
# torch 2.13.0 is the CPU build on our dev/CI machines; on a GPU box, install your CUDA torch
# first and run `make TORCH= demo` so pip keeps it.
TORCH ?= torch==2.13.0
# Triton's interpreter runs the int8 decoding kernel's test on the CPU. CUDA torch brings its own
# triton: there, run `make TRITON= test` so pip keeps it.
TRITON ?= triton==3.6.0
DATA ?= data/sample.jsonl
OUT ?= runs/demo

.PHONY: install demo test test-fast

install:
	$(if $(TORCH),$(PY) -m pip install -q $(TORCH))
	$(PY) -m pip install -q -e '.[quant,dev]'

demo: install
	llamalora validate $(DATA)
	llamalora stats $(DATA) --tokenizer bundled
	llamalora train $(DATA) --model tiny --output-dir $(OUT) --overwrite --num-train-epochs 1 \
	  --learning-rate 2e-3 --no-gradient-checkpointing
	llamalora export-adapter $(OUT) --out $(OUT)-adapter --overwrite
	llamalora chat --adapter $(OUT) --prompt "다음 건설 용어를 설명하세요. 거푸집" \
	  --temperature 0 --max-new-tokens 32



test: install
	$(if $(TRITON),$(PY) -m pip install -q $(TRITON))
	$(PY) -m pytest -m "not gpu" -p no:cacheprovider

test-fast:
	$(PY) -m pytest -p no:cacheprovider
