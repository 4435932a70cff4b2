"""The end-to-end tier's stack, started once: `qbt serve` (Ray Serve, the vLLM engine on the dev models) pointed at
the session's real Redis, driven by the official clients."""

from __future__ import annotations

import pytest

from tests.stack import start_stack
from tests.support import MODEL, RUNNING_STACKS


@pytest.fixture(scope="session")
def stack(redis_server, tmp_path_factory):
    stack = start_stack(redis_server.url, tmp_path_factory)
    RUNNING_STACKS.append(stack.stop)
    yield stack
    if stack.stop in RUNNING_STACKS:
        RUNNING_STACKS.remove(stack.stop)
    stack.stop()


@pytest.fixture
def client(stack, customer):
    import openai

    return openai.OpenAI(base_url=stack.base_url + "/v1", api_key=customer.key, max_retries=0, timeout=120)


@pytest.fixture
def http(stack, customer):
    import httpx

    with httpx.Client(base_url=stack.base_url, timeout=120,
                      headers={"Authorization": f"Bearer {customer.key}"}) as c:
        yield c


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from serve_app.config.paths import model_path

    return AutoTokenizer.from_pretrained(model_path(MODEL))
