"""Long prompts are tokenized off the event loop (in one worker thread), short ones on it; the ids are the same."""

from __future__ import annotations

import threading

from deployments.sim_tokenizer import sim_tokenizer
from serve_app.api.protocol import parse_completion_request
from serve_app.serving import prompts
from tests.inprocess import LLM, service_config


async def test_long_prompts_are_tokenized_in_the_worker_thread_and_short_ones_on_the_loop(monkeypatch):
    spec = next(m for m in service_config().models if m.id == LLM)
    tokenizer = sim_tokenizer()
    threads = []
    original = prompts.tokenize

    def recording(req, spec, tok):
        threads.append(threading.current_thread().name)
        return original(req, spec, tok)

    monkeypatch.setattr(prompts, "tokenize", recording)
    short = parse_completion_request({"model": LLM, "prompt": "The capital of Canada is", "max_tokens": 1})
    long_text = "a" * (prompts.OFF_LOOP_CHARS // 2)
    long = parse_completion_request({"model": LLM, "prompt": [long_text, long_text], "max_tokens": 1})
    ids = parse_completion_request({"model": LLM, "prompt": [1] * prompts.OFF_LOOP_CHARS, "max_tokens": 1})
    spec = spec.model_copy(update={"max_model_len": 10 * prompts.OFF_LOOP_CHARS})
    assert (await prompts.tokenize_async(short, spec, tokenizer)).ids == original(short, spec, tokenizer).ids
    assert (await prompts.tokenize_async(long, spec, tokenizer)).ids == original(long, spec, tokenizer).ids
    await prompts.tokenize_async(ids, spec, tokenizer)
    assert threads[0] == threading.current_thread().name
    assert len(threads) == 3 and all(t.startswith("qbt-tokenize") for t in threads[1:])
