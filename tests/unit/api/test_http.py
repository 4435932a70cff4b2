"""Bodies that are not text: lone surrogates (escaped or raw) and a client that leaves mid-body are 400s in the
contract's envelope, never a 5xx with a traceback (found by the hostile tier)."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.requests import Request

from serve_app.api.errors import ApiError
from serve_app.api.http import read_json


def request_of(*messages: dict) -> Request:
    queue = list(messages)

    async def receive():
        return queue.pop(0)

    return Request({"type": "http", "method": "POST", "headers": []}, receive)


def body(raw: bytes) -> Request:
    return request_of({"type": "http.request", "body": raw, "more_body": False})


@pytest.mark.parametrize("raw", [b'{"prompt": "a\\ud800b"}', b'{"prompt": ["x", "\\udc80"]}',
                                 b'{"prompt": "\\udc00\\ud800"}', b'{"prompt": "a\xed\xa0\x80b"}',
                                 '{"prompt": "x"}'.encode("utf-16")])
def test_text_that_is_no_unicode_is_refused(raw):
    with pytest.raises(ApiError) as err:
        asyncio.run(read_json(body(raw), 10_000))
    assert err.value.status == 400


def test_escaped_pairs_and_plain_utf8_pass():
    raw = json.dumps({"prompt": "emoji \U0001F600 é"}).encode()  # ensure_ascii: a surrogate pair escape
    assert b"\\ud83d\\ude00" in raw
    assert asyncio.run(read_json(body(raw), 10_000)) == {"prompt": "emoji \U0001F600 é"}
    assert asyncio.run(read_json(body("{\"p\": \"é\"}".encode()), 100)) == {"p": "é"}


def test_a_client_leaving_mid_body_is_a_plain_refusal():
    req = request_of({"type": "http.request", "body": b'{"prompt": ', "more_body": True},
                     {"type": "http.disconnect"})
    with pytest.raises(ApiError) as err:
        asyncio.run(read_json(req, 10_000))
    assert "disconnected" in err.value.message
