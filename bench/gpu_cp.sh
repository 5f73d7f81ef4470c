#!/usr/bin/env bash
# Issue 14 on GPUs: context-parallel NSA (NCCL) on 1, 2 and 4 H200s, in one device call of at
# most ~9.5 minutes on a 4-GPU machine (nvidia-h200-x4); logs and tables in $OUT.
#
#   bash bench/gpu_cp.sh                      # 4 GPUs: worlds 1, 2, 4
#   WORLDS="1 2" bash bench/gpu_cp.sh         # 2 GPUs (nvidia-h200-x2)
#
# Stage 1 (2 GPUs): bench/cp_bench.py --check: CP output and gradients against one GPU on the
#   same torch paths (float32, T=4099, documents crossing ranks): check.log (a FAIL exits 1).
# Stage 2: for each world R in $WORLDS, the rows of bench/cp_bench.py at T in $T (default 128k,
#   256k): cp fwd, cp fwd+bwd, all-gather, reduce-scatter (+ the router's fast paths on one GPU),
#   per-rank peak memory, appended to cp.csv; then cp.md: speed-up and efficiency t_1/(R t_R).
# Stage 3: FSDP2 + CP training on the largest world (bf16 params, fp32 reduce, T=32768, paper
#   config): 6 steps with DCP checkpoints every 3, then a resume to step 8: train.log.
# NVLink multicast stays off (the lent machines' rule): NCCL_NVLS_ENABLE=0 etc.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=4
OUT="${OUT:-/tmp/nsa_out}"
T="${T:-131072 262144}"
gpus=$(nvidia-smi -L | wc -l)
WORLDS="${WORLDS:-1 2 4}"
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  nvidia-smi topo -m
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version())"
} > "$OUT/env.txt" 2>&1
devices() { seq -s, 0 $(($1 - 1)); }
run() {  # run WORLD TIMEOUT ARGS...: torchrun on the first WORLD GPUs
  local w=$1 t=$2; shift 2
  CUDA_VISIBLE_DEVICES=$(devices "$w") timeout "$t" torchrun --standalone --nproc-per-node="$w" "$@"
}

status=0
if [ "$gpus" -ge 2 ]; then
  run 2 60 bench/cp_bench.py --check --T 8192 --reps 1 --no-baseline --csv "$OUT/check.csv" \
      > "$OUT/check.log" 2>&1 || status=1
fi
for w in $WORLDS; do
  [ "$w" -le "$gpus" ] || { echo "skip world $w: $gpus GPUs" >> "$OUT/cp.log"; continue; }
  budget=$(( w == 1 ? 200 : 120 ))
  echo "== world $w" >> "$OUT/cp.log"
  run "$w" "$budget" bench/cp_bench.py --T $T --reps 2 --budget 40 --csv "$OUT/cp.csv" \
      >> "$OUT/cp.log" 2>&1 || echo "world $w: exit $?" >> "$OUT/cp.log"
done
python3 bench/cp_bench.py --summarize --csv "$OUT/cp.csv" --md "$OUT/cp.md" >> "$OUT/cp.log" 2>&1

last=$(echo $WORLDS | tr ' ' '\n' | awk -v g="$gpus" '$1 <= g' | tail -1)
if [ "${last:-1}" -ge 2 ]; then
  args=(-m nsa_impl.parallel.train --nsa-config paper --seq-len 32768 --layers 2 --hidden 1024
        --heads 16 --kv-heads 4 --head-dim 64 --param-dtype bf16 --reduce-dtype fp32
        --ckpt-every 3 --out "$OUT/train")
  { run "$last" 75 "${args[@]}" --steps 6 && run "$last" 45 "${args[@]}" --steps 8 --resume; } \
      > "$OUT/train.log" 2>&1 || echo "train: exit $?" >> "$OUT/train.log"
fi
tail -n 40 "$OUT/cp.md" "$OUT/check.log" "$OUT/train.log" 2>/dev/null
exit $status
