#!/usr/bin/env bash
# One device call of the 2026-12-01 session, by stage name (each stays inside the 600 s limit):
#   bash bench/gpu_session.sh kernels   # GPU tests of the v4 prefill and the decode kernels
#                                       # (in parallel), the prefill launch-shape sweep + parts +
#                                       # table (8k..64k), the decode benchmark grid
#   bash bench/gpu_session.sh verify    # 2026-12-02: every GPU test and the router's GPU
#                                       # conformance (in parallel), the profile of a planned
#                                       # 64k call, then ours / dense / flash_nsa / fla-core side
#                                       # by side (.peers/peer_bench.py; wheels from .whl/)
#   bash bench/gpu_session.sh recheck   # 2026-12-02: call 1's failing GPU tests, NaN-rows per
#                                       # CUDA torch path, peers' conformance, the profile and
#                                       # the side by side again, the decode grid
#   bash bench/gpu_session.sh measure   # 2026-12-02: determinism per CUDA path, GPU tests,
#                                       # conformance (router, peers), the profile, the side by
#                                       # side with flash_nsa and fla-core
#   bash bench/gpu_session.sh final     # 2026-12-02: the last call's checks of the fixes, the
#                                       # profile and ours against dense
#   bash bench/gpu_session.sh serve     # 2026-12-02: the triton path's and the peers' GPU
#                                       # conformance, the decode benchmark grid
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

# fla-core is a pure-Python wheel (carried in .whl/): unpacked onto a path of its own, put on
# PYTHONPATH only in the peers' processes.
FLA=/tmp/fla_site
unpack_fla() {
  python3 -m zipfile -e .whl/fla_core-*.whl "$FLA" && python3 -c "import sys; sys.path.insert(0, '$FLA'); import fla; print('fla', fla.__version__)" 2>&1 | tail -1 | tee -a "$SUM"
}

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
verify)
  note "GPU tests (all, -m gpu) and the router's GPU conformance, in parallel"
  timeout 300 python3 -m pytest tests gpu_matrix conformance/tests -m gpu -q -rfEs -n 4 \
      -p no:cacheprovider > "$OUT/tests/gpu_tests.log" 2>&1 &
  p1=$!
  timeout 300 python3 -m conformance run --impl nsa_impl --device cuda --no-mutants --examples 1 \
      --report "$OUT/tests/conf_nsa_impl" > "$OUT/tests/conf_nsa_impl.log" 2>&1 &
  p2=$!
  wait $p1; r1=$?; wait $p2; r2=$?
  note "gpu tests rc=$r1: $(tail -1 "$OUT/tests/gpu_tests.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/tests/gpu_tests.log" | head -30 | tee -a "$SUM"
  note "conformance nsa_impl cuda rc=$r2: $(grep -E 'pass, .* fail' "$OUT/tests/conf_nsa_impl.log" | tail -1)"
  grep -E "FAIL|ERROR" "$OUT/tests/conf_nsa_impl.log" | head -20 | tee -a "$SUM"
  rm -f "$OUT/tests/conf_nsa_impl/junit.xml"
  note "profile of a planned call at 64k"
  timeout 90 python3 bench/profile_forward.py --T 65536 --out "$OUT/prefill" \
      > "$OUT/prefill/profile.log" 2>&1
  note "profile rc=$?"; cat "$OUT/prefill/profile.log" | tee -a "$SUM"
  unpack_fla
  left=$(( 575 - (SECONDS - t0) ))
  note "side by side (peer_bench ours, then peers), ${left}s left"
  timeout $(( left / 2 )) python3 .peers/peer_bench.py ours 8192,16384,32768,65536 \
      > "$OUT/prefill/peer_ours.jsonl" 2>&1
  note "ours rc=$?"
  left=$(( 580 - (SECONDS - t0) ))
  PYTHONPATH="$PWD/.peers:$PWD/.peers/stand_in:$FLA:$PWD" timeout $(( left > 20 ? left : 20 )) \
      python3 .peers/peer_bench.py peers 8192,16384,32768,65536 > "$OUT/prefill/peer_peers.jsonl" 2>&1
  note "peers rc=$?"
  grep -hE "^\{|failed" "$OUT"/prefill/peer_*.jsonl | tee -a "$SUM"
  ;;
serve)
  unpack_fla
  note "GPU conformance: nsa_impl:triton, fla:parallel, flash_nsa (in parallel)"
  timeout 280 python3 -m conformance run --impl nsa_impl:triton --device cuda --no-mutants \
      --examples 1 --report "$OUT/tests/conf_triton" > "$OUT/tests/conf_triton.log" 2>&1 &
  p1=$!
  PYTHONPATH="$PWD/.peers/stand_in:$FLA:$PWD" timeout 280 python3 -m conformance run --impl fla:parallel --peer \
      --device cuda --examples 1 --report "$OUT/tests/conf_fla_parallel" \
      > "$OUT/tests/conf_fla_parallel.log" 2>&1 &
  p2=$!
  NSA_FLASH_NSA_PATH="$PWD/.peers" PYTHONPATH="$PWD/.peers/stand_in:$PWD" timeout 280 \
      python3 -m conformance run --impl flash_nsa --peer --device cuda --examples 1 \
      --report "$OUT/tests/conf_flash_nsa" > "$OUT/tests/conf_flash_nsa.log" 2>&1 &
  p3=$!
  for p in $p1 $p2 $p3; do wait $p; done
  for n in triton fla_parallel flash_nsa; do
    note "conformance $n: $(grep -E 'pass, .* fail' "$OUT/tests/conf_$n.log" | tail -1)"
    rm -f "$OUT/tests/conf_$n/junit.xml"
  done
  left=$(( 570 - (SECONDS - t0) ))
  note "decode bench, ${left}s left"
  timeout $(( left > 20 ? left : 20 )) python3 bench/decode_bench.py --out "$OUT/decode/decode" \
      --budget-s $(( left > 30 ? left - 15 : 15 )) > "$OUT/decode/decode_bench.log" 2>&1
  note "decode bench rc=$?"
  [ -f "$OUT/decode/decode.md" ] && cat "$OUT/decode/decode.md" | tee -a "$SUM" \
      || tail -25 "$OUT/decode/decode_bench.log" | tee -a "$SUM"
  ;;
recheck)
  unpack_fla
  note "GPU tests of call 1's failures and the selection kernels; NaN-rows attribution per CUDA path; peers' conformance (in parallel)"
  timeout 240 python3 -m pytest tests/test_plan.py tests/test_api.py tests/kernels/test_triton_sel.py \
      gpu_matrix -m gpu -q -rfEs -n 3 -p no:cacheprovider > "$OUT/tests/gpu_tests.log" 2>&1 &
  pids=($!)
  for impl in nsa_impl:masked nsa_impl:packed nsa_impl:varlen; do
    n="${impl//:/_}"
    timeout 240 python3 -m conformance run --impl "$impl" --device cuda --no-mutants \
        --clause NSA-NAN-ROWS --clause NSA-NAN-VARLEN-ISOLATION --report "$OUT/tests/nan_$n" \
        > "$OUT/tests/nan_$n.log" 2>&1 &
    pids+=($!)
  done
  PYTHONPATH="$PWD/.peers/stand_in:$FLA:$PWD" timeout 240 python3 -m conformance run --impl fla:parallel \
      --peer --device cuda --examples 1 --report "$OUT/tests/conf_fla_parallel" \
      > "$OUT/tests/conf_fla_parallel.log" 2>&1 &
  pids+=($!)
  NSA_FLASH_NSA_PATH="$PWD/.peers" PYTHONPATH="$PWD/.peers/stand_in:$PWD" timeout 240 \
      python3 -m conformance run --impl flash_nsa --peer --device cuda --examples 1 \
      --report "$OUT/tests/conf_flash_nsa" > "$OUT/tests/conf_flash_nsa.log" 2>&1 &
  pids+=($!)
  for p in "${pids[@]}"; do wait "$p"; done
  note "gpu tests: $(tail -1 "$OUT/tests/gpu_tests.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/tests/gpu_tests.log" | head -20 | tee -a "$SUM"
  for n in nan_nsa_impl_masked nan_nsa_impl_packed nan_nsa_impl_varlen conf_fla_parallel conf_flash_nsa; do
    note "$n: $(grep -E 'graded' "$OUT/tests/$n.log" | tail -1)"
    grep -E "^  FAIL" "$OUT/tests/$n.log" | cut -c1-300 | head -4 | tee -a "$SUM"
    rm -f "$OUT/tests/$n/junit.xml"
  done
  note "profile of a planned call at 64k"
  timeout 60 python3 bench/profile_forward.py --T 65536 --out "$OUT/prefill" > "$OUT/prefill/profile.log" 2>&1
  grep -vE "UserWarning|_warn_once" "$OUT/prefill/profile.log" | tee -a "$SUM"
  note "side by side: ours, then fla-core (flash_nsa's rows are call 1's)"
  timeout 100 python3 .peers/peer_bench.py ours 8192,16384,32768,65536 > "$OUT/prefill/peer_ours.jsonl" 2>&1
  PYTHONPATH="$PWD/.peers:$PWD/.peers/stand_in:$FLA:$PWD" timeout 120 \
      python3 .peers/peer_bench.py peers 8192,16384,32768,65536 > "$OUT/prefill/peer_peers.jsonl" 2>&1
  grep -hE "^ROW|failed|Error" "$OUT"/prefill/peer_*.jsonl | tee -a "$SUM"
  left=$(( 575 - (SECONDS - t0) ))
  note "decode bench, ${left}s left"
  timeout $(( left > 20 ? left : 20 )) python3 bench/decode_bench.py --out "$OUT/decode/decode" \
      --budget-s $(( left > 30 ? left - 15 : 15 )) > "$OUT/decode/decode_bench.log" 2>&1
  note "decode bench rc=$?"
  [ -f "$OUT/decode/decode.md" ] && cat "$OUT/decode/decode.md" | tee -a "$SUM" \
      || tail -25 "$OUT/decode/decode_bench.log" | tee -a "$SUM"
  ;;
measure)
  unpack_fla
  note "determinism per CUDA path (float64, bf16); GPU tests of the selection, plan and compile; router conformance; peers' conformance (in parallel)"
  timeout 120 python3 bench/determinism_probe.py > "$OUT/tests/determinism.log" 2>&1 &
  pids=($!)
  timeout 200 python3 -m pytest tests/test_plan.py tests/test_api.py tests/kernels/test_triton_sel.py \
      tests/test_amp.py -m gpu -q -rfEs -n 3 -p no:cacheprovider > "$OUT/tests/gpu_tests.log" 2>&1 &
  pids+=($!)
  timeout 200 python3 -m conformance run --impl nsa_impl --device cuda --no-mutants --examples 1 \
      --report "$OUT/tests/conf_nsa_impl" > "$OUT/tests/conf_nsa_impl.log" 2>&1 &
  pids+=($!)
  PYTHONPATH="$PWD/.peers/stand_in:$FLA:$PWD" timeout 200 python3 -m conformance run --impl fla:parallel \
      --peer --device cuda --examples 1 --report "$OUT/tests/conf_fla_parallel" \
      > "$OUT/tests/conf_fla_parallel.log" 2>&1 &
  pids+=($!)
  NSA_FLASH_NSA_PATH="$PWD/.peers" PYTHONPATH="$PWD/.peers/stand_in:$PWD" timeout 200 \
      python3 -m conformance run --impl flash_nsa --peer --device cuda --examples 1 \
      --report "$OUT/tests/conf_flash_nsa" > "$OUT/tests/conf_flash_nsa.log" 2>&1 &
  pids+=($!)
  for p in "${pids[@]}"; do wait "$p"; done
  cat "$OUT/tests/determinism.log" | tee -a "$SUM"
  note "gpu tests: $(tail -1 "$OUT/tests/gpu_tests.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/tests/gpu_tests.log" | head -20 | tee -a "$SUM"
  for n in conf_nsa_impl conf_fla_parallel conf_flash_nsa; do
    note "$n: $(grep -E 'graded' "$OUT/tests/$n.log" | tail -1)"
    grep -E "^  FAIL" "$OUT/tests/$n.log" | cut -c1-240 | head -6 | tee -a "$SUM"
    rm -f "$OUT/tests/$n/junit.xml"
  done
  note "profile of a planned call at 64k"
  timeout 60 python3 bench/profile_forward.py --T 65536 --out "$OUT/prefill" > "$OUT/prefill/profile.log" 2>&1
  grep -vE "UserWarning|_warn_once" "$OUT/prefill/profile.log" | tee -a "$SUM"
  note "side by side: ours, then flash_nsa and fla-core"
  timeout 80 python3 .peers/peer_bench.py ours 8192,16384,32768,65536 > "$OUT/prefill/peer_ours.jsonl" 2>&1
  left=$(( 560 - (SECONDS - t0) ))
  PYTHONPATH="$PWD/.peers:$PWD/.peers/stand_in:$FLA:$PWD" timeout $(( left > 30 ? left : 30 )) \
      python3 .peers/peer_bench.py peers 8192,16384,32768,65536 > "$OUT/prefill/peer_peers.jsonl" 2>&1
  note "peers rc=$?"
  grep -hE "^ROW|failed|Error" "$OUT"/prefill/peer_*.jsonl | tee -a "$SUM"
  ;;
final)
  note "determinism per CUDA path; GPU NaN/compile/plan tests; NaN and parity clauses (router, triton) (in parallel)"
  timeout 100 python3 bench/determinism_probe.py --paths masked,packed,varlen > "$OUT/tests/determinism.log" 2>&1 &
  pids=($!)
  timeout 110 python3 -m pytest tests/kernels/test_triton_nan_routes.py tests/kernels/test_triton_attn.py \
      tests/test_api.py tests/test_plan.py -m gpu -q -rfEs -n 3 -p no:cacheprovider \
      > "$OUT/tests/gpu_tests.log" 2>&1 &
  pids+=($!)
  clauses="--clause NSA-NAN-ROWS --clause NSA-NAN-VARLEN-ISOLATION --clause NSA-NAN-EMPTY-CMP --clause NSA-DENSE-CROSSCHECK --clause NSA-EQ5-SHAPES"
  for impl in nsa_impl nsa_impl:triton; do
    n="${impl//:/_}"
    timeout 110 python3 -m conformance run --impl "$impl" --device cuda --no-mutants --examples 1 \
        $clauses --report "$OUT/tests/conf_$n" > "$OUT/tests/conf_$n.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  cat "$OUT/tests/determinism.log" | tee -a "$SUM"
  note "gpu tests: $(tail -1 "$OUT/tests/gpu_tests.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/tests/gpu_tests.log" | head -20 | tee -a "$SUM"
  for n in conf_nsa_impl conf_nsa_impl_triton; do
    note "$n: $(grep -E 'graded' "$OUT/tests/$n.log" | tail -1)"
    grep -E "^  FAIL" "$OUT/tests/$n.log" | cut -c1-240 | head -6 | tee -a "$SUM"
    rm -f "$OUT/tests/$n/junit.xml"
  done
  note "profile of a planned call at 64k"
  timeout 45 python3 bench/profile_forward.py --T 65536 --out "$OUT/prefill" > "$OUT/prefill/profile.log" 2>&1
  grep -vE "UserWarning|_warn_once" "$OUT/prefill/profile.log" | tee -a "$SUM"
  left=$(( 235 - (SECONDS - t0) ))
  note "side by side: ours (${left}s)"
  timeout $(( left > 20 ? left : 20 )) python3 .peers/peer_bench.py ours 8192,16384,32768,65536 \
      > "$OUT/prefill/peer_ours.jsonl" 2>&1
  grep -hE "^ROW|failed|Error" "$OUT"/prefill/peer_ours.jsonl | tee -a "$SUM"
  ;;
*)
  echo "unknown stage $1"; exit 2 ;;
esac
for d in prefill decode tests; do tar -czf "$OUT/$d.tgz" -C "$OUT" "$d" && rm -rf "${OUT:?}/$d"; done
note "call done"
