"""The decisive-step task (`product_chain`): generator, splits, the oracle's decisive key span,
the task probe's measurements and the data.task config key."""

import re

import pytest

from megatron_trace.annotate import AnnotationRequest, segment_text
from megatron_trace.tasks import task_rows
from megatron_trace.tasks.arith import parse_steps, split_of, verify
from megatron_trace.tasks.oracle import OracleAnnotator
from megatron_trace.tasks.probe import first_error_place, probe_errors, result_positions
from megatron_trace.tasks.product_chain import generate

_PROBLEM = re.compile(r"^(\d+) \+(\d)-(\d) ([a-z])\*(\d)$")


def _replay(problem: str, num_ops: int) -> list[tuple[int, str, int, int]]:
    """The chain a problem text describes, worked independently of the generator."""
    start, up, down, label, m = _PROBLEM.match(problem).groups()
    at, value, out = "abcdefghijklmnopqrstuvwxyz".index(label), int(start), []
    for i in range(num_ops):
        op, b = ("*", int(m)) if i == at else (("+", int(up)) if i % 2 == 0 else ("-", int(down)))
        result = value * b if op == "*" else value + b if op == "+" else value - b
        out.append((value, op, b, result))
        value = result
    return out


@pytest.mark.parametrize("num_ops", [2, 8, 12])
def test_solutions_follow_the_problem_and_only_the_product_carries(num_ops):
    problems = generate(60, num_ops=num_ops, seed=4)
    for p in problems:
        steps = [s for _, s in parse_steps(p.solution) if s]
        assert [(s.a, s.op, s.b, s.result) for s in steps] == _replay(p.problem, num_ops)
        assert [s.op for s in steps].count("*") == 1
        # each line opens with its label and the operation it reads from the problem ("c*7 24*7=168")
        heads = [line.split(" ")[0] for line in p.solution.split("\n")[:-1]]
        assert heads == [f"{label}{s.op}{s.b}" for label, s in zip("abcdefghijklmnopqrstuvwxyz", steps)]
        for s in steps:
            if s.op != "*":  # an easy step changes the ones digit only, and stays non-negative
                assert s.a // 10 == s.result // 10 and s.result >= 0
        assert verify(p.solution, p.answer) and p.answer == str(steps[-1].result)
    # the product is spread over the positions, not stuck at one
    assert len({[s.op for s in p.steps].index("*") for p in problems}) >= num_ops // 2


def test_generator_is_seeded_and_splits_are_disjoint():
    a = generate(80, seed=2)
    assert [p.problem for p in a] == [p.problem for p in generate(80, seed=2)]
    held = generate(40, split="heldout", seed=2)
    assert not {p.problem for p in a} & {p.problem for p in held} and len({p.problem for p in a}) == 80
    assert all(split_of(p.problem) == "heldout" for p in held)
    assert task_rows("product_chain", 3, split="train", seed=2, num_ops=8) == [p.to_row() for p in a[:3]]
    with pytest.raises(ValueError, match="num_ops"):
        generate(1, num_ops=1)
    with pytest.raises(ValueError, match="data.task"):
        task_rows("chess", 1, split="train", seed=0, num_ops=8)


def _request(p, response, correct):
    return AnnotationRequest(p.problem, p.solution, correct, response, tuple(segment_text(response)))


def _span_text(req, ann):
    return "".join(req.response[s.start:s.end] for s in req.segments if s.id in ann.segment_ids)


def test_oracle_marks_the_product_line_only():
    for p in generate(10, seed=7):
        product = next(line for line in p.solution.split("\n") if "*" in line)
        req = _request(p, p.solution, True)
        (ranked,) = OracleAnnotator(0.25).annotate([req])
        (decisive,) = OracleAnnotator(0.25, decisive_only=True).annotate([req])
        assert decisive.diagnostic == "key_computation" and _span_text(req, decisive).strip() == product
        assert len(_span_text(req, ranked)) > len(_span_text(req, decisive))  # the ranked rule adds easy lines
        # an incorrect response that goes wrong at the product: its first error is that line
        wrong = p.solution.replace(product, product[:-1] + str((int(product[-1]) + 1) % 10))
        req = _request(p, wrong, False)
        (err,) = OracleAnnotator(0.25, decisive_only=True).annotate([req])
        assert err.diagnostic == "arithmetic_error" and product[:-1] in _span_text(req, err)


def test_probe_places_first_errors_and_result_digits():
    p = generate(1, seed=11, num_ops=8)[0]
    lines = p.solution.split("\n")
    k = next(i for i, line in enumerate(lines) if "*" in line)
    assert first_error_place(p.solution, p.solution) == "answer"
    bad_product = "\n".join(lines[:k] + [lines[k] + "0"] + lines[k + 1:-1] + ["Answer: -1"])
    assert first_error_place(bad_product, p.solution) == "decisive"
    assert first_error_place("\n".join(lines[:-2]), p.solution) == ("after" if k < 7 else "decisive")
    decisive, other = result_positions(p.solution)

    def read_and_computed(line):  # "c*7 24*7=168" -> offset and text of "7=168"
        head, comp = line.split(" ")
        cut = len(head) + 1 + re.match(r"\d+[+*-]", comp).end()
        return cut, line[cut:]

    cut, text = read_and_computed(lines[k])
    assert "".join(p.solution[i] for i in sorted(decisive)) == text
    assert min(decisive) == sum(len(x) + 1 for x in lines[:k]) + cut and not decisive & other
    assert len(other) == sum(len(read_and_computed(x)[1]) for i, x in enumerate(lines[:-1]) if i != k)
    rows = [p.to_row()] * 3
    res = probe_errors([p.solution, bad_product, "Answer: -1"], rows, verify)
    assert res["incorrect"] == 2 and res["first_error"]["decisive"] == 1
    assert res["share_at_decisive"] == 0.5


def test_data_task_key_is_checked():
    from megatron_trace.config import load_config

    cfg = load_config("configs/tiny_cpu.yaml", ["data.task=product_chain", "data.arith.num_ops=8"])
    assert cfg.data.task == "product_chain"
    with pytest.raises(ValueError, match="data.task"):
        load_config("configs/tiny_cpu.yaml", ["data.task=sudoku"])
    with pytest.raises(ValueError, match="data.task"):
        load_config("configs/tiny_cpu.yaml", ["data.task=product_chain", "data.source=x.jsonl"])
    with pytest.raises(ValueError, match="data.arith.num_ops"):
        load_config("configs/tiny_cpu.yaml", ["data.task=product_chain", "data.arith.num_ops=1"])


def test_demo_task_flag_picks_the_task_configs_and_refuses_a_mismatch(capsys):
    from megatron_trace.cli import DEMO_CONFIGS, main
    from megatron_trace.config import load_config

    for task, (rl, sft) in DEMO_CONFIGS.items():
        assert load_config(f"configs/{rl}").data.task == task and load_config(f"configs/{sft}").data.task == task
    with pytest.raises(SystemExit, match="data.task=arith, but --task is product_chain"):
        main(["demo", "--task", "product_chain", "--config", "configs/tiny_cpu_demo.yaml"])
