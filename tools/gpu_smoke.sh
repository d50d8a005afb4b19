#!/usr/bin/env bash
# GPU smoke checks for one CUDA machine (no cluster): what CPU CI cannot exercise.
#   bash tools/gpu_smoke.sh OUT_DIR
# Runs, each with its own log under OUT_DIR and a summary line in OUT_DIR/summary.txt:
#   1. pytest tests/gpu (TE parity; skipped where transformer-engine is missing)
#   2. tools/check_weight_sync.py --device cuda (actor step -> hf engine on GPU, logits compared)
#   3. a 3-step TRACE run on CUDA in float32 and in bfloat16 (nccl, Megatron optimizer, sync, checkpoint)
#   4. tools/bench_step.py on CUDA
#   5. the colocated memory hand-off: 3 steps with the optimizer off-loaded during rollout, memory/* per step;
#      and the hf engine alone: device memory freed by sleep() and taken back by wake(weights)/wake(kv_cache)
#   6. run checkpoints with Megatron's distributed optimizer (bf16, fp32 masters + Adam moments sharded over
#      DP): save at dp=N (N = min(2, GPUs), torchrun), resume bit-identically at dp=N, load exactly at dp=1
#      (the case of tests/distributed/test_optimizer_checkpoint.py, which runs it on gloo)
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
run train_handoff $PY -m megatron_trace.cli train --config $TRAIN train.offload_during_rollout=true \
  run.dir="$OUT/run_handoff"
[ -f "$OUT/run_handoff/metrics.jsonl" ] && $PY -c "
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    print(json.dumps({'step': m['step'], **{k: v for k, v in m.items() if k.startswith('memory/')}}))
" "$OUT/run_handoff/metrics.jsonl" > "$OUT/handoff_memory.jsonl"
run engine_handoff $PY -c "
import dataclasses, json, torch
from megatron_trace.models.hf_io import make_random_hf_model
from megatron_trace.models.qwen3 import QWEN3_SIZES
from megatron_trace.rollout import HFEngine, SamplingParams
free = lambda: torch.cuda.mem_get_info()[0] / 2**30
eng = HFEngine(make_random_hf_model(dataclasses.replace(QWEN3_SIZES['demo'], num_hidden_layers=8), seed=0),
               eos_token_ids=[], device='cuda')
eng.generate([[1, 2, 3]] * 4, SamplingParams(n=4, max_new_tokens=32, seed=0))
f0 = free(); eng.sleep(); torch.cuda.empty_cache(); f1 = free()
eng.wake(['weights']); f2 = free(); eng.wake(['kv_cache', 'cuda_graph']); f3 = free()
out = eng.generate([[1, 2, 3]], SamplingParams(n=2, max_new_tokens=8, seed=0))
print(json.dumps({'released_gb': f1 - f0, 'weights_restored_gb': f1 - f2, 'kv_restored_gb': f2 - f3,
                  'generates_after_wake': len(out) == 2}))
"
run bench_step $PY tools/bench_step.py --config configs/tiny_cpu.yaml --json --repeats 5 parallel.device=cuda
tail -n 1 "$OUT/bench_step.log" > "$OUT/bench_step.json" 2>/dev/null || true
for r in run_fp32 run_bf16; do
  [ -f "$OUT/$r/metrics.jsonl" ] && tail -n 1 "$OUT/$r/metrics.jsonl" > "$OUT/${r}_last_metrics.json"
done
cat > "$OUT/optim_ckpt.py" <<'PY'
import json, os, sys
import torch
sys.path[:0] = ["tests", "tests/distributed"]
import test_optimizer_checkpoint as T
from conftest import TINY_TIED


def cpu(state):
    return {n: {k: v.cpu() for k, v in fields.items()} for n, fields in state.items()}


if __name__ == "__main__":  # dist_checkpointing's writer spawns helpers that import this file
    mode, out = sys.argv[1], sys.argv[2]
    hf, run_dir = os.path.join(out, "hf"), os.path.join(out, "run")
    if mode == "hf":
        from megatron_trace.models.hf_io import make_random_hf_model
        make_random_hf_model(TINY_TIED, hf, seed=0)
        sys.exit(0)
    batches = torch.randint(0, 1000, (T.STEPS, 4, 10), generator=torch.Generator().manual_seed(5))
    res = T._rank(hf, batches, run_dir, "dist_adam_bf16", mode == "save")
    if res is None:  # not rank 0
        sys.exit(0)
    if mode == "save":
        torch.save(cpu(res["saved"]), os.path.join(out, "saved.pt"))
        bad = T._diff(cpu(res["loaded"]), cpu(res["saved"])) + T._diff(cpu(res["resumed"]), cpu(res["final"]))
    else:
        bad = T._diff(cpu(res["loaded"]), torch.load(os.path.join(out, "saved.pt")))
    print(json.dumps({"mode": mode, "world": int(os.environ.get("WORLD_SIZE", "1")), "mismatched": bad[:10]}))
    sys.exit(1 if bad else 0)
PY
NGPU=$($PY -c "import torch; print(min(2, torch.cuda.device_count()))")
run optim_ckpt_hf $PY "$OUT/optim_ckpt.py" hf "$OUT/optim_ckpt"
run optim_ckpt_dp$NGPU $PY -m torch.distributed.run --standalone --nproc-per-node "$NGPU" "$OUT/optim_ckpt.py" save \
  "$OUT/optim_ckpt"
run optim_ckpt_dp1 $PY "$OUT/optim_ckpt.py" load "$OUT/optim_ckpt"
