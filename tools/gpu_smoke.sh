#!/usr/bin/env bash
# GPU smoke checks for one CUDA machine (no cluster): what CPU CI cannot exercise.
#   bash tools/gpu_smoke.sh OUT_DIR            (from anywhere; it runs in the repository root)
#   GPU_SMOKE_PARTS="handoff optim_ckpt" bash tools/gpu_smoke.sh OUT_DIR     (a subset)
#
# stdout is JSON Lines and nothing else: ONE object per part, {"part": NAME, "ok": true|false|null,
# "rc": N|null, "seconds": N, "log": FILE, ...figures}; ok/rc are null when a part is skipped (then
# "skipped": true and "reason"); "timed_out": true when its time limit (timeout(1)) killed it. The same
# lines go to OUT_DIR/summary.jsonl, each part's output to OUT_DIR/<part>.log, progress to stderr.
# Meant to fit about 8 minutes on one H100 (not yet timed on a GPU; each part has a time limit that
# bounds a hung part, not the total). Parts, in this order (GPU_SMOKE_PARTS picks some; env/install always run):
#   env            torch, CUDA, GPU name and count, TransformerEngine, megatron-core versions
#   install        only when `import megatron.core` fails: the offline wheelhouse (below)
#   handoff        (a) the colocated memory hand-off: 3 steps with the optimizer off-loaded during rollout,
#                  memory/* of every step from metrics.jsonl; then the hf engine alone (engine_handoff):
#                  device memory freed by sleep() and taken back by wake(weights)/wake(kv_cache)
#   optim_ckpt     (b) run checkpoints with Megatron's distributed optimizer (bf16, fp32 masters + Adam
#                  moments sharded over DP) through NCCL: save at dp=N (N = min(2, GPUs), torchrun), resume
#                  bit-identically at dp=N, load exactly at dp=1 (tests/distributed/test_optimizer_checkpoint.py
#                  runs the same case on gloo)
#   thd_packing    (c) tests/gpu/test_thd_packing.py: packed rows through TE's THD path == padded rows;
#                  skipped, with the reason, where transformer_engine does not import
#   routed_loss    (d) tools/bench_routed_loss.py --device cuda at Qwen3's vocabulary (time, peak CUDA memory
#                  of Megatron's CE vs the routed path vs a naive full-vocab reference)
#   fused_head     tools/bench_fused_head.py --device cuda, bf16, H 4096, 8192 tokens: Megatron's head + CE vs
#                  the unfused routed path vs the fused LM head (time, peak CUDA memory, gradient difference)
#   pytest_gpu     the rest of tests/gpu (TE parity; skipped where transformer-engine is missing)
#   weight_sync    tools/check_weight_sync.py --device cuda (actor step -> hf engine on GPU, logits compared)
#   train_fp32, train_bf16   3-step TRACE runs on CUDA (nccl, Megatron optimizer, sync, checkpoint)
#   bench_step     tools/bench_step.py on CUDA
#
# Without megatron-core (a GPU box with torch but no package index): build the wheelhouse where an index
# is reachable, for the box's Python (`make wheelhouse PY=3.12`: git-ignored wheelhouse/, <= 60 MiB), and
# carry it along (the device tool's `carry: ["wheelhouse"]`; scp/rsync to a cluster). This script then
# creates a venv with --system-site-packages in ${GPU_SMOKE_VENV:-/tmp/mt_gpu_smoke_venv} (the image's
# torch/TE stay in use; nothing of the image changes) and runs `pip install --no-index --find-links
# wheelhouse megatron-trace` into it; where no venv can be made, or with GPU_SMOKE_INSTALL=interpreter,
# it installs into the interpreter itself. PYTHONPATH puts this checkout
# first, so its code, not the wheel's copy, is what runs.
set -u
OUT=${1:-gpu_smoke}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
HPY=$PY  # runs the helpers below (standard library only)
WHEELHOUSE=${WHEELHOUSE:-wheelhouse}
PARTS=${GPU_SMOKE_PARTS:-handoff optim_ckpt thd_packing routed_loss fused_head pytest_gpu weight_sync train_fp32 train_bf16 bench_step}
: >"$OUT/summary.jsonl"

cat >"$OUT/smoke_helpers.py" <<'PY'
"""Helpers of tools/gpu_smoke.sh: build each part's JSON line and read figures out of logs."""
import glob, json, math, os, re, sys


def last_json(path):
    """The last line of a file that is a JSON object, or {}."""
    try:
        lines = open(path, errors="replace").read().splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return obj
    return {}


def pytest_counts(path):
    """tests_passed/failed/skipped/error counts and skip reasons from `pytest -q -rs` output."""
    text = open(path, errors="replace").read() if os.path.exists(path) else ""
    out = {}
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", text):
        out["tests_" + (what.rstrip("s") if what.startswith("error") else what)] = int(n)
    reasons = re.findall(r"^SKIPPED \[\d+\] [^:]+:\d+: (.*)$", text, re.M)
    if reasons:
        out["skip_reasons"] = sorted(set(reasons))[:5]
    return out


def metrics(run_dir, keys=("step", "loss/total", "reward/mean", "time/step")):
    """Figures of a training run: its last metrics row (a few keys, memory/* all) and whether every
    logged loss is finite."""
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = [json.loads(x) for x in open(path)] if os.path.exists(path) else []
    if not rows:
        return {"ok": False, "reason": f"no rows in {path}"}
    last = rows[-1]
    fig = {k: last[k] for k in keys if k in last}
    fig.update({k: v for k, v in last.items() if k.startswith("memory/")})
    losses = [r["loss/total"] for r in rows if isinstance(r.get("loss/total"), (int, float))]
    fig["steps_logged"] = len(rows)
    fig["losses_finite"] = all(math.isfinite(x) for x in losses)
    fig["ok"] = fig["losses_finite"]
    fig["checkpoints"] = sorted(os.path.basename(p) for p in glob.glob(os.path.join(run_dir, "checkpoints", "step_*")))
    return fig


def handoff(run_dir, engine_log):
    """(a): memory/* of every step of the off-loaded run, and the engine's own sleep/wake figures."""
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = [json.loads(x) for x in open(path)] if os.path.exists(path) else []
    steps = [{"step": r.get("step"), **{k: v for k, v in r.items() if k.startswith("memory/")}} for r in rows]
    fig = {"steps": steps, "ok": bool(steps) and all(len(s) > 1 for s in steps)}
    if not fig["ok"]:
        fig["reason"] = "no memory/* figures in metrics.jsonl" if rows else f"no rows in {path}"
    eng = last_json(engine_log)
    fig["engine"], fig["engine_log"] = eng, engine_log
    if not eng.get("generates_after_wake"):
        fig["ok"] = False
    return fig


def manifest(path):
    """What a wheelhouse was built for (its manifest.json, written by tools/build_wheelhouse.py)."""
    m = json.load(open(path)) if os.path.exists(path) else {}
    return {"python_version": m.get("python_version"), "total_mib": m.get("total_mib"),
            "wheels": len(m.get("wheels", {}))}


def merge(*objs):
    out = {}
    for o in objs:
        try:
            o = json.loads(o)
        except ValueError:
            continue
        if isinstance(o, dict):
            out.update(o)
    return out


def emit(part, rc, seconds, log, figures=""):
    rec = {"part": part}
    if rc == "skip":
        rec.update(ok=None, rc=None, skipped=True)
    else:
        rec.update(ok=int(rc) == 0, rc=int(rc))
        if int(rc) in (124, 137):
            rec["timed_out"] = True
    rec["seconds"] = int(seconds)
    if log:
        rec["log"] = log
    fig = {}
    if figures.strip():
        try:
            fig = json.loads(figures)
        except ValueError:
            fig = {"figures_unparsed": figures[-500:]}
        if not isinstance(fig, dict):
            fig = {"figures": fig}
    if "ok" in fig:  # a part's own verdict can only turn ok into not ok
        ok = fig.pop("ok")
        if rec["ok"] is not None:
            rec["ok"] = rec["ok"] and bool(ok)
    rec.update(fig)
    print(json.dumps(rec, default=str))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "emit":
        emit(*args)
    else:
        print(json.dumps({"last_json": last_json, "pytest": pytest_counts, "metrics": metrics,
                          "handoff": handoff, "manifest": manifest, "merge": merge}[cmd](*args), default=str))
PY

say() { echo "[gpu_smoke] $*" >&2; }
emit() {  # emit PART RC SECONDS LOG [FIGURES_JSON]: one JSON line on stdout and in summary.jsonl
  local line
  line=$("$HPY" "$OUT/smoke_helpers.py" emit "$@") || line="{\"part\": \"$1\", \"ok\": false, \"rc\": null, \"reason\": \"the JSON helper failed\"}"
  echo "$line"
  echo "$line" >>"$OUT/summary.jsonl"
}
fig() { "$HPY" "$OUT/smoke_helpers.py" "$@" 2>/dev/null || echo '{}'; }
want() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
RC=0 SECS=0
run() {  # run NAME LIMIT_S command...: output to OUT/NAME.log; sets RC and SECS
  local name=$1 limit=$2
  shift 2
  say "$name (at most ${limit}s) ..."
  local t0
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  RC=$?
  SECS=$(($(date +%s) - t0))
  say "$name rc=$RC seconds=$SECS"
}

# ---------------------------------------------------------------- env (and install)
env_json() {
  "$PY" - <<'PY' 2>/dev/null
import json
out = {}
try:
    import torch
    out.update(torch=torch.__version__, cuda=torch.cuda.is_available(), gpus=torch.cuda.device_count(),
               torch_cuda=torch.version.cuda)
    if torch.cuda.is_available():
        out["device_name"] = torch.cuda.get_device_name(0)
except Exception as exc:  # noqa: BLE001
    out["torch_error"] = f"{type(exc).__name__}: {exc}"
for mod in ("megatron.core", "transformer_engine", "transformers"):
    try:
        m = __import__(mod, fromlist=["_"])
        out[mod] = getattr(m, "__version__", "present")
    except Exception as exc:  # noqa: BLE001
        out[mod] = None
        out[mod + "_error"] = f"{type(exc).__name__}: {exc}"[:300]
import sys
out["python"] = sys.version.split()[0]
out["python_executable"] = sys.executable
out["ok"] = bool(out.get("cuda")) and out.get("megatron.core") is not None
print(json.dumps(out))
PY
}

if ! "$PY" -c "import megatron.core" >/dev/null 2>&1; then
  t0=$(date +%s)
  log="$OUT/install.log"
  if [ ! -d "$WHEELHOUSE" ]; then
    emit install 1 0 "$log" '{"reason": "megatron.core does not import and there is no wheelhouse/: run `make wheelhouse PY=X.Y` where a package index is reachable and carry wheelhouse/ here"}'
  else
    where=interpreter
    venv=${GPU_SMOKE_VENV:-/tmp/mt_gpu_smoke_venv}
    if [ "${GPU_SMOKE_INSTALL:-venv}" != interpreter ] &&
      "$PY" -m venv --system-site-packages --without-pip "$venv" >"$log" 2>&1; then
      # --system-site-packages shows the *base* interpreter's packages; when $PY is itself a venv or a
      # conda env, a .pth adds its site-packages too, so its torch (and TE) are seen, and kept, by pip.
      # --without-pip: the venv runs the image's own pip (no seeded pip/setuptools shadowing the image's,
      # no ensurepip needed), which installs into the venv.
      "$PY" -c 'import site; print("\n".join(site.getsitepackages() + [site.getusersitepackages()]))' \
        >"$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_mt_parent_site.pth"
      PY="$venv/bin/python"
      where="venv $venv (--system-site-packages)"
    fi
    say "installing from $WHEELHOUSE into the $where"
    # (no PYTHONPATH here: pip would take a checkout's megatron_trace.egg-info for the installed project)
    env -u PYTHONPATH "$PY" -m pip install --no-index --find-links "$WHEELHOUSE" megatron-trace >>"$log" 2>&1
    rc=$?
    pyv=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    emit install "$rc" $(($(date +%s) - t0)) "$log" \
      "{\"into\": \"$where\", \"python\": \"$pyv\", \"wheelhouse\": $(fig manifest "$WHEELHOUSE/manifest.json")}"
  fi
fi
# this checkout's megatron_trace (and tests/, configs/) are what runs, not the copy inside an installed wheel
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
emit env 0 0 "" "$(env_json || echo '{"ok": false}')"
NGPU=$("$PY" -c "import torch; print(min(2, torch.cuda.device_count()))" 2>/dev/null || echo 0)
TRAIN="configs/tiny_cpu.yaml parallel.device=cuda train.steps=3 checkpoint.every=2 log.progress=false"

# ---------------------------------------------------------------- (a) colocated hand-off with off-load
if want handoff; then
  run train_handoff 300 "$PY" -m megatron_trace.cli train --config $TRAIN train.offload_during_rollout=true \
    run.dir="$OUT/run_handoff"
  rc_train=$RC secs=$SECS
  run engine_handoff 120 "$PY" -c "
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
  rc=$rc_train
  [ "$rc" -eq 0 ] && rc=$RC
  emit handoff "$rc" $((secs + SECS)) "$OUT/train_handoff.log" "$(fig handoff "$OUT/run_handoff" "$OUT/engine_handoff.log")"
fi

# ---------------------------------------------------------------- (b) distributed optimizer: NCCL save/resume
if want optim_ckpt; then
  cat >"$OUT/optim_ckpt.py" <<'PY'
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
  total=0
  run optim_ckpt_hf 120 "$PY" "$OUT/optim_ckpt.py" hf "$OUT/optim_ckpt"
  rc=$RC rc_hf=$RC total=$((total + SECS))
  run optim_ckpt_save 180 "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NGPU" "$OUT/optim_ckpt.py" \
    save "$OUT/optim_ckpt"
  rc_save=$RC total=$((total + SECS))
  save=$(fig last_json "$OUT/optim_ckpt_save.log")
  run optim_ckpt_load 180 "$PY" "$OUT/optim_ckpt.py" load "$OUT/optim_ckpt"
  rc_load=$RC total=$((total + SECS))
  load=$(fig last_json "$OUT/optim_ckpt_load.log")
  [ "$rc" -eq 0 ] && rc=$rc_save
  [ "$rc" -eq 0 ] && rc=$rc_load
  emit optim_ckpt "$rc" "$total" "$OUT/optim_ckpt_save.log" \
    "{\"dp_save\": $NGPU, \"rc_hf\": $rc_hf, \"rc_save_resume\": $rc_save, \"rc_load_dp1\": $rc_load, \"save_resume\": $save, \"load_dp1\": $load}"
fi

# ---------------------------------------------------------------- (c) THD packing through TransformerEngine
if want thd_packing; then
  if te_err=$("$PY" -c "import transformer_engine.pytorch" 2>&1); then
    run thd_packing 240 "$PY" -m pytest -q -rs -p no:cacheprovider tests/gpu/test_thd_packing.py
    counts=$(fig pytest "$OUT/thd_packing.log")
    if [ "$RC" -eq 0 ] && echo "$counts" | grep -q '"tests_skipped"' && ! echo "$counts" | grep -q '"tests_passed"'; then
      emit thd_packing skip "$SECS" "$OUT/thd_packing.log" "$(fig merge "$counts" '{"reason": "pytest skipped it (see skip_reasons)"}')"
    else
      emit thd_packing "$RC" "$SECS" "$OUT/thd_packing.log" "$counts"
    fi
  else
    reason=$(echo "$te_err" | tail -n 1 | tr -d '"\\' | cut -c1-300)
    emit thd_packing skip 0 "" "{\"reason\": \"transformer_engine.pytorch does not import: $reason\"}"
  fi
fi

# ---------------------------------------------------------------- (d) routed-loss benchmark on CUDA
if want routed_loss; then
  run routed_loss 240 "$PY" tools/bench_routed_loss.py --device cuda --vocab 151936 --tokens 4096 --routed-frac 0.25 \
    --tp 1 --dtype bf16 --repeats 5 --json
  emit routed_loss "$RC" "$SECS" "$OUT/routed_loss.log" "$(fig last_json "$OUT/routed_loss.log")"
fi

# ---------------------------------------------------------------- (e) fused LM head benchmark on CUDA
if want fused_head; then
  run fused_head 300 "$PY" tools/bench_fused_head.py --device cuda --vocab 151936 --hidden 4096 --tokens 8192 \
    --routed-frac 0.25 --tp 1 --dtype bf16 --repeats 5 --json
  emit fused_head "$RC" "$SECS" "$OUT/fused_head.log" "$(fig last_json "$OUT/fused_head.log")"
fi

# ---------------------------------------------------------------- the rest
if want pytest_gpu; then
  run pytest_gpu 300 "$PY" -m pytest -q -rs -p no:cacheprovider tests/gpu --ignore=tests/gpu/test_thd_packing.py
  emit pytest_gpu "$RC" "$SECS" "$OUT/pytest_gpu.log" "$(fig pytest "$OUT/pytest_gpu.log")"
fi
if want weight_sync; then
  run weight_sync 240 "$PY" tools/check_weight_sync.py --device cuda
  emit weight_sync "$RC" "$SECS" "$OUT/weight_sync.log" "$(fig last_json "$OUT/weight_sync.log")"
fi
if want train_fp32; then
  run train_fp32 300 "$PY" -m megatron_trace.cli train --config $TRAIN run.dir="$OUT/run_fp32"
  emit train_fp32 "$RC" "$SECS" "$OUT/train_fp32.log" "$(fig metrics "$OUT/run_fp32")"
fi
if want train_bf16; then
  run train_bf16 300 "$PY" -m megatron_trace.cli train --config $TRAIN model.dtype=bfloat16 run.dir="$OUT/run_bf16"
  emit train_bf16 "$RC" "$SECS" "$OUT/train_bf16.log" "$(fig metrics "$OUT/run_bf16")"
fi
if want bench_step; then
  run bench_step 300 "$PY" tools/bench_step.py --config configs/tiny_cpu.yaml --json --repeats 5 parallel.device=cuda
  emit bench_step "$RC" "$SECS" "$OUT/bench_step.log" "$(fig last_json "$OUT/bench_step.log")"
fi
say "done: $OUT/summary.jsonl"
