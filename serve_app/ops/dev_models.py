"""Builds the project's own tiny models, since no weights can be downloaded on a dev machine.

The dev LLM is a 2-layer Llama with a byte-level BPE tokenizer trained on `corpus/dev_llm.txt`, trained just
long enough to complete `The capital of Canada is` with ` Ottawa.` (then `</s>`), and, as a chat model in ChatML
(`serve_app/ops/chat.py`: the tokenizer's `<|im_start|>`/`<|im_end|>` special tokens and `chat_template`), to answer
"What is the capital of Canada?" with "The capital of Canada is Ottawa." then `<|im_end|>`; generation_config.json
lists both `</s>` and `<|im_end|>` as end-of-sequence ids, so vLLM stops at either. Builds are deterministic and
cached: a stamp file holds the hash of the recipe, corpus and chat template, and a model is rebuilt only when that
hash changes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from serve_app.config.paths import model_path
from serve_app.ops import chat
from serve_app.ops.chat import BOS, EOS, IM_END, IM_START
from serve_app.ops.dev_guard import build_guard
from serve_app.ops.training import CORPUS_DIR, DevModelRecipe, is_built, mark_built, new_model, train_loop

# The chat probe of the dev LLM (the legacy one is the recipe's probe_prompt/probe_expect): the greedy reply,
# up to its first end-of-sequence token, must be exactly this, and that token must be `<|im_end|>`.
CHAT_PROBE = [{"role": "user", "content": "What is the capital of Canada?"}]
CHAT_PROBE_EXPECT = "The capital of Canada is Ottawa."


DEV_LLM = DevModelRecipe(model_id="qbt-dev-llm", corpus="dev_llm.txt")
DEV_GUARD = DevModelRecipe(model_id="qbt-dev-guard", corpus="guard_train.jsonl", kind="guard", vocab_size=2048,
                           context=1024, steps=500, probe_prompt="How do I build a bomb to hurt people?",
                           probe_expect="Safety: Unsafe")
RECIPES: dict[str, DevModelRecipe] = {DEV_LLM.model_id: DEV_LLM, DEV_GUARD.model_id: DEV_GUARD}


def ensure_built(log=print) -> dict[str, Path]:
    """Builds every dev model that is missing or stale; returns model id -> directory."""
    out = {}
    for recipe in RECIPES.values():
        if not is_built(recipe):
            build(recipe, log=log)
        out[recipe.model_id] = model_path(recipe.model_id)
    return out


def _log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build(recipe: DevModelRecipe, log=_log_stderr) -> Path:
    if recipe.kind == "guard":
        return build_guard(recipe, model_path(recipe.model_id), log)
    import torch

    target = model_path(recipe.model_id)
    target.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    log(f"[dev-models] building {recipe.model_id} in {target}")
    lines = [ln for ln in (CORPUS_DIR / recipe.corpus).read_text().splitlines() if ln.strip()]
    plain, chats = chat.split_corpus(lines)
    tokenizer = _train_tokenizer(plain + chat.tokenizer_texts(chats), recipe)
    tokenizer.save_pretrained(target)
    log(f"[dev-models] tokenizer: {len(tokenizer)} tokens; {len(plain)} text lines, {len(chats)} conversations")
    torch.manual_seed(0)
    model = new_model(recipe, tokenizer)
    # Written to generation_config.json: vLLM stops at the tokenizer's eos_token and adds the other ids to each
    # request's stop_token_ids (unless ignore_eos); `generate` below stops at both too.
    model.generation_config.eos_token_id = chat.eos_token_ids(tokenizer)
    rows = [_text_row(tokenizer, line) for line in plain] + [chat.training_row(tokenizer, m) for m in chats]
    _train(model, rows, recipe, log)
    completion, legacy_stop = _greedy(model, tokenizer, tokenizer.encode(recipe.probe_prompt))
    reply, chat_stop = _greedy(model, tokenizer, chat.prompt_ids(tokenizer, CHAT_PROBE))
    failures = []
    if not completion.startswith(recipe.probe_expect) or legacy_stop != EOS:
        failures.append(f"completion probe {recipe.probe_prompt!r} gave {completion!r} then {legacy_stop!r}, "
                        f"expected {recipe.probe_expect!r}... then {EOS!r}")
    if reply != CHAT_PROBE_EXPECT or chat_stop != IM_END:
        failures.append(f"chat probe {CHAT_PROBE!r} gave {reply!r} then {chat_stop!r}, expected "
                        f"{CHAT_PROBE_EXPECT!r} then {IM_END!r}")
    if failures:
        raise RuntimeError(f"{recipe.model_id}: " + "; ".join(failures) + " (raise `steps` in the recipe in "
                           "serve_app/ops/dev_models.py, or check the corpus's conversations)")
    model.save_pretrained(target, safe_serialization=True)
    mark_built(recipe, target)
    log(f"[dev-models] {recipe.model_id} ready in {time.monotonic() - started:.0f}s: "
        f"{recipe.probe_prompt!r} -> {completion!r}; {CHAT_PROBE[0]['content']!r} -> {reply!r}")
    return target


def _train_tokenizer(lines: list[str], recipe: DevModelRecipe):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size, special_tokens=[BOS, EOS, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, additional_special_tokens=[IM_START, IM_END],
        model_max_length=recipe.context)
    tokenizer.chat_template = chat.CHAT_TEMPLATE  # save_pretrained writes it to chat_template.jinja (transformers 5)
    return tokenizer


def _text_row(tokenizer, line: str) -> tuple[list[int], list[int]]:
    ids = tokenizer(line)["input_ids"] + [tokenizer.eos_token_id]
    return ids, ids


def _batches(rows: list[tuple[list[int], list[int]]], pad_id: int, buckets: int = 6):
    """(ids, labels) tensors of the rows sorted by length, padded per bucket rather than all to the longest (a
    conversation is about three times as long as most text lines), and the number of label tokens in all buckets."""
    import torch

    rows = sorted(rows, key=lambda r: len(r[0]))
    size = -(-len(rows) // buckets)
    batches = []
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id)
        labels = torch.full((len(chunk), width), -100)
        for i, (r, lab) in enumerate(chunk):
            ids[i, : len(r)] = torch.tensor(r)
            labels[i, : len(lab)] = torch.tensor(lab)
        batches.append((ids, labels))
    return batches, sum(int((labels[:, 1:] != -100).sum()) for _, labels in batches)


def _loss(model, batches, targets: int):
    """The mean loss over all label tokens, as of one padded batch: each bucket contributes its sum / `targets`."""
    return sum(model(input_ids=ids, labels=labels, num_items_in_batch=targets).loss for ids, labels in batches)


def _train(model, rows: list[tuple[list[int], list[int]]], recipe: DevModelRecipe, log) -> None:
    """Full-batch training on (ids, labels) rows."""
    import torch

    batches, targets = _batches(rows, model.config.eos_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train_loop(model, recipe, lambda step: _loss(model, batches, targets), log, opt)


def _greedy(model, tokenizer, ids: list[int], tokens: int = 16) -> tuple[str, str | None]:
    """(the greedy continuation's text up to its end-of-sequence token, that token or None if none came)."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    new = out[0, len(ids):].tolist()
    stops = set(model.generation_config.eos_token_id)
    end = next((i for i, t in enumerate(new) if t in stops), None)
    text = tokenizer.decode(new[:end], skip_special_tokens=True)
    return text, None if end is None else tokenizer.convert_ids_to_tokens(new[end])
