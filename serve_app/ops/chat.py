"""The dev LLM's chat format: ChatML as Qwen's chat models use it, with the tokenizer's BOS in front.

A conversation renders as `<s><|im_start|>{role}\\n{content}<|im_end|>\\n` per message, then `<|im_start|>assistant\\n`
when a reply is wanted; the model ends its reply with `<|im_end|>` (a stop token through generation_config.json).

The template writes the BOS itself, so the rendered text must be tokenized WITHOUT the tokenizer's own special tokens
(`tokenizer.encode(text, add_special_tokens=False)`, as `apply_chat_template(..., tokenize=True)` and vLLM's chat
endpoint do); with them the prompt would start with two BOS. The ids then start like the completions path's
`tokenizer.encode(text)`: one BOS.

In the corpus (`corpus/dev_llm.txt`) a line that starts with `{"messages":` is one conversation, a JSON object whose
last message is the assistant's reply; every other line is plain text.
"""

from __future__ import annotations

import json

BOS, EOS, IM_START, IM_END = "<s>", "</s>", "<|im_start|>", "<|im_end|>"
CHAT_PREFIX = '{"messages":'

# `content` may be a string, null, or OpenAI-style content parts (their text parts are joined).
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set content = message['content'] %}"
    "{%- elif message['content'] is none %}{%- set content = '' %}"
    "{%- else %}{%- set content = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') %}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def split_corpus(lines: list[str]) -> tuple[list[str], list[list[dict]]]:
    """(plain-text lines, conversations) of a corpus's non-blank lines."""
    plain, chats = [], []
    for line in lines:
        if line.startswith(CHAT_PREFIX):
            messages = json.loads(line)["messages"]
            if not messages or messages[-1]["role"] != "assistant":
                raise ValueError(f"a corpus conversation must end with the assistant's reply: {line!r}")
            chats.append(messages)
        else:
            plain.append(line)
    return plain, chats


def tokenizer_texts(chats: list[list[dict]]) -> list[str]:
    """What the BPE trainer reads of the conversations: roles and contents, never the special tokens' spelling."""
    return [f"{m['role']}\n{m['content']}" for messages in chats for m in messages]


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The ids the model is given to continue `messages` as the assistant (what the ingress must send)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def eos_token_ids(tokenizer) -> list[int]:
    """generation_config.json's `eos_token_id`: `</s>` ends a completion, `<|im_end|>` an assistant turn."""
    return [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)]


def training_row(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(ids, labels) of a conversation: the loss is on the final assistant turn only (its text, `<|im_end|>`, `\\n`)."""
    prompt = prompt_ids(tokenizer, messages[:-1])
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)
    if ids[: len(prompt)] != prompt:
        raise ValueError("the chat template's generation prompt is not a prefix of the rendered conversation")
    return ids, [-100] * len(prompt) + ids[len(prompt):]
