#!/usr/bin/env bash
# NSA vs dense attention, one short training run each on one H200, in ONE device call (~4-7 min).
#
#   bash bench/train_gpu.sh        # from the repository root; results under $OUT
#
# Model: byte-level LM, 6 layers, width 1024, 16 query heads / 1 KV head of 64, SwiGLU MLP
# (~90M parameters); NSA with the paper's configuration (l=32, d=16, l'=64, n=16, w=512).
# Data: the Python standard library's .py sources on that machine, pieces of at most 8192 bytes
# packed 32768 tokens per step with cu_seqlens (nothing crosses a document). bf16 autocast,
# AdamW 1e-3, warmup 60, cosine to 1e-4, 600 steps, eval every 50 steps on 8 fixed held-out
# batches. Each run has a training time limit (then a clean stop with a final eval), so the
# whole script stays inside its budget even if a step is slower than estimated; the report
# compares the runs at their last common eval step.
#
# Estimate (from bench/results/h200_bf16.md: NSA fwd+bwd at T=8192, 64 heads x 128 = 19.4 ms per
# layer; dense FA-2 7.3 ms): per step ~16 ms per NSA layer (a quarter of the work at four
# times the tokens, plus launch overhead) x 6 + ~30 ms of projections/MLP -> ~130 ms, i.e.
# ~80 s for 600 steps; dense ~6 ms per layer -> ~65 ms/step, ~40 s. Plus Triton compilation
# (~30 s, first steps), evaluation and start-up: ~3-4 min in all; the limits cap it at ~7.5.
#
# $OUT receives at most 8 files (the device tool's limit):
#   env.txt        GPU, driver, torch/triton versions
#   train_gpu.log  both runs' progress lines and result JSON, the report's output
#   loss.csv       per logged step and run: loss, eval loss, lr, grad norm, clip fraction, tokens/s
#   summary.csv    per run: parameters, steps, final/best eval loss, eval loss relative to dense
#                  at the last common eval step, steady tokens/s
#   loss.png       train loss, eval loss, tokens/s against the step, NSA and dense side by side
#   gates.png      NSA gate mean +- std per layer and branch, and the final gate distribution
#   runs.tgz       metrics.jsonl + summary.json of both runs (per-branch timing under
#                  NSA_DEBUG_TIMING=1, routes, fallbacks, reads, length histograms)
#   gpu_tests.log  the GPU tests of the training work, with the time that is left
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/nsa_train_out}"
RUNS=/tmp/nsa_train_runs  # checkpoints (~1 GB each) stay off $OUT
BUDGET="${BUDGET:-460}"   # seconds for the whole script
mkdir -p "$OUT" "$RUNS"
LOG="$OUT/train_gpu.log"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, triton, sys; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])"
} 2>&1 | tee "$OUT/env.txt"

COMMON=(--device cuda --dtype bf16 --seed 0
        --layers 6 --hidden 1024 --heads 16 --kv-heads 1 --head-dim 64 --nsa-config paper
        --seq-len 8192 --batch-tokens 32768 --steps 600 --warmup 60 --lr 1e-3
        --log-every 10 --eval-every 50 --eval-batches 8 --ckpt-every 100000 --progress)
# TRAIN_ARGS replaces the flags above (a CPU dry run of the plumbing, e.g. TRAIN_ARGS="--device
# cpu --layers 1 --hidden 32 --heads 2 --head-dim 16 --steps 4 --train-bytes 5000").
if [[ -n "${TRAIN_ARGS:-}" ]]; then read -r -a COMMON <<< "$TRAIN_ARGS"; fi

run() {  # run NAME TIME_LIMIT HARD_TIMEOUT [extra flags]
  local name=$1 limit=$2 hard=$3
  shift 3
  echo "=== $name: start at ${SECONDS}s" | tee -a "$LOG"
  timeout "$hard" python3 -m nsa_impl.train "${COMMON[@]}" --out "$RUNS/$name" \
      --time-limit "$limit" "$@" 2>&1 | tee -a "$LOG" | grep -E "eval_loss|^\{|Error|error" | tail -20
  echo "=== $name: exit ${PIPESTATUS[0]} at ${SECONDS}s" | tee -a "$LOG"
}
# Training time limits (s) per run; a shorter device call passes smaller ones.
NSA_LIMIT="${NSA_LIMIT:-200}" DENSE_LIMIT="${DENSE_LIMIT:-140}"
NSA_DEBUG_TIMING=1 run nsa "$NSA_LIMIT" $((NSA_LIMIT + 50)) --attention nsa
run dense "$DENSE_LIMIT" $((DENSE_LIMIT + 40)) --attention dense

# dense first: summary.csv's eval_vs_first_run is then NSA's eval loss relative to dense
python3 -m nsa_impl.train.report "$RUNS/dense" "$RUNS/nsa" --labels dense nsa --out "$RUNS/report" \
    2>&1 | tee -a "$LOG"
cp "$RUNS"/report/{loss.csv,summary.csv,loss.png,gates.png} "$OUT"/ 2>/dev/null
cat "$RUNS/report/summary.csv" 2>/dev/null | tee -a "$LOG"
(cd "$RUNS" && tar czf "$OUT/runs.tgz" --ignore-failed-read \
    nsa/metrics.jsonl nsa/summary.json dense/metrics.jsonl dense/summary.json 2>/dev/null)

left=$((BUDGET - SECONDS))
if ((left > 45)); then
  echo "=== GPU tests with ${left}s left" | tee -a "$LOG"
  timeout "$left" python3 -m pytest -q -rA -m gpu -p no:cacheprovider \
      tests/test_amp.py tests/test_observe.py tests/test_train.py > "$OUT/gpu_tests.log" 2>&1
  tail -3 "$OUT/gpu_tests.log" | tee -a "$LOG"
else
  echo "=== GPU tests skipped: ${left}s left" | tee -a "$LOG"
fi
echo "=== done at ${SECONDS}s" | tee -a "$LOG"
