#!/usr/bin/env bash
# One device call, by stage name (each stays inside the 600 s limit; the stages are what the
# calls of 2026-12-01 and 2026-12-02 ran, kept so that a number can be reproduced):
#   bash bench/gpu_session.sh kernels   # 12-01: GPU tests of the v4 prefill and decode kernels,
#                                       # the prefill sweep + parts + table, the decode grid
#   bash bench/gpu_session.sh verify    # 12-02 call 1: every GPU test and the router's GPU
#                                       # conformance, the profile of a planned 64k call, ours /
#                                       # dense / flash_nsa / fla-core side by side
#   bash bench/gpu_session.sh recheck   # call 2: call 1's failing tests, NaN rows per CUDA torch
#                                       # path, peers' conformance, profile, side by side, decode
#   bash bench/gpu_session.sh measure   # call 3: determinism per CUDA path, tests, router and
#                                       # peers' conformance, profile, side by side
#   bash bench/gpu_session.sh final     # call 4: the fixes' checks, profile, ours vs dense
#   bash bench/gpu_session.sh serve     # the triton path's and the peers' conformance, decode
#   bash bench/gpu_session.sh close     # 12-03 call 1: every GPU test, the GPU conformance of the
#                                       # router, the triton path and fla:parallel, the profile
#                                       # of a planned 64k call, ours side by side
#   bash bench/gpu_session.sh sortmerge # call 2: NaN probe per path, the fixes' GPU tests, the
#                                       # triton path's conformance (xdist), top-n sweep,
#                                       # profile, ours side by side
#   bash bench/gpu_session.sh train     # call 3: the fixes' GPU tests, GPU conformance of the
#                                       # triton path, the router's NaN clauses, fla:parallel;
#                                       # then bench/train_gpu.sh (NSA vs dense) alone on the GPU
#   bash bench/gpu_session.sh flapar    # call 4: fla:parallel's report (fp16/bf16 lanes), the
#                                       # NaN probe per branch combination
#   bash bench/gpu_session.sh contain   # 12-04 call 1: the causal-prefix fix (NaN probe, the
#                                       # router's and the torch paths' NaN clauses, their GPU
#                                       # tests), the router's full conformance, fla:parallel's
#                                       # report; profiles at 8k and 16k
#   bash bench/gpu_session.sh torchpaths # call 2: the GPU conformance of the torch paths (masked,
#                                       # packed, varlen), plan tests; ours and the peers side by
#                                       # side in one call (plan-free calls reuse a cached plan)
#   bash bench/gpu_session.sh kernpaths # call 3: the GPU conformance of the flash and triton
#                                       # paths, the Triton kernels' GPU tests; ours side by
#                                       # side, the 8k profile, the decode grid
#   bash bench/gpu_session.sh compile   # session 4 call 1: the fullgraph compile test after the block
#                                       # geometry moved into the plan, the Triton kernels' and
#                                       # the plan's GPU tests, the GPU conformance of the triton
#                                       # path and the router; ours side by side, profiles 8k, 64k
#   bash bench/gpu_session.sh acceptance # session 5 call 1: Dk/Dv = 192/128 at 64k, full NSA at
#                                       # h = 4 (32k, 64k), ours side by side
#   bash bench/gpu_session.sh probe     # call 2: profiles at 192/128 (64k) and h = 4 (32k, ours
#                                       # and flash_nsa), selection tile sizes at h = 4
#   bash bench/gpu_session.sh hostgpu   # call 3: host time per planned call on the device
#                                       # (bench/host_gpu.py), the 192/128 profile at 64k,
#                                       # ours side by side, the selection's GPU tests
#   bash bench/gpu_session.sh nanab     # call 4: the 64k profile after the row-range dK/dV
#                                       # kernels took cleaned copies again, ours side by side,
#                                       # the 192/128 profile
#   bash bench/gpu_session.sh wide      # call 5: dK/dV launch shapes at 192/128 (row-range and
#                                       # selection), the selection at 128/128, side by side
#   bash bench/gpu_session.sh final5    # call 6: the 192/128 and h = 4 rows, ours side by side,
#                                       # the GPU tests of the changed code
#   bash bench/gpu_session.sh rank      # session 7 call 1: decode GPU tests, the decode grid and
#                                       # bench/decode_sweep.py (launch shapes per case)
#   bash bench/gpu_session.sh packed    # call 2: the packed top-n: decode GPU tests, grid, sweep
#                                       # around the new defaults; GPU conformance (triton path,
#                                       # router)
#   bash bench/gpu_session.sh heads     # call 3: K2's gather in head passes: decode GPU tests,
#                                       # the sweep with registers per kernel
#   bash bench/gpu_session.sh final6    # call 4: K2's heads per pass by programs per SM: decode
#                                       # GPU tests, grid, a K1 sweep, GPU conformance
#   bash bench/gpu_session.sh tail6     # call 5: K2 warps, K3 stages, K4 heads per program, and
#                                       # all three, against the default measured twice
# Before a call: `git describe --always --dirty > .head` here, and carry .head with .peers and
# .whl (the device's .git is a stale snapshot: `git log` there names an older commit).
# The side by side is .peers/peer_bench.py (the peers folder copied in, git-ignored, carried);
# fla-core comes from its wheel in .whl/. Results under $OUT, at most 8 files back:
# summary.txt (the tables), prefill.tgz, decode.tgz, tests.tgz.
set -u -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
OUT="${OUT:-/tmp/nsa_session}"
mkdir -p "$OUT"/prefill "$OUT"/decode "$OUT"/tests
SUM="$OUT/summary.txt"
: > "$SUM"
t0=$SECONDS
PIDS=()
note() { echo "[$((SECONDS - t0)) s] $*" | tee -a "$SUM"; }
left() { echo $(( $1 - (SECONDS - t0) )); }  # seconds left before mark $1
{
  nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  # the device's .git is not this tree's: the caller writes .head (carried, git-ignored) first
  if [ -f .head ]; then echo "tree: $(cat .head)"; else echo "tree: unknown (no .head carried)"; fi
} 2>&1 | tee -a "$SUM"

# fla-core is a pure-Python wheel: unpacked onto a path of its own, on PYTHONPATH only in the
# peers' processes (as is the flash_attn stand-in).
FLA=/tmp/fla_site
PEERS_PATH="$PWD/.peers/stand_in:$FLA:$PWD"
unpack_fla() {
  python3 -m zipfile -e .whl/fla_core-*.whl "$FLA" && python3 -c "import sys; sys.path.insert(0, '$FLA'); import fla; print('fla', fla.__version__)" 2>&1 | tail -1 | tee -a "$SUM"
}

# gpu_tests TIMEOUT FILE...: `pytest -m gpu` on FILEs in the background (log tests/gpu_tests.log)
gpu_tests() {
  local limit=$1; shift
  timeout "$limit" python3 -m pytest "$@" -m gpu -q -rfEs -n 3 -p no:cacheprovider \
      > "$OUT/tests/gpu_tests.log" 2>&1 &
  PIDS+=($!)
}
# conf NAME TIMEOUT ARGS...: `conformance run ARGS --device cuda` in the background, report in
# tests/NAME (pytest arguments, e.g. xdist's `-n 6`, after `--` at the end of ARGS) (peers: pass --peer and set PYTHONPATH/NSA_FLASH_NSA_PATH in the environment)
conf() {
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 -m conformance run --device cuda --examples 1 \
      --report "$OUT/tests/$name" "$@" > "$OUT/tests/$name.log" 2>&1 &
  PIDS+=($!)
}
peer_conf() {  # peer_conf NAME TIMEOUT IMPL [ARGS]: a peer graded with its runtime on the path
  PYTHONPATH="$PEERS_PATH" NSA_FLASH_NSA_PATH="$PWD/.peers" conf "$1" "$2" --impl "$3" --peer "${@:4}"
}
wait_all() { for p in "${PIDS[@]}"; do wait "$p"; done; PIDS=(); }
report_tests() {
  note "gpu tests: $(tail -1 "$OUT/tests/gpu_tests.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/tests/gpu_tests.log" | head -30 | tee -a "$SUM"
}
report_conf() {  # report_conf NAME...: each report's graded line and first failures
  for n in "$@"; do
    note "$n: $(grep -E 'graded' "$OUT/tests/$n.log" | tail -1)"
    grep -E "^  FAIL" "$OUT/tests/$n.log" | cut -c1-300 | head -6 | tee -a "$SUM"
    rm -f "$OUT/tests/$n/junit.xml"
  done
}
profile64k() {  # profile64k TIMEOUT: torch.profiler of a planned call at T = 65536
  note "profile of a planned call at 64k"
  timeout "$1" python3 bench/profile_forward.py --T 65536 --out "$OUT/prefill" \
      > "$OUT/prefill/profile.log" 2>&1
  grep -vE "UserWarning|_warn_once" "$OUT/prefill/profile.log" | tee -a "$SUM"
}
profile_at() {  # profile_at TIMEOUT TOP T...: bench/profile_forward.py of a planned call per T
  local limit=$1 top=$2 T; shift 2
  for T in "$@"; do
    note "profile at $T"
    timeout "$limit" python3 bench/profile_forward.py --T "$T" --top "$top" --out "$OUT/prefill" \
        > "$OUT/prefill/profile$T.log" 2>&1
    grep -vE "UserWarning|_warn_once" "$OUT/prefill/profile$T.log" | tee -a "$SUM"
  done
}
side_by_side() {  # side_by_side WHO TIMEOUT: peer_bench rows (ours | peers) at 8k..64k
  local who=$1 limit=$2 path="$PWD"
  [ "$who" = peers ] && path="$PWD/.peers:$PEERS_PATH"
  note "side by side: $who (${limit}s)"
  PYTHONPATH="$path" timeout $(( limit > 20 ? limit : 20 )) python3 .peers/peer_bench.py "$who" \
      8192,16384,32768,65536 > "$OUT/prefill/peer_$who.jsonl" 2>&1
  grep -hE "^ROW|failed|Error" "$OUT/prefill/peer_$who.jsonl" | tee -a "$SUM"
}
decode_grid() {  # decode_grid TIMEOUT: bench/decode_bench.py (graph-replayed steps)
  local limit=$(( $1 > 20 ? $1 : 20 ))
  note "decode bench, ${limit}s"
  timeout "$limit" python3 bench/decode_bench.py --out "$OUT/decode/decode" \
      --budget-s $(( limit > 30 ? limit - 15 : 15 )) > "$OUT/decode/decode_bench.log" 2>&1
  note "decode bench rc=$?"
  [ -f "$OUT/decode/decode.md" ] && cat "$OUT/decode/decode.md" | tee -a "$SUM" \
      || tail -25 "$OUT/decode/decode_bench.log" | tee -a "$SUM"
}
decode_tests() {  # decode_tests: the decode kernels' and cache's GPU tests (foreground)
  timeout 150 python3 -m pytest -m gpu tests/kernels/test_decode_step.py tests/test_decode.py -q \
      -rfEs -n 3 -p no:cacheprovider > "$OUT/tests/gpu_tests.log" 2>&1
  report_tests
}
decode_sweep() {  # decode_sweep TIMEOUT VARIANTS [ARGS]: bench/decode_sweep.py, its table
  local limit=$1 variants=$2; shift 2
  timeout "$limit" python3 bench/decode_sweep.py --out "$OUT/decode/sweep" \
      --budget-s $(( limit > 40 ? limit - 20 : 20 )) ${variants:+--variants "$variants"} "$@" \
      > "$OUT/decode/sweep.log" 2>&1
  note "decode sweep rc=$?"
  grep -E "^\||^Skipped" "$OUT/decode/sweep.md" 2>/dev/null | tee -a "$SUM" \
      || tail -20 "$OUT/decode/sweep.log" | tee -a "$SUM"
}
decode_conf() {  # decode_conf MARK: GPU conformance of the triton path and the router, in parallel
  note "GPU conformance of the triton path and the router (in parallel)"
  conf conf_nsa_impl_triton "$(left "$1")" --impl nsa_impl:triton --no-mutants -- -n 6
  conf conf_nsa_impl "$(left "$1")" --impl nsa_impl --no-mutants -- -n 5
  wait_all; report_conf conf_nsa_impl_triton conf_nsa_impl
}
NAN_CLAUSES=(--clause NSA-NAN-ROWS --clause NSA-NAN-VARLEN-ISOLATION)

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
  budget=$(( $(left 560) - 130 ))
  note "prefill sweep/parts/table with budget ${budget}s"
  timeout $(( budget + 15 )) python3 bench/gpu_prefill.py --out "$OUT/prefill" --budget-s "$budget" \
      --T 8192,16384,32768,65536 --sections sweep,parts,table > "$OUT/prefill/gpu_prefill.log" 2>&1
  note "prefill rc=$?"
  tail -40 "$OUT/prefill/gpu_prefill.log" | grep -vE "^ +(File|\^|~)" | tee -a "$SUM"
  decode_grid "$(left 570)"
  ;;
verify)
  note "GPU tests (all, -m gpu) and the router's GPU conformance, in parallel"
  gpu_tests 300 tests gpu_matrix conformance/tests
  conf conf_nsa_impl 300 --impl nsa_impl --no-mutants
  wait_all; report_tests; report_conf conf_nsa_impl
  profile64k 90
  unpack_fla
  side_by_side ours $(( $(left 575) / 2 ))
  side_by_side peers "$(left 580)"
  ;;
recheck)
  unpack_fla
  note "call 1's failing tests, the selection kernels; NaN rows per CUDA torch path; peers"
  gpu_tests 240 tests/test_plan.py tests/test_api.py tests/kernels/test_triton_sel.py gpu_matrix
  for impl in nsa_impl:masked nsa_impl:packed nsa_impl:varlen; do
    conf "nan_${impl//:/_}" 240 --impl "$impl" --no-mutants "${NAN_CLAUSES[@]}"
  done
  peer_conf conf_fla_parallel 240 fla:parallel
  peer_conf conf_flash_nsa 240 flash_nsa
  wait_all; report_tests
  report_conf nan_nsa_impl_masked nan_nsa_impl_packed nan_nsa_impl_varlen conf_fla_parallel \
      conf_flash_nsa
  profile64k 60
  side_by_side ours 100
  side_by_side peers 120
  decode_grid "$(left 575)"
  ;;
measure)
  unpack_fla
  note "determinism per CUDA path; selection, plan, compile tests; router and peers' conformance"
  timeout 120 python3 bench/determinism_probe.py > "$OUT/tests/determinism.log" 2>&1 &
  PIDS+=($!)
  gpu_tests 200 tests/test_plan.py tests/test_api.py tests/kernels/test_triton_sel.py tests/test_amp.py
  conf conf_nsa_impl 200 --impl nsa_impl --no-mutants
  peer_conf conf_fla_parallel 200 fla:parallel
  peer_conf conf_flash_nsa 200 flash_nsa
  wait_all
  tee -a "$SUM" < "$OUT/tests/determinism.log"
  report_tests; report_conf conf_nsa_impl conf_fla_parallel conf_flash_nsa
  profile64k 60
  side_by_side ours 80
  side_by_side peers "$(left 560)"
  ;;
final)
  note "determinism per CUDA path; NaN, compile and plan tests; NaN and parity clauses"
  timeout 100 python3 bench/determinism_probe.py --paths masked,packed,varlen \
      > "$OUT/tests/determinism.log" 2>&1 &
  PIDS+=($!)
  gpu_tests 110 tests/kernels/test_triton_nan_routes.py tests/kernels/test_triton_attn.py \
      tests/test_api.py tests/test_plan.py
  for impl in nsa_impl nsa_impl:triton; do
    conf "conf_${impl//:/_}" 110 --impl "$impl" --no-mutants "${NAN_CLAUSES[@]}" \
        --clause NSA-NAN-EMPTY-CMP --clause NSA-DENSE-CROSSCHECK --clause NSA-EQ5-SHAPES
  done
  wait_all
  tee -a "$SUM" < "$OUT/tests/determinism.log"
  report_tests; report_conf conf_nsa_impl conf_nsa_impl_triton
  profile64k 45
  side_by_side ours "$(left 235)"
  ;;
serve)
  unpack_fla
  note "GPU conformance: nsa_impl:triton, fla:parallel, flash_nsa (in parallel)"
  conf conf_triton 280 --impl nsa_impl:triton --no-mutants
  peer_conf conf_fla_parallel 280 fla:parallel
  peer_conf conf_flash_nsa 280 flash_nsa
  wait_all; report_conf conf_triton conf_fla_parallel conf_flash_nsa
  decode_grid "$(left 570)"
  ;;
close)
  unpack_fla
  note "every GPU test; conformance of the router, the triton path and fla:parallel (in parallel)"
  gpu_tests 320 tests gpu_matrix conformance/tests
  conf conf_nsa_impl 320 --impl nsa_impl --no-mutants
  conf conf_triton 320 --impl nsa_impl:triton --no-mutants
  peer_conf conf_fla_parallel 320 fla:parallel
  wait_all; report_tests; report_conf conf_nsa_impl conf_triton conf_fla_parallel
  profile64k 60
  side_by_side ours "$(left 560)"
  ;;
sortmerge)
  note "NaN probe per CUDA path (NSA-NAN-ROWS case)"
  timeout 90 python3 bench/nan_probe.py 2>&1 | grep -v Warning | tee -a "$SUM"
  note "GPU tests of the fixes; the triton path's and the router's conformance (in parallel)"
  gpu_tests 270 tests/test_api.py tests/kernels/test_triton_topn.py tests/kernels/test_triton_attn.py \
      tests/kernels/test_triton_nan_routes.py tests/kernels/test_triton_sel.py
  conf conf_triton 270 --impl nsa_impl:triton --no-mutants -- -n 6
  conf conf_nsa_impl 270 --impl nsa_impl --no-mutants "${NAN_CLAUSES[@]}" -- -n 2
  wait_all; report_tests; report_conf conf_triton conf_nsa_impl
  note "top-n sweep at 64k"
  timeout 120 python3 bench/gpu_prefill.py --out "$OUT/prefill" --sections sweep \
      --sweep-kernels topn --budget-s 100 > "$OUT/prefill/topn_sweep.log" 2>&1
  grep -E "^  topn|error|Error" "$OUT/prefill/topn_sweep.log" | head -20 | tee -a "$SUM"
  profile64k 60
  note "profile of a planned call at 8k"
  timeout 40 python3 bench/profile_forward.py --T 8192 --out "$OUT/prefill" > "$OUT/prefill/profile8k.log" 2>&1
  grep -vE "UserWarning|_warn_once" "$OUT/prefill/profile8k.log" | head -30 | tee -a "$SUM"
  side_by_side ours "$(left 575)"
  ;;
train)
  unpack_fla
  note "GPU tests of the fixes; conformance: triton path, router NaN clauses, fla:parallel"
  gpu_tests 200 tests/test_api.py tests/kernels/test_triton_nan_routes.py \
      tests/kernels/test_triton_attn.py tests/kernels/test_triton_topn.py
  conf conf_triton 210 --impl nsa_impl:triton --no-mutants -- -n 6
  conf conf_nsa_impl 210 --impl nsa_impl --no-mutants "${NAN_CLAUSES[@]}" -- -n 2
  peer_conf conf_fla_parallel 210 fla:parallel -- -n 3
  wait_all; report_tests; report_conf conf_triton conf_nsa_impl conf_fla_parallel
  note "training run: NSA vs dense, alone on the GPU"
  mkdir -p "$OUT/train"
  OUT="$OUT/train" BUDGET=330 NSA_LIMIT=150 DENSE_LIMIT=90 bash bench/train_gpu.sh \
      > "$OUT/train/session.log" 2>&1
  grep -E "^===|eval_vs|steady|^run," "$OUT/train/train_gpu.log" | tail -20 | tee -a "$SUM"
  cat "$OUT/train/summary.csv" 2>/dev/null | tee -a "$SUM"
  tar -czf "$OUT/train.tgz" -C "$OUT" train && rm -rf "${OUT:?}/train"
  ;;
flapar)
  unpack_fla
  note "fla:parallel conformance; NaN probe per branch combination (in parallel)"
  peer_conf conf_fla_parallel 300 fla:parallel -- -n 4  # 170 s reached ~95% (call 4)
  timeout 120 python3 bench/nan_probe.py --dtypes bfloat16 --paths \
      "cmp:flash/sel:masked/win:masked,cmp:masked/sel:packed/win:masked,cmp:masked/sel:packed/win:flash,cmp:flash/sel:packed/win:masked" \
      2>&1 | grep -v Warning > "$OUT/tests/nan_probe.log" &
  PIDS+=($!)
  wait_all; report_conf conf_fla_parallel
  cut -c1-400 "$OUT/tests/nan_probe.log" | tee -a "$SUM"
  ;;
contain)
  unpack_fla
  note "fla:parallel report; router conformance; NaN clauses per torch path; NaN probe"
  peer_conf conf_fla_parallel 330 fla:parallel -- -n 4
  conf conf_nsa_impl 330 --impl nsa_impl --no-mutants -- -n 3
  for impl in nsa_impl:packed nsa_impl:varlen; do
    conf "nan_${impl//:/_}" 200 --impl "$impl" --no-mutants "${NAN_CLAUSES[@]}"
  done
  gpu_tests 200 tests/branches/test_selection.py tests/test_api.py tests/test_scoring.py
  timeout 150 python3 bench/nan_probe.py --dtypes bfloat16,float16 --paths "router,packed,varlen,cmp:flash/sel:packed/win:masked,cmp:flash/sel:varlen/win:masked" 2>&1 | grep -v Warning \
      > "$OUT/tests/nan_probe.log" &
  PIDS+=($!)
  wait_all; report_tests
  report_conf conf_fla_parallel conf_nsa_impl nan_nsa_impl_packed nan_nsa_impl_varlen
  cut -c1-300 "$OUT/tests/nan_probe.log" | tee -a "$SUM"
  profile_at 60 14 8192 16384
  ;;
torchpaths)
  unpack_fla
  note "GPU conformance of the torch paths; plan tests (in parallel)"
  for impl in nsa_impl:masked nsa_impl:packed nsa_impl:varlen; do
    conf "conf_${impl//:/_}" 290 --impl "$impl" --no-mutants -- -n 3
  done
  gpu_tests 200 tests/test_plan.py tests/branches/test_selection.py
  wait_all; report_tests; report_conf conf_nsa_impl_masked conf_nsa_impl_packed conf_nsa_impl_varlen
  side_by_side ours 110
  side_by_side peers "$(left 585)"
  ;;
kernpaths)
  note "GPU conformance of the flash and triton paths; the Triton kernels' GPU tests (in parallel)"
  conf conf_nsa_impl_flash 300 --impl nsa_impl:flash --no-mutants -- -n 4
  conf conf_nsa_impl_triton 300 --impl nsa_impl:triton --no-mutants -- -n 5
  gpu_tests 300 tests/kernels/test_triton_attn.py tests/kernels/test_triton_nan_routes.py \
      tests/kernels/test_triton_sel.py tests/test_plan.py tests/test_api.py
  wait_all; report_tests; report_conf conf_nsa_impl_flash conf_nsa_impl_triton
  side_by_side ours 100
  profile_at 45 12 8192
  decode_grid "$(left 560)"
  ;;
compile)
  note "fullgraph compile + Triton kernel + plan GPU tests; triton path and router conformance"
  conf conf_nsa_impl_triton 330 --impl nsa_impl:triton --no-mutants -- -n 5
  conf conf_nsa_impl 330 --impl nsa_impl --no-mutants -- -n 4
  gpu_tests 330 tests/test_api.py tests/test_plan.py tests/kernels/test_triton_sel.py \
      tests/kernels/test_triton_attn.py tests/kernels/test_triton_nan_routes.py
  wait_all; report_tests; report_conf conf_nsa_impl_triton conf_nsa_impl
  side_by_side ours 100
  profile_at 60 14 8192 65536
  ;;
selsweep)
  note "selection launch shapes (random paper selections)"
  timeout 330 python3 bench/sel_sweep.py --T 65536,8192 --budget-s 300 --out "$OUT/prefill" \
      > "$OUT/prefill/sel_sweep.log" 2>&1
  grep -vE "UserWarning|_warn_once" "$OUT/prefill/sel_sweep.log" | tee -a "$SUM"
  for T in 8192 65536; do
    note "flash_nsa's profile at $T"
    PYTHONPATH="$PWD/.peers:$PEERS_PATH" timeout 70 python3 bench/profile_forward.py --T $T \
        --who flash_nsa --top 16 --out "$OUT/prefill" > "$OUT/prefill/peer_profile$T.log" 2>&1
    grep -vE "UserWarning|_warn_once|Warning" "$OUT/prefill/peer_profile$T.log" | cut -c1-160 \
        | tee -a "$SUM"
  done
  ;;
selsweep2)
  note "selection launch shapes: fewer warps per program (random, then coherent selections)"
  timeout 200 python3 bench/sel_sweep.py --only-new --T 65536,8192 --budget-s 180 \
      --out "$OUT/prefill" > "$OUT/prefill/sel_sweep.log" 2>&1
  grep -vE "UserWarning|_warn_once" "$OUT/prefill/sel_sweep.log" | tee -a "$SUM"
  timeout 120 python3 bench/sel_sweep.py --only-new --coherent --T 65536 --budget-s 100 \
      --out "$OUT/prefill/coherent" > "$OUT/prefill/sel_sweep_coherent.log" 2>&1
  grep -vE "UserWarning|_warn_once" "$OUT/prefill/sel_sweep_coherent.log" | tee -a "$SUM"
  ;;
tma)
  unpack_fla
  note "TMA selection: GPU tests, triton path and router conformance (in parallel)"
  conf conf_nsa_impl_triton 300 --impl nsa_impl:triton --no-mutants -- -n 5
  conf conf_nsa_impl 300 --impl nsa_impl --no-mutants -- -n 4
  gpu_tests 300 tests/kernels/test_triton_sel.py tests/branches/test_selection.py \
      tests/test_api.py tests/test_plan.py
  wait_all; report_tests; report_conf conf_nsa_impl_triton conf_nsa_impl
  note "A/B: descriptor loads (default) against masked loads"
  timeout 60 python3 bench/sel_sweep.py --T 65536,8192 --variants '[{}, {"tma": 0}]' \
      --out "$OUT/prefill" > "$OUT/prefill/sel_ab.log" 2>&1
  grep -E "^T=|fwd .*bwd" "$OUT/prefill/sel_ab.log" | tee -a "$SUM"
  side_by_side ours 90
  profile_at 45 12 8192 65536
  side_by_side peers "$(left 585)"
  ;;
tmatests)
  note "the selection kernels' GPU tests"
  gpu_tests 300 tests/kernels/test_triton_sel.py
  wait_all; report_tests
  ;;
graphed)
  note "the plan's GPU tests (CUDA-graph replay included); graphed vs eager planned calls"
  gpu_tests 240 tests/test_plan.py
  wait_all; report_tests
  timeout 200 python3 bench/graphed_bench.py > "$OUT/prefill/graphed.jsonl" 2>&1
  grep -hE "^ROW|failed|differs|Error" "$OUT/prefill/graphed.jsonl" | tee -a "$SUM"
  ;;
acceptance)
  note "Dk/Dv = 192/128 at 64k; full NSA with h = 4 (16 heads, 4 groups) at 32k and 64k"
  timeout 85 python3 bench/gpu_bench.py --T 65536 --dims 192/128 --parts nsa --budget-s 75 \
      --out "$OUT/prefill/dims192" > "$OUT/prefill/dims192.log" 2>&1
  grep -E "^\|" "$OUT/prefill/dims192.md" 2>/dev/null | tee -a "$SUM" || tail -5 "$OUT/prefill/dims192.log" | tee -a "$SUM"
  timeout "$(left 165)" python3 bench/gpu_bench.py --T 32768,65536 --dims 128/128 \
      --parts nsa_h4 --budget-s 60 --out "$OUT/prefill/h4" > "$OUT/prefill/h4.log" 2>&1
  grep -E "^\|" "$OUT/prefill/h4.md" 2>/dev/null | tee -a "$SUM" || tail -5 "$OUT/prefill/h4.log" | tee -a "$SUM"
  side_by_side ours "$(left 330)"
  ;;
probe)
  note "profiles of the two missed shapes: Dk/Dv = 192/128 at 64k, h = 4 at 32k (ours, flash_nsa)"
  for args in "--T 65536 --dims 192/128" "--T 32768 --heads 16/4"; do
    note "profile $args"
    # shellcheck disable=SC2086 # the arguments split on purpose
    timeout 90 python3 bench/profile_forward.py $args --top 14 --out "$OUT/prefill" \
        2>&1 | grep -vE "UserWarning|_warn_once" | tee -a "$SUM"
  done
  note "profile flash_nsa --T 32768 --heads 16/4"
  PYTHONPATH="$PWD/.peers:$PEERS_PATH" timeout 90 python3 bench/profile_forward.py --T 32768 \
      --heads 16/4 --who flash_nsa --top 12 --out "$OUT/prefill" 2>&1 \
      | grep -vE "UserWarning|_warn_once" | tee -a "$SUM"
  note "selection tile sizes at h = 4 (P positions per tile)"
  timeout 90 python3 bench/sel_sweep.py --T 32768 --heads 16/4 --budget-s 75 \
      --variants '[{}, {"P": 1}, {"P": 2}, {"P": 8}, {"P": 8, "warps_fwd": 8}]' \
      --out "$OUT/prefill" 2>&1 | grep -E "^T=|fwd .*bwd|ERROR|best" | tee -a "$SUM"
  ;;
hostgpu)
  note "host time of planned calls on this machine (bench/host_gpu.py)"
  timeout 200 python3 bench/host_gpu.py --T 8192,16384,65536 --out "$OUT/prefill" \
      2>&1 | grep -vE "UserWarning|_warn_once" | tee -a "$SUM"
  note "profile --T 65536 --dims 192/128"
  timeout 120 python3 bench/profile_forward.py --T 65536 --dims 192/128 --top 16 \
      --out "$OUT/prefill" 2>&1 | grep -vE "UserWarning|_warn_once" | tee -a "$SUM"
  side_by_side ours 150
  note "the selection kernels' GPU tests"
  gpu_tests "$(left 560)" tests/kernels/test_triton_sel.py tests/branches/test_selection.py
  wait_all; report_tests
  ;;
nanab)
  note "after the row-range dK/dV kernels took cleaned copies again: profile at 64k, ours side by side, 192/128"
  profile_at 60 20 65536
  side_by_side ours 150
  timeout 120 python3 bench/profile_forward.py --T 65536 --dims 192/128 --top 16 \
      --out "$OUT/prefill" 2>&1 | grep -vE "UserWarning|_warn_once" | tee -a "$SUM"
  ;;
wide)
  note "Dk/Dv = 192/128: launch shapes of the dK/dV kernels (row-range and selection), 64k"
  timeout 150 python3 bench/range_sweep.py --T 65536 --dims 192/128 --budget-s 130 \
      --out "$OUT/prefill" 2>&1 | grep -E "^T=|win .*cmp|ERROR|best|skipped" | tee -a "$SUM"
  timeout 110 python3 bench/sel_sweep.py --T 65536 --dims 192/128 --budget-s 90 --out "$OUT/prefill" \
      --variants '[{}, {"BKEY": 16}, {"warps_bwd": 4}, {"QB": 2}, {"QB": 2, "BKEY": 16}, {"BKEY": 16, "warps_bwd": 4}, {"QB": 2, "warps_bwd": 4}]' \
      2>&1 | grep -E "^T=|fwd .*bwd|ERROR|best" | tee -a "$SUM"
  note "the selection kernels at 128/128 (default shape; session 4: 16.10 / 34.81 ms)"
  timeout 60 python3 bench/sel_sweep.py --T 65536 --budget-s 40 --variants '[{}]' 2>&1 \
      | grep -E "^T=|fwd .*bwd|ERROR" | tee -a "$SUM"
  side_by_side ours "$(left 560)"
  ;;
final5)
  note "session 5 last call: 192/128 and h = 4 rows, ours side by side, GPU tests of the changed code"
  timeout 85 python3 bench/gpu_bench.py --T 65536 --dims 192/128 --parts nsa --budget-s 75 \
      --out "$OUT/prefill/dims192" > "$OUT/prefill/dims192.log" 2>&1
  grep -E "^\|" "$OUT/prefill/dims192.md" 2>/dev/null | tee -a "$SUM" || tail -5 "$OUT/prefill/dims192.log" | tee -a "$SUM"
  timeout 90 python3 bench/gpu_bench.py --T 32768,65536 --dims 128/128 \
      --parts nsa_h4 --budget-s 60 --out "$OUT/prefill/h4" > "$OUT/prefill/h4.log" 2>&1
  grep -E "^\|" "$OUT/prefill/h4.md" 2>/dev/null | tee -a "$SUM" || tail -5 "$OUT/prefill/h4.log" | tee -a "$SUM"
  side_by_side ours 100
  note "GPU tests: Triton kernels, selection branch, API, plan"
  gpu_tests "$(left 540)" tests/kernels/test_triton_sel.py tests/kernels/test_triton_attn.py \
      tests/kernels/test_tuning.py tests/branches/test_selection.py tests/test_api.py tests/test_plan.py
  wait_all; report_tests
  ;;
rank)
  note "session 7 call 1: decode top-n by counting ranks: the decode GPU tests, the grid, the sweep"
  decode_tests
  decode_grid 140
  decode_sweep "$(left 575)" ""
  ;;
packed)
  note "session 7 call 2: packed top-n keys, 2 programs per SM, K4 with 2 warps"
  decode_tests
  decode_grid 110
  decode_sweep 110 '[{}, {"module": {"PROGRAMS_PER_SM": 4}}, {"module": {"PROGRAMS_PER_SM": 1}}, {"options": {"combine": [4, 1]}}, {"module": {"COMBINE_PROGRAMS_PER_SM": 8}}, {"module": {"COMBINE_PROGRAMS_PER_SM": 2}}, {"split_scale": [1, 1, 2]}, {"module": {"SCORE_CHUNK": 32}}, {"module": {"SCORE_CHUNK": 128}}]'
  decode_conf 580
  ;;
heads)
  note "session 7 call 3: K2 gather in head passes (SCORE_HEADS), K3 loop pipelined, registers"
  decode_tests
  decode_sweep 200 '[{}, {"module": {"SCORE_HEADS": 8}}, {"module": {"SCORE_HEADS": 4}}, {"module": {"SCORE_HEADS": 2}}, {"module": {"SCORE_HEADS": 1}}, {"module": {"SCORE_HEADS": 4, "SCORE_CHUNK": 128}}, {"module": {"SCORE_HEADS": 4}, "options": {"score": [8, 1]}}, {"options": {"sel": [4, 3]}}, {"options": {"sel": [4, 1]}}]'
  note "ncu: the four decode kernels at B=32 T=65536"
  timeout 100 ncu --clock-control none -k regex:"_(cmp_win|score|sel|combine)_kernel" \
      --launch-skip 4 --launch-count 4 --section SpeedOfLight --section Occupancy \
      --section LaunchStats --section WarpStateStats python3 bench/decode_once.py --B 32 \
      --T 65536 > "$OUT/decode/ncu_B32.txt" 2>&1
  grep -E "^  _|Duration|DRAM Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit Reg|Warp Cycles Per Issued|Grid Size|Stall" \
      "$OUT/decode/ncu_B32.txt" | cut -c1-120 | tee -a "$SUM"
  ;;
final6)
  note "session 7 call 4: K2 heads per pass by programs per SM; the decode grid; GPU conformance"
  decode_tests
  decode_grid 100
  decode_sweep 100 '[{}, {"options": {"cmp_win": [4, 1]}}, {"module": {"TILE": 32}}, {"module": {"SCORE_CHUNK": 128}}]'
  decode_conf 560
  ;;
tail6)
  note "session 7 call 5: launch options for the last microseconds (K2 warps, K3 stages, K4 heads)"
  decode_sweep 130 '[{}, {"options": {"score": [2, 1]}}, {"options": {"sel": [4, 3]}}, {"module": {"COMBINE_PROGRAMS_PER_SM": 8}}, {"options": {"score": [2, 1], "sel": [4, 3]}, "module": {"COMBINE_PROGRAMS_PER_SM": 8}}, {}]' \
      --cases 32x65536,16x16384,8x65536,1x65536
  ;;
*)
  echo "unknown stage $1"; exit 2 ;;
esac
for d in prefill decode tests; do tar -czf "$OUT/$d.tgz" -C "$OUT" "$d" && rm -rf "${OUT:?}/$d"; done
note "call done"
