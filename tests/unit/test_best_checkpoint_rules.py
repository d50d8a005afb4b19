"""checkpoint.keep_best, without a run: which eval becomes the best (strictly greater, first of
ties, never NaN), what pruning keeps, and the atomic `best` symlink and best.json, repaired on
restart after a crash between them (tests/distributed/test_best_checkpoint.py runs it for real)."""

import json
import os
from types import SimpleNamespace

from megatron_trace.train.checkpoint import (
    _best_names,
    best_metric,
    mark_best,
    new_best,
    read_best,
    restore_best,
    to_prune,
)


def test_best_metric_default_follows_the_in_loop_source():
    def cfg(metric, source):
        return SimpleNamespace(checkpoint=SimpleNamespace(best_metric=metric), eval=SimpleNamespace(in_loop_source=source))

    assert best_metric(cfg(None, None)) == "eval/average"
    assert best_metric(cfg(None, "val.jsonl")) == "eval/val/avg@k"
    assert best_metric(cfg("eval/aime24/avg@k", "val.jsonl")) == "eval/aime24/avg@k"


def test_new_best_is_strictly_greater_first_of_ties_and_never_nan():
    m = "eval/average"
    b = new_best(None, m, 0.2, 1)
    assert b == {"step": 1, "checkpoint": "step_000001", "metric": m, "value": 0.2,
                 "history": [{"step": 1, "value": 0.2}]}
    for v in (0.2, 0.1, float("nan"), float("inf"), None):  # a tie, worse, non-finite, missing
        assert new_best(b, m, v, 2) is None, v
    assert new_best(None, m, float("nan"), 1) is None
    b3 = new_best(b, m, 0.5, 3)
    assert (b3["step"], b3["checkpoint"], b3["value"]) == (3, "step_000003", 0.5)
    assert b3["history"] == [{"step": 1, "value": 0.2}, {"step": 3, "value": 0.5}]
    # a best recorded for another metric does not count: the first finite value replaces it
    other = new_best(b3, "eval/val/avg@k", 0.0, 4)
    assert other["value"] == 0.0 and other["history"] == [{"step": 4, "value": 0.0}]


def test_prune_keeps_the_last_k_and_the_best():
    names = ["step_000004", "step_000002", "step_000006.tmp", "latest", "best", "best.json", "step_000006",
             "step_000001"]
    assert to_prune(names, 1) == ["step_000001", "step_000002", "step_000004"]
    assert to_prune(names, 1, keep={"step_000002"}) == ["step_000001", "step_000004"]
    assert to_prune(names, 3, keep={"step_000006"}) == ["step_000001"]
    assert to_prune(names, 5) == []


def test_mark_best_is_a_relative_link_and_json_and_restart_repairs_the_link(tmp_path):
    root = tmp_path / "checkpoints"
    for s in (2, 4):
        (root / f"step_{s:06d}").mkdir(parents=True)
    assert read_best(str(tmp_path)) is None and restore_best(str(tmp_path)) is None and _best_names(str(root)) == set()
    first = new_best(None, "eval/average", 0.3, 2)
    mark_best(str(root), first)
    assert os.readlink(root / "best") == "step_000002" and (root / "best").resolve() == root / "step_000002"
    assert json.loads((root / "best.json").read_text()) == first == read_best(str(tmp_path))
    (root / "best.tmp").symlink_to("step_000004")  # a crash's leftover
    second = new_best(first, "eval/average", 0.4, 4)
    mark_best(str(root), second)
    assert os.readlink(root / "best") == "step_000004" and not os.path.lexists(root / "best.tmp")
    assert sorted(os.listdir(root)) == ["best", "best.json", "step_000002", "step_000004"]
    # a crash after best.json, before the link: both are kept from pruning, and a restart re-points the link
    os.remove(root / "best")
    (root / "best").symlink_to("step_000002")
    assert _best_names(str(root)) == {"step_000002", "step_000004"}
    assert restore_best(str(tmp_path)) == second and os.readlink(root / "best") == "step_000004"
