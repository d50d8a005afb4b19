"""KL weight schedule: boundary convention, decay shapes, the exposure sums."""

import math

import pytest

from megatron_trace.loss import ExposureTracker, KLSchedule
from megatron_trace.loss.schedule import NEVER_ENDS


def test_default_boundaries_and_sum_of_squares():
    s = KLSchedule()
    assert [s.lam(k) for k in (0, 9, 10)] == [0.5, 0.5, 0.5]
    assert s.lam(11) == pytest.approx(0.5 * (1 - 1 / 30))
    assert s.lam(39) == pytest.approx(0.5 / 30) and s.lam(40) == 0.0 and s.lam(1000) == 0.0
    assert s.needs_teacher(39) and not s.needs_teacher(40) and s.last_active_step == 39
    assert sum(s.lam(k) ** 2 for k in range(100)) == pytest.approx(5.127, abs=1e-3)  # digest: ~5.13
    assert s.grpo_span_weight(0) == 0.0 and s.grpo_span_weight(25) == pytest.approx(0.5) and s.grpo_span_weight(40) == 1


def test_cosine_and_exponential():
    c = KLSchedule(decay="cosine")
    assert c.lam(10) == 0.5 and c.lam(25) == pytest.approx(0.25) and c.lam(40) == 0
    e = KLSchedule(decay="exponential", exp_final_ratio=0.01)
    assert e.lam(10) == 0.5 and e.lam(25) == pytest.approx(0.5 * 0.01**0.5) and e.lam(40) == 0
    assert all(e.lam(k) > e.lam(k + 1) for k in range(10, 39))


def test_grpo_baseline_never_needs_teacher():
    s = KLSchedule(lambda0=0.0)
    assert not any(s.needs_teacher(k) for k in range(50)) and s.grpo_span_weight(0) == 1.0
    assert s.last_active_step == -1


def test_constant_never_ends():
    s = KLSchedule(kind="constant")  # warm-up and decay (10, 30 by default) are not read
    assert [s.lam(k) for k in (0, 9, 10, 39, 40, 41, 10_000)] == [0.5] * 7
    assert all(s.needs_teacher(k) for k in (0, 39, 40, 199, 10_000))
    assert s.active_forever and s.last_active_step == NEVER_ENDS and 10**12 <= s.last_active_step
    assert s.grpo_span_weight(0) == 0.0 and s.grpo_span_weight(10_000) == 0.0  # an annealed span weight stays 0
    tr = ExposureTracker()
    cums = [tr.update(s.lam(k), 0.3)["exposure/lambda2_coverage_cum"] for k in range(200)]
    assert cums == pytest.approx([0.25 * 0.3 * (k + 1) for k in range(200)])  # linear in the step count
    assert tr.exposure_lin == pytest.approx(0.5 * 0.3 * 200)
    off = KLSchedule(lambda0=0.0, kind="constant")  # lambda0 = 0 is GRPO whatever the kind
    assert not off.active_forever and off.last_active_step == -1 and not off.needs_teacher(100)
    assert not KLSchedule().active_forever


@pytest.mark.parametrize("kw, key", [({"lambda0": -1}, "lambda0"), ({"decay": "step"}, "decay"),
                                     ({"warmup_steps": -2}, "warmup_steps"), ({"kind": "forever"}, "kind")])
def test_bad_values_name_the_key(kw, key):
    with pytest.raises(ValueError, match=key):
        KLSchedule(**kw)


def test_exposure_tracker():
    s, tr = KLSchedule(), ExposureTracker()
    for k in range(60):
        out = tr.update(s.lam(k), 0.25)
    assert out["exposure/lambda2_coverage_cum"] == pytest.approx(0.25 * 5.127, abs=1e-3)
    lin = sum(s.lam(k) for k in range(60)) * 0.25
    assert out["exposure/lambda_coverage_cum"] == pytest.approx(lin)
    tr2 = ExposureTracker()
    tr2.load_state_dict(tr.state_dict())
    assert tr2 == tr and math.isfinite(tr.exposure_sq)
