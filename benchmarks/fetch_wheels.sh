#!/usr/bin/env bash
# Wheels the GPU machine lacks, for benchmarks/gpu.sh (Python 3.12, x86-64; ~43 MB). Run where
# PyPI is reachable; benchmarks/wheels/ is git-ignored and travels with the tree when carried.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d wheels "bitsandbytes==0.50.2" "platformdirs>=4"
ls -la wheels
