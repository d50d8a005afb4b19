"""Packaging rules that a green CI would otherwise hide."""

import ast
import os
import subprocess
import sys

from conftest import REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def _deps():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    return project["dependencies"], project["optional-dependencies"], project


def test_dependency_pins():
    deps, extras, project = _deps()
    names = [d.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip() for d in deps]
    all_reqs = deps + [r for rs in extras.values() for r in rs]
    # PyPI's `apex` is an unrelated web toolkit: NVIDIA apex comes from NGC containers only.
    assert not any(r.split("[")[0].split("=")[0].split("<")[0].split(">")[0].strip() == "apex" for r in all_reqs)
    assert "megatron-core>=0.16.1,<0.17" in deps  # 0.17 needs Python >= 3.12
    # The core set is what train/eval/smoke need (`make wheelhouse` bundles it, <= 60 MiB); the rest
    # are extras, all of which `dev` (what `make install` installs) pulls in.
    assert sorted(names) == sorted(["torch", "megatron-core", "psutil", "transformers", "tokenizers", "safetensors",
                                    "omegaconf", "math-verify", "tqdm", "numpy"])
    assert extras["data"] == ["datasets"] and extras["tensorboard"] == ["tensorboard"]
    assert extras["plots"] == ["matplotlib"]
    assert "nemo-run==0.11.1" in extras["launch"]
    assert any(d.startswith("leptonai<0.28") for d in extras["launch"])  # nemo-run 0.11.1 breaks on newer
    assert "megatron-trace[data,tensorboard,plots,launch]" in extras["dev"]
    assert any(r.startswith("transformer-engine") for r in extras["gpu"])
    # SGLang 0.5.6 pins torch 2.9.1; its PyPI wheel has no `srt` extra. The router fronts a job's own fleet.
    assert extras["sglang"] == ["sglang==0.5.6", "sglang-router==0.3.2"]
    assert project["scripts"]["megatron-trace"] == "megatron_trace.cli:main"


def test_makefile_never_resolves_bare_torch():
    text = open(os.path.join(REPO, "Makefile")).read()
    assert "TORCH_SPEC ?= torch==2.13.0" in text and "import torch" in text


def test_tools_have_main_guards():
    """dist_checkpointing's writer and the rank spawner re-import the script in child processes."""
    for name in os.listdir(os.path.join(REPO, "tools")):
        if name.endswith(".py"):
            tree = ast.parse(open(os.path.join(REPO, "tools", name)).read())
            guards = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
            assert guards, f"tools/{name} needs an `if __name__ == '__main__':` guard"


def test_only_parallel_touches_parallel_state():
    pkg = os.path.join(REPO, "megatron_trace")
    offenders = []
    for root, _, files in os.walk(pkg):
        for f in files:
            path = os.path.join(root, f)
            if f.endswith(".py") and os.sep + "parallel" + os.sep not in path:
                if "parallel_state" in open(path).read():
                    offenders.append(os.path.relpath(path, REPO))
    assert offenders == []


def test_ruff_clean():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "megatron_trace", "tools", "tests"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_every_test_file_is_collected():
    """pytest silently skips some folder names (dist, build); make sure nothing falls through."""
    on_disk = {os.path.relpath(os.path.join(root, f), REPO)
               for root, _, files in os.walk(os.path.join(REPO, "tests"))
               for f in files if f.startswith("test_") and f.endswith(".py")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "tests"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    collected = {line.split("::")[0] for line in proc.stdout.splitlines() if "::" in line}
    assert on_disk == collected, on_disk ^ collected


def _imports(path):
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module


def test_dependency_rules_of_the_layout():
    """loss/ imports only torch (and the standard library); data/reward/annotate/tasks/rollout never import Megatron."""
    pkg = os.path.join(REPO, "megatron_trace")
    stdlib = set(sys.stdlib_module_names)
    for f in os.listdir(os.path.join(pkg, "loss")):
        if f.endswith(".py"):
            mods = {m.split(".")[0] for m in _imports(os.path.join(pkg, "loss", f))}
            assert mods <= stdlib | {"torch", "__future__"}, (f, mods - stdlib)
    for sub in ("data", "reward", "annotate", "tasks", "teacher", "rollout"):
        for root, _, files in os.walk(os.path.join(pkg, sub)):
            for f in files:
                if f.endswith(".py"):
                    assert not any(m.startswith("megatron.") or m == "megatron" for m in _imports(os.path.join(root, f))), f
