"""Pure tensor math of the TRACE objective. Imports only torch; process groups are arguments."""

from .vocab_parallel import token_divergence, token_logprob_and_entropy

__all__ = ["token_divergence", "token_logprob_and_entropy"]
