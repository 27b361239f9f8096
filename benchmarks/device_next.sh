#!/usr/bin/env bash
# GPU measurements for one device call, each step under its own time limit (a call may run 10 minutes).
#   carry: .carry (site312.tar.xz: fla + TileLang wheels unpacked, see ENVIRONMENT.md; kernel_cache.tar.xz* from
#          an earlier call's $OUT if any). Usage: bash benchmarks/device_next.sh MODE
#   tests:  every GPU test (tests/gpu), or TESTS="FILE... [-k EXPR]"
#   stream: the stream GPU tests, then the 10,000-frame benchmark with 8 and 32 streams
#   train:  the training-kernel GPU tests, then the 4B stage-2 step in the best known one-GPU setting (2 rows in
#           one forward, RC=9 layers recomputed) and the same step profiled (kernel time by kind)
#   profile: the training step as in train and its per-kernel profile, no tests
#   frame:  after a change to the frame step: its GPU tests, (PROFILE=1) the per-kernel profile, 2,000 frames and 32
#           streams
#           (carry [".carry", ".gpu_carry"]: the parity fixture for test_fast_model)
#   clip:   frames per step (push_clip): the stream benchmark (FRAMES=1000, STREAMS=32) with CLIPS="4 1 8" frames a
#           step (the first is the headline; BENCH_LIMIT, BUDGET seconds), (PROFILE=K) the
#           per-kernel profile of K-frame clips, the block kernel against SDPA at BLOCK_T="256 1024 2048" tokens, then
#           the stream and fast-model GPU tests unless NO_TESTS=1 (carry [".carry", ".gpu_carry"])
#   headline: the streaming figures issue 5 asks for (clip mode: 10,000 frames, 10 / 4 / 1 frames a step, 8 and 32
#           streams; carry [".carry", ".gpu_carry"])
#   micro:  the short-conv tiles and the SWA block kernel on their own (bench_short_conv.py, bench_block_attention.py),
#           then their GPU tests
#   probe:  per-kernel profile of a frame step, the block-attention and FP8 GEMM microbenchmarks
#   train_ab: the training step (same setting as train) on this tree, then again with the files under .devrun/base/
#           copied over it (their repo paths mirrored; e.g. `git show REF:src/x.py > .devrun/base/src/x.py`);
#           carry [".carry", ".devrun"]: an A/B of a change on one machine in one call; AB_TESTS="FILE..." runs
#           those GPU tests first, BENCH="conv swiglu norm" the training kernels on their own first
#           (benchmarks/bench_train_{conv,swiglu,norm}.py)
#   kbench: BENCH="conv swiglu norm" (default all three; ARGS passed to each): the training kernels' microbenchmarks
#   stream_ab: the stream benchmark (1,000 frames, 32 streams) on this tree, then with .devrun/base/ copied over it
#           (as train_ab); carry [".carry", ".devrun"]
#   conv:   the training convs (ops/short_conv_train) alone: their GPU tests and bench_train_conv.py at the default
#           tiles against fla's causal_conv1d
#   x2:     (a 2-GPU machine) the training step with FSDP2 over both GPUs, 2 rows per GPU in one forward
#   Results go to $OUT (logs, JSON); copy $OUT/kernel_cache.tar.xz.* into .carry/ afterwards (recompress it here with
#   `xz -9e` when the carry nears 64 MiB: the device's xz -6 -T0 pieces are ~2x larger).
#   tests needs the parity fixture: copy ../shared/fixtures/reference-tiny to .gpu_carry/shared/fixtures/ and carry
#   [".carry/site312.tar.xz", ".gpu_carry"] (with the kernel cache too the carry passes 64 MiB; kernels then compile).
set -o pipefail
export PYTHONUNBUFFERED=1
what=${1:-}
OUT=${OUT:-out/device}; mkdir -p "$OUT"
mkdir -p /tmp/s && tar xJf .carry/site312.tar.xz -C /tmp/s || exit 1
export PYTHONPATH=/tmp/s/site312:$PWD/src
[ -d .gpu_carry/shared ] && export INFINITEVL_SHARED=$PWD/.gpu_carry/shared
source benchmarks/device_cache.sh && cache_restore

# gpu_tests LIMIT FILE... -k EXPR: the GPU tests into $OUT/gpu_tests.log
gpu_tests() {
  local limit=$1; shift
  # -v: a run cut by its time limit still shows which tests passed
  timeout "$limit" python3 -m pytest -v -p no:cacheprovider -rf --tb=short "$@" > "$OUT/gpu_tests.log" 2>&1
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
  timeout "$limit" python3 benchmarks/bench_train.py --trainable gdn,attention --warmup 1 --steps "${STEPS:-3}" "$@" \
    --out "$OUT/$name" > "$OUT/$name.log" 2>&1
}
tests_summary() {
  echo "PASSED lines: $(grep -c " PASSED" "$OUT/gpu_tests.log")"
  grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.log" | grep -v " PASSED" | tail -12
}

STREAM_K="block or vision or graph or frame or memory or missing"
RC=${RC:-9}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
summary() { grep -E "step \(|MFU|memory|tokens/s|processes|Error|error" "$OUT/$1.log" | tail -8; }
case $what in
  tests)
    gpu_tests 560 ${TESTS:-tests/gpu}; tests_summary ;;
  stream)
    gpu_tests 150 tests/gpu/test_fast_ops.py tests/gpu/test_stream_graph.py -k "$STREAM_K"; tests_summary
    stream_bench 400 170; grep -v "^{" "$OUT/stream.log" | tail -12 ;;
  train)
    gpu_tests 200 tests/gpu/test_train_kernels.py; tests_summary
    train_bench 150 train --rows-per-step 2 --rows-per-forward 2 --recompute-layers "$RC"; summary train
    train_bench 200 train_profile --rows-per-step 2 --rows-per-forward 2 --recompute-layers "$RC" --profile
    grep -v TileLang "$OUT/train_profile.log" | grep -E " ms  |by kernel kind" | head -32 ;;
  profile)  # the training step (as train) and its per-kernel profile only, no tests
    train_bench 300 train_profile --rows-per-step 2 --rows-per-forward 2 --recompute-layers "$RC" --profile
    summary train_profile
    grep -v TileLang "$OUT/train_profile.log" | grep -E " ms  |by kernel kind|by operator|GPU idle" | head -80 ;;
  frame)
    gpu_tests 250 tests/gpu/test_fast_ops.py tests/gpu/test_stream_graph.py tests/gpu/test_fast_model.py \
      -k "conv or $STREAM_K or reference or graph or engine"; tests_summary
    [ -n "${PROFILE:-}" ] && { stream_profile 120 512; grep -E "^==|kernels in" "$OUT/profile_stream.log"; }
    STREAM_ARGS="--frames 1500 --streams 32 --steps 5" stream_bench 200 100; grep -v "^{" "$OUT/stream.log" | tail -12 ;;
  headline)  # issue 5's measurement: 10,000 frames, windows of exactly 500 (clips of 10 frames), 8 and 32 streams
    FRAMES=10000 CLIPS="10 4 1" STREAMS="8 32" BENCH_LIMIT=400 BUDGET=120 BLOCK_T="" NO_TESTS=1 bash "$0" clip
    exit $? ;;
  clip)
    STREAM_ARGS="--frames ${FRAMES:-1000} --frames-per-step ${CLIPS:-4 1 8} --streams ${STREAMS:-32} --steps 5" \
      stream_bench "${BENCH_LIMIT:-210}" "${BUDGET:-40}"; grep -v "^{" "$OUT/stream.log" | tail -14
    [ -n "${PROFILE:-}" ] && { stream_profile 100 4096 --frames-per-step "$PROFILE" --streams 1; grep -E "^==|kernels in" "$OUT/profile_stream.log"; }
    [ -n "${BLOCK_T-256 1024 2048}" ] && { timeout 60 python3 benchmarks/bench_block_attention.py --batch 1 \
      --tokens ${BLOCK_T-256 1024 2048} --splits 0 --sdpa > "$OUT/block.log" 2>&1; grep -v "^{" "$OUT/block.log" | tail -6; }
    [ -z "${NO_TESTS:-}" ] && { gpu_tests 270 tests/gpu/test_stream_graph.py tests/gpu/test_fast_model.py; tests_summary; } ;;
  micro)
    timeout 90 python3 benchmarks/bench_short_conv.py --tokens 256 1024 2048 > "$OUT/conv.log" 2>&1
    grep -v "^{" "$OUT/conv.log" | tail -30
    timeout 60 python3 benchmarks/bench_block_attention.py --batch 1 --tokens 256 1024 2048 --splits 0 \
      > "$OUT/block.log" 2>&1; grep -v "^{" "$OUT/block.log" | tail -6
    timeout 60 python3 benchmarks/bench_block_attention.py --batch 32 --tokens 256 --splits 0 \
      > "$OUT/block32.log" 2>&1; grep -v "^{" "$OUT/block32.log" | tail -2
    [ -z "${NO_TESTS:-}" ] && { gpu_tests 150 tests/gpu/test_fast_ops.py -k "block or conv"; tests_summary; } ;;
  probe)
    stream_profile 200 512; grep "^==" "$OUT/profile_stream.log"
    timeout 90 python3 benchmarks/bench_block_attention.py > "$OUT/block.log" 2>&1; grep -v "^{" "$OUT/block.log" | tail -6
    timeout 90 python3 benchmarks/probe_fp8.py > "$OUT/fp8.log" 2>&1; grep -v "^{" "$OUT/fp8.log" | tail -5 ;;
  train_ab)
    [ -d .devrun/base ] || { echo "train_ab needs .devrun/base/<repo paths>"; exit 2; }
    [ -n "${AB_TESTS:-}" ] && { gpu_tests 150 $AB_TESTS; tests_summary; }
    for b in ${BENCH:-}; do  # e.g. BENCH="conv swiglu norm": benchmarks/bench_train_$b.py first
      timeout 90 python3 "benchmarks/bench_train_$b.py" > "$OUT/train_$b.log" 2>&1
      grep -v "^{" "$OUT/train_$b.log" | grep -v -i warn | tail -8
    done
    train_bench 200 train_new --rows-per-step 2 --rows-per-forward 2 --recompute-layers "$RC"; summary train_new
    cp -r .devrun/base/. .
    train_bench 200 train_base --rows-per-step 2 --rows-per-forward 2 --recompute-layers "$RC"; summary train_base ;;
  kbench)  # BENCH="conv swiglu norm" (ARGS for each): the training kernels on their own, no tests, no step
    for b in ${BENCH:-conv swiglu norm}; do
      timeout 120 python3 "benchmarks/bench_train_$b.py" ${ARGS:-} > "$OUT/train_$b.log" 2>&1
      grep -v "^{" "$OUT/train_$b.log" | grep -v -i warn | tail -20
    done ;;
  stream_ab)
    [ -d .devrun/base ] || { echo "stream_ab needs .devrun/base/<repo paths>"; exit 2; }
    OUT_ALL=$OUT; mkdir -p "$OUT/new" "$OUT/base"
    OUT=$OUT_ALL/new STREAM_ARGS="--frames 1000 --streams 32 --steps 5" stream_bench 230 60
    grep -v "^{" "$OUT_ALL/new/stream.log" | tail -6
    cp -r .devrun/base/. .
    OUT=$OUT_ALL/base STREAM_ARGS="--frames 1000 --streams 32 --steps 5" stream_bench 230 60
    grep -v "^{" "$OUT_ALL/base/stream.log" | tail -6 ;;
  conv)  # the training convs alone: their GPU tests, then bench_train_conv.py at the default tiles against fla's
    gpu_tests 100 tests/gpu/test_train_kernels.py -k training_conv; tests_summary
    timeout 90 python3 benchmarks/bench_train_conv.py --fwd-tiles --dpre-tiles --dx-tiles > "$OUT/train_conv.log" 2>&1
    grep -v "^{" "$OUT/train_conv.log" | grep -v -i warn | tail -22 ;;
  x2)
    timeout 300 torchrun --standalone --nproc_per_node 2 benchmarks/bench_train.py --trainable gdn,attention \
      --rows-per-step 4 --rows-per-forward 2 --recompute-layers "$RC" --warmup 1 --steps 3 --out "$OUT/train_x2" \
      > "$OUT/train_x2.log" 2>&1
    summary train_x2 ;;
  *) echo "unknown mode $what: tests | stream | frame | headline | clip | micro | train | profile | kbench | train_ab | stream_ab | probe | conv | x2"; exit 2 ;;
esac
cache_save
