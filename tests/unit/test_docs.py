"""The docs site and the README: every config key documented and listed in the generated reference,
the generated pages current, `mkdocs build --strict` clean (no broken link or anchor), the README
short, and no module past the size limit."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_trace.config import Config

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import gen_docs  # noqa: E402


def _leaf_keys(obj, prefix: str = "") -> list[str]:
    """Every leaf key of a config object, walked independently of the generator."""
    out = []
    for f in dataclasses.fields(obj):
        name = f.name.rstrip("_")
        key = f"{prefix}.{name}" if prefix else name
        value = getattr(obj, f.name)
        out += _leaf_keys(value, key) if dataclasses.is_dataclass(value) else [key]
    return out


def test_every_config_key_has_a_doc_comment():
    assert gen_docs.missing_docs() == []


def test_the_config_reference_lists_every_key_of_config():
    keys = _leaf_keys(Config())
    assert len(keys) > 150 and "rollout.async.max_age" in keys and "data.arith.ops" in keys
    page = gen_docs.CONFIG_PAGE.read_text()
    rows = {line.split("|")[1].strip().strip("`") for line in page.splitlines() if line.startswith("| `")}
    assert set(keys) <= rows, f"not in docs/reference/config.md: {sorted(set(keys) - rows)}"


def test_the_reference_shows_what_the_schema_allows():
    """The allowed values come from the checks themselves: a value the page lists is accepted,
    one it does not is refused."""
    from megatron_trace.config.sections_train import TeacherConfig

    keys = {k.name: k for keys in gen_docs.config_keys().values() for k in keys}
    assert keys["teacher.mode"].allowed == "one of `live`, `snapshot`"
    assert keys["optim.micro_batch_size"].default == 4 and keys["optim.micro_batch_size"].type == "int"
    assert "integer >= 1" in keys["teacher.sync_every"].allowed
    TeacherConfig(mode="live")
    with pytest.raises(ValueError, match="teacher.mode"):
        TeacherConfig(mode="frozen")


def test_the_generated_pages_are_current():
    """Fails when a config key, a doc comment or a flag changed without `python tools/gen_docs.py`."""
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_docs.py"), "--check"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    cli = gen_docs.CLI_PAGE.read_text()
    for heading in ("### `megatron-trace train`", "### `megatron-trace report`", "### `tools/bench_step.py`",
                    "### `launch/sweep.py`"):
        assert heading in cli
    assert "--eval-separate" in cli and str(ROOT) not in cli


def test_mkdocs_builds_strictly(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "site" / "reference" / "config" / "index.html").exists()


def test_mkdocs_strict_catches_a_broken_link(tmp_path):
    """The check above can fail: the same build over a copy of the docs with one bad link does."""
    import shutil

    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    page = tmp_path / "docs" / "index.md"
    page.write_text(page.read_text() + "\nSee [nowhere](no_such_page.md).\n")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                       capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode != 0 and "no_such_page.md" in r.stdout + r.stderr


def test_the_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    import re

    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


def test_no_module_is_over_500_lines():
    big = []
    for folder in ("megatron_trace", "launch", "tools"):
        for path in (ROOT / folder).rglob("*.py"):
            n = len(path.read_text().splitlines())
            if n > 500:
                big.append(f"{path.relative_to(ROOT)} ({n})")
    assert not big, f"modules over 500 lines: {big}"


def test_no_function_is_much_over_80_lines():
    """One responsibility per function: about 80 lines at most (90 leaves room for a docstring)."""
    import ast

    long = []
    for folder in ("megatron_trace", "launch", "tools"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > 90:
                        long.append(f"{path.relative_to(ROOT)}::{node.name} ({n})")
    assert not long, f"functions over 90 lines: {long}"
