"""Run checkpoints hold the whole optimizer: fp32 master weights, Adam moments and the step go
through dist_checkpointing, so a resume continues bit for bit and a dp=2 checkpoint resumes at
dp=1. Covered for Megatron's standard optimizer (fp32 params, and bf16 params with fp32 masters)
and for its distributed optimizer (state sharded over DP), with a snapshot teacher alongside.

Each case: 2 ranks (dp=2) train 2 Adam steps, save, record the full optimizer state, train 2
more. A fresh run (new model, DDP, optimizer, teacher) on the same ranks loads the checkpoint:
state equal, and the next 2 steps equal the uninterrupted ones bit for bit. One new process
(dp=1) loads it too: state equal, and the steps run. (tests/e2e/test_cli.py resumes a killed
`megatron-trace train` in a new process.)
"""

import types

import pytest
import torch

from megatron_trace.parallel import run_on_ranks

STEPS = 4  # the checkpoint is written after step 2
KINDS = {  # name: (params dtype, distributed optimizer)
    "adam_fp32": (torch.float32, False),
    "adam_bf16": (torch.bfloat16, False),
    "dist_adam_fp32": (torch.float32, True),
    "dist_adam_bf16": (torch.bfloat16, True),
}


def _full_state(ddp, optimizer) -> dict:
    """{param name: {model, param (fp32 master), exp_avg, exp_avg_sq}}, whole tensors on every rank."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    names = {p: n for n, p in ddp.module.named_parameters()}
    out = {n: {"model": p.detach().clone()} for p, n in names.items()}
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer):  # gathers the DP shards on every rank
            world = opt.get_parameter_state_dp_zero(use_gloo_comm=False, return_on_all_ranks=True)
            for i, buffer in enumerate(opt.buffers):
                (tensors,) = world[i].values()
                for p, (start, end, _) in buffer.param_index_map.items():
                    out[names[p]].update({k: tensors[k][start:end].view(p.shape).clone()
                                          for k in ("param", "exp_avg", "exp_avg_sq")})
            continue
        for group in opt.optimizer.param_groups:
            for main in group["params"]:
                model_param = next(p for p in names if p is main or getattr(p, "main_param", None) is main)
                st = opt.optimizer.state[main]
                out[names[model_param]].update(param=main.detach().float().clone(), exp_avg=st["exp_avg"].clone(),
                                               exp_avg_sq=st["exp_avg_sq"].clone())
    return out


def _build(hf_dir, batches, run_dir, kind, groups):
    """A fresh run (model, DDP, optimizer, snapshot teacher) as checkpoints see it, and its train step."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_trace.models.checkpoint import load_hf
    from megatron_trace.parallel.schedule import run_schedule
    from megatron_trace.train.setup import OptimSettings, build_optimizer, wrap_ddp
    from megatron_trace.train.teacher import SnapshotTeacher

    dtype, distributed = KINDS[kind]
    model = load_hf(hf_dir, groups, params_dtype=dtype)
    ddp = wrap_ddp(model, groups, use_distributed_optimizer=distributed)
    optimizer = build_optimizer(ddp, groups, OptimSettings(optimizer="adam", lr=1e-2, clip_grad=1.0,
                                                           use_distributed_optimizer=distributed))
    teacher = SnapshotTeacher(model.arch, groups, params_dtype=dtype, use_te=None, sync_every=2)
    cfg = types.SimpleNamespace(run=types.SimpleNamespace(dir=run_dir), checkpoint=types.SimpleNamespace(keep_last=2),
                                optim=types.SimpleNamespace(optimizer="adam", distributed_optimizer=distributed))
    run = types.SimpleNamespace(cfg=cfg, groups=groups, arch=model.arch, ddp=ddp, optimizer=optimizer, teacher=teacher)
    num_tokens = batches[0].numel() - batches[0].shape[0]

    def forward_step(data_iter, m):
        x = next(data_iter).to(groups.device)  # (tools/gpu_smoke.sh runs this on CUDA)
        logits = m(x[:, :-1], torch.arange(x.shape[1] - 1, device=x.device).expand(x.shape[0], -1), None)

        def loss_func(logits_bsv):  # DP ranks sum their grads: normalise by the global count
            nll = vocab_parallel_cross_entropy(logits_bsv.float().clone(), x[:, 1:].contiguous())
            return nll.sum() / num_tokens, {}

        return logits, loss_func

    def train_step(step):
        mine = batches[step].chunk(groups.dp_size)[groups.dp_rank]
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        run_schedule(groups, ddp, forward_step, iter([mine]), num_microbatches=1, seq_length=mine.shape[1] - 1,
                     micro_batch_size=mine.shape[0])
        ok, grad_norm, _ = optimizer.step()
        assert ok and grad_norm > 0

    return run, train_step


def _teacher(run) -> dict:
    return {k: v.clone() for k, v in run.teacher.module.state_dict().items() if "extra_state" not in k}


def _rank(hf_dir, batches, run_dir, kind, save, tp=1):
    """save: train 2 steps, checkpoint, train 2 more. Then (always) a fresh run loads the
    checkpoint and trains the same 2 steps."""
    import torch.distributed as dist

    from megatron_trace.parallel import initialize
    from megatron_trace.train.checkpoint import find_latest, load_run_checkpoint, save_run_checkpoint

    groups = initialize(tp=tp, pp=1)
    out = {}
    if save:
        run, train_step = _build(hf_dir, batches, run_dir, kind, groups)
        run.teacher.refresh(run.ddp, 0)
        for step in range(2):
            train_step(step)
        save_run_checkpoint(run, 2, {"cursor": 0})
        out.update(saved=_full_state(run.ddp, run.optimizer), teacher=_teacher(run))
        for step in range(2, STEPS):
            train_step(step)
        out["final"] = _full_state(run.ddp, run.optimizer)
    run, train_step = _build(hf_dir, batches, run_dir, kind, groups)
    load_run_checkpoint(run, find_latest(run_dir))
    out.update(loaded=_full_state(run.ddp, run.optimizer), loaded_teacher=_teacher(run),
               teacher_version=run.teacher.version)
    for step in range(2, STEPS):
        train_step(step)
    out["resumed"] = _full_state(run.ddp, run.optimizer)
    out["tp_dims"] = {n: p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
                      for n, p in run.ddp.module.named_parameters()}
    return out if dist.get_rank() == 0 or tp > 1 else None


def _diff(a: dict, b: dict) -> list[str]:
    """The (param, field) pairs where two `_full_state`s differ."""
    assert set(a) == set(b)
    return [f"{n}.{k}" for n in a for k in a[n] if not torch.equal(a[n][k], b[n][k])]


@pytest.fixture(scope="module", params=sorted(KINDS))
def saved(request, hf_dirs, tmp_path_factory):
    """dp=2: the uninterrupted run, and a fresh run resumed from its checkpoint."""
    kind = request.param
    run_dir = str(tmp_path_factory.mktemp(kind))
    batches = torch.randint(0, 1000, (STEPS, 4, 10), generator=torch.Generator().manual_seed(5))
    out = run_on_ranks(_rank, 2, hf_dirs["tied"], batches, run_dir, kind, True)[0]
    return kind, run_dir, batches, out


def _check_loaded(got, ref):
    assert _diff(ref["saved"], ref["final"]), "training after the save must change the state"
    assert not _diff(got["loaded"], ref["saved"])  # model weights, fp32 masters and moments, bit for bit
    assert set(got["loaded"]["decoder.final_layernorm.weight"]) == {"model", "param", "exp_avg", "exp_avg_sq"}
    assert got["teacher_version"] == 0
    assert all(torch.equal(got["loaded_teacher"][k], ref["teacher"][k]) for k in ref["teacher"])


@pytest.mark.dist
def test_resume_continues_bit_identically(saved):
    _, _, _, ref = saved
    _check_loaded(ref, ref)
    assert not _diff(ref["resumed"], ref["final"])  # the continued steps are the uninterrupted ones


@pytest.mark.dist
def test_dp2_checkpoint_resumes_at_dp1(saved, hf_dirs):
    kind, run_dir, batches, ref = saved
    got = run_on_ranks(_rank, 1, hf_dirs["tied"], batches, run_dir, kind, False)[0]
    _check_loaded(got, ref)
    # dp=1 sums the gradient in another order: the steps run, and stay close to dp=2's in fp32
    assert set(_diff(got["resumed"], got["loaded"])) == set(_diff(ref["final"], ref["saved"]))
    for name, fields in ref["final"].items():
        if fields["model"].dtype == torch.float32:
            torch.testing.assert_close(got["resumed"][name]["param"], fields["param"], rtol=1e-3, atol=1e-4)


def _unshard(name: str, parts: list, dim: int | None) -> torch.Tensor:
    """The whole tensor from its TP shards (each rank holds [gate; up] of the SwiGLU fc1)."""
    if dim is None:
        return parts[0]
    if name.endswith("mlp.linear_fc1.weight"):
        halves = [p.chunk(2, dim) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim)
    return torch.cat(parts, dim)


@pytest.mark.dist
def test_tp2_checkpoint_resumes_at_tp1(hf_dirs, tmp_path):
    """The standard optimizer's state is keyed like the model's: it reshards across TP too."""
    batches = torch.randint(0, 1000, (STEPS, 4, 10), generator=torch.Generator().manual_seed(5))
    ref = run_on_ranks(_rank, 2, hf_dirs["tied"], batches, str(tmp_path), "adam_fp32", True, 2)
    assert not _diff(ref[0]["resumed"], ref[0]["final"])
    got = run_on_ranks(_rank, 1, hf_dirs["tied"], batches, str(tmp_path), "adam_fp32", False, 1)[0]
    for name, fields in got["loaded"].items():
        for key, t in fields.items():
            assert torch.equal(t, _unshard(name, [r["saved"][name][key] for r in ref], ref[0]["tp_dims"][name])), \
                (name, key)


def test_resume_refuses_what_cannot_reshard(tmp_path):
    from megatron_trace.train.checkpoint import _check_resumable

    (tmp_path / "optimizer").mkdir()
    saved = {"tp": 2, "pp": 1, "dp": 2, "optimizer": "adam", "distributed_optimizer": True}
    _check_resumable(str(tmp_path), saved, {**saved, "dp": 1})  # DP reshards
    with pytest.raises(ValueError, match=r"tp=2, pp=1, dp=2.*tp=1, pp=1.*reshards across DP only.*parallel.tp"):
        _check_resumable(str(tmp_path), saved, {**saved, "tp": 1})
    with pytest.raises(ValueError, match="optim.distributed_optimizer=False: set optim.optimizer"):
        _check_resumable(str(tmp_path), saved, {**saved, "distributed_optimizer": False})
    _check_resumable(str(tmp_path), {**saved, "distributed_optimizer": False},
                     {**saved, "tp": 1, "pp": 2, "distributed_optimizer": False})  # anything reshards
    (tmp_path / "optimizer").rmdir()
    with pytest.raises(ValueError, match="older megatron-trace.*model.ckpt=.*/model"):
        _check_resumable(str(tmp_path), saved, saved)
