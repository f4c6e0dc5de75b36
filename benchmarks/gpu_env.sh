# Sourced by the GPU scripts: installs the carried wheels (.whl/, made by gpu_wheels.sh:
# bitsandbytes, datasets, pyarrow, pandas, gguf, which the lent machines lack) and sets the
# environment.
set -euo pipefail
OUTDIR=${1:-/tmp/gpu-out}
mkdir -p "$OUTDIR"
# (a later call on a warm machine may carry other files and keep the install of an earlier one)
if compgen -G ".whl/*.whl" > /dev/null || [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# FlashAttention-4, where benchmarks/gpu_fa4.sh unpacked it (its .pth file is not read off
# PYTHONPATH, hence the second entry)
if [ -d /tmp/fa4site ]; then
  export PYTHONPATH=/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH
fi
# The lent image sets PYTHONDONTWRITEBYTECODE=1 and ships no bytecode, so every process
# compiled each module it imported again (10.4 s of a one-step train's start under cProfile,
# 2026-12-01): a second run then reached "Loaded" after 30-37 s. pip-installed environments
# keep bytecode; so do the runs here, in a cache of their own: unsetting the variable alone
# left a second one-step run as slow as the first ("Loaded" at 20.1 s after 17.0 s), with the
# cache at 12.8 s after 18.9 s (H200, 2026-12-01).
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-/tmp/pycache}
