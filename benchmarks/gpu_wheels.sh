#!/usr/bin/env bash
# Fills .whl/ with what the lent GPU machines lack (their image: Python 3.12, torch 2.11 CUDA 13,
# transformers, peft, accelerate), within the 64 MiB a run may carry: bitsandbytes (CUDA 13
# libraries only), datasets and pyarrow (less Flight, S3, headers and tests), pandas (less its
# tests), gguf; and for eval and serve (gpu_eval_check.sh, gpu_serve_check.sh): fastapi,
# starlette, uvicorn, pydantic (+ pydantic-core, annotated-types, typing-inspection),
# opentelemetry-api (fastapi imports it), rouge-score (built here from its sdist) and nltk
# (+ defusedxml) under it; about 4.7 MB of the 64 MiB. pip does not check a wheel's RECORD
# against its files, so trimmed wheels install.
# Usage (repo root, here, with the package index reachable): bash benchmarks/gpu_wheels.sh
set -euo pipefail
rm -rf .whl && mkdir .whl && cd .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d . \
  bitsandbytes==0.50.2 datasets==5.2.0 pyarrow==26.0.1 pandas==3.1.1 dill==0.4.1 \
  xxhash==4.1.0 multiprocess==0.70.19 fsspec==2026.9.0 gguf==0.19.0 python-dateutil six tzdata
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d . \
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 pydantic==2.13.4 pydantic-core==2.46.4 \
  annotated-types==0.7.0 typing-inspection==0.4.2 opentelemetry-api==1.45.3 nltk==3.10.4 \
  defusedxml==0.7.1
python3 -m pip wheel -q --no-deps -w . rouge-score==0.1.2  # a pure-Python sdist
zip -q -d bitsandbytes-*.whl 'bitsandbytes/libbitsandbytes_cuda1[12]*' \
  'bitsandbytes/libbitsandbytes_rocm*' 'bitsandbytes/libbitsandbytes_xpu*'
# Flight and S3 are imported only on request (pyarrow.flight, pyarrow.fs's S3FileSystem).
zip -q -d pyarrow-*.whl 'pyarrow/libarrow_flight*' 'pyarrow/libarrow_python_flight*' \
  'pyarrow/_flight*' 'pyarrow/libarrow_s3*' 'pyarrow/_s3fs*' 'pyarrow/include/*' \
  'pyarrow/tests/*' 'pyarrow/src/*' 'pyarrow/_pyarrow_cpp_tests*' 'pyarrow/includes/*' \
  'pyarrow/libarrow_python.so' 'pyarrow/libarrow_python.so.*.*' \
  'pyarrow/libarrow_python_parquet_encryption.so' \
  'pyarrow/libarrow_python_parquet_encryption.so.*.*' \
  'pyarrow/*.pyx' 'pyarrow/*.pxd' 'pyarrow/*.cpp' 'pyarrow/*.h'
zip -q -d pandas-*.whl 'pandas/tests/*'
du -cb ./*.whl | tail -1
