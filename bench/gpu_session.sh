#!/usr/bin/env bash
# One device call of the 2026-12-01 session, by stage name (each stays inside the 600 s limit):
#   bash bench/gpu_session.sh kernels   # GPU tests of the v4 prefill and the decode kernels
#                                       # (in parallel), the prefill launch-shape sweep + parts +
#                                       # table (8k..64k), the decode benchmark grid
# Results under $OUT, packed so that at most 8 files come back: summary.txt (the tables),
# prefill.tgz, decode.tgz, tests.tgz.
set -u -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
OUT="${OUT:-/tmp/nsa_session}"
mkdir -p "$OUT"/prefill "$OUT"/decode "$OUT"/tests
SUM="$OUT/summary.txt"
: > "$SUM"
t0=$SECONDS
note() { echo "[$((SECONDS - t0)) s] $*" | tee -a "$SUM"; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  git log --oneline -1 2>/dev/null || true
} 2>&1 | tee -a "$SUM"

case "${1:-kernels}" in
kernels)
  note "GPU tests: prefill v4 kernels and decode kernels, in parallel"
  timeout 150 python3 -m pytest tests/gpu/test_triton_attn_gpu.py -q -rA -n 4 -p no:cacheprovider \
      > "$OUT/tests/prefill_tests.log" 2>&1 &
  p1=$!
  timeout 150 python3 -m pytest -m gpu tests/test_decode_step.py tests/test_decode.py -q -rA \
      -n 3 -p no:cacheprovider > "$OUT/tests/decode_tests.log" 2>&1 &
  p2=$!
  wait $p1; r1=$?; wait $p2; r2=$?
  note "prefill tests rc=$r1: $(tail -1 "$OUT/tests/prefill_tests.log")"
  note "decode tests rc=$r2: $(tail -1 "$OUT/tests/decode_tests.log")"
  grep -E "^(FAILED|ERROR)" "$OUT"/tests/*.log | head -20 | tee -a "$SUM"
  budget=$(( 560 - (SECONDS - t0) - 130 ))
  note "prefill sweep/parts/table with budget ${budget}s"
  timeout $(( budget + 15 )) python3 bench/gpu_prefill.py --out "$OUT/prefill" --budget-s "$budget" \
      --T 8192,16384,32768,65536 --sections sweep,parts,table > "$OUT/prefill/gpu_prefill.log" 2>&1
  note "prefill rc=$?"
  tail -40 "$OUT/prefill/gpu_prefill.log" | grep -vE "^ +(File|\^|~)" | tee -a "$SUM"
  left=$(( 570 - (SECONDS - t0) ))
  note "decode bench, ${left}s left"
  timeout $(( left > 20 ? left : 20 )) python3 bench/decode_bench.py --out "$OUT/decode/decode" \
      --budget-s $(( left > 30 ? left - 15 : 15 )) > "$OUT/decode/decode_bench.log" 2>&1
  note "decode bench rc=$?"
  [ -f "$OUT/decode/decode.md" ] && cat "$OUT/decode/decode.md" | tee -a "$SUM" \
      || tail -25 "$OUT/decode/decode_bench.log" | tee -a "$SUM"
  ;;
*)
  echo "unknown stage $1"; exit 2 ;;
esac
for d in prefill decode tests; do tar -czf "$OUT/$d.tgz" -C "$OUT" "$d" && rm -rf "${OUT:?}/$d"; done
note "call done"
