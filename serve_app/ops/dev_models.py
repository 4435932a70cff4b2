"""Builds the project's own tiny models, since no weights can be downloaded on a dev machine.

The dev LLM is a 2-layer Llama with a byte-level BPE tokenizer trained on `corpus/dev_llm.txt`, trained just
long enough to complete `The capital of Canada is` with ` Ottawa.`. Builds are deterministic and cached: a
stamp file holds the hash of the recipe and corpus, and a model is rebuilt only when that hash changes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from serve_app.config.paths import model_path
from serve_app.ops.dev_guard import build_guard
from serve_app.ops.training import CORPUS_DIR, DevModelRecipe, is_built, mark_built, new_model, train_loop

BOS, EOS = "<s>", "</s>"


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
    tokenizer = _train_tokenizer(lines, recipe)
    tokenizer.save_pretrained(target)
    log(f"[dev-models] tokenizer: {len(tokenizer)} tokens")
    torch.manual_seed(0)
    model = new_model(recipe, tokenizer)
    _train(model, tokenizer, lines, recipe, log)
    completion = _greedy(model, tokenizer, recipe.probe_prompt)
    if not completion.startswith(recipe.probe_expect):
        raise RuntimeError(
            f"{recipe.model_id}: probe {recipe.probe_prompt!r} gave {completion!r}, expected "
            f"{recipe.probe_expect!r}; raise `steps` in the recipe in serve_app/ops/dev_models.py"
        )
    model.save_pretrained(target, safe_serialization=True)
    mark_built(recipe, target)
    log(f"[dev-models] {recipe.model_id} ready in {time.monotonic() - started:.0f}s: "
        f"{recipe.probe_prompt!r} -> {completion!r}")
    return target


def _train_tokenizer(lines: list[str], recipe: DevModelRecipe):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size, special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, model_max_length=recipe.context)


def _train(model, tokenizer, lines: list[str], recipe: DevModelRecipe, log) -> None:
    import torch

    rows = [tokenizer(line)["input_ids"] + [tokenizer.eos_token_id] for line in lines]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.eos_token_id)
    labels = torch.full((len(rows), width), -100)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(r)] = torch.tensor(r)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train_loop(model, recipe, lambda step: model(input_ids=ids, labels=labels).loss, log, opt)


def _greedy(model, tokenizer, prompt: str, tokens: int = 6) -> str:
    import torch

    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
