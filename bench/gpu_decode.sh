#!/usr/bin/env bash
# Issue 11 on one GPU in ONE device call (H200, torch 2.11 + triton 3.6, no network), <= 8 min
# (stage timeouts add up to 470 s):
#   1. the GPU decode tests (pytest -m gpu on tests/kernels/test_decode_step.py and tests/test_decode.py)
#   2. the decode clauses of the conformance suite for nsa_impl on cuda (NSACache -> Triton path)
#   3. bench/decode_bench.py   (the B x T grid + a ragged batch: CSV, table, PNG)
#   4. bench/generate_bench.py (toy LM tokens/s, NSA vs dense, 8k/32k/64k: CSV, table, PNG)
# Files under $OUT (7 of the 8 that come back): run.log, decode.{csv,md,png},
# generate.{csv,md,png}. Each stage has its own timeout so a slow one cannot eat the others;
# a failed stage is reported in the summary printed last, and the script goes on.
#   OUT=/tmp/out bash bench/gpu_decode.sh
set -u -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/nsa_decode_out}"
mkdir -p "$OUT"
LOG="$OUT/run.log"
: > "$LOG"
declare -A STATUS

stage() {  # stage NAME TIMEOUT_S CMD...: run, tee into the log, remember the exit status
  local name="$1" limit="$2"
  shift 2
  echo "=== $name (timeout ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=$?
  STATUS[$name]="rc=$rc $((SECONDS - t0))s"
  echo "=== $name done: ${STATUS[$name]}" | tee -a "$LOG"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  # the device's .git is a stale snapshot: the caller writes .head and carries it (gpu_session.sh)
  if [ -f .head ]; then echo "tree: $(cat .head)"; else echo "tree: unknown (no .head carried)"; fi
} 2>&1 | tee -a "$LOG"

stage gpu_tests 140 python3 -m pytest -m gpu tests/kernels/test_decode_step.py tests/test_decode.py \
  -q -rA -p no:cacheprovider -n 3
for clause in NSA-P5-DECODE-PREFILL NSA-I9-READS; do
  stage "conformance_$clause" 40 python3 -m conformance run --impl nsa_impl --device cuda \
    --no-mutants --clause "$clause" --report "/tmp/conf_$clause"
done
stage decode_bench 150 python3 bench/decode_bench.py --out "$OUT/decode"
stage generate_bench 100 python3 bench/generate_bench.py --out "$OUT/generate"

{
  echo
  echo "==================== summary ===================="
  for name in gpu_tests conformance_NSA-P5-DECODE-PREFILL conformance_NSA-I9-READS \
              decode_bench generate_bench; do
    printf '%-36s %s\n' "$name" "${STATUS[$name]:-not run}"
  done
  echo
  grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed|skipped)|pass,|FAIL" "$LOG" | grep -v "^===" | tail -15
  echo
  [ -f "$OUT/decode.md" ] && cat "$OUT/decode.md"
  echo
  [ -f "$OUT/generate.md" ] && cat "$OUT/generate.md"
} 2>&1 | tee -a "$LOG"
