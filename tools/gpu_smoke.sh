#!/usr/bin/env bash
# GPU smoke checks for one CUDA machine (no cluster): what CPU CI cannot exercise.
#   bash tools/gpu_smoke.sh OUT_DIR
# Runs, each with its own log under OUT_DIR and a summary line in OUT_DIR/summary.txt:
#   1. pytest tests/gpu (TE parity; skipped where transformer-engine is missing)
#   2. tools/check_weight_sync.py --device cuda (actor step -> hf engine on GPU, logits compared)
#   3. a 3-step TRACE run on CUDA in float32 and in bfloat16 (nccl, Megatron optimizer, sync, checkpoint)
#   4. tools/bench_step.py on CUDA
set -u
OUT=${1:-gpu_smoke}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
run() {  # name, command...
  local name=$1; shift
  local t0=$(date +%s)
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$(( $(date +%s) - t0 ))" | tee -a "$OUT/summary.txt"
}
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0))" \
  | tee -a "$OUT/summary.txt"
run pytest_gpu $PY -m pytest -q -rs tests/gpu
run weight_sync $PY tools/check_weight_sync.py --device cuda
TRAIN="configs/tiny_cpu.yaml parallel.device=cuda train.steps=3 checkpoint.every=2 log.progress=false"
run train_fp32 $PY -m megatron_trace.cli train --config $TRAIN run.dir="$OUT/run_fp32"
run train_bf16 $PY -m megatron_trace.cli train --config $TRAIN model.dtype=bfloat16 run.dir="$OUT/run_bf16"
run bench_step $PY tools/bench_step.py --config configs/tiny_cpu.yaml --json --repeats 5 parallel.device=cuda
tail -n 1 "$OUT/bench_step.log" > "$OUT/bench_step.json" 2>/dev/null || true
for r in run_fp32 run_bf16; do
  [ -f "$OUT/$r/metrics.jsonl" ] && tail -n 1 "$OUT/$r/metrics.jsonl" > "$OUT/${r}_last_metrics.json"
done
