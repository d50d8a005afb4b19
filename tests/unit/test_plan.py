"""The memory planner (`megatron_trace/plan/`, `megatron-trace plan`): its parameter, gradient
and optimizer bytes equal what Megatron allocates, every Qwen3 recipe fits on 80 GB, an
over-budget config is refused with the keys to change, the SGLang engine's memory outside its
pool, CUDA contexts and NCCL buffers are their own lines (on every GPU of a replica, with or
without SGLANG_MEMORY_SAVER_CUDA_GRAPH), and the CLI prints the table."""

import dataclasses
import glob
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO

from megatron_trace.config import load_config
from megatron_trace.config.schema import ClusterConfig, Config, ModelConfig, OptimConfig, ParallelConfig
from megatron_trace.models.builder import padded_vocab
from megatron_trace.models.qwen3 import QWEN3_SIZES
from megatron_trace.parallel import run_on_ranks
from megatron_trace.plan import GB, check_fits, param_numels, plan_memory, static_bytes

MEMORY_SAVER = "SGLANG_MEMORY_SAVER_CUDA_GRAPH"
RECIPES = sorted(glob.glob(os.path.join(REPO, "configs", "qwen3_*.yaml")))


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_every_recipe_fits_on_80gb(path, monkeypatch):
    monkeypatch.delenv(MEMORY_SAVER, raising=False)  # the larger case: graphs stay while the engine sleeps
    cfg = load_config(path)
    plan = plan_memory(cfg, source=path)
    assert cfg.cluster.gpu_memory_gb == 80
    assert plan.fits, plan.table()
    assert plan.engine_fits and plan.kv_cache_tokens > 100_000, plan.table()  # room to generate 8k tokens x many
    assert plan.layout["gpus"] == cfg.cluster.nodes * cfg.cluster.gpus_per_node


def test_an_over_budget_layout_is_refused_with_the_keys_to_change():
    cfg = load_config(os.path.join(REPO, "configs", "qwen3_32b_trace_fkl.yaml"), ["parallel.tp=1"])
    assert not plan_memory(cfg).fits
    with pytest.raises(ValueError) as err:
        check_fits(cfg)
    msg = str(err.value)
    for needle in ("cluster.gpu_memory_gb=80", "parallel.tp", "GB per GPU", "train.memory_check=false"):
        assert needle in msg, (needle, msg)
    # activations dominate without recompute: the message says how to cut them
    cfg = load_config(os.path.join(REPO, "configs", "qwen3_8b_grpo.yaml"), ["optim.recompute=none"])
    with pytest.raises(ValueError, match="optim.recompute=selective.*or full.*optim.max_tokens_per_micro_batch"):
        check_fits(cfg)
    cfg = load_config(os.path.join(REPO, "configs", "qwen3_14b_grpo.yaml"),
                      ["optim.distributed_optimizer=false", "parallel.tp=2"])
    with pytest.raises(ValueError, match="optim.distributed_optimizer=true"):
        check_fits(cfg)


def test_train_checks_the_plan_on_cuda_only():
    from megatron_trace.train.setup_run import _check_memory

    cfg = load_config(os.path.join(REPO, "configs", "qwen3_32b_trace_fkl.yaml"), ["parallel.tp=1"])
    cuda = SimpleNamespace(device=torch.device("cuda"), dp_size=16)
    with pytest.raises(ValueError, match="memory plan"):
        _check_memory(cfg, cuda)
    _check_memory(cfg, SimpleNamespace(device=torch.device("cpu"), dp_size=16))  # CPU runs are not checked
    cfg.train.memory_check = False
    _check_memory(cfg, cuda)


def test_parameter_counts_follow_the_hf_model_and_megatron_sharding():
    for name, arch in QWEN3_SIZES.items():
        pad = padded_vocab(arch.vocab_size, 1) - arch.vocab_size
        heads = 1 if arch.tie_word_embeddings else 2
        assert sum(param_numels(arch, 1, 1)[0].values()) == arch.num_params + pad * arch.hidden_size * heads, name
    arch = QWEN3_SIZES["8b"]
    whole = sum(param_numels(arch, 1, 1)[0].values())
    split = param_numels(arch, 2, 2)  # TP shards the matrices, the norms are replicated, PP splits layers
    assert split[0]["embedding"] * 2 == padded_vocab(arch.vocab_size, 2) * arch.hidden_size
    assert sum(sum(s.values()) for s in split) * 2 < whole + 2 * split[0]["norms"] + 2 * split[1]["norms"]
    with pytest.raises(ValueError, match="parallel.tp"):
        param_numels(arch, 16, 1)  # 8 KV heads do not split 16 ways
    with pytest.raises(ValueError, match="parallel.pp"):
        param_numels(arch, 1, 5)


def _tiny_cfg(**over) -> Config:
    return Config(model=ModelConfig(size="tiny", dtype=over.pop("dtype", "bfloat16"), use_te=False),
                  parallel=ParallelConfig(tp=over.pop("tp", 1), pp=1, device="cuda",
                                          sequence_parallel=over.pop("sp", False)),
                  optim=OptimConfig(recompute=over.pop("recompute", "none"), micro_batch_size=2, **over),
                  cluster=ClusterConfig(nodes=1, gpus_per_node=2))


def test_activation_formula_by_hand_and_recompute_ordering():
    arch = QWEN3_SIZES["tiny"]  # h 64, 2 layers, 4 heads x 32, 2 KV heads, ffn 128
    cfg = _tiny_cfg(dtype="float32")
    cfg.rollout.max_new_tokens, cfg.rollout.prompts_per_step, cfg.schedule.lambda0 = 64, 1, 0.0
    h, q, kv, f, L, B = 64, 128, 64, 128, 2, 4
    T = 2 * (100 + 64)  # micro_batch_size rows of prompt + response
    plan = plan_memory(cfg, prompt_tokens=100, fused_attention=True, dp=1)
    per_layer = T * B * (4 * h + (q + kv) + (q + 2 * kv) + q + 4 * f)
    want = L * per_layer + T * 2 * h * B  # + the final norm on the last stage
    assert plan.train.components["activations (update)"] == pytest.approx(want)
    assert plan.train.components["LM head logits (update)"] == 2 * 64 * padded_vocab(arch.vocab_size, 1) * 2 * B

    def act(fused=False, **over):
        c = _tiny_cfg(**over)
        c.rollout.max_new_tokens, c.schedule.lambda0 = 4096, 0.0
        return plan_memory(c, fused_attention=fused, dp=1).train.components["activations (update)"]

    # unfused attention at 4k tokens: the [heads, s, s] scores dominate; selective drops them,
    # full keeps layer inputs but recomputes one whole layer (scores included) at a time
    none, sel, full = act(), act(recompute="selective"), act(recompute="full")
    assert none > full > sel and none > 10 * sel, (none, sel, full)
    # fused attention keeps no scores: selective changes almost nothing, full is what helps
    none, sel, full = act(True), act(True, recompute="selective"), act(True, recompute="full")
    assert none == sel > full, (none, sel, full)
    assert act(tp=2, sp=True, recompute="full") < act(tp=2, recompute="full")


def test_cli_prints_the_table_and_json_and_exits_1_when_over():
    cmd = [sys.executable, "-m", "megatron_trace.cli", "plan", "--config", "configs/qwen3_8b_trace_fkl.yaml", "--json"]
    env = {k: v for k, v in os.environ.items() if k != MEMORY_SAVER}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    for needle in ("megatron-trace plan: configs/qwen3_8b_trace_fkl.yaml", "tp=2 pp=1 dp=8", "actor weights",
                   "optimizer (adam, distributed /8)", "teacher logits", "rollout engine KV cache", "peak",
                   "engine CUDA graphs (est.)", "engine graph input buffers", "engine activations (est.)",
                   "engine custom all-reduce", "CUDA contexts (est.)", "NCCL buffers (est.)",
                   f"{MEMORY_SAVER}: not set to 1 in this environment", "stage 0, TP rank 0, engine owner",
                   "stage 0, TP rank 1", "are estimates", "GPU 80 GB", "fits"):
        assert needle in out.stdout, needle
    assert "runtime overhead" not in out.stdout
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert data["fits"] and data["train"]["peak_gb"] <= 80 and data["layout"]["tp"] == 2
    assert set(data["gpus_peak_gb"]["rollout"]) == {"stage 0, TP rank 0, engine owner", "stage 0, TP rank 1"}
    released = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120, env={**env, MEMORY_SAVER: "1"})
    assert f"{MEMORY_SAVER}: =1 in this environment" in released.stdout
    assert json.loads(released.stdout.strip().splitlines()[-1])["train"]["peak_gb"] < data["train"]["peak_gb"]
    over = subprocess.run(cmd[:-1] + ["parallel.tp=1", "optim.recompute=none"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert over.returncode == 1 and "DOES NOT FIT" in over.stdout and "optim.recompute" in over.stdout


# SGLang 0.5.6 / NCCL figures, written out here (not read from megatron_trace.plan) so that a change
# there shows up as a failure: see megatron_trace/plan/engine.py and runtime.py for the sources
MIB = 2**20
CTX = 0.5 * GB  # one process's CUDA context (estimate)
NCCL_COMM = 16 * 2 * (4 * MIB + 120 * 640 * 8 * 8 + 8 * 512 * 8 * 16)  # channels x ring peers x (Simple+LL128+LL)
CUSTOM_AR = 3 * 8 * MIB  # custom_all_reduce.py: meta + IPC buffer + rank_data, max_size 8 MiB each
GRAPHS, BUFFERS, ENGINE_ACT = "engine CUDA graphs (est.)", "engine graph input buffers", "engine activations (est.)"
CONTEXTS, NCCL, AR = "CUDA contexts (est.)", "NCCL buffers (est.)", "engine custom all-reduce"


def _plan_8b(*overrides):
    return plan_memory(load_config(os.path.join(REPO, "configs", "qwen3_8b_trace_fkl.yaml"), list(overrides)))


def test_engine_lines_follow_sglang_source_figures(monkeypatch):
    """Qwen3-8B (h 4096, 32 x 128 query heads, 8 KV heads, ffn 12288, V 151936, 40960 positions),
    engine TP 2 on an 80 GB GPU: SGLang's defaults there are chunked_prefill_size 8192 and
    cuda_graph_max_bs 256 (server_args.py, GPUs of 60-160 GiB at tp < 4)."""
    monkeypatch.delenv(MEMORY_SAVER, raising=False)
    plan = _plan_8b()
    ro, tr = plan.rollout.components, plan.train.components
    h, q, kv, f, V, ctx, t, B = 4096, 32 * 128, 8 * 128, 12288, 151936, 40960, 2, 2
    max_bs, chunk, requests = 256, 8192, 64 * 8 // 8  # prompts_per_step x n / one engine per DP replica
    graphs = 2 * MIB * max_bs  # server_args.py: SGLang reserves 2 MiB per unit of cuda_graph_max_bs
    buffers = max_bs * (V * 4 + h * B) + max_bs * ctx * 4 + ctx * 8  # fp32 logits + embeds; FA3 page table
    activations = chunk * B * (2 * h + max(3 * f, 2 * q + 2 * kv) / t) + 3 * requests * V * 4  # prefill chunk + sampler
    assert ro[GRAPHS] == tr[GRAPHS] == graphs
    assert ro[BUFFERS] == tr[BUFFERS] == buffers
    assert ro[ENGINE_ACT] == pytest.approx(activations) and ENGINE_ACT not in tr  # emptied when it sleeps
    assert ro[AR] == tr[AR] == CUSTOM_AR
    # the owner's GPU: the trainer and its scheduler (no IPC context: SGLang's SPMD weight path);
    # NCCL: the trainer's default, TP and DP groups and SGLang's two TP communicators
    assert plan.rollout.gpu == plan.train.gpu == "TP rank 0, engine owner"
    assert ro[CONTEXTS] == tr[CONTEXTS] == 2 * CTX
    assert ro[NCCL] == tr[NCCL] == 5 * NCCL_COMM
    assert "runtime overhead" not in ro and "runtime overhead" not in tr
    # the pool: mem_fraction_static of what is free when the engine starts (the trainer without
    # Adam's moments, two contexts, SGLang's pynccl communicator and custom all-reduce)
    trainer = sum(v for k, v in ro.items() if k.startswith(("actor", "gradients", "snapshot")))
    opt = next(v for k, v in ro.items() if k.startswith("optimizer"))
    at_start = trainer + opt * 4 / 12 + 2 * CTX + NCCL_COMM + CUSTOM_AR
    weights = QWEN3_SIZES["8b"].num_params * B / t
    assert ro["rollout engine weights"] == weights
    assert ro["rollout engine KV cache"] == pytest.approx(0.5 * (80 * GB - at_start) - weights)
    assert plan.kv_cache_tokens == int(ro["rollout engine KV cache"] // (2 * 36 * kv // t * B))
    table = plan.table()
    for name in (GRAPHS, BUFFERS, ENGINE_ACT, AR, CONTEXTS, NCCL):
        assert name in table, name


@pytest.mark.parametrize("gb,tp,chunk,max_bs", [(80, 2, 8192, 256), (80, 4, 8192, 512), (141, 8, 8192, 512),
                                                 (40, 2, 4096, 32), (24, 4, 2048, 80), (192, 2, 16384, 512)])
def test_sglang_defaults_follow_gpu_memory_and_tp(gb, tp, chunk, max_bs):
    cfg = load_config(os.path.join(REPO, "configs", "qwen3_14b_grpo.yaml"),
                      [f"cluster.gpu_memory_gb={gb}", f"parallel.tp={tp}"])
    a = plan_memory(cfg).assumptions
    assert (a["sglang_chunked_prefill_size"], a["sglang_cuda_graph_max_bs"]) == (chunk, max_bs)


def test_every_gpu_of_a_replica_holds_the_engine_and_the_owner_most():
    """Engine TP ranks 1..tp-1 run on the GPUs of trainer TP ranks 1..tp-1: each holds the engine's
    shard next to the trainer, as much as the owner's GPU (the SPMD weight path opens no context on
    another GPU)."""
    plan = plan_memory(load_config(os.path.join(REPO, "configs", "qwen3_14b_trace_fkl.yaml")))  # tp 4
    owner, others = "stage 0, TP rank 0, engine owner", "stage 0, TP ranks 1..3"
    for phase in ("rollout", "train"):
        assert set(plan.gpus[phase]) == {owner, others}
        assert plan.gpus[phase][owner] == pytest.approx(plan.gpus[phase][others])
    assert plan.rollout.peak == plan.gpus["rollout"][owner] and plan.train.peak == plan.gpus["train"][owner]
    ro = plan.rollout.components
    trainer = sum(v for k, v in ro.items() if k.startswith(("actor", "gradients", "optim", "snapshot")))
    engine = sum(v for k, v in ro.items() if "engine" in k)
    assert engine > ro["rollout engine weights"] + ro["rollout engine KV cache"] > 10 * GB
    # the other TP ranks: the same engine lines, two contexts (trainer and their own scheduler)
    assert plan.gpus["rollout"][others] == pytest.approx(trainer + engine + 2 * CTX + ro[NCCL])
    notes = plan.table()
    assert "GPUs of a replica" in notes and others in notes
    # pp = 2: stage 1 holds no engine; the plan names where each phase peaks
    plan = plan_memory(load_config(os.path.join(REPO, "configs", "qwen3_32b_trace_fkl.yaml")))  # tp 8, pp 2
    assert set(plan.gpus["rollout"]) == {"stage 0, TP rank 0, engine owner", "stage 0, TP ranks 1..7", "stage 1"}
    assert plan.gpus["rollout"]["stage 1"] < plan.gpus["rollout"]["stage 0, TP ranks 1..7"]
    assert plan.rollout.components[CONTEXTS] == 2 * CTX  # trainer and scheduler, on every stage-0 GPU
    # rank0 placement: one engine (TP 1) on global rank 0, no custom all-reduce; the others none
    plan = _plan_8b("rollout.placement=rank0")
    assert plan.rollout.gpu == "global rank 0, engine owner" and AR not in plan.rollout.components
    assert plan.rollout.components[CONTEXTS] == 2 * CTX
    assert plan.gpus["rollout"]["stage 0, other GPUs"] < plan.rollout.peak - plan.rollout.components[GRAPHS]


def test_cuda_graph_line_follows_sglang_memory_saver_env(monkeypatch):
    """Only with SGLANG_MEMORY_SAVER_CUDA_GRAPH=1 does the sleeping engine release its graphs."""
    monkeypatch.delenv(MEMORY_SAVER, raising=False)
    kept = _plan_8b()
    assert kept.train.components[GRAPHS] == 2 * MIB * 256
    assert f"{MEMORY_SAVER}: not set to 1" in kept.table()
    for value in ("1", "true"):
        monkeypatch.setenv(MEMORY_SAVER, value)
        released = _plan_8b()
        assert GRAPHS not in released.train.components and released.rollout.components[GRAPHS] == 2 * MIB * 256
        assert released.train.peak == pytest.approx(kept.train.peak - 2 * MIB * 256)
        assert released.rollout.peak == kept.rollout.peak
        assert f"{MEMORY_SAVER}: =1 in this environment" in released.table()
        assert released.assumptions["sglang_memory_saver_cuda_graph"] is True
    monkeypatch.setenv(MEMORY_SAVER, "0")
    assert _plan_8b().train.components[GRAPHS] == 2 * MIB * 256


def _megatron_bytes(tp, pp, cases):
    """Bytes of the real tensors: parameters, DDP grad buffers, optimizer state after one step."""
    from megatron_trace.models.builder import build_model
    from megatron_trace.parallel import initialize
    from megatron_trace.train.setup import OptimSettings, build_optimizer, wrap_ddp

    groups = initialize(tp=tp, pp=pp)
    out = []
    for arch, dtype, optimizer in cases:
        ddp = wrap_ddp(build_model(arch, groups, params_dtype=dtype), groups)
        opt = build_optimizer(ddp, groups, OptimSettings(optimizer=optimizer, lr=1e-3))
        for p in ddp.parameters():
            p.main_grad.fill_(1e-3)
        opt.step()  # Adam's moments are made at the first step
        params = {id(p): p for p in ddp.parameters()}
        state = 0
        for o in getattr(opt, "chained_optimizers", [opt]):
            for g in o.optimizer.param_groups:
                for p in g["params"]:
                    if id(p) not in params:  # fp32 master copies
                        state += p.numel() * p.element_size()
                    st = o.optimizer.state.get(p, {})
                    state += sum(st[k].numel() * st[k].element_size()
                                 for k in ("exp_avg", "exp_avg_sq", "momentum_buffer") if st.get(k) is not None)
        out.append({"stage": groups.pp_rank, "weights": sum(p.numel() * p.element_size() for p in params.values()),
                    "grads": sum(b.grad_data.numel() * b.grad_data.element_size() for b in ddp.buffers),
                    "optimizer": state})
    return out


@pytest.mark.dist
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)], ids=["tp1", "tp2", "pp2"])
def test_static_bytes_equal_megatron_tensors(tp, pp):
    archs = [QWEN3_SIZES["tiny"], dataclasses.replace(QWEN3_SIZES["tiny"], tie_word_embeddings=False, head_dim=16)]
    cases = [(a, dt, o) for a in archs for dt in (torch.float32, torch.bfloat16) for o in ("adam", "sgd")]
    measured = run_on_ranks(_megatron_bytes, tp * pp, tp, pp, cases)
    for rank_result in measured:
        for (arch, dtype, optimizer), got in zip(cases, rank_result):
            cfg = Config(model=ModelConfig(size="tiny", dtype="bfloat16" if dtype == torch.bfloat16 else "float32"),
                         parallel=ParallelConfig(tp=tp, pp=pp), optim=OptimConfig(optimizer=optimizer),
                         cluster=ClusterConfig(nodes=1, gpus_per_node=tp * pp))
            want = static_bytes(cfg, arch, dp=1, te_spec=False)[got["stage"]]
            case = (arch.tie_word_embeddings, dtype, optimizer, got["stage"])
            assert {k: got[k] for k in want} == want, case
            assert want["weights"] / GB < 0.01


def _fkl_8b(*overrides):
    return load_config(os.path.join(REPO, "configs", "qwen3_8b_trace_fkl.yaml"), list(overrides))


def test_fused_lm_head_replaces_the_logits_by_hidden_states_and_chunk_buffers(monkeypatch):
    """loss.fused_head: the teacher keeps [positions, h] hidden states, the update one chunk's fp32
    temporaries and the response hidden states with their gradient; no [T, V/tp] logits. Figures
    written out for Qwen3-8B at tp 2 (h 4096, V 151936 padded to 152576, 76288 per rank, bf16)."""
    monkeypatch.delenv(MEMORY_SAVER, raising=False)
    cfg_off, cfg_on = _fkl_8b(), _fkl_8b("loss.fused_head=true")
    assert cfg_off.loss.fused_head is False
    off, on = plan_memory(cfg_off), plan_memory(cfg_on)
    h, Vr, B = 4096, 76288, 2
    assert padded_vocab(QWEN3_SIZES["8b"].vocab_size, 2) == 2 * Vr
    rows, resp = cfg_off.optim.micro_batch_size, cfg_off.rollout.max_new_tokens
    assert off.assumptions["micro_batch_tokens"] == rows * (1024 + resp)
    T_resp = rows * resp  # response positions of a micro-batch: 16384
    positions = cfg_off.teacher.max_resident_tokens  # 16384: under this rank's mini-batch, over a micro-batch
    assert 2 * (resp * 0.25 + cfg_off.teacher.probe_tokens) < positions
    chunk = 2**27 // (6 * 4 * Vr)  # six fp32 [c, V/tp] buffers in a 128 MiB target: 73 tokens
    unfused_head = positions * Vr * B + T_resp * Vr * 2 * B
    fused_head = positions * h * B + 6 * 4 * min(chunk, T_resp) * Vr + T_resp * h * B * 2 + Vr * h * B
    tr_off, tr_on = off.train.components, on.train.components
    assert tr_off["teacher logits (one update chunk)"] == positions * Vr * B
    assert tr_off["LM head logits (update)"] == T_resp * Vr * 2 * B
    assert tr_on["teacher hidden states (one update chunk)"] == positions * h * B
    assert tr_on["fused LM head chunk buffers"] == 6 * 4 * chunk * Vr
    assert tr_on["LM head hidden states + grad (update)"] == T_resp * h * B * 2
    assert tr_on["fused LM head d(weight) (forward to backward)"] == Vr * h * B
    assert not any("logits" in k for k in tr_on)
    assert not any(k.startswith(("fused LM head", "teacher hidden", "LM head hidden")) for k in tr_off)
    # every other line, and the whole rollout phase, is the same both ways
    def same(d):
        return {k: v for k, v in d.items() if "logits" not in k and "hidden" not in k and "fused" not in k}

    assert same(tr_on) == same(tr_off) and on.rollout.components == off.rollout.components
    assert on.train.notes["train peak"] == off.train.notes["train peak"] == "the update pass"
    assert on.train.peak < off.train.peak
    assert off.train.peak - on.train.peak == pytest.approx(unfused_head - fused_head)
    # both plans carry both train peaks, whatever the flag
    for plan, flag in ((off, False), (on, True)):
        assert plan.lm_head == {"fused_head": flag, "fused_train_peak_gb": pytest.approx(on.train.peak / GB),
                                "unfused_train_peak_gb": pytest.approx(off.train.peak / GB)}
        assert plan.to_dict()["lm_head"]["fused_head"] is flag
    assert "the flag is off" in off.table() and "the flag is on" in on.table()
    # an explicit chunk: min(chunk, T_resp) tokens of temporaries
    explicit = plan_memory(_fkl_8b("loss.fused_head=true", "loss.head_chunk_tokens=1024")).train.components
    assert explicit["fused LM head chunk buffers"] == 6 * 4 * 1024 * Vr
    huge = plan_memory(_fkl_8b("loss.fused_head=true", "loss.head_chunk_tokens=100000")).train.components
    assert huge["fused LM head chunk buffers"] == 6 * 4 * T_resp * Vr


def test_cli_prints_the_train_peak_with_and_without_the_fused_head():
    env = {k: v for k, v in os.environ.items() if k != MEMORY_SAVER}
    fused = plan_memory(_fkl_8b("loss.fused_head=true")).train.peak / GB
    unfused = plan_memory(_fkl_8b()).train.peak / GB
    want = f"LM head: fused (loss.fused_head=true) {fused:.1f} GB train peak / unfused {unfused:.1f} GB"
    for flag in ("false", "true"):
        cmd = [sys.executable, "-m", "megatron_trace.cli", "plan", "--config", "configs/qwen3_8b_trace_fkl.yaml",
               "--json", f"loss.fused_head={flag}"]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        assert want in out.stdout and f"the flag is {'on' if flag == 'true' else 'off'}" in out.stdout, out.stdout
        data = json.loads(out.stdout.strip().splitlines()[-1])
        assert data["lm_head"] == {"fused_head": flag == "true", "fused_train_peak_gb": round(fused, 2),
                                   "unfused_train_peak_gb": round(unfused, 2)}
        assert data["train"]["peak_gb"] == round(fused if flag == "true" else unfused, 2)
        assert data["train"]["notes"]["LM head"] in out.stdout
