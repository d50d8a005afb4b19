"""tools/build_wheelhouse.py without the network: what it leaves out (torch and everything torch
pulls in), the platform tags it asks pip for, and the lock it passes on. The real build and an offline
install from it are tests/e2e/test_wheelhouse.py (slow)."""

import importlib.util
import os

from conftest import REPO


def _tool():
    spec = importlib.util.spec_from_file_location("_build_wheelhouse", os.path.join(REPO, "tools", "build_wheelhouse.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_torch_closure_follows_torch_only():
    t = _tool()
    report = {"install": [
        {"metadata": {"name": "torch", "version": "2.11.0",
                      "requires_dist": ["filelock", "sympy>=1.13.3", "nvidia-nccl-cu13==2.28.9; platform_system == 'Linux'",
                                        "triton==3.6.0; platform_system == \"Linux\"", "optree>=0.13.0; extra == \"optree\""]}},
        {"metadata": {"name": "sympy", "version": "1.14.0", "requires_dist": ["mpmath<1.4,>=1.1.0"]}},
        {"metadata": {"name": "mpmath", "version": "1.3.0"}},
        {"metadata": {"name": "filelock", "version": "3.20.0"}},
        {"metadata": {"name": "nvidia-nccl-cu13", "version": "2.28.9"}},
        {"metadata": {"name": "triton", "version": "3.6.0"}},
        {"metadata": {"name": "optree", "version": "0.17.0"}},  # only through torch's extra: kept
        {"metadata": {"name": "megatron-core", "version": "0.16.1", "requires_dist": ["torch>=2.6.0", "numpy"]}},
        {"metadata": {"name": "numpy", "version": "2.4.6"}},
    ]}
    assert t.torch_closure(report) == {"torch", "sympy", "mpmath", "filelock", "nvidia-nccl-cu13", "triton"}
    for name in ("Jinja2", "MarkupSafe", "typing_extensions", "nvidia-cudnn-cu12", "cuda-bindings", "setuptools"):
        assert t.in_torch_family(name), name
    for name in ("numpy", "megatron-core", "transformers", "omegaconf", "math-verify"):
        assert not t.in_torch_family(name), name


def test_platform_tags_and_lock_filter(tmp_path):
    t = _tool()
    args = t.platform_args("3.12")
    assert args[:5] == ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
    tags = [a for a in args if a.startswith("manylinux")]
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_17_x86_64" in tags and "manylinux2014_x86_64" in tags
    assert not any(tag.startswith("manylinux_2_29") or tag.startswith("manylinux_2_3") for tag in tags)
    lock = tmp_path / "lock.txt"
    lock.write_text("# header\ntorch==2.13.0+cpu\nsympy==1.14.0\nnumpy==2.4.6\ntyping_extensions==4.16.0\n"
                    "omegaconf==2.4.0\n")
    out = open(t.filtered_constraints(str(lock), str(tmp_path))).read().split()
    assert out == ["numpy==2.4.6", "omegaconf==2.4.0"]
