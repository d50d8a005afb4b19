"""Training data with reference solutions: tools/prepare_data.py on a local OpenThoughts-114k
metadata fixture (nothing is downloaded), the refusal of teacher-using variants on data without
solutions unless data.answer_only_teacher is set, and the in-loop eval on the validation split."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

from megatron_trace.config import ConfigError, check_teacher_data, load_config
from megatron_trace.data.prepare import DROP_REASONS, prepare_openthoughts
from megatron_trace.loss.routed import ROUTE_VARIANTS

FIXTURE = os.path.join(REPO, "tests", "fixtures", "openthoughts_metadata")
JSONL = os.path.join(FIXTURE, "part-00000.jsonl")
TINY = os.path.join(REPO, "configs", "tiny_cpu.yaml")


def _meta(problem, solution, domain="math", source="synthetic_math"):
    return {"problem": problem, "deepseek_reasoning": "...", "deepseek_solution": "...",
            "ground_truth_solution": solution, "domain": domain, "source": source, "test_cases": None,
            "starter_code": None}


# The parquet part of the folder fixture: 4 usable rows, a puzzle, an empty solution and a
# problem that is already in the JSONL part (a duplicate across files).
PARQUET_ROWS = [
    _meta("What is $6 \\div 3$?", "$6 \\div 3 = \\boxed{2}$."),
    _meta("What is $2^{10}$?", "$2^{10} = \\boxed{1024}$."),
    _meta("Which set holds the roots of $x^2 = 1$?", "They are $\\pm 1$: $\\boxed{\\{-1, 1\\}}$."),
    _meta("Give $0.25$ as a fraction.", "$0.25 = \\boxed{\\frac{1}{4}}$."),
    _meta("A knight and a knave...", "The first is a knight: \\boxed{A}.", domain="puzzle", source="riddles"),
    _meta("What is $3+3$?", ""),
    _meta("What is $7 \\times 8$?", "Again $\\boxed{56}$."),
]
# What the fixture is designed to give (see tests/fixtures/openthoughts_metadata/README.md).
JSONL_COUNTS = {"rows": 20, "kept": 11, "corrupt": 2, "not_math": 2, "no_solution": 1, "no_boxed_answer": 2,
                "duplicate": 1, "unverified": 1}
FOLDER_COUNTS = {"rows": 27, "kept": 15, "corrupt": 2, "not_math": 3, "no_solution": 2, "no_boxed_answer": 2,
                 "duplicate": 2, "unverified": 1}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The fixture's JSONL part and a parquet part in one folder (plus a file that is not read)."""
    import datasets

    d = tmp_path_factory.mktemp("openthoughts")
    shutil.copy(JSONL, d / "part-00000.jsonl")
    datasets.Dataset.from_list(PARQUET_ROWS).to_parquet(str(d / "part-00001.parquet"))
    (d / "notes.txt").write_text("neither .jsonl nor .parquet: not read")
    return str(d)


@pytest.fixture(scope="module")
def prepared(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    _prepare(folder, out, max_train=100)
    return str(out)


def _prepare(source, out, **kw):
    kw.setdefault("num_val", 3)
    return prepare_openthoughts(source, str(out), progress=False, workers=2, **kw)


def _read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _problems(out, split):
    return [r["problem"] for r in _read(os.path.join(out, f"{split}.jsonl"))]


def _check_counts(report, want):
    d = report.to_dict()
    assert d["rows"] == want["rows"] and d["dropped"] == {r: want[r] for r in DROP_REASONS}
    assert d["train"] + d["val"] + d["unused"] == want["kept"]
    assert d["rows"] == want["kept"] + sum(d["dropped"].values())


def _dry_run(*overrides):
    exe = shutil.which("megatron-trace", path=os.path.dirname(sys.executable))
    return subprocess.run([exe, "train", "--config", TINY, "--dry-run", *overrides], capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def test_counts_per_reason_and_corrupt_rows_named(tmp_path, capsys):
    report = _prepare(JSONL, tmp_path, max_train=100)
    _check_counts(report, JSONL_COUNTS)
    assert (report.num_train, report.num_val, report.num_unused) == (8, 3, 0)
    err = capsys.readouterr().err
    assert f"{JSONL} line 7: corrupt row skipped (unreadable JSON" in err
    assert f"{JSONL} line 13: corrupt row skipped (field 'problem' is int" in err
    rows = {r["problem"]: r for r in _read(tmp_path / "train.jsonl") + _read(tmp_path / "val.jsonl")}
    assert all(set(r) == {"problem", "solution", "answer", "source"} for r in rows.values())
    assert rows["Find $x$ if $3x = 12$."]["answer"] == "4"  # the last \boxed, not the earlier \fbox
    assert rows["Compute $\\frac{1}{4}+\\frac{1}{4}$."]["answer"] == "\\frac{1}{2}"  # nested braces
    assert rows["Expand $(x+1)^2$."]["answer"] == "x^{2}+2x+1"
    assert rows["What is $9-4$?"]["source"] == ""  # a null source
    assert rows["What is $2+3$?"]["solution"].startswith("Adding")  # the first of two duplicates


def test_folder_of_jsonl_and_parquet_parts(folder, prepared):
    report = _prepare(folder, os.path.join(prepared, "again"), max_train=100)
    _check_counts(report, FOLDER_COUNTS)
    kept = set(_problems(prepared, "train")) | set(_problems(prepared, "val"))
    assert {"What is $2^{10}$?", "Give $0.25$ as a fraction.", "What is $2+3$?"} <= kept and len(kept) == 15
    # the JSONL part is read first (sorted names), so its copy of the duplicate is the one kept
    rows = {r["problem"]: r for split in ("train", "val") for r in _read(os.path.join(prepared, f"{split}.jsonl"))}
    assert rows["What is $7 \\times 8$?"]["solution"] == "$7 \\times 8 = \\boxed{56}$."


def test_seed_makes_splits_deterministic_and_disjoint(folder, prepared, tmp_path):
    _prepare(folder, tmp_path / "same", max_train=100)
    _prepare(folder, tmp_path / "other", max_train=100, seed=1)
    for split in ("train", "val"):
        assert open(tmp_path / "same" / f"{split}.jsonl").read() == open(os.path.join(prepared, f"{split}.jsonl")).read()
    assert _problems(tmp_path / "other", "train") != _problems(prepared, "train")
    for out in (prepared, tmp_path / "other"):
        train, val = _problems(out, "train"), _problems(out, "val")
        assert len(val) == 3 and len(train) == 12 and not set(train) & set(val)
        assert len(set(train)) == len(train)


def test_max_train_caps_and_the_rest_is_counted(folder, prepared, tmp_path):
    report = _prepare(folder, tmp_path, max_train=4)
    assert (report.num_train, report.num_val, report.num_unused) == (4, 3, 8)
    # same seed: the same validation split, and the capped train split is a prefix of the full one
    assert _problems(tmp_path, "val") == _problems(prepared, "val")
    assert _problems(tmp_path, "train") == _problems(prepared, "train")[:4]


def test_bad_sources_and_sizes(folder, tmp_path):
    with pytest.raises(ValueError, match="only 15 usable rows"):
        _prepare(folder, tmp_path / "o", num_val=15)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _prepare(str(tmp_path / "missing.jsonl"), tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .jsonl or .parquet files"):
        _prepare(str(tmp_path / "empty"), tmp_path / "o")
    with pytest.raises(ValueError, match="--max-train"):
        _prepare(folder, tmp_path / "o", max_train=0)


def test_cli_prints_one_json_line(tmp_path):
    tool = os.path.join(REPO, "tools", "prepare_data.py")
    proc = subprocess.run([sys.executable, tool, "--source", JSONL, "--out", str(tmp_path), "--val", "2",
                           "--max-train", "5", "--seed", "3", "--workers", "1"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    res = json.loads(lines[0])
    assert (res["train"], res["val"], res["unused"], res["rows"]) == (5, 2, 4, 20)
    assert res["dropped"] == {r: JSONL_COUNTS[r] for r in DROP_REASONS}
    assert "part-00000.jsonl line 7" in proc.stderr and "part-00000.jsonl line 13" in proc.stderr
    assert len(_read(tmp_path / "train.jsonl")) == 5 and len(_read(tmp_path / "val.jsonl")) == 2
    bad = subprocess.run([sys.executable, tool, "--source", str(tmp_path / "nope.parquet"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert bad.returncode == 2 and "nope.parquet does not exist" in bad.stderr and not bad.stdout


def test_prepared_files_pass_train_dry_run(prepared):
    from megatron_trace.data import load_problems

    train, val = os.path.join(prepared, "train.jsonl"), os.path.join(prepared, "val.jsonl")
    ok = _dry_run(f"data.source={train}", "loss.variant=trace_fkl", f"eval.in_loop_source={val}")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert f"source: {train}" in ok.stdout and f"in_loop_source: {val}" in ok.stdout
    assert _dry_run(f"data.source={val}", "loss.variant=trace_rkl").returncode == 0
    rows, report = load_problems(train)  # as the trainer reads it
    assert report.num_skipped == 0 and len(rows) == 12 and all(r["solution"] and r["answer"] for r in rows)


@pytest.fixture
def answer_only(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps({"problem": f"What is {i}+{i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(80)))
    return str(path)


def _check(source, *overrides):
    check_teacher_data(load_config(TINY, [f"data.source={source}", *overrides]))


@pytest.mark.parametrize("variant", sorted(set(ROUTE_VARIANTS) - {"grpo"}))
def test_teacher_variants_refuse_answer_only_data(answer_only, variant):
    with pytest.raises(ConfigError) as err:
        _check(answer_only, f"loss.variant={variant}")
    msg = str(err.value)
    for needle in ("data.answer_only_teacher", answer_only, f"loss.variant={variant}", "tools/prepare_data.py"):
        assert needle in msg, (needle, msg)


def test_opt_in_grpo_and_lambda0_zero_pass(answer_only, tmp_path):
    _check(answer_only, "loss.variant=trace_fkl", "data.answer_only_teacher=true")
    _check(answer_only, "loss.variant=grpo")
    _check(answer_only, "loss.variant=trace_fkl", "schedule.lambda0=0")
    _check(answer_only, "loss.variant=trace_fkl", "train.mode=train_only", f"train.records_dir={tmp_path}")
    # what is not refused: the synthetic task, a hub name (not readable offline), a path that is
    # not there yet (training fails on it when it opens the data), a solution in the first rows
    _check("arith", "loss.variant=trace_fkl")
    _check("open-thoughts/OpenThoughts-114k", "loss.variant=trace_fkl")
    _check(str(tmp_path / "later" / "train.jsonl"), "loss.variant=trace_fkl")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"problem": "1+1", "answer": "2"}) + "\n"
                     + json.dumps({"problem": "2+2", "answer": "4", "solution": "2+2=4"}) + "\n")
    _check(str(mixed), "loss.variant=trace_fkl")


def test_contexts_without_a_solution_train_on_answer_only_data(answer_only):
    """teacher.context type_only / answer_and_type need no solutions: accepted with no refusal
    (the dry-run too); the solution contexts are still refused on such data."""
    for ctx in ("type_only", "answer_and_type"):
        _check(answer_only, "loss.variant=trace_fkl", f"teacher.context={ctx}")
    with pytest.raises(ConfigError) as err:
        _check(answer_only, "loss.variant=trace_rkl", "teacher.context=solution")
    assert "teacher.context=solution" in str(err.value) and "type_only" in str(err.value)
    proc = _dry_run(f"data.source={answer_only}", "teacher.context=type_only")
    assert proc.returncode == 0 and "context: type_only" in proc.stdout, proc.stderr[-2000:]


def test_parquet_without_solutions_is_refused(tmp_path):
    import datasets

    path = str(tmp_path / "a.parquet")
    datasets.Dataset.from_list([{"problem": "1+1", "answer": "2"}]).to_parquet(path)
    with pytest.raises(ConfigError, match="data.answer_only_teacher"):
        _check(path, "loss.variant=trace_fkl")
    datasets.Dataset.from_list([{"problem": "1+1", "answer": "2", "solution": "1+1=2"}]).to_parquet(path)
    _check(path, "loss.variant=trace_fkl")


def test_cli_dry_run_refuses_answer_only_data(answer_only):
    proc = _dry_run(f"data.source={answer_only}", "loss.variant=trace_fkl")
    assert proc.returncode == 2 and "data.answer_only_teacher" in proc.stderr and not proc.stdout
    assert _dry_run(f"data.source={answer_only}", "loss.variant=trace_fkl",
                    "data.answer_only_teacher=true").returncode == 0


def test_in_loop_eval_reads_the_val_split(prepared, monkeypatch):
    from megatron_trace.eval.harness import _load, settings_from_config

    val = os.path.join(prepared, "val.jsonl")
    cfg = load_config(TINY, [f"eval.in_loop_source={val}", "eval.benchmarks=[math500]", "eval.limit=2"])
    s = settings_from_config(cfg, in_loop=True)
    assert s.benchmarks == ["val"] and s.sources == {"val": val}
    kind, rows = _load("val", s)
    assert kind == "math" and [r["problem"] for r in rows] == _problems(prepared, "val")[:2]
    final = settings_from_config(cfg)  # `megatron-trace eval` keeps the benchmarks
    assert final.benchmarks == ["math500"] and final.sources == {}
    assert "sources" not in final.fingerprint()  # older eval state.json files stay valid
    plain = load_config(TINY, ["eval.benchmarks=[math500]"])
    assert settings_from_config(plain, in_loop=True).benchmarks == ["math500"]
    # `megatron-trace eval benchmarks=[val]` evaluates the split as the loop did (same name, seeds)
    again = settings_from_config(load_config(TINY, [f"eval.in_loop_source={val}", "eval.benchmarks=[val]",
                                                    "eval.limit=2"]))
    assert again.fingerprint() == s.fingerprint() and again.benchmarks == ["val"]
    with pytest.raises(ConfigError, match="eval.benchmarks"):
        load_config(TINY, ["eval.benchmarks=[val]"])  # no split to evaluate


def test_recipes_point_at_the_prepared_data(prepared, tmp_path, monkeypatch):
    recipe = os.path.join(REPO, "configs", "qwen3_0p6b_trace_fkl.yaml")
    os.makedirs(tmp_path / "openthoughts_math")
    for split in ("train", "val"):
        shutil.copy(os.path.join(prepared, f"{split}.jsonl"), tmp_path / "openthoughts_math" / f"{split}.jsonl")
    monkeypatch.setenv("MT_DATA", str(tmp_path))
    cfg = load_config(recipe)
    assert cfg.data.source == str(tmp_path / "openthoughts_math" / "train.jsonl")
    assert cfg.eval.in_loop_source == str(tmp_path / "openthoughts_math" / "val.jsonl")
    assert "math500" in cfg.eval.benchmarks and not cfg.data.answer_only_teacher
    check_teacher_data(cfg)
    monkeypatch.setenv("MT_DATA", str(tmp_path / "not_made_yet"))
    check_teacher_data(load_config(recipe))  # recipes dry-run before their data exists


def test_launchers_refuse_answer_only_data_before_submitting(answer_only):
    """launch/*.py resolve the config as `train` does: the refusal comes before any job exists."""
    proc = subprocess.run([sys.executable, os.path.join("launch", "local.py"), "--config", "configs/tiny_cpu.yaml",
                           "--dry-run", f"data.source={answer_only}"], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert proc.returncode != 0 and "data.answer_only_teacher" in proc.stderr, proc.stderr[-2000:]
