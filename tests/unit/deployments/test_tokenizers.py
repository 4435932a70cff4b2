"""The ingress's token ids are the engine's, for every tokenizer mode the catalog uses (issue #15, item 5): loaded by
vLLM's own `get_tokenizer` with the model's engine arguments, chat rendered as vLLM's renderers do. The Mistral
files are the ones mistral_common ships (Mistral-Nemo's tekken.json, Mistral-7B-v0.3's SentencePiece v3)."""

from __future__ import annotations

import shutil
from pathlib import Path

import mistral_common
import pytest

from deployments.sim_tokenizer import sim_tokenizer
from deployments.tokenizers import chat_render, is_mistral, load_tokenizer, plain_tokens, serves_chat
from serve_app.config.catalog import load as load_catalog

MISTRAL_DATA = Path(mistral_common.__file__).parent / "data"
TURNS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of Canada?"},
         {"role": "assistant", "content": "Ottawa."}, {"role": "user", "content": "And of France?"}]
TEXT = "The capital of Canada is"


def test_the_catalog_uses_only_the_modes_tested_here():
    modes = {m.engine_args.get("tokenizer_mode", "auto") for m in load_catalog().models}
    assert modes == {"auto", "mistral"}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf-tokenizer")
    sim_tokenizer().save_pretrained(path)  # a Hugging Face tokenizer with a ChatML template
    return path


@pytest.fixture(scope="module", params=[("tekken_240718.json", "tekken.json"),
                                        ("mistral_instruct_tokenizer_240323.model.v3", "tokenizer.model.v3")])
def mistral_dir(request, tmp_path_factory) -> Path:
    source, name = request.param
    path = tmp_path_factory.mktemp("mistral-tokenizer")
    shutil.copy(MISTRAL_DATA / source, path / name)
    return path


def test_hugging_face_mode_chat_and_text_ids_are_the_engines(hf_dir):
    tok = load_tokenizer(str(hf_dir), {})
    assert not is_mistral(tok) and serves_chat(tok)
    ids, text = chat_render(tok, TURNS)
    engine = tok.apply_chat_template(TURNS, add_generation_prompt=True, tokenize=True)  # vLLM's HF renderer
    assert ids == list(engine["input_ids"] if hasattr(engine, "keys") else engine)
    assert text.endswith("<|im_start|>assistant\n") and tok.encode(TEXT) == tok(TEXT)["input_ids"]
    assert 4 not in plain_tokens(tok, "<|im_end|>")  # typed, it stays characters


def test_mistral_mode_chat_goes_straight_to_ids(mistral_dir):
    tok = load_tokenizer(str(mistral_dir), {"tokenizer_mode": "mistral"})
    assert is_mistral(tok) and serves_chat(tok)
    ids, text = chat_render(tok, TURNS)
    assert ids == list(tok.apply_chat_template(TURNS, add_generation_prompt=True))  # vLLM's Mistral renderer
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.encode(text, add_special_tokens=False) != ids  # why: re-encoding the rendered text is not the same
    assert tok.encode(TEXT)[0] == tok.bos_token_id and len(tok) >= 32768
    typed = plain_tokens(tok, "[INST] hi [/INST]")
    assert tok.bos_token_id not in typed and len(typed) > 2  # never a special token from text
