"""megatron-trace: TRACE RLVR trainer on Megatron-core."""
__version__ = "0.1.0"
