"""TEST HELPER: code of the pinned SGLang wheel, run on CPU without SGLang's dependencies.

SGLang 0.5.6 cannot be installed here (it pins a CUDA torch and needs GPU kernels), but its wheel
is plain Python. `make test` downloads it (`pip download --no-deps sglang==0.5.6`) to
`.cache/wheels/` (or set MT_SGLANG_WHEEL). This module reads source files out of it and executes
the definitions a contract test needs, from the wheel's own text, in stand-in modules registered
under SGLang's module names (so pickles name the classes exactly as SGLang does, and SGLang's
`SafeUnpickler` judges them by those names).

`install(path)` puts into sys.modules:
  sglang.srt.utils                          MultiprocessingSerializer, SafeUnpickler (utils/common.py)
  sglang.srt.utils.patch_torch              monkey_patch_torch_reductions: a recording double (the
                                            real one rewrites CUDA tensor reductions and breaks CPU ones)
  sglang.srt.model_executor.model_runner    LocalSerializedTensor, _unwrap_tensor (model_runner.py)
and returns {"engine_update_weights_from_tensor": Engine.update_weights_from_tensor as a plain
function, "io_fields": the fields of UpdateWeightsFromTensorReqInput, "patch_calls": [count]}.
`uninstall()` removes them again.
"""

from __future__ import annotations

import ast
import glob
import os
import sys
import textwrap
import types
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
VERSION = "0.5.6"
_NAMES = ["sglang", "sglang.srt", "sglang.srt.utils", "sglang.srt.utils.patch_torch", "sglang.srt.model_executor",
          "sglang.srt.model_executor.model_runner"]


def wheel_path() -> str:
    """The wheel, or an error that says how to get it."""
    env = os.environ.get("MT_SGLANG_WHEEL")
    found = [env] if env else sorted(glob.glob(os.path.join(REPO, ".cache", "wheels", f"sglang-{VERSION}-*.whl")))
    if not found or not os.path.exists(found[0]):
        raise FileNotFoundError(
            f"the sglang {VERSION} wheel is missing: `make test` downloads it to .cache/wheels/ "
            f"(or: pip download --no-deps sglang=={VERSION} -d .cache/wheels; MT_SGLANG_WHEEL=path)")
    return found[0]


def read(path: str, member: str) -> str:
    with zipfile.ZipFile(path) as zf:
        return zf.read(member).decode()


def _definitions(source: str, names: set[str], *, within: str | None = None) -> dict[str, str]:
    """Source text (decorators included, dedented) of the top-level classes/functions `names`, or
    of the methods `names` of class `within`."""
    tree = ast.parse(source)
    body = tree.body
    if within is not None:
        body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == within).body
    lines = source.splitlines()
    out = {}
    for node in body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name in names:
            start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            out[node.name] = textwrap.dedent("\n".join(lines[start:node.end_lineno]))
    missing = names - set(out)
    if missing:
        raise LookupError(f"sglang {VERSION} wheel: {sorted(missing)} not found" + (f" in {within}" if within else ""))
    return out


def _module(name: str, code: str, env: dict) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(env)
    sys.modules[name] = mod
    exec(compile(code, f"<sglang {VERSION} wheel: {name}>", "exec"), mod.__dict__)
    return mod


def install(path: str | None = None) -> dict:
    import io
    import pickle
    import typing
    from dataclasses import dataclass
    from multiprocessing.reduction import ForkingPickler

    import torch

    path = path or wheel_path()
    root = "sglang/srt/"
    # the wheel's annotations name typing's generics
    typing_env = {**{n: getattr(typing, n) for n in ("List", "Optional", "Tuple", "Union")}, "dataclass": dataclass,
                  "torch": torch}
    for name in _NAMES[:2] + ["sglang.srt.model_executor"]:
        pkg = types.ModuleType(name)
        pkg.__path__ = []
        sys.modules[name] = pkg
    common = _definitions(read(path, root + "utils/common.py"), {"MultiprocessingSerializer", "SafeUnpickler"})
    utils = types.ModuleType("sglang.srt.utils")
    utils.__path__ = []
    utils.__dict__.update({**typing_env, "io": io, "pickle": pickle, "ForkingPickler": ForkingPickler,
                           "pybase64": None})
    sys.modules["sglang.srt.utils"] = utils
    exec(compile(common["SafeUnpickler"] + "\n\n" + common["MultiprocessingSerializer"],
                 f"<sglang {VERSION} wheel: utils/common.py>", "exec"), utils.__dict__)
    patch_calls = [0]

    def monkey_patch_torch_reductions():  # recording double, see the module docstring
        patch_calls[0] += 1

    _module("sglang.srt.utils.patch_torch", "", {"monkey_patch_torch_reductions": monkey_patch_torch_reductions})
    runner = _definitions(read(path, root + "model_executor/model_runner.py"), {"LocalSerializedTensor",
                                                                               "_unwrap_tensor"})
    _module("sglang.srt.model_executor.model_runner", runner["_unwrap_tensor"] + "\n\n" + runner["LocalSerializedTensor"],
            {**typing_env, "MultiprocessingSerializer": utils.MultiprocessingSerializer})
    engine_src = _definitions(read(path, root + "entrypoints/engine.py"), {"update_weights_from_tensor"},
                              within="Engine")["update_weights_from_tensor"]
    io_tree = ast.parse(read(path, root + "managers/io_struct.py"))
    req = next(n for n in io_tree.body if isinstance(n, ast.ClassDef) and n.name == "UpdateWeightsFromTensorReqInput")
    fields = [s.target.id for s in req.body if isinstance(s, ast.AnnAssign)]

    @dataclass
    class UpdateWeightsFromTensorReqInput:  # the wheel's fields (checked by the caller), none of BaseReq's
        serialized_named_tensors: list
        load_format: str | None = None
        flush_cache: bool = True

    env = {**typing_env, "MultiprocessingSerializer": utils.MultiprocessingSerializer,
           "UpdateWeightsFromTensorReqInput": UpdateWeightsFromTensorReqInput}
    exec(compile(engine_src, f"<sglang {VERSION} wheel: Engine.update_weights_from_tensor>", "exec"), env)
    return {"engine_update_weights_from_tensor": env["update_weights_from_tensor"], "io_fields": fields,
            "patch_calls": patch_calls}


def uninstall() -> None:
    for name in _NAMES:
        sys.modules.pop(name, None)


class WheelEngine:
    """A stand-in for `sglang.Engine` whose `update_weights_from_tensor` runs the wheel's own method
    body: the payload it builds for TP worker r is `payloads[-1][r]`."""

    def __init__(self, update_fn, tp_size: int):
        self._update = update_fn
        self.server_args = types.SimpleNamespace(tp_size=tp_size)
        self.payloads: list[list[bytes]] = []
        outer = self

        class _Manager:
            def update_weights_from_tensor(self, obj, request):
                outer.payloads.append(list(obj.serialized_named_tensors))
                return True, "Succeeded to update model weights."

        self.tokenizer_manager = _Manager()
        self.loop = types.SimpleNamespace(run_until_complete=lambda x: x)

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        return self._update(self, named_tensors, load_format=load_format, flush_cache=flush_cache)

    def flush_cache(self):
        return types.SimpleNamespace(success=True)
