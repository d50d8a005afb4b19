"""Loss primitives without tensor parallelism against the dense float64 reference.

The TP=2 and TP=3 versions of the same cases run in tests/distributed/test_vocab_parallel_tp.py.
"""

import math

import pytest
import torch
import vp_cases

from megatron_trace.loss import token_divergence, token_logprob_and_entropy


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_all_cases_tp1(dtype):
    results = vp_cases.run_cases(tp_group=None, tp_rank=0, tp_size=1, dtype=dtype)
    vp_cases.check_results(results, dtype)


def test_inputs_are_not_mutated_and_bf16_accumulates_in_fp32():
    torch.manual_seed(0)
    x = torch.randn(6, 50, dtype=torch.float32, requires_grad=True)
    t = torch.randn(6, 50)
    x0, t0 = x.detach().clone(), t.clone()
    lp, ent = token_logprob_and_entropy(x, torch.arange(6))
    d = token_divergence(x, t, "forward", entry_clip=0.05)
    (lp.sum() + d.sum()).backward()
    assert torch.equal(x.detach(), x0) and torch.equal(t, t0)
    xb = x.detach().bfloat16().requires_grad_()
    lpb, _ = token_logprob_and_entropy(xb, torch.arange(6))
    assert lpb.dtype == torch.float32
    ref, _ = token_logprob_and_entropy(xb.detach().float(), torch.arange(6))
    assert torch.allclose(lpb, ref, atol=1e-6)  # same bf16 values, fp32 math
    lpb.sum().backward()
    assert xb.grad.dtype == torch.bfloat16


def test_chunk_size_does_not_change_results():
    torch.manual_seed(1)
    x = torch.randn(37, 64, dtype=torch.float64)
    t = torch.randn(37, 64, dtype=torch.float64)
    y = torch.randint(0, 64, (37,))
    outs = []
    for chunk in (1, 5, 37, None):
        xs = x.clone().requires_grad_()
        lp, _ = token_logprob_and_entropy(xs, y, chunk_size=chunk)
        d = token_divergence(xs, t, "reverse", chunk_size=chunk, entry_clip=0.05)
        (lp.sum() + d.sum()).backward()
        outs.append((lp.detach(), d.detach(), xs.grad))
    for o in outs[1:]:
        assert all(torch.allclose(a, b, rtol=0, atol=1e-13) for a, b in zip(o, outs[0]))


def test_argument_errors_name_the_problem():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="kind"):
        token_divergence(x, x, "sideways")
    with pytest.raises(ValueError, match="targets"):
        token_logprob_and_entropy(x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        token_logprob_and_entropy(x, torch.zeros(3, dtype=torch.long), temperature=0)
    with pytest.raises(ValueError, match="entry_clip"):
        token_divergence(x, x, "forward", entry_clip=-1.0)


@pytest.mark.parametrize("mode, key_rises", [("none", True), ("upper", False), ("abs", False), ("grad", True)])
def test_which_clip_modes_keep_the_forward_kl_lift(mode, key_rises):
    """The issue's case at Qwen3's vocabulary: a key token at p_student = 0.05, p_teacher = 0.6,
    the rest uniform. Unclipped, a descent step on FKL raises the key token (dD/dz_key = q - p =
    -0.55). `upper` and `abs` cut the key token's own term (1.145 > 0.05) and its gradient; what
    is left pushes it down. `grad` keeps the direction and only bounds the size (-0.05)."""
    V, key = 151936, 7

    def logits(p_key):
        z = torch.zeros(1, V, dtype=torch.float64)
        z[0, key] = math.log(p_key * (V - 1) / (1 - p_key))  # softmax gives p_key there
        return z

    student = logits(0.05).requires_grad_()
    d = token_divergence(student, logits(0.6), "forward", entry_clip=0.05, clip_mode=mode)
    (g,) = torch.autograd.grad(d.sum(), student)
    if mode in ("none", "grad"):
        assert d.item() == pytest.approx(1.145, abs=2e-3)
    assert (g[0, key].item() < 0) == key_rises, g[0, key].item()
    if mode == "grad":
        assert g[0, key].item() == pytest.approx(-0.05) and g.abs().max().item() <= 0.05 + 1e-12
    if mode == "none":
        assert g[0, key].item() == pytest.approx(-0.55, abs=1e-9)
