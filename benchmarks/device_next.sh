#!/usr/bin/env bash
# GPU measurements for one device call, each step under its own time limit (a call may run 10 minutes).
#   carry: .carry (site312.tar.xz: fla + TileLang wheels unpacked, see ENVIRONMENT.md; kernel_cache.tar.xz* from
#          an earlier call's $OUT if any). Usage: bash benchmarks/device_next.sh [stream|train|all|final|probe|ab|tk|rpf|rc|ce|fp|b8|b64|x2|x2b]
#   stream: GPU tests, frame profile (SDPA vs block kernel), the 10,000-frame benchmark; train: a profiled step;
#   final: training step, GPU tests, stream benchmark; probe: GPU tests, block-kernel profile, profiled step;
#   x2 (a 2-GPU machine): GPU 0 trains on 1 GPU (2 rows/step, profiled) while GPU 1 runs the stream GPU tests
#   and profile; then the same 2 rows/step over both GPUs with FSDP2 (torchrun), on the now-warm kernel cache.
set -o pipefail
export PYTHONUNBUFFERED=1
what=${1:-all}
OUT=${OUT:-out/device}; mkdir -p "$OUT"
mkdir -p /tmp/s && tar xJf .carry/site312.tar.xz -C /tmp/s || exit 1
export PYTHONPATH=/tmp/s/site312:$PWD/src
source benchmarks/device_cache.sh && cache_restore

# gpu_tests LIMIT FILE... -k EXPR: the GPU tests into $OUT/gpu_tests.log
gpu_tests() {
  local limit=$1; shift
  timeout "$limit" python3 -m pytest -q -p no:cacheprovider -rf --tb=short "$@" > "$OUT/gpu_tests.log" 2>&1
}
# stream_profile LIMIT BLOCK_MAX_T...: per-kernel profile of a frame step at 1 and 32 streams
stream_profile() {
  local limit=$1; shift
  timeout "$limit" python3 benchmarks/profile_stream.py --streams 1 32 --swa-block-prefill "$@" --out "$OUT/ps" \
    > "$OUT/profile_stream.log" 2>&1
}
# stream_bench LIMIT BUDGET_S: the 10,000-frame single stream (first), then 8 and 32 streams
stream_bench() {
  timeout "$1" python3 benchmarks/bench_stream.py --out "$OUT/stream" --steps 10 --budget-s "$2" ${STREAM_ARGS:-} \
    > "$OUT/stream.log" 2>&1
}
# train_bench LIMIT NAME ARGS...: the 4B stage-2 training step into $OUT/NAME(.log)
train_bench() {
  local limit=$1 name=$2; shift 2
  timeout "$limit" python3 benchmarks/bench_train.py --trainable gdn,attention --warmup 1 --steps 3 "$@" \
    --out "$OUT/$name" > "$OUT/$name.log" 2>&1
}
tests_summary() { grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.log" | tail -12; }

STREAM_K="block or vision or graph or frame or memory or missing"
if [[ $what == stream || $what == all ]]; then
  gpu_tests 150 tests/gpu/test_fast_ops.py tests/gpu/test_stream_graph.py -k "$STREAM_K"; tests_summary
  stream_profile 140 0 512; grep "^==" "$OUT/profile_stream.log"
  stream_bench 290 170; tail -1 "$OUT/stream.log"
fi
if [[ $what == train || $what == all ]]; then
  train_bench 480 train --profile; grep -v TileLang "$OUT/train.log" | tail -30
fi
if [[ $what == final ]]; then  # each alone on the GPU
  train_bench 150 train; grep -v TileLang "$OUT/train.log" | tail -16
  gpu_tests 130 tests/gpu/test_stream_graph.py tests/gpu/test_fast_ops.py -k "graph or frame or memory or missing or block"
  tests_summary
  stream_bench 240 160; tail -25 "$OUT/stream.log"
fi
if [[ $what == probe ]]; then
  gpu_tests 170 tests/gpu/test_fast_ops.py tests/gpu/test_stream_graph.py -k "$STREAM_K"; tests_summary
  stream_profile 100 512; grep "^==" "$OUT/profile_stream.log"
  train_bench 240 train --profile; grep -v TileLang "$OUT/train.log" | tail -45
fi
if [[ $what == ab ]]; then  # the 10,000-frame stream benchmark; GPU tests; block-kernel split counts
  stream_bench 300 170; tail -25 "$OUT/stream.log"
  gpu_tests 180 tests/gpu/test_stream_graph.py tests/gpu/test_fast_ops.py -k "graph or frame or memory or missing or block"
  tests_summary
  timeout 70 python3 benchmarks/bench_block_attention.py --splits 0 3 8 12 17 > "$OUT/block.log" 2>&1
  grep -v "^{" "$OUT/block.log" | tail -10
fi
if [[ $what == tk ]]; then  # the fused training kernels' GPU tests, then a profiled training step
  gpu_tests 100 tests/gpu/test_train_kernels.py; tests_summary
  train_bench 330 train --profile; grep -v TileLang "$OUT/train.log" | tail -22
fi
if [[ $what == rpf ]]; then  # the fused training kernels' tests; two 8K rows per step in one forward
  gpu_tests 60 tests/gpu/test_train_kernels.py; tests_summary
  train_bench 190 train2 --rows-per-step 2 --rows-per-forward 2; grep -v TileLang "$OUT/train2.log" | tail -16
fi
if [[ $what == rc ]]; then  # fp8 GEMM probe; block-kernel GPU tests; recompute_layers trades at 2 rows/step
  timeout 80 python3 benchmarks/probe_fp8.py > "$OUT/fp8.log" 2>&1; grep -v "^{" "$OUT/fp8.log" | tail -8
  gpu_tests 100 tests/gpu/test_fast_ops.py -k block; tests_summary
  for r in 18 9; do
    train_bench 150 train_rc$r --rows-per-step 2 --rows-per-forward 2 --recompute-layers $r
    grep -E "step \(|MFU|memory|tokens/s|Error|error" "$OUT/train_rc$r.log" | tail -6
  done
  train_bench 150 train_rc0 --rows-per-step 2 --rows-per-forward 1 --recompute-layers 0
  grep -E "step \(|MFU|memory|tokens/s|Error|error" "$OUT/train_rc0.log" | tail -6
fi
if [[ $what == ce ]]; then  # training-kernel + block GPU tests; profiled step with the fused cross-entropy
  gpu_tests 200 tests/gpu/test_train_kernels.py tests/gpu/test_fast_ops.py -k "block or rms or swiglu or entropy"
  tests_summary
  train_bench 230 train_ce9 --rows-per-step 2 --rows-per-forward 2 --recompute-layers 9 --profile
  grep -v TileLang "$OUT/train_ce9.log" | tail -24
  train_bench 140 train_ce4 --rows-per-step 2 --rows-per-forward 2 --recompute-layers 4
  grep -E "step \(|MFU|memory|tokens/s|Error|error" "$OUT/train_ce4.log" | tail -6
fi
if [[ $what == fp ]]; then  # training-kernel GPU tests; 2 rows/step with fused projections, 9 and 7 recomputed
  gpu_tests 120 tests/gpu/test_train_kernels.py; tests_summary
  for r in 9 7; do
    train_bench 150 train_fp$r --rows-per-step 2 --rows-per-forward 2 --recompute-layers $r
    grep -E "step \(|MFU|memory|tokens/s|Error|error" "$OUT/train_fp$r.log" | tail -6
  done
fi
if [[ $what == b8 ]]; then  # a GPU's share of the published batch (8 rows/step, 2 per forward); then the tests
  train_bench 170 train_b8r9 --rows-per-step 8 --rows-per-forward 2 --recompute-layers 9
  grep -E "step \(|MFU|memory|tokens/s|Error|error" "$OUT/train_b8r9.log" | tail -6
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    train_bench 170 train_b8r8 --rows-per-step 8 --rows-per-forward 2 --recompute-layers 8
  grep -E "step \(|MFU|memory|tokens/s|Error|error" "$OUT/train_b8r8.log" | tail -6
  gpu_tests 200 tests/gpu/test_train_kernels.py; tests_summary
fi
if [[ $what == x2b ]]; then  # 2-GPU machine: two 1-GPU variants side by side, then FSDP2 over both GPUs
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  ( CUDA_VISIBLE_DEVICES=0 train_bench 230 g1_b8r11 --rows-per-step 8 --rows-per-forward 2 --recompute-layers 11 \
      --loss-chunk 2048 ) &
  ( CUDA_VISIBLE_DEVICES=1 train_bench 230 g1_b2r8 --rows-per-step 2 --rows-per-forward 2 --recompute-layers 8 ) &
  wait
  for f in g1_b8r11 g1_b2r8; do echo "== $f"; grep -E "step \(|MFU|memory|tokens/s|Error|error" "$OUT/$f.log" | tail -6; done
  timeout 240 torchrun --standalone --nproc_per_node 2 benchmarks/bench_train.py --trainable gdn,attention \
    --rows-per-step 4 --rows-per-forward 2 --recompute-layers 8 --warmup 1 --steps 3 --out "$OUT/g2_b4r8" \
    > "$OUT/g2_b4r8.log" 2>&1
  echo "== g2_b4r8"; grep -v TileLang "$OUT/g2_b4r8.log" | grep -E "step \(|MFU|memory|tokens/s|processes|Error|error" | tail -8
fi
if [[ $what == b64 ]]; then  # 1 GPU: the published batch of 64 rows per step, then 8 (a GPU's share on 8 GPUs)
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  train_bench 210 h_b64r10 --rows-per-step 64 --rows-per-forward 2 --recompute-layers 10 --loss-chunk 2048 --steps 2
  train_bench 120 h_b8r10 --rows-per-step 8 --rows-per-forward 2 --recompute-layers 10 --loss-chunk 2048
  for f in h_b64r10 h_b8r10; do echo "== $f"; grep -E "step \(|MFU|memory|tokens/s|Error|error" "$OUT/$f.log" | tail -6; done
fi
if [[ $what == x2 ]]; then
  ( CUDA_VISIBLE_DEVICES=0 train_bench 280 train1 --rows-per-step 2 --profile ) &
  ( export CUDA_VISIBLE_DEVICES=1
    gpu_tests 150 tests/gpu/test_fast_ops.py tests/gpu/test_stream_graph.py -k "$STREAM_K or segments"
    stream_profile 130 0 512 ) &
  wait
  tests_summary; grep "^==" "$OUT/profile_stream.log"; grep -v TileLang "$OUT/train1.log" | tail -32
  timeout 200 torchrun --standalone --nproc_per_node 2 benchmarks/bench_train.py --trainable gdn,attention \
    --rows-per-step 2 --warmup 1 --steps 3 --out "$OUT/train2" > "$OUT/train2.log" 2>&1
  grep -v TileLang "$OUT/train2.log" | tail -18
fi
cache_save
