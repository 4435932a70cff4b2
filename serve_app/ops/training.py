"""What both dev-model builders share: the recipe (whose fingerprint decides when a model is rebuilt), the
corpus folder, the tiny Llama they train, and the training loop."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from serve_app.config.paths import model_path
from serve_app.ops import chat
from serve_app.safety import templates

CORPUS_DIR = Path(__file__).parent / "corpus"
RECIPE_VERSION = "1"


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
            h.update((templates.PROMPT_TEMPLATE + templates.RESPONSE_TEMPLATE).encode())
        else:
            h.update(chat.CHAT_TEMPLATE.encode())
        return h.hexdigest()[:16]


def is_built(recipe: DevModelRecipe) -> bool:
    stamp = model_path(recipe.model_id) / ".qbt-build"
    return stamp.exists() and stamp.read_text().strip() == recipe.fingerprint()


def mark_built(recipe: DevModelRecipe, target: Path) -> None:
    (target / ".qbt-build").write_text(recipe.fingerprint() + "\n")


def new_model(recipe: DevModelRecipe, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size, intermediate_size=recipe.hidden_size * 2,
        num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads, num_key_value_heads=recipe.kv_heads,
        max_position_embeddings=recipe.context, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, torch_dtype="float32",
    )
    return LlamaForCausalLM(config)


def train_loop(model, recipe: DevModelRecipe, loss_at: Callable[[int], object], log, opt, sched=None) -> None:
    """`recipe.steps` optimiser steps on `loss_at(step)`, logging every 50; leaves the model in eval mode."""
    model.train()
    for step in range(1, recipe.steps + 1):
        loss = loss_at(step)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()
        if step % 50 == 0 or step == recipe.steps:
            log(f"[dev-models] {recipe.model_id}: step {step}/{recipe.steps} loss {loss.item():.3f}")
    model.eval()
