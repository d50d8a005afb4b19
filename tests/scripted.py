"""Scripted rollout engines and a lossless byte-level tokenizer for evaluation tests.

The engines follow the real `RolloutEngine.generate` protocol (n samples per prompt,
prompt-major, `Sample` records); what they answer is decided by a function of the prompt.
"""

from megatron_trace.rollout import Sample


def byte_tokenizer():
    """A real `PreTrainedTokenizerFast` over the 256 bytes (round-trips any UTF-8 text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


class ScriptedEngine:
    """answer(prompt_text, sample_index) -> response text."""

    weight_version = 0

    def __init__(self, tokenizer, answer, fail_after_calls=None):
        self.tokenizer, self.answer, self.calls, self.fail_after = tokenizer, answer, 0, fail_after_calls

    def generate(self, prompts, params, seeds=None):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        out = []
        for p in prompts:
            text = self.tokenizer.decode(p)
            for j in range(params.n):
                ids = self.tokenizer(self.answer(text, j), add_special_tokens=False)["input_ids"]
                out.append(Sample(ids, [0.0] * len(ids), "stop", 0))
        return out

    def shutdown(self):
        pass
