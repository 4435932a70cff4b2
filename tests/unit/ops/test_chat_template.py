"""The dev LLM's chat format (serve_app/ops/chat.py) on a small tokenizer trained here the way the build trains the
real one; no model weights, no vLLM. One test reads the built model directory when it is there and current."""

from __future__ import annotations

import json

import pytest

from serve_app.config.paths import model_path
from serve_app.ops import chat, dev_models
from serve_app.ops.training import CORPUS_DIR, DevModelRecipe, is_built

QUESTION = [{"role": "user", "content": "What is the capital of Canada?"}]
SYSTEM = [{"role": "system", "content": "You are a helpful assistant."}] + QUESTION
ANSWER = {"role": "assistant", "content": "The capital of Canada is Ottawa."}


@pytest.fixture(scope="module")
def tok():
    lines = ["The capital of Canada is Ottawa.", "You are a helpful assistant.", "What is the capital of Canada?"]
    texts = lines + chat.tokenizer_texts([SYSTEM + [ANSWER]])
    return dev_models._train_tokenizer(texts, DevModelRecipe(model_id="t", corpus="dev_llm.txt", vocab_size=400))


def test_renders_chatml_with_one_bos_and_the_generation_prompt(tok):
    assert tok.apply_chat_template(SYSTEM, add_generation_prompt=True, tokenize=False) == (
        "<s><|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of Canada?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert tok.apply_chat_template(QUESTION + [ANSWER], tokenize=False) == (
        "<s><|im_start|>user\nWhat is the capital of Canada?<|im_end|>\n"
        "<|im_start|>assistant\nThe capital of Canada is Ottawa.<|im_end|>\n")


def test_prompt_ids_start_like_the_completions_path(tok):
    ids = chat.prompt_ids(tok, QUESTION)
    assert ids == tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.encode("The capital of Canada is")[:1] == [tok.bos_token_id]  # the post-processor's one BOS
    im_start, im_end = tok.convert_tokens_to_ids([chat.IM_START, chat.IM_END])
    assert ids[1] == im_start and ids[-3:-1] == [im_start, tok.convert_tokens_to_ids("assistant")]
    assert ids.count(im_end) == 1
    # The trap the ingress must avoid: the rendered text already holds the BOS.
    text = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert tok.encode(text)[:2] == [tok.bos_token_id, tok.bos_token_id]


def test_chatml_markers_are_single_special_tokens(tok):
    ids = tok.convert_tokens_to_ids([chat.BOS, chat.EOS, chat.IM_START, chat.IM_END])
    assert ids == [0, 1, 2, 3]
    assert set(ids) <= set(tok.all_special_ids)
    assert tok.decode(chat.prompt_ids(tok, QUESTION), skip_special_tokens=True) == (
        "user\nWhat is the capital of Canada?\nassistant\n")
    assert chat.eos_token_ids(tok) == [tok.eos_token_id, ids[3]]


def test_content_parts_and_null_content(tok):
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital "},
                                          {"type": "image_url", "image_url": {"url": "x"}},
                                          {"type": "text", "text": "of Canada?"}]}]
    render = tok.apply_chat_template
    assert render(parts, tokenize=False) == render(QUESTION, tokenize=False)
    assert render([{"role": "assistant", "content": None}], tokenize=False) == "<s><|im_start|>assistant\n<|im_end|>\n"


def test_training_row_learns_the_reply_and_its_end_only(tok):
    ids, labels = chat.training_row(tok, SYSTEM + [ANSWER])
    prompt = chat.prompt_ids(tok, SYSTEM)
    assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [-100] * len(prompt)
    learned = labels[len(prompt):]
    assert learned == ids[len(prompt):]
    assert tok.decode(learned) == "The capital of Canada is Ottawa.<|im_end|>\n"


def test_save_and_reload_keep_the_template_and_the_special_tokens(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.chat_template == chat.CHAT_TEMPLATE
    assert chat.prompt_ids(again, SYSTEM) == chat.prompt_ids(tok, SYSTEM)
    assert again.encode("The capital of Canada is") == tok.encode("The capital of Canada is")


def test_the_corpus_conversations_parse_and_hold_the_probe():
    lines = [ln for ln in (CORPUS_DIR / dev_models.DEV_LLM.corpus).read_text().splitlines() if ln.strip()]
    plain, chats = chat.split_corpus(lines)
    assert plain and all(not ln.startswith("{") for ln in plain)
    assert dev_models.CHAT_PROBE + [{"role": "assistant", "content": dev_models.CHAT_PROBE_EXPECT}] in chats
    assert any(m[0]["role"] == "system" for m in chats)
    with pytest.raises(ValueError, match="assistant"):
        chat.split_corpus(['{"messages": [{"role": "user", "content": "hi"}]}'])


def test_the_template_is_part_of_the_llm_fingerprint_only(monkeypatch):
    llm, guard = dev_models.DEV_LLM.fingerprint(), dev_models.DEV_GUARD.fingerprint()
    monkeypatch.setattr(chat, "CHAT_TEMPLATE", chat.CHAT_TEMPLATE + " ")
    assert dev_models.DEV_LLM.fingerprint() != llm
    assert dev_models.DEV_GUARD.fingerprint() == guard


def test_bucketed_batches_give_the_single_batch_loss(tok):
    import torch

    from serve_app.ops.training import new_model

    recipe = DevModelRecipe(model_id="t", corpus="dev_llm.txt", hidden_size=32, layers=1, heads=2, kv_heads=1)
    torch.manual_seed(0)
    model = new_model(recipe, tok)
    rows = [dev_models._text_row(tok, "The capital of Canada is Ottawa."), dev_models._text_row(tok, "Ottawa."),
            chat.training_row(tok, SYSTEM + [ANSWER]), chat.training_row(tok, QUESTION + [ANSWER])]
    with torch.no_grad():
        one = dev_models._loss(model, *dev_models._batches(rows, tok.eos_token_id, buckets=1))
        many = dev_models._loss(model, *dev_models._batches(rows, tok.eos_token_id, buckets=3))
    assert torch.allclose(one, many, atol=1e-5)


@pytest.mark.skipif(not is_built(dev_models.DEV_LLM), reason="the dev LLM is not built (qbt dev-models)")
def test_the_built_model_renders_and_stops_like_this():
    from transformers import AutoTokenizer

    path = model_path(dev_models.DEV_LLM.model_id)
    built = AutoTokenizer.from_pretrained(path)
    assert built.chat_template == chat.CHAT_TEMPLATE
    assert chat.prompt_ids(built, QUESTION)[:2] == built.convert_tokens_to_ids([chat.BOS, chat.IM_START])
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == chat.eos_token_ids(built)
