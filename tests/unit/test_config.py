"""Typed config: every YAML in configs/ loads; bad keys, types and ranges fail early and precisely."""

import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

from megatron_trace.config import Config, ConfigError, dump_config, load_config

CONFIGS = sorted(os.path.join(REPO, "configs", f) for f in os.listdir(os.path.join(REPO, "configs"))
                 if f.endswith((".yaml", ".yml")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config) and cfg.train.steps >= 1
    again = load_config(path, [f"seed={cfg.seed + 1}"])
    assert again.seed == cfg.seed + 1


def test_defaults_follow_the_paper():
    c = load_config()
    assert (c.loss.variant, c.loss.eps_low, c.loss.eps_high, c.loss.entry_clip) == ("trace_fkl", 0.2, 0.28, 0.05)
    assert (c.schedule.lambda0, c.schedule.warmup_steps, c.schedule.decay_steps) == (0.5, 10, 30)
    assert c.annotate.coverage_cap == 0.25 and c.teacher.sync_every == 10 and not c.train.dynamic_sampling
    assert c.schedule.kind == "anneal" and c.teacher.mode == "snapshot" and c.data.thinking
    # the tiny configs keep what they ran with: the live teacher, no thinking switch
    for name in ("tiny_cpu.yaml", "tiny_cpu_demo.yaml", "tiny_cpu_sft.yaml"):
        tiny = load_config(os.path.join(REPO, "configs", name))
        assert (tiny.teacher.mode, tiny.data.thinking, tiny.schedule.kind) == ("live", False, "anneal"), name


@pytest.mark.parametrize("override, needles", [
    ("rollout.temprature=0.5", ["unknown config key 'rollout.temprature'", "did you mean 'rollout.temperature'"]),
    ("rollout.n=abc", ["'rollout.n'", "'abc'", "not a valid int"]),
    ("rollout.n=1", ["'rollout.n'", "value 1", "integer >= 2"]),
    ("loss.variant=magic", ["'loss.variant'", "'magic'", "trace_fkl"]),
    ("optim.lr=-1", ["'optim.lr'", "-1.0", "> 0"]),
    ("annotate.coverage_cap=1.5", ["'annotate.coverage_cap'", "1.5", "(0, 1]"]),
    ("eval.benchmarks=[math5000]", ["'eval.benchmarks[0]'", "math5000", "math500"]),
    ("loss.entry_clip=big", ["'loss.entry_clip'", "'big'", "float | None"]),
    ("schedule.decay=step", ["'schedule.decay'", "'step'", "cosine"]),
    ("schedule.kind=forever", ["'schedule.kind'", "'forever'", "anneal", "constant"]),
    ("train.mode=train_only", ["'train.records_dir'", "None", "train.mode=train_only"]),
    ("train.mode=replay", ["'train.mode'", "'replay'", "rollout_only"]),
    ("train.key_token_lift=-1", ["'train.key_token_lift'", "-1", ">= 0"]),
    ("optim.lr_decay=step", ["'optim.lr_decay'", "'step'", "cosine"]),
    ("sft.privileged_frac=2", ["'sft.privileged_frac'", "2.0", "[0, 1]"]),
    ("teacher.probe_tokens=-2", ["'teacher.probe_tokens'", "-2", ">= 0"]),
    ("rollout.hf_batch_prompts=0", ["'rollout.hf_batch_prompts'", "value 0", "auto or an integer >= 1"]),
    ("rollout.hf_batch_prompts=most", ["'rollout.hf_batch_prompts'", "'most'", "auto"]),
    ("rollout.hf_max_batch_tokens=0", ["'rollout.hf_max_batch_tokens'", "value 0", "integer >= 1"]),
    ("teacher.context=everything", ["'teacher.context'", "'everything'", "type_only", "solution_and_type"]),
    ("loss.mask_coverage=0.25", ["'loss.mask_coverage'", "0.25", "random_mask and inverted_mask"]),
    ("loss.mask_coverage=most", ["'loss.mask_coverage'", "'most'", "matched or a fraction in (0, 1]"]),
])
def test_bad_values_name_key_value_and_allowed(override, needles):
    with pytest.raises(ConfigError) as err:
        load_config(os.path.join(REPO, "configs", "tiny_cpu.yaml"), [override])
    for n in needles:
        assert n in str(err.value), (n, str(err.value))


def test_cross_field_rules_and_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="exclusive"):
        load_config(None, ["model.hf_dir=/a", "model.ckpt=/b"])
    c = load_config(None, ["loss.agg=seq-mean-token-sum-norm", "rollout.max_new_tokens=77"])
    assert c.loss.max_response_len == 77
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    (tmp_path / "typo.yaml").write_text("trian:\n  steps: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        load_config(str(tmp_path / "typo.yaml"))


def test_teacher_context_and_the_new_variants():
    tiny = os.path.join(REPO, "configs", "tiny_cpu.yaml")
    assert (load_config(tiny).teacher.context, load_config(tiny).teacher.thinking) == ("solution_and_type", None)
    for variant in ("all_token_fkl", "opsd", "srpo_like"):  # no annotation: a type-only teacher sees nothing
        with pytest.raises(ConfigError) as err:
            load_config(tiny, [f"loss.variant={variant}", "teacher.context=type_only"])
        assert "'teacher.context'=type_only" in str(err.value) and variant in str(err.value)
    assert load_config(tiny, ["loss.variant=grpo", "schedule.lambda0=0", "teacher.context=type_only"])
    c = load_config(tiny, ["loss.variant=inverted_mask", "loss.mask_coverage=0.25", "loss.action=rkl"])
    assert c.loss.mask_coverage == 0.25
    with pytest.raises(ConfigError, match="srpo_like"):
        load_config(tiny, ["loss.variant=srpo_like", "loss.action=both"])


def test_keep_best_needs_the_in_loop_eval_and_a_metric_it_logs():
    tiny = os.path.join(REPO, "configs", "tiny_cpu.yaml")
    assert not load_config(tiny).checkpoint.keep_best  # the schema's default
    with pytest.raises(ConfigError) as err:
        load_config(tiny, ["checkpoint.keep_best=true", "eval.every=0"])
    assert "'checkpoint.keep_best'" in str(err.value) and "eval.every > 0" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(tiny, ["checkpoint.keep_best=true", "checkpoint.best_metric=eval/val/avg@k"])
    assert "'checkpoint.best_metric'" in str(err.value) and "eval/arith/avg@k" in str(err.value)
    ok = load_config(tiny, ["checkpoint.keep_best=true", "eval.in_loop_source=val.jsonl",
                            "checkpoint.best_metric=eval/val/avg@k"])
    assert ok.checkpoint.best_metric == "eval/val/avg@k"


def test_dump_round_trips(tmp_path):
    c = load_config(os.path.join(REPO, "configs", "tiny_cpu.yaml"), ["loss.variant=trace_rkl"])
    (tmp_path / "resolved.yaml").write_text(dump_config(c))
    assert load_config(str(tmp_path / "resolved.yaml")) == c


def test_cli_dry_run_prints_resolved_config_and_rejects_typos():
    exe = shutil.which("megatron-trace", path=os.path.dirname(sys.executable))
    ok = subprocess.run([exe, "train", "--config", os.path.join(REPO, "configs", "tiny_cpu.yaml"), "rollout.n=6",
                         "--dry-run"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "'n': 6" in ok.stdout and "variant: trace_fkl" in ok.stdout
    bad = subprocess.run([exe, "train", "--config", os.path.join(REPO, "configs", "tiny_cpu.yaml"), "optim.lr=0",
                          "--dry-run"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "'optim.lr'" in bad.stderr


def test_lr_schedule_shapes():
    from megatron_trace.train.setup import lr_at

    assert [lr_at(s, 10, 1.0, 0.0, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    lin = [lr_at(s, 6, 1.0, 0.2, 1, "linear") for s in range(6)]
    assert lin[0] == 1.0 and lin[1] == 1.0 and abs(lin[-1] - 0.2) < 1e-12 and lin == sorted(lin, reverse=True)
    cos = [lr_at(s, 5, 1.0, 0.0, 0, "cosine") for s in range(5)]
    assert cos[0] == 1.0 and abs(cos[2] - 0.5) < 1e-12 and abs(cos[-1]) < 1e-12
    with pytest.raises(ValueError, match="optim.lr_decay"):
        lr_at(5, 10, 1.0, 0.0, 0, "step")
