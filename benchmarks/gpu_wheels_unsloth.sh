#!/usr/bin/env bash
# Fills .whl-unsloth/ with Unsloth and what it needs that the lent GPU image lacks (its package
# list: /work/.library/device/KINDS.md), for benchmarks/unsloth_run.py: unsloth and unsloth_zoo
# 2026.10.9 (the release that supports transformers 5.17, the image's), TRL 1.15, datasets 4.x
# (TRL 1.15 needs >= 4.7, Unsloth < 5: a folder of its own, apart from .whl/'s 5.2 for llamalora)
# and the small pure-Python wheels their METADATA lists. Unsloth's wheel is mostly its web UI
# (studio/), which the trainer never imports: pruned, as gpu_wheels.sh prunes pyarrow.
# bitsandbytes (for 8-bit and 4-bit) comes from .whl/ (gpu_wheels.sh). Prints the set's bytes.
# Usage (repo root, with the package index reachable): bash benchmarks/gpu_wheels_unsloth.sh
set -euo pipefail
rm -rf .whl-unsloth && mkdir .whl-unsloth && cd .whl-unsloth
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d . \
  unsloth==2026.10.9 unsloth_zoo==2026.10.9 'trl==1.15.*' 'datasets>=4.7,<5' \
  cut_cross_entropy msgspec tyro docstring_parser typeguard shtab nest_asyncio json5 \
  structlog dill==0.4.1 multiprocess==0.70.19 'fsspec<=2026.9.0'
zip -q -d unsloth-2026.10.9-*.whl 'studio/*'
du -cb ./*.whl | tail -1
