# Sourced by the GPU scripts: installs the carried wheels (.whl/, made by gpu_wheels.sh:
# bitsandbytes, datasets, pyarrow, pandas, gguf, which the lent machines lack) and sets the
# environment.
set -euo pipefail
OUTDIR=${1:-/tmp/gpu-out}
mkdir -p "$OUTDIR"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
