"""tools/bench_async.py runs end to end at a toy size and reports what it promises (a smoke test
of the benchmark; its figures are in docs/performance.md, measured at the default workload)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.dist


def test_bench_async_prints_its_keys_and_draws_the_timeline(tmp_path):
    png = tmp_path / "timeline.png"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "bench_async.py"), "--json", "--steps", "3",
                           "--prompts", "2", "--n", "2", "--max-new-tokens", "8", "--size", "tiny",
                           "--timeline", str(png)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for k in ("step_s_sync", "step_s_async", "ratio_step_time_sync_vs_async", "trainer_idle_frac_sync",
              "trainer_idle_frac_async"):
        assert res[k] > 0, k
    assert res["ratio_step_time_sync_vs_async"] == pytest.approx(res["step_s_sync"] / res["step_s_async"])
    assert 0 < res["trainer_idle_frac_sync"] < 1 and res["dropped"] == 0 and res["age_mean_async"] == 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
