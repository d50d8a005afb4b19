"""A character-level tokenizer for the synthetic task, saved as a real HF tokenizer.

Every printable ASCII character and the newline is one token, plus Qwen-style special tokens
and a chat template (with the Qwen3 thinking switch), so the demo exercises exactly the code
paths a Qwen3 tokenizer does: offsets, special tokens, `apply_chat_template`.
"""

from __future__ import annotations

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "build_char_tokenizer"]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<unk>"]
_CHARS = ["\n"] + [chr(c) for c in range(32, 127)]

# Qwen3's template, reduced to what the task needs. enable_thinking=False pre-fills an empty
# think block, as Qwen3's template does.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def build_char_tokenizer():
    """A `transformers.PreTrainedTokenizerFast` (call `.save_pretrained(dir)` to write it)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + _CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
