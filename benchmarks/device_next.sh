#!/usr/bin/env bash
# The open measurements in one device call, most important first, each under its own time limit.
#   carry: .carry (site312.tar.xz: fla + TileLang wheels unpacked, see ENVIRONMENT.md; kernel_cache.tgz.part*
#          from an earlier call's $OUT if any). Usage: bash benchmarks/device_next.sh [stream|train|all|x2]
#   x2 (a 2-GPU machine): GPU 0 trains on 1 GPU (2 rows/step, profiled) while GPU 1 runs the stream GPU tests
#   and profile; then the same 2 rows/step over both GPUs with FSDP2 (torchrun), on the now-warm kernel cache.
set -o pipefail
export PYTHONUNBUFFERED=1
what=${1:-all}
OUT=${OUT:-out/device}; mkdir -p "$OUT"
mkdir -p /tmp/s && tar xJf .carry/site312.tar.xz -C /tmp/s || exit 1
export PYTHONPATH=/tmp/s/site312:$PWD/src
source benchmarks/device_cache.sh && cache_restore
if [[ $what == stream || $what == all ]]; then
  # 1. the block kernel against SDPA for a frame's SWA attention (decides BLOCK_PREFILL_MAX_T's default)
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fast_ops.py tests/gpu/test_stream_graph.py \
    -k "block or vision or graph or frame or memory or missing" 2>&1 | tail -3 | tee "$OUT/gpu_tests.log"
  timeout 140 python3 benchmarks/profile_stream.py --streams 1 32 --swa-block-prefill 0 512 --out "$OUT/ps" \
    > "$OUT/profile_stream.log" 2>&1; grep "^==" "$OUT/profile_stream.log"
  # 2. the full 10,000-frame run (pass --swa-block-prefill 512 if step 1 shows it faster)
  timeout 290 python3 benchmarks/bench_stream.py --out "$OUT/stream" --steps 10 --budget-s 170 ${STREAM_ARGS:-} \
    > "$OUT/stream.log" 2>&1; tail -1 "$OUT/stream.log"
fi
if [[ $what == train || $what == all ]]; then
  timeout 480 python3 benchmarks/bench_train.py --trainable gdn,attention --warmup 1 --steps 3 --profile \
    --out "$OUT/train" > "$OUT/train.log" 2>&1; grep -v TileLang "$OUT/train.log" | tail -30
fi
if [[ $what == final ]]; then  # training step, GPU tests, the full stream benchmark, each alone on the GPU
  timeout 150 python3 benchmarks/bench_train.py --trainable gdn,attention --warmup 1 --steps 3 \
    --out "$OUT/train" > "$OUT/train.log" 2>&1; grep -v TileLang "$OUT/train.log" | tail -16
  timeout 130 python3 -m pytest -q -p no:cacheprovider -rf --tb=short tests/gpu/test_stream_graph.py \
    tests/gpu/test_fast_ops.py -k "graph or frame or memory or missing or block" > "$OUT/gpu_tests.log" 2>&1
  grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.log" | tail -12
  timeout 240 python3 benchmarks/bench_stream.py --out "$OUT/stream" --steps 10 --budget-s 160 \
    > "$OUT/stream.log" 2>&1; tail -25 "$OUT/stream.log"
fi
if [[ $what == probe ]]; then  # GPU tests, the frame profile with the block kernel, a profiled training step
  timeout 170 python3 -m pytest -q -p no:cacheprovider -rf --tb=short tests/gpu/test_fast_ops.py \
    tests/gpu/test_stream_graph.py -k "block or vision or graph or frame or memory or missing" > "$OUT/gpu_tests.log" 2>&1
  grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.log" | tail -12
  timeout 100 python3 benchmarks/profile_stream.py --streams 1 32 --swa-block-prefill 512 --out "$OUT/ps" \
    > "$OUT/profile_stream.log" 2>&1; grep "^==" "$OUT/profile_stream.log"
  timeout 240 python3 benchmarks/bench_train.py --trainable gdn,attention --warmup 1 --steps 3 --profile \
    --out "$OUT/train" > "$OUT/train.log" 2>&1; grep -v TileLang "$OUT/train.log" | tail -45
fi
if [[ $what == x2 ]]; then
  ( CUDA_VISIBLE_DEVICES=0 timeout 280 python3 benchmarks/bench_train.py --trainable gdn,attention --rows-per-step 2 \
      --warmup 1 --steps 3 --profile --out "$OUT/train1" > "$OUT/train1.log" 2>&1 ) &
  ( export CUDA_VISIBLE_DEVICES=1
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fast_ops.py tests/gpu/test_stream_graph.py \
      -k "block or vision or graph or frame or memory or missing or segments" > "$OUT/gpu_tests.log" 2>&1
    timeout 130 python3 benchmarks/profile_stream.py --streams 1 32 --swa-block-prefill 0 512 --out "$OUT/ps" \
      > "$OUT/profile_stream.log" 2>&1 ) &
  wait
  tail -3 "$OUT/gpu_tests.log"; grep "^==" "$OUT/profile_stream.log"; grep -v TileLang "$OUT/train1.log" | tail -32
  timeout 200 torchrun --standalone --nproc_per_node 2 benchmarks/bench_train.py --trainable gdn,attention \
    --rows-per-step 2 --warmup 1 --steps 3 --out "$OUT/train2" > "$OUT/train2.log" 2>&1
  grep -v TileLang "$OUT/train2.log" | tail -18
fi
cache_save
