"""Optional dependencies: the extras of pyproject.toml beyond the core `dependencies`.

The core set is what `megatron-trace train/eval/smoke` need (and what `make wheelhouse` bundles
for an offline CUDA machine). A feature that needs an extra imports it through `require`, which
fails with a message naming the extra to install instead of a bare ModuleNotFoundError.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# extra -> what it is for (the messages quote it)
EXTRAS = {
    "data": "parquet files and hub datasets as data (the `datasets` package, with pyarrow)",
    "tensorboard": "TensorBoard logging (log.tensorboard)",
    "plots": "plots (matplotlib)",
    "launch": "the NeMo-Run launchers in launch/",
}


class MissingExtra(ImportError):
    """An optional dependency is missing; the message names the extra that provides it."""


def install_hint(extra: str) -> str:
    return f"pip install 'megatron-trace[{extra}]'"


def require(module: str, extra: str, what: str) -> ModuleType:
    """`import module`, or MissingExtra saying that `what` needs the `extra` extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(f"{what} needs the {module.split('.')[0]!r} package, which is not installed "
                           f"({exc}); install the {extra!r} extra: {install_hint(extra)}") from None
