"""The fused LM head at TP=1 (tests/fused_cases.py): values and gradients equal the unfused path
(materialised logits + vocab_parallel.py) in float64 and float32, in one chunk and in many; tied
embeddings get both gradients; bad inputs are refused."""

import fused_cases
import pytest
import torch

from megatron_trace.loss.fused_head import auto_chunk_tokens, fused_head


@pytest.mark.parametrize("case", fused_cases.CASES, ids=[c[0] for c in fused_cases.CASES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk_tokens", [3, None])
def test_fused_equals_unfused(case, dtype, chunk_tokens):
    want = fused_cases.reference(case)
    got = fused_cases.run_fused(case, None, 0, 1, dtype, chunk_tokens)
    fused_cases.compare(got, want, dtype, (case[0], dtype, chunk_tokens))


def test_tied_embeddings_get_both_gradients():
    """The head weight is the embedding table: its gradient is the lookup's plus the head's."""
    from megatron_trace.loss import token_divergence, token_logprob_and_entropy

    g = torch.Generator().manual_seed(3)
    V, H, T = 37, 8, 9
    table0 = torch.randn(V, H, generator=g, dtype=torch.float64)
    mix = torch.randn(H, H, generator=g, dtype=torch.float64) * 0.5
    ids, targets = torch.randint(0, V, (T,), generator=g), torch.randint(0, V, (T,), generator=g)
    rows = torch.tensor([1, 4, 8])
    t_hidden = torch.randn(3, H, generator=g, dtype=torch.float64)

    def grads(fused: bool):
        table = table0.clone().requires_grad_()
        hidden = torch.tanh(table[ids] @ mix)
        if fused:
            out = fused_head(hidden, table, targets, kl_index=rows, teacher_hidden=t_hidden,
                             teacher_weight=table.detach(), kinds=("forward",), chunk_tokens=4)
            loss = out.logprob.sum() + 0.3 * out.fkl.sum()
        else:
            logits = hidden @ table.t()
            lp, _ = token_logprob_and_entropy(logits, targets)
            loss = lp.sum() + 0.3 * token_divergence(logits[rows], t_hidden @ table.detach().t(), "forward").sum()
        return torch.autograd.grad(loss, table)[0]

    fused, unfused = grads(True), grads(False)
    assert torch.allclose(fused, unfused, atol=1e-10, rtol=0)
    assert fused[ids].abs().sum() > 0  # the lookup's share arrived too


def test_auto_chunk_follows_the_memory_target():
    assert auto_chunk_tokens(151936) * 151936 * 4 * 6 <= 2**27 < (auto_chunk_tokens(151936) + 1) * 151936 * 4 * 6
    assert auto_chunk_tokens(151936 // 2) >= 2 * auto_chunk_tokens(151936)
    assert auto_chunk_tokens(10**12) == 1


@pytest.mark.parametrize("kwargs, needle", [
    ({"kl_index": torch.tensor([0, 1])}, "needs teacher_hidden"),
    ({"kl_index": torch.tensor([1, 0]), "teacher_hidden": torch.zeros(2, 4), "teacher_weight": torch.zeros(5, 4)},
     "ascending"),
    ({"kl_index": torch.tensor([0, 9]), "teacher_hidden": torch.zeros(2, 4), "teacher_weight": torch.zeros(5, 4)},
     r"lie in \[0, 3\)"),
    ({"kl_index": torch.tensor([0]), "teacher_hidden": torch.zeros(2, 4), "teacher_weight": torch.zeros(5, 4)},
     "teacher_hidden must be"),
    ({"kinds": ("forward", "sideways")}, "kinds"),
    ({"clip_mode": "soft"}, "clip_mode"),
    ({"entry_clip": -1.0}, "entry_clip"),
    ({"temperature": 0.0}, "temperature"),
])
def test_bad_inputs_are_refused(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        fused_head(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, dtype=torch.long), **kwargs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_underallocated_token_from_hidden_states(dtype):
    """`Head.underallocated` at TP=1 (TP=2/3: tests/distributed/test_fused_head_tp.py)."""
    fused_cases.check_underallocated(fused_cases.run_underallocated(None, 0, 1, dtype), dtype, dtype)
