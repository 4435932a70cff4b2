"""The simulated models' tokenizer: byte-level BPE with no merges, built in memory.

One token per UTF-8 byte makes token counts predictable in tests (ASCII text: one token per character) and needs no
files, no training and no download; the chat-template special tokens are real special tokens so that the guard's
templates and `split_special_tokens` behave as with the Qwen-style checkpoints.
"""

from __future__ import annotations

import functools

PAD, BOS, EOS, IM_START, IM_END = "<|endoftext|>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, IM_START, IM_END)  # ids 0..4; the 256 byte symbols are ids 5..260


@functools.lru_cache(maxsize=1)
def sim_tokenizer():
    """A `transformers.PreTrainedTokenizerFast`, shared (it is stateless for encode and decode)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet())):
        vocab[symbol] = len(SPECIAL_TOKENS) + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                  additional_special_tokens=[IM_START, IM_END])
    out.chat_template = CHAT_TEMPLATE
    return out


# ChatML, as Qwen's checkpoints write it: the simulated models serve chat completions too.
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
