#!/usr/bin/env bash
# Issue 10 (v4) in ONE device call of <= 8 minutes: GPU tests of the v4 kernels, peers (when the
# lead carries .peers), then bench/gpu_prefill.py (launch-shape sweep at T=64k -> measured
# profile, per-kernel profile, full-NSA table 8k..128k vs dense cuDNN/flash in one process).
#   bash bench/gpu_prefill.sh            # everything (about 7.5 minutes)
#   bash bench/gpu_prefill.sh quick      # tests + table at 8k/64k only (about 4 minutes)
# Files back under $OUT (<= 8): gpu_tests.log, peers.jsonl, gpu_prefill.log, sweep.csv,
# parts.csv, table.csv, table.md, profile_sm90.json.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
OUT="${OUT:-/tmp/nsa_out}"
mkdir -p "$OUT"
mode="${1:-full}"
start=$(date +%s)
total=${NSA_CALL_BUDGET_S:-470}
left() { echo $(( total - ($(date +%s) - start) )); }

nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.max.sm \
    --format=csv 2>&1 | tee "$OUT/gpu_tests.log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" 2>&1 | tee -a "$OUT/gpu_tests.log"

# 1. correctness of the v4 kernels compiled (bf16/fp16 lowp class, fp32 class, 64k rows)
timeout 170 python3 -m pytest tests/kernels/test_triton_attn.py tests/kernels/test_triton_topn.py -m gpu -q -rA -n 4 -p no:cacheprovider \
    2>&1 | tee -a "$OUT/gpu_tests.log" | grep -E "FAIL|ERROR|passed|failed|Error" | head -30

# 2. peers in their own process (flash_attn stand-in on their path only), same call; two
#    lengths only (.peers/ is a local copy of the peers' tool, git-ignored, not in the repo)
if [ -d .peers ] && [ "$mode" = full ]; then
  timeout 90 env PYTHONPATH="$PWD/.peers:$PWD/.peers/stand_in:$PWD" \
      python3 .peers/peer_bench.py peers 8192,65536 > "$OUT/peers.jsonl" 2>&1
  grep "^ROW" "$OUT/peers.jsonl" | tail -12
fi

# 3. sweep -> measured profile, parts, the table (budget: what is left, minus a margin)
budget=$(( $(left) - 15 ))
if [ "$mode" = quick ]; then
  args=(--sections table --T 8192,65536)
else
  args=(--sections sweep,parts,table)
fi
timeout $(( budget + 10 )) python3 bench/gpu_prefill.py --out "$OUT" --budget-s "$budget" \
    --peers "$OUT/peers.jsonl" "${args[@]}" 2>&1 | tee "$OUT/gpu_prefill.log" \
    | grep -vE "^ +(File|\^|~)" | tail -70
echo "call used $(( $(date +%s) - start )) s"
