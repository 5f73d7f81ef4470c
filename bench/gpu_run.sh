#!/usr/bin/env bash
# One device-machine call: environment line, GPU tests, benchmarks; logs under $OUT.
#   bash bench/gpu_run.sh cmp     # GPU tests + full NSA at 16k/64k with a profile breakdown
#   bash bench/gpu_run.sh matrix  # nox -s gpu_matrix (carried nox wheels), forced-path conformance
#   bash bench/gpu_run.sh verify  # GPU tests, decode conformance clauses, full NSA at 64k
#   bash bench/gpu_run.sh check   # GPU tests + selection sweep/timings + a full-NSA scout
#   bash bench/gpu_run.sh bench   # the full benchmark table (bench/gpu_bench.py)
# Each step has its own timeout so one slow step cannot eat the others' time.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
OUT="${OUT:-/tmp/nsa_out}"
mkdir -p "$OUT"
stage="${1:-check}"
{
  nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT/env.txt"

case "$stage" in
cmp)
  # the compressed branch's flash path: GPU tests, then full NSA at 64k with a profile
  timeout 120 python3 -m pytest tests -m gpu -q -rA -n 4 -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "FAIL|SKIP|ERROR|passed|failed|Error|slack" | head -60
  timeout 200 python3 bench/gpu_bench.py --out "$OUT/nsa64k" --T 16384,65536 --dims 128/128 \
      --parts nsa --cmp-sweep 65536 --profile 65536 --budget-s 170 2>&1 | tee "$OUT/nsa64k.log" | grep -v "^ *void\|^---\|^ *Name" | tail -60
  timeout 230 python3 -m conformance run --impl nsa_impl:flash --device cuda --no-mutants \
      --report "$OUT/conf_flash" 2>&1 | tail -30
  rm -f "$OUT/conf_flash/junit.xml" "$OUT/nsa64k.csv"  # at most 8 files come back
  ;;
matrix)
  # the GPU lane as CI's self-hosted runner would run it (nox from carried wheels: no network
  # here, so every pair cell skips and the "installed" cell runs), then the two forced paths
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PWD:/tmp/site" PIP_NO_INDEX=1
  timeout 330 python3 -m nox -s gpu_matrix 2>&1 | tee "$OUT/nox.log" | grep -E "^nox >|passed|failed|pass,|FAIL|Skipp" | tail -40
  for impl in flash triton; do
    timeout 110 python3 -m conformance run --impl "nsa_impl:$impl" --device cuda --no-mutants \
        --report "$OUT/conf_$impl" 2>&1 | tail -12
  done
  cp -r reports/gpu_matrix "$OUT/conf_matrix" 2>/dev/null
  (cd "$OUT" && tar czf conformance.tgz conf_* && rm -rf conf_*)
  ;;
check)
  timeout 230 python3 -m pytest tests -m gpu -q -rA -n 4 -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "PASS|FAIL|SKIP|ERROR|err |passed|failed|Error" | head -150
  timeout 220 python3 bench/gpu_bench.py --out "$OUT/sel" --dims 128/128 --parts sel,h4 \
      --sweep 16384 --budget-s 170 2>&1 | tee "$OUT/sel.log" | tail -60
  timeout 120 python3 bench/gpu_bench.py --out "$OUT/nsa_scout" --T 8192 --dims 128/128 \
      --parts nsa,decode --budget-s 80 2>&1 | tee "$OUT/nsa_scout.log" | tail -40
  ;;
tune)
  timeout 150 python3 -m pytest tests -m gpu -q -rA -n 4 -p no:cacheprovider \
      2>&1 | tee "$OUT/gpu_tests.log" | grep -E "PASS|FAIL|SKIP|ERROR|err |passed|failed|Error" | head -60
  timeout 400 python3 bench/gpu_bench.py --out "$OUT/tune" --dims 128/128 --parts none \
      --sweep 65536 --budget-s 330 2>&1 | tee "$OUT/tune.log" | tail -60
  ;;
bench)
  timeout 560 python3 bench/gpu_bench.py --out "$OUT/gpu_bench" --budget-s 500 "${@:2}" 2>&1 \
      | tee "$OUT/bench.log" | tail -80
  ;;
final2)
  timeout 230 python3 -m conformance run --impl nsa_impl:triton --device cuda --no-mutants \
      --report "$OUT/conf_triton" 2>&1 | tail -58
  rm -f "$OUT/conf_triton/junit.xml"
  timeout 330 python3 bench/gpu_bench.py --out "$OUT/gpu_bench" --dims "${2:-128/128}" \
      --cmp-sweep 65536 --budget-s 290 2>&1 | tee "$OUT/bench.log" | grep -E "^\|" | tail -45
  ;;
final3)
  timeout 200 python3 -m conformance run --impl nsa_impl:triton --device cuda --no-mutants \
      --report "$OUT/conf_triton" 2>&1 | grep -E "FAIL|pass,"
  rm -f "$OUT/conf_triton/junit.xml"
  timeout 100 python3 bench/gpu_bench.py --out "$OUT/decode64k" --T 65536 --dims 128/128 \
      --parts decode --budget-s 80 2>&1 | grep -E "^\|" | tail -3
  timeout 200 python3 bench/gpu_bench.py --out "$OUT/dims192" --T 16384,65536 --dims 192/128 \
      --parts sel,nsa,decode --budget-s 170 2>&1 | tee "$OUT/dims192.log" | grep -E "^\|" | tail -16
  ;;
verify)
  # after the last changes: GPU tests, the decode clauses, full NSA at 64k
  timeout 120 python3 -m pytest tests -m gpu -q -rA -n 4 -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "FAIL|ERROR|passed|failed" | head -20
  for c in NSA-P5-DECODE-PREFILL NSA-I9-READS NSA-LONG-INDEX-BOUNDS-64K; do
    timeout 100 python3 -m conformance run --impl nsa_impl --device cuda --no-mutants \
        --clause "$c" --report "$OUT/conf_$c" 2>&1 | grep -E "FAIL|pass,"
  done
  (cd "$OUT" && tar czf conformance.tgz conf_* && rm -rf conf_*)
  timeout 120 python3 bench/gpu_bench.py --out "$OUT/nsa64k" --T 65536 --dims 128/128 \
      --parts nsa,decode --budget-s 100 2>&1 | grep -E "^\|" | tail -4
  ;;
final)
  timeout 150 python3 -m pytest tests -m gpu -q -rA -n 4 -p no:cacheprovider \
      2>&1 | tee "$OUT/gpu_tests.log" | grep -E "FAIL|SKIP|ERROR|passed|failed|Error" | head -40
  timeout 400 python3 bench/gpu_bench.py --out "$OUT/gpu_bench" --budget-s 350 2>&1 \
      | tee "$OUT/bench.log" | tail -75
  ;;
*)
  echo "unknown stage $stage"; exit 2 ;;
esac
