"""megatron-trace: TRACE (token-routed self-distillation + GRPO) RLVR trainer on Megatron-core."""

import warnings as _warnings

# Without TransformerEngine/apex (every CPU machine) megatron-core warns at import and at every
# layer it builds that it falls back to torch implementations. That is the expected CPU setup.
for _msg in (r"Apex is not installed", r"Transformer Engine and Apex are not installed",
             r".*transformer.engine.*not installed", r"Using local implementations",
             # megatron-core 0.16 warns about its own default cuda_graph_scope on every config
             r"full scope is deprecated",
             # dist_checkpointing (torch_dist) still builds on torch ShardedTensor
             r"Please use DTensor instead",
             r"`load_state_dict` is deprecated"):
    _warnings.filterwarnings("ignore", message=_msg)

__version__ = "0.1.0"
