#!/usr/bin/env bash
# One call on the GPU machine: install the carried fla wheels, run the GPU tests, then the benchmark.
#   carry: .gpu_carry (wheels/ from `pip download flash-linear-attention==0.6.0 fla-core==0.6.0 --no-deps`,
#          shared/fixtures/reference-tiny copied from ../shared)
# Usage: bash benchmarks/device_run.sh [tests|bench|all] [extra benchmark args...]
set -o pipefail
export PYTHONUNBUFFERED=1
what=${1:-all}; shift || true
OUT=${OUT:-out/device}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu_carry/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src INFINITEVL_SHARED=$PWD/.gpu_carry/shared
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
if [[ $what == tests || $what == all ]]; then
  python3 -m pytest -q tests/gpu -p no:cacheprovider --timeout 300 -rs 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
fi
if [[ $what == bench || $what == all ]]; then
  python3 benchmarks/bench_inference.py --out "$OUT/bench" "$@" 2>&1 | grep -v '^\[transformers\]' | tee "$OUT/bench.log"
fi
