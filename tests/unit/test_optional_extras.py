"""The optional extras (data, tensorboard, plots, launch): with one missing, the feature that needs
it fails with a message naming the extra, or (TensorBoard logging, on by default) warns once and the
run goes on; everything in the core set keeps working. A missing package is simulated with
sys.modules[name] = None, which makes `import name` raise ImportError."""

import ast
import importlib.util
import json
import os
import sys
import warnings

import pytest
from conftest import REPO

from megatron_trace.extras import MissingExtra

OPTIONAL = ("datasets", "pyarrow", "pandas", "matplotlib", "tensorboard", "nemo_run", "leptonai", "wandb")


def _hide(monkeypatch, *names):
    """Make `import name` (and its submodules) fail for the rest of the test."""
    for name in names:
        for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            monkeypatch.delitem(sys.modules, mod)
        monkeypatch.setitem(sys.modules, name, None)


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", os.path.join(REPO, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _module_level_imports(tree):
    """Names imported outside any function body (module and class level, under if/try too)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module or ""
        stack.extend(ast.iter_child_nodes(node))


def test_no_optional_package_is_imported_at_module_level():
    """`import megatron_trace.<anything>` must work with the core set alone: optional packages are
    imported inside the functions that need them (through megatron_trace.extras.require)."""
    assert list(_module_level_imports(ast.parse("import datasets\ndef f():\n    import matplotlib"))) == ["datasets"]
    offenders = []
    for root, _, files in os.walk(os.path.join(REPO, "megatron_trace")):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                offenders += [f"{os.path.relpath(path, REPO)}: {n}" for n in _module_level_imports(ast.parse(open(path).read()))
                              if n.split(".")[0] in OPTIONAL]
    assert offenders == []

# ------------------------------------------------------------------------------------- data


def test_jsonl_loads_without_datasets(tmp_path, monkeypatch):
    from megatron_trace.data import load_benchmark, load_problems

    _hide(monkeypatch, "datasets", "pyarrow", "pandas")
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"problem": "1+1", "answer": "2", "solution": "1+1=2"}) + "\n"
                    + json.dumps({"problem": "2+2", "answer": 4}) + "\n")
    rows, report = load_problems(str(path))
    assert [(r["problem"], r["answer"], r["solution"]) for r in rows] == [("1+1", "2", "1+1=2"), ("2+2", "4", None)]
    _, math500 = load_benchmark("math500")  # the bundled benchmarks are .jsonl too
    assert len(math500) == 500


def test_parquet_and_hub_need_the_data_extra(tmp_path, monkeypatch):
    from megatron_trace.data import load_problems
    from megatron_trace.data.problems import peek_has_solution

    _hide(monkeypatch, "datasets", "pyarrow")
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1")
    for source in (str(path), "open-thoughts/OpenThoughts-114k"):
        with pytest.raises(MissingExtra, match=r"pip install 'megatron-trace\[data\]'"):
            load_problems(source)
    with pytest.raises(MissingExtra, match=r"megatron-trace\[data\]"):
        peek_has_solution(str(path))


def test_prepare_data_names_the_data_extra(tmp_path, monkeypatch, capsys):
    _hide(monkeypatch, "datasets", "pyarrow")
    (tmp_path / "part-0.parquet").write_bytes(b"PAR1")
    tool = _load_tool("prepare_data")
    for source in (str(tmp_path), "open-thoughts/OpenThoughts-114k"):
        assert tool.main(["--source", source, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "error:" in err and "pip install 'megatron-trace[data]'" in err


# ------------------------------------------------------------------------------ tensorboard


def test_missing_tensorboard_warns_once_and_logging_goes_on(tmp_path, monkeypatch):
    from megatron_trace.train import setup_run

    monkeypatch.setattr(setup_run, "_TB_WARNED", False)
    _hide(monkeypatch, "tensorboard")
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert setup_run.open_tensorboard(str(tmp_path / "tb")) is None
        assert setup_run.open_tensorboard(str(tmp_path / "tb2")) is None
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "log.tensorboard" in msgs[0] and "megatron-trace[tensorboard]" in msgs[0], msgs
    assert not os.path.exists(tmp_path / "tb")


def test_tensorboard_writer_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    from megatron_trace.train.setup_run import open_tensorboard

    tb = open_tensorboard(str(tmp_path / "tb"))
    tb.add_scalar("x", 1.0, 0)
    tb.close()
    assert os.listdir(tmp_path / "tb")


# ------------------------------------------------------------------------------------ plots


def test_plots_need_the_plots_extra(tmp_path, monkeypatch, capsys):
    from megatron_trace.demo import run_demo
    from megatron_trace.observability.plots import plot_runs

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/mean": 0.5}) + "\n")
    _hide(monkeypatch, "matplotlib")
    with pytest.raises(MissingExtra, match=r"pip install 'megatron-trace\[plots\]'"):
        plot_runs([str(run)], str(tmp_path / "plots"))
    assert _load_tool("plot_metrics").main([str(run)]) == 2
    assert "megatron-trace[plots]" in capsys.readouterr().err
    # the demo refuses before it trains anything (its plots come last)
    with pytest.raises(MissingExtra, match=r"megatron-trace demo.*megatron-trace\[plots\]"):
        run_demo(str(tmp_path / "demo"), config="unused.yaml", sft_config="unused.yaml", overrides=[])
    assert not os.path.exists(tmp_path / "demo")


def test_cli_reports_a_missing_extra_as_an_error(monkeypatch, capsys):
    from megatron_trace import cli

    def boom(args):
        raise MissingExtra("x needs y: pip install 'megatron-trace[data]'")

    monkeypatch.setattr(cli, "_cmd_models", boom)
    assert cli.main(["models"]) == 2
    assert "error: x needs y: pip install 'megatron-trace[data]'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- launch


def test_launchers_name_the_launch_extra(monkeypatch):
    _hide(monkeypatch, "nemo_run")
    monkeypatch.syspath_prepend(os.path.join(REPO, "launch"))
    spec = importlib.util.spec_from_file_location("_launch_common_probe", os.path.join(REPO, "launch", "common.py"))
    with pytest.raises(SystemExit, match=r"pip install 'megatron-trace\[launch\]'"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_package_never_imports_launch_dependencies():
    """nemo-run and leptonai serve launch/ only, so they can be an extra."""
    for root, _, files in os.walk(os.path.join(REPO, "megatron_trace")):
        for f in files:
            if f.endswith(".py"):
                text = open(os.path.join(root, f)).read()
                assert "nemo_run" not in text and "leptonai" not in text, f
