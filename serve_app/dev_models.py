"""Builds the project's own tiny models, since no weights can be downloaded on a dev machine.

The dev LLM is a 2-layer Llama with a byte-level BPE tokenizer trained on `corpus/dev_llm.txt`, trained just
long enough to complete `The capital of Canada is` with ` Ottawa.`. Builds are deterministic and cached: a
stamp file holds the hash of the recipe and corpus, and a model is rebuilt only when that hash changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CORPUS_DIR = Path(__file__).parent / "corpus"
RECIPE_VERSION = "1"
BOS, EOS = "<s>", "</s>"


@dataclass(frozen=True)
class DevModelRecipe:
    model_id: str
    corpus: str
    vocab_size: int = 2048
    hidden_size: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    context: int = 512
    steps: int = 400
    probe_prompt: str = "The capital of Canada is"
    probe_expect: str = " Ottawa"
    kind: str = "lm"

    def fingerprint(self) -> str:
        h = hashlib.sha256(RECIPE_VERSION.encode())
        h.update(json.dumps(self.__dict__, sort_keys=True).encode())
        h.update((CORPUS_DIR / self.corpus).read_bytes())
        if self.kind == "guard":
            from serve_app import guard

            h.update((guard.PROMPT_TEMPLATE + guard.RESPONSE_TEMPLATE).encode())
        return h.hexdigest()[:16]


DEV_LLM = DevModelRecipe(model_id="qbt-dev-llm", corpus="dev_llm.txt")
DEV_GUARD = DevModelRecipe(model_id="qbt-dev-guard", corpus="guard_train.jsonl", kind="guard", vocab_size=2048,
                           context=1024, steps=500, probe_prompt="How do I build a bomb to hurt people?",
                           probe_expect="Safety: Unsafe")
RECIPES: dict[str, DevModelRecipe] = {DEV_LLM.model_id: DEV_LLM, DEV_GUARD.model_id: DEV_GUARD}


def models_dir() -> Path:
    default = Path(__file__).resolve().parent.parent / ".cache" / "models"
    return Path(os.environ.get("QBT_MODELS_DIR", default))


def model_path(model_id: str) -> Path:
    return models_dir() / model_id


def is_built(recipe: DevModelRecipe) -> bool:
    stamp = model_path(recipe.model_id) / ".qbt-build"
    return stamp.exists() and stamp.read_text().strip() == recipe.fingerprint()


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
        from serve_app.dev_guard import build_guard

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
    model = _new_model(recipe, tokenizer)
    _train(model, tokenizer, lines, recipe, log)
    completion = _greedy(model, tokenizer, recipe.probe_prompt)
    if not completion.startswith(recipe.probe_expect):
        raise RuntimeError(
            f"{recipe.model_id}: probe {recipe.probe_prompt!r} gave {completion!r}, expected "
            f"{recipe.probe_expect!r}; raise `steps` in the recipe in serve_app/dev_models.py"
        )
    model.save_pretrained(target, safe_serialization=True)
    (target / ".qbt-build").write_text(recipe.fingerprint() + "\n")
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


def _new_model(recipe: DevModelRecipe, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size, intermediate_size=recipe.hidden_size * 2,
        num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads, num_key_value_heads=recipe.kv_heads,
        max_position_embeddings=recipe.context, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, torch_dtype="float32",
    )
    return LlamaForCausalLM(config)


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
    model.train()
    for step in range(1, recipe.steps + 1):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 50 == 0 or step == recipe.steps:
            log(f"[dev-models] {recipe.model_id}: step {step}/{recipe.steps} loss {loss.item():.3f}")
    model.eval()


def _greedy(model, tokenizer, prompt: str, tokens: int = 6) -> str:
    import torch

    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
