"""SGLang rollout engines (GPU only). Pinned version: sglang==0.5.6, the `sglang` extra.

- `engine.SGLangEngine`: an `sglang.Engine` in the trainer's process (colocated placement), with
  SGLang's SPMD weight path at TP > 1 and a shutdown scoped to its own processes.
- `remote.RemoteSGLangEngine`: one `sglang.launch_server` over HTTP, or an `sglang-router`.
- `weight_group.RemoteWeightGroup`: trainer rank 0 + every server's ranks in one process group
  for weight broadcasts.
- `protocol`: the request and answer shapes both speak.

Seeds: sample j of prompt i carries `sampling_seed = sample_seed(seeds[i], j)`. SGLang honours a
per-request sampling_seed only when the server runs with `enable_deterministic_inference`.
Log-probs are SGLang's default: log softmax(logits / temperature), before top-k/top-p.
"""

from .engine import SGLangEngine, serialize_local
from .protocol import (
    DEFAULT_GROUP_NAME,
    EngineRequestError,
    _expand,  # noqa: F401 - tests reach the row expansion through the package
    parse_output,
    to_sglang_sampling_params,
)
from .remote import RemoteSGLangEngine
from .weight_group import RemoteWeightGroup, connect

__all__ = ["DEFAULT_GROUP_NAME", "EngineRequestError", "RemoteSGLangEngine", "RemoteWeightGroup", "SGLangEngine",
           "connect", "parse_output", "serialize_local", "to_sglang_sampling_params"]
