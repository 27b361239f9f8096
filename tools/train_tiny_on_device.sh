#!/usr/bin/env bash
# The exact device-machine command that trained the shipped tiny model (one H100 call, < 10 min):
#   carry .whl_av (the PyAV wheel: the synthetic videos are mp4), results under $OUT.
# Usage: bash tools/train_tiny_on_device.sh [extra train_tiny_model.py args]
# Brings back: train.log, results.json, and tiny.tar.gz.* (the trained dirs, no data, split under 16 MiB);
# ship locally with `python tools/make_tiny_model.py --weights <untarred>/sft/final`.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out/tiny}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/avsite .whl_av/*.whl || exit 1
export PYTHONPATH=/tmp/avsite:$PWD/src
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
W=${WORK:-/tmp/tiny}
timeout ${BUDGET_S:-540} python3 tools/train_tiny_model.py --work "$W" --train 20000 --test 600 --eval-n 300 \
  --workers 14 "$@" 2>&1 | grep --line-buffered -v 'Writing model shards\|Loading weights' | tee "$OUT/train.log"
rc=$?
cp "$W/results.json" "$OUT/" 2>/dev/null
# what the next stage needs: finished exports (skipping inputs a later export supersedes), plus the newest
# checkpoint of a stage that did not finish (so a next call resumes it)
cd "$W" && {
  prev=teacher-vision
  for d in teacher student-init distill-layer distill-e2e sft; do
    if [[ -d $d/final || ($d == student-init && -d $d) ]]; then
      [[ $d == student-init ]] && cur=$d || cur=$d/final
    else
      echo "$prev"
      [[ -f $d/latest ]] && echo "$d/latest" "$d/$(cat $d/latest)"
      break
    fi
    prev=$cur
  done
  ls -d teacher/final distill-e2e/final sft/final */metrics.jsonl 2>/dev/null
} | sort -u | xargs tar -czf - | split -b 15M - "$OUT/tiny.tar.gz."
ls -la "$OUT"
exit $rc
