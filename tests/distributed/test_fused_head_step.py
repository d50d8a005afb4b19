"""A 3-step TRACE run with `loss.fused_head=true` equals the same run with `false` (fp32), at 1
process, TP=2 (sequence parallel) and PP=2, with padded and packed rows.

The runs exercise every pass that reads the LM head: the old-log-prob pass (2 mini-batches), the
snapshot teacher (refreshed every 2 steps, so at step 1 its weight differs from the actor's), the
update with FKL and RKL routes and the leakage probes, the teacher record, and the key-token
lift. The tiny model ties its embeddings, so the fused head's weight gradient must reach the
shared embedding (and, at PP=2, the last stage's copy of it).
"""

import math
import os
import sys

import pytest
import torch

from megatron_trace.parallel import run_on_ranks

sys.path.insert(0, os.path.dirname(__file__))

from test_loop import OVERRIDES, _comparable, _pseudo_verify  # noqa: E402
from test_loop_features import FirstSegmentAnnotator  # noqa: E402

EXTRA = ["optim.mini_batches=2", "teacher.mode=snapshot", "teacher.sync_every=2", "train.key_token_lift=2",
         "train.save_records=true"]
PACKED = ["optim.pack_sequences=true", "optim.max_tokens_per_micro_batch=48"]


def _rank(tp, pp, rundir, overrides):
    from megatron_trace.config import load_config
    from megatron_trace.models.convert import export_hf_stream
    from megatron_trace.train.loop import train
    from megatron_trace.train.setup_run import setup_run

    cfg = load_config("configs/tiny_cpu.yaml", [f"parallel.tp={tp}", f"parallel.pp={pp}", f"run.dir={rundir}",
                                                *OVERRIDES, *EXTRA, *overrides])
    run = setup_run(cfg)
    run.verify = _pseudo_verify
    run.annotator = FirstSegmentAnnotator()  # key spans on correct rollouts, error spans on the others
    history = train(run, steps=3)
    return history, {k: v.clone() for k, v in export_hf_stream(run.ddp, run.groups)}


CASES = {
    "single-padded": (1, 1, []),
    "single-packed": (1, 1, PACKED),
    "tp2-sp-packed": (2, 1, ["parallel.sequence_parallel=true", *PACKED]),
    "pp2-padded": (1, 2, []),
}


@pytest.mark.dist
@pytest.mark.parametrize("case", list(CASES))
def test_fused_head_run_equals_unfused(case, tmp_path):
    tp, pp, extra = CASES[case]
    runs = {}
    for fused in (False, True):
        out = run_on_ranks(_rank, tp * pp, tp, pp, str(tmp_path / f"fused{fused}"),
                           [*extra, f"loss.fused_head={str(fused).lower()}"])
        runs[fused] = out[0]  # rank 0 holds the logged metrics and the exported weights
    (ref_hist, ref_w), (hist, w) = runs[False], runs[True]
    assert ref_w.keys() == w.keys() and ref_w
    moved = 0
    for k, v in ref_w.items():
        scale = v.abs().max().item()
        assert (w[k] - v).abs().max().item() <= 1e-6 * max(scale, 1e-3), (case, k)
    assert len(hist) == len(ref_hist) == 3
    for step, (a, b) in enumerate(zip(hist, ref_hist)):
        a, b = _comparable(a), _comparable(b)
        assert set(a) == set(b)
        for k in b:
            # abs_tol: a KL near 0 is a difference of O(log V) fp32 terms, which the two paths sum in
            # different orders (the fused one from per-token sums): they agree to ~1e-7 absolute
            same = (math.isnan(a[k]) and math.isnan(b[k])) or math.isclose(a[k], b[k], rel_tol=1e-5, abs_tol=1e-6)
            assert same, (case, step, k, a[k], b[k])
        moved += b["optim/grad_norm"] > 0
    # the runs did what the comparison needs: KL on both routes, updates, the lift, the leakage probe
    assert moved == 3
    assert any(m["loss/kl"] != 0 for m in ref_hist) and any(m.get("route/rkl_frac", 0) > 0 for m in ref_hist)
    assert any(m.get("route/fkl_frac", 0) > 0 for m in ref_hist)
    assert any(not math.isnan(m.get("teacher/leakage_kl_offspan", math.nan)) for m in ref_hist)
    assert any(not math.isnan(m.get("lift/key_teacher", math.nan)) for m in ref_hist)
    assert any(m.get("lift/key_underallocated", math.nan) != m["lift/key_teacher"] for m in ref_hist
               if not math.isnan(m.get("lift/key_teacher", math.nan)))
    # the teacher's log-prob and entropy at each routed token (the stage records)
    recorded = 0
    for step in range(3):
        name = f"records/step_{step:06d}.pt"
        a, b = (torch.load(tmp_path / f"fused{f}" / name, weights_only=False)["teacher_outputs"] for f in (True, False))
        assert a.keys() == b.keys()
        for uid, v in b.items():
            for key in ("logprob", "entropy"):
                assert a[uid][key] == pytest.approx(v[key], rel=1e-5, abs=1e-6), (case, step, uid, key)
            recorded += 1
    assert recorded > 0
