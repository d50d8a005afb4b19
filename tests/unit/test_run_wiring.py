"""Run setup wiring that needs no process group: data sources with the math verifier pool and a
real tokenizer, annotator selection, the W&B sink (a recording stand-in for the wandb module;
the real service cannot be reached here), and config rules checked at load time."""

import json
import os
import sys
import types

import pytest
from conftest import REPO

from megatron_trace.config import ConfigError, load_config


def test_jsonl_source_uses_real_tokenizer_and_math_verify(tmp_path):
    from megatron_trace.tasks.tokenizer import build_char_tokenizer
    from megatron_trace.train.setup_run import _load_data

    tok_dir = tmp_path / "tok"
    build_char_tokenizer().save_pretrained(str(tok_dir))
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"problem": f"What is {i}+{i}?", "answer": str(2 * i)}) for i in range(5)))
    cfg = load_config(None, [f"data.source={data}", "reward.workers=1", "data.max_problems=4"])
    tokenizer, problems, verify, closers = _load_data(cfg, str(tok_dir))
    try:
        assert len(problems) == 4 and {p["answer"] for p in problems} <= {"0", "2", "4", "6", "8"}
        assert tokenizer("ab", add_special_tokens=False)["input_ids"] == build_char_tokenizer()("ab")["input_ids"]
        got = verify([("so \\boxed{4}", "4"), ("so \\boxed{5}", "4"), ("no answer here", "4")])
        assert got == ["correct", "wrong", "no_answer"]
    finally:
        for fn in closers:
            fn()
    with pytest.raises(ValueError, match="needs a real tokenizer"):
        _load_data(cfg, None)


def test_annotator_selection(tmp_path):
    from megatron_trace.annotate.api import ApiAnnotator
    from megatron_trace.annotate.self_annotator import SelfAnnotator
    from megatron_trace.tasks.oracle import OracleAnnotator
    from megatron_trace.train.setup_run import _build_annotator

    assert isinstance(_build_annotator(load_config(None, ["annotate.kind=oracle"]), None, None), OracleAnnotator)
    api = _build_annotator(load_config(None, ["annotate.kind=api", f"run.dir={tmp_path}"]), None, None)
    assert isinstance(api, ApiAnnotator) and api.config.cache_dir == str(tmp_path / "annotator_cache")
    assert isinstance(_build_annotator(load_config(None, ["annotate.kind=self"]), object(), None), SelfAnnotator)
    with pytest.raises(ValueError, match="oracle only knows the synthetic task"):
        _build_annotator(load_config(None, ["annotate.kind=oracle", "data.source=x.jsonl"]), None, None)


class _RecordingWandb(types.ModuleType):
    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kw):
        self.inits.append(kw)
        outer = self

        class _Run:
            def log(self, data, step):
                outer.logged.append((step, data))

            def finish(self):
                outer.finished += 1

        return _Run()


def test_wandb_sink_logs_scalars_and_resumes_the_same_run(tmp_path, monkeypatch):
    from megatron_trace.train.setup_run import Run, _open_run_dir

    fake = _RecordingWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = load_config(None, [f"run.dir={tmp_path}", "log.wandb=true", "log.tensorboard=false",
                             "log.wandb_project=proj"])
    ids = []
    for _ in range(2):  # a rerun into the same directory continues the same W&B run
        run = types.SimpleNamespace(cfg=cfg, _closers=[], metrics_path=None, _tb=None, _wandb=None)
        _open_run_dir(run)
        Run.log(run, 3, {"reward/mean": 0.5, "note": "text"})
        for fn in run._closers:
            fn()
        ids.append(fake.inits[-1]["id"])
    assert ids[0] == ids[1] and fake.inits[0]["project"] == "proj" and fake.inits[0]["resume"] == "allow"
    assert fake.logged[0] == (3, {"reward/mean": 0.5}) and fake.finished == 2
    assert json.loads(open(tmp_path / "metrics.jsonl").readline())["reward/mean"] == 0.5
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    run = types.SimpleNamespace(cfg=cfg, _closers=[], metrics_path=None, _tb=None, _wandb=None)
    with pytest.raises(ValueError, match="'log.wandb'.*pip install wandb"):
        _open_run_dir(run)


@pytest.mark.parametrize("overrides, needle", [
    (["optim.distributed_optimizer=true", "optim.optimizer=sgd"], "'optim.distributed_optimizer'.*Adam only"),
    (["rollout.engine=sglang"], "needs model.hf_dir"),
    (["parallel.device=cuda", "parallel.tp=3", "cluster.nodes=1", "cluster.gpus_per_node=8"], "must divide"),
])
def test_cross_field_rules(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, overrides)


def test_config_includes_merge_in_order_and_refuse_cycles(tmp_path):
    (tmp_path / "a.yaml").write_text("rollout:\n  n: 4\n  top_k: 5\n")
    (tmp_path / "b.yaml").write_text("include: [a.yaml]\nrollout:\n  n: 6\n")
    (tmp_path / "c.yaml").write_text("include: [b.yaml]\nrollout:\n  top_p: 0.5\n")
    c = load_config(str(tmp_path / "c.yaml"), ["rollout.top_k=7"])
    assert (c.rollout.n, c.rollout.top_k, c.rollout.top_p) == (6, 7, 0.5)
    (tmp_path / "a.yaml").write_text("include: [c.yaml]\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_config(str(tmp_path / "c.yaml"))
    (tmp_path / "d.yaml").write_text("include: [missing.yaml]\n")
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        load_config(str(tmp_path / "d.yaml"))


def test_loss_temperature_is_the_rollout_temperature_unless_set():
    from megatron_trace.loss import LossConfig
    from megatron_trace.train.setup_run import loss_kwargs

    sampled = load_config(None, ["rollout.temperature=0.7"])
    assert LossConfig(**loss_kwargs(sampled)).temperature == 0.7
    explicit = load_config(None, ["rollout.temperature=0.7", "loss.temperature=1.0"])
    assert LossConfig(**loss_kwargs(explicit)).temperature == 1.0
    assert LossConfig(**loss_kwargs(load_config(None, ["loss.entry_clip_mode=grad"]))).entry_clip_mode == "grad"
    with pytest.raises(ConfigError, match="loss.entry_clip_mode"):
        load_config(None, ["loss.entry_clip_mode=lower"])
    with pytest.raises(ConfigError, match="loss.temperature"):
        load_config(None, ["loss.temperature=0"])


def test_schedule_kind_reaches_the_run_schedule():
    """The all-token baselines' recipes distil for the whole run; TRACE's anneal to 0 by step 40."""
    from megatron_trace.train.setup_run import kl_schedule

    const = kl_schedule(load_config(os.path.join(REPO, "configs", "qwen3_8b_all_token_fkl.yaml")))
    assert const.kind == "constant" and const.active_forever and [const.lam(k) for k in (0, 40, 199)] == [0.5] * 3
    trace = kl_schedule(load_config(os.path.join(REPO, "configs", "qwen3_8b_trace_fkl.yaml")))
    assert trace.kind == "anneal" and trace.last_active_step == 39 and trace.lam(40) == 0.0
    assert kl_schedule(load_config(None, ["schedule.kind=constant", "schedule.lambda0=0.2"])).lam(10_000) == 0.2
