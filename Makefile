# Two commands do all the set-up on a fresh machine:
#   make demo   installs, then runs the main job on data/sample.jsonl with the tiny model
#   make test   installs, then runs the CPU test suite (what CI runs)
PY ?= python3
# torch 2.13.0 is the CPU build on our dev/CI machines; on a GPU box, install your CUDA torch
# first and run `make TORCH= demo` so pip keeps it.
TORCH ?= torch==2.13.0
DATA ?= data/sample.jsonl
OUT ?= runs/demo

.PHONY: install demo test test-fast

install:
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[quant,dev]'

demo: install
	llamalora validate $(DATA)
	llamalora stats $(DATA) --tokenizer bundled



test: install
	$(PY) -m pytest -m "not gpu" -p no:cacheprovider

test-fast:
	$(PY) -m pytest -p no:cacheprovider
