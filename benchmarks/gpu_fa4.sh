#!/usr/bin/env bash
# FlashAttention-4 (flash-attn-4, for the vision attention in CUDA graphs) for the lent GPU
# machines, whose image lacks it. Its compiler library alone is 92 MB as a wheel, more than a
# call may carry beside .whl/, so it travels xz-compressed in three parts, over three calls to
# one warm machine (each call within its idle time of the last):
#   here:   bash benchmarks/gpu_fa4.sh pack      -> .fa4/1 (4.4 MB), .fa4/2 (56 MB), .fa4/3
#   there:  call 1 carries .whl .fa4/1, call 2 .fa4/2, call 3 .fa4/3; each starts with
#           bash benchmarks/gpu_fa4.sh stash     (the third also unpacks into /tmp/fa4site,
#           which gpu_env.sh then puts on PYTHONPATH)
set -euo pipefail
case ${1:-} in
  pack)
    rm -rf .fa4 && mkdir -p .fa4/w .fa4/1 .fa4/2 .fa4/3 && cd .fa4/w
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d . \
      flash-attn-4==4.0.0b36 quack-kernels==0.6.5 apache-tvm-ffi==0.1.15.post2 \
      torch-c-dlpack-ext==0.1.5 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
      nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1
    mkdir big && python3 -m zipfile -e nvidia_cutlass_dsl_libs_cu13-*.whl big
    for w in *.whl; do [[ $w == nvidia_cutlass_dsl_libs_cu13-* ]] || python3 -m zipfile -e "$w" big; done
    tar -C big -cf - . | xz -9 -T0 > ../all.tar.xz
    cd ..
    dd if=all.tar.xz of=1/part bs=1M iflag=count_bytes count=4400000 status=none
    dd if=all.tar.xz of=2/part bs=1M iflag=skip_bytes,count_bytes skip=4400000 count=56000000 status=none
    dd if=all.tar.xz of=3/part bs=1M iflag=skip_bytes skip=60400000 status=none
    rm -rf w all.tar.xz && du -b 1 2 3 ;;
  stash)
    mkdir -p /tmp/fa4parts
    for i in 1 2 3; do [ -f .fa4/$i/part ] && cp .fa4/$i/part /tmp/fa4parts/$i; done
    if [ -f /tmp/fa4parts/1 ] && [ -f /tmp/fa4parts/2 ] && [ -f /tmp/fa4parts/3 ] \
        && [ ! -d /tmp/fa4site ]; then
      mkdir -p /tmp/fa4site
      cat /tmp/fa4parts/1 /tmp/fa4parts/2 /tmp/fa4parts/3 | xz -dc | tar -xf - -C /tmp/fa4site
    fi
    ls /tmp/fa4parts ;;
  *) echo "usage: $0 pack|stash" >&2; exit 2 ;;
esac
