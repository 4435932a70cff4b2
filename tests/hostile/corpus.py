"""The hostile inputs, generated: every field of the completions contract crossed with values of the wrong type and
out of range, broken JSON, broken text, sizes at and past the caps, bad credentials, unknown routes and methods,
dot segments, broken HTTP framing and trickled bodies. Each is a `Case` with what its answer must be."""

from __future__ import annotations

import json

from serve_app.api.protocol import MAX_CHOICES, MAX_PROMPTS, CompletionRequest
from tests.hostile.exchange import ANY, HTTP_LAYER, NO_ANSWER, SERVE, Case

INVALID = ("invalid_request",)
AUTH = ("invalid_api_key", "rate_limit_exceeded")  # past 20 failures in 10 s from one address, the throttle answers
BIG = 10**30

# The wrong-type values for each kind of field (a value may be right for one field and wrong for another).
WRONG = {
    "int": ["16", "x", 1.5, 2.0, True, [], {}, [1]],
    "float": ["0.5", True, [], {}, [0.5], "NaN"],
    "bool": [1, 0, "true", "false", 1.0, [], {}],
    "str": [1, 1.5, True, [], {}, ["a"]],
    "model": [1, True, [], {}, ["x"], None, ""],
    "prompt": [42, 1.5, True, {}, None, [], [[]], [1, "a"], ["a", 1], [[1], "a"], [1.5], [True], [None], [[1.5]],
               {"text": "hi"}, [-1], [[5], [-1]], [["a"]]],
    "stop": [1, True, {}, [1], [None], [["a"]], ["a", "b", "c", "d", "e"], "", ["a", ""]],
    "stream_options": ["x", 1, True, [], {"include_usage": 1}, {"include_usage": "true"}, {"x": True}],
    "logit_bias": [[], "x", 1, True, {"x": 1}, {"5": "1"}, {"5": 101}, {"5": -101}, {"-5": 1}, {"": 1}, {"5": True},
                   {"5": [1]}, {"5": None}, {" 5": 1}, {"5.0": 1},
                   {"\u00b2": 1}, {"\u0663": 1}, {"1" * 11: 1}],
    "ids": ["x", 1, [-1], ["1"], [1.5], {}, [True], [None], [[1]]],
    "words": ["x", [1], [None], {}, 1, [["a"]], [""]],
    "structured": ["x", 1, True, [], {}, {"regex": 1}, {"choice": []}, {"choice": "a"}, {"json": 3},
                   {"regex": "a", "choice": ["a"]}, {"x": 1}, {"json_object": "true"}, {"grammar": None, "x": 1}],
}
KINDS = {
    "model": "model", "prompt": "prompt", "suffix": "str", "max_tokens": "int", "temperature": "float", "top_p": "float",
    "n": "int", "best_of": "int", "stream": "bool", "stream_options": "stream_options", "logprobs": "int",
    "echo": "bool", "stop": "stop", "presence_penalty": "float", "frequency_penalty": "float",
    "logit_bias": "logit_bias", "seed": "int", "user": "str", "top_k": "int", "min_p": "float",
    "repetition_penalty": "float", "min_tokens": "int", "ignore_eos": "bool", "stop_token_ids": "ids",
    "include_stop_str_in_output": "bool", "skip_special_tokens": "bool", "spaces_between_special_tokens": "bool",
    "allowed_token_ids": "ids", "bad_words": "words", "structured_outputs": "structured",
    "return_token_ids": "bool", "priority": "int", "prompt_logprobs": "int"}
OUT_OF_RANGE = {
    "max_tokens": [-1, BIG, -BIG], "n": [0, MAX_CHOICES + 1, -1, BIG, -BIG], "best_of": [0, 21, BIG],
    "logprobs": [-1, 6, BIG], "seed": [2**63, -2**63 - 1, BIG], "top_k": [-2, -BIG, 2**63], "min_tokens": [-1, BIG, 3],
    "temperature": [-0.1, 2.01, 1e300], "top_p": [-0.1, 1.01, 0], "presence_penalty": [-2.01, 2.01],
    "frequency_penalty": [-2.01, 2.01], "min_p": [-0.1, 1.01], "repetition_penalty": [0, -1, 2.01],
    "prompt_logprobs": [-1, 21, BIG], "priority": [1, -1, BIG]}  # priority: the sim models do not schedule by it
# No upper bound in the contract: passed through to the engine (vLLM clamps or refuses them); any answer but a 5xx.
UNBOUNDED = {"top_k": 2**63 - 1, "stop_token_ids": [BIG], "allowed_token_ids": [BIG], "logit_bias": {"9" * 10: 1}}


def j(obj) -> bytes:
    return json.dumps(obj).encode()  # NaN and Infinity as their literals, as Python's json writes them


def build(key: str, model: str, context: int, vocab: int) -> list[Case]:
    base = {"model": model, "prompt": "hello", "max_tokens": 2}
    cases = fields(base) + documents(base) + text(base, model) + sizes(base, key, context, vocab)
    return cases + credentials(base, key) + routes(base, key) + framing(base, key)


def fields(base: dict) -> list[Case]:
    assert set(KINDS) == set(CompletionRequest.model_fields), "a field of the contract has no hostile values"
    cases = []
    for name, kind in KINDS.items():
        extra = {"stream": True} if name == "stream_options" else {}
        codes = INVALID + ("model_not_found",) if name == "model" else INVALID  # "" is a string: no such model
        for value in WRONG[kind]:
            cases.append(Case("wrong type", f"{name}={value!r}"[:80], j({**base, **extra, name: value}),
                              codes=codes))
    for name, values in OUT_OF_RANGE.items():
        for value in values:
            cases.append(Case("out of range", f"{name}={value!r}"[:80], j({**base, name: value}), codes=INVALID))
    for name in [n for n, k in KINDS.items() if k in ("int", "float")]:
        for literal in (b"NaN", b"Infinity", b"-Infinity"):
            body = j(base)[:-1] + b', "' + name.encode() + b'": ' + literal + b"}"
            cases.append(Case("non-finite", f"{name}={literal.decode()}", body, codes=INVALID))
    for literal in (b"NaN", b"Infinity"):
        cases.append(Case("non-finite", f"logit_bias value {literal.decode()}",
                          j(base)[:-1] + b', "logit_bias": {"5": ' + literal + b"}}", codes=INVALID))
    for name, value in UNBOUNDED.items():
        cases.append(Case("unbounded", f"{name}={value!r}"[:80], j({**base, name: value}), expect=ANY))
    cases += [Case("consistency", "best_of < n", j({**base, "n": 3, "best_of": 2}), codes=INVALID),
              Case("consistency", "best_of > n streamed", j({**base, "best_of": 3, "stream": True}), codes=INVALID),
              Case("consistency", "stream_options without stream", j({**base, "stream_options": {}}), codes=INVALID),
              Case("consistency", "min_tokens > max_tokens", j({**base, "min_tokens": 3}), codes=INVALID),
              Case("consistency", "suffix on a model without FIM", j({**base, "suffix": "!"}), codes=INVALID)]
    for name in ("frobnicate", "Model", "messages", "functions", "__proto__", "constructor", "a\u0000b", "\ud800"):
        cases.append(Case("unknown field", repr(name), j({**base, name: 1}), codes=INVALID))
    cases.append(Case("unknown field", "stream_options.x", j({**base, "stream": True, "stream_options": {"x": 1}}),
                      codes=INVALID))
    cases += [Case("missing field", "{}", j({}), codes=INVALID),
              Case("missing field", "no prompt", j({"model": base["model"]}), codes=INVALID),
              Case("missing field", "no model", j({"prompt": "hi"}), codes=INVALID)]
    return cases


def documents(base: dict) -> list[Case]:
    """Bodies that are not a JSON object, or not JSON at all."""
    bodies = {
        "empty": b"", "{": b"{", "truncated": j(base)[:-7], "truncated string": b'{"model": "qbt', "}": b"}",
        "list": b"[]", "list of ints": b"[1, 2]", "list of the body": b"[" + j(base) + b"]", "string": b'"hello"',
        "number": b"42", "float": b"4.2e1", "null": b"null", "true": b"true", "NaN": b"NaN",
        "single quotes": b"{'model': 'x'}", "trailing comma": j(base)[:-1] + b",}", "comment": b"/* */" + j(base),
        "two documents": j(base) + j(base), "NUL after": j(base) + b"\x00", "NUL": b"\x00",
        "100k [": b"[" * 100_000, "100k {": b"{" * 100_000, "50k nested objects": b'{"a":' * 50_000 + b"1" +
        b"}" * 50_000, "50k nested lists in a field": j(base)[:-1] + b', "stop": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        "5000-digit int": j(base)[:-1] + b', "seed": ' + b"9" * 5000 + b"}",
        "bytes ff fe": b"\xff\xfe\xfd", "invalid UTF-8 in a string": b'{"model": "\xc3\x28", "prompt": "hi"}',
        "overlong slash": b'{"model": "x", "prompt": "\xc0\xaf"}', "form encoded": b"model=x&prompt=hi",
    }
    cases = [Case("not a JSON object", name, body, codes=INVALID) for name, body in bodies.items()]
    cases += [Case("not a JSON object", "duplicate key, last wrong", j(base)[:-1] + b', "max_tokens": "2"}',
                   codes=INVALID),
              Case("encoding", "UTF-8 BOM", b"\xef\xbb\xbf" + j(base), expect=ANY),
              Case("encoding", "UTF-16", json.dumps(base).encode("utf-16"), expect=ANY)]
    return cases


def text(base: dict, model: str) -> list[Case]:
    """Lone surrogates (as JSON escapes: valid JSON, not valid Unicode) and NUL characters."""
    surrogates = {  # json.dumps writes them as escapes
        "prompt": {"prompt": "a\ud800b"}, "prompt, low half": {"prompt": "\udc80"},
        "prompt, halves reversed": {"prompt": "\udc00\ud800"}, "in a prompt list": {"prompt": ["ok", "\ud800"]},
        "model": {"model": model + "\ud800"}, "stop": {"stop": "\ud800"}, "user": {"user": "\ud800"},
        "bad_words": {"bad_words": ["\ud800"]}, "logit_bias key": {"logit_bias": {"\ud800": 1}},
    }
    cases = [Case("lone surrogate", name, j({**base, **fields}), expect=ANY) for name, fields in surrogates.items()]
    # Invalid UTF-8 (a surrogate encoded as UTF-8): Python's json.loads decodes bytes with `surrogatepass`.
    cases.append(Case("lone surrogate", "UTF-8-encoded, in the prompt", expect=ANY,
                      body=b'{"model": "' + model.encode() + b'", "prompt": "a\xed\xa0\x80b"}'))
    cases += [Case("NUL", "in the prompt", j({**base, "prompt": "a\u0000b"}), expect=ANY),
              Case("NUL", "in the model", j({**base, "model": model + "\u0000"}), codes=("model_not_found",)),
              Case("NUL", "model is NUL", j({**base, "model": "\u0000"}), codes=("model_not_found",)),
              Case("NUL", "in stop", j({**base, "stop": "\u0000"}), expect=ANY),
              Case("NUL", "in user", j({**base, "user": "\u0000" * 100}), expect=ANY),
              Case("model", "unknown", j({**base, "model": "gpt-4"}), codes=("model_not_found",)),
              Case("model", "in the catalog, not served", j({**base, "model": "Qwen3-32B"}), codes=("model_not_found",)),
              Case("model", "10 KB name", j({**base, "model": "m" * 10_000}), codes=("model_not_found",)),
              Case("model", "path traversal", j({**base, "model": "../../etc/passwd"}), codes=("model_not_found",))]
    return cases


def sizes(base: dict, key: str, context: int, vocab: int) -> list[Case]:
    cases = [
        Case("size", "2.1 MB body", codes=INVALID,
             raw=[request("POST", "/v1/completions", key, j({**base, "prompt": "x" * 2_100_000}))]),
        Case("size", "1.9 MB prompt (past the context)", j({**base, "prompt": "x" * 1_900_000}), codes=INVALID),
        Case("size", "1.9 MB of token ids", j({**base, "prompt": [5] * 450_000}), codes=INVALID),
        Case("size", "100k logit_bias entries", j({**base, "logit_bias": {str(i): 1 for i in range(100_000)}}),
             expect=ANY),
        Case("size", "a 100k-character stop", j({**base, "stop": "s" * 100_000}), expect=ANY),
        Case("size", "100k bad_words", j({**base, "bad_words": ["w"] * 100_000}), expect=ANY),
        Case("caps", f"{MAX_PROMPTS} prompts", j({**base, "prompt": ["a"] * MAX_PROMPTS, "max_tokens": 1}),
             expect=SERVE),
        Case("caps", f"{MAX_PROMPTS + 1} prompts", j({**base, "prompt": ["a"] * (MAX_PROMPTS + 1)}), codes=INVALID),
        Case("caps", "64 prompts x n=2", j({**base, "prompt": ["a"] * 64, "n": 2, "max_tokens": 1}), expect=SERVE),
        Case("caps", "65 prompts x n=2", j({**base, "prompt": ["a"] * 65, "n": 2}), codes=INVALID),
        Case("caps", "n=128", j({**base, "n": MAX_CHOICES, "max_tokens": 1}), expect=SERVE),
        Case("caps", "12 prompts x best_of 20 (240 sequences)",
             j({**base, "prompt": ["a"] * 12, "best_of": 20, "max_tokens": 1}), expect=SERVE),
        Case("caps", "13 prompts x best_of 20 (260 sequences)", j({**base, "prompt": ["a"] * 13, "best_of": 20}),
             codes=INVALID),
        Case("caps", "4 stops", j({**base, "stop": ["a", "b", "c", "d"]}), expect=SERVE),
        Case("caps", f"prompt of {context - 1} tokens + 1", j({**base, "prompt": "y" * (context - 1), "max_tokens": 1}),
             expect=SERVE),
        Case("caps", f"prompt of {context} tokens", j({**base, "prompt": "y" * context, "max_tokens": 0}),
             codes=INVALID),
        Case("caps", "max_tokens to the context", j({**base, "max_tokens": context}), codes=INVALID),
        Case("caps", f"{MAX_PROMPTS} token-id prompts", j({**base, "prompt": [[5, 6]] * MAX_PROMPTS, "max_tokens": 1}),
             expect=SERVE),
    ]
    for ids in ([-1], [vocab], [10**9], [BIG], [[5], [vocab]], [5, -5]):
        cases.append(Case("token ids", f"prompt {ids}", j({**base, "prompt": ids}), codes=INVALID))
    cases += [Case("token ids", "special ids only", j({**base, "prompt": [0, 1, 2, 3, 4]}), expect=ANY),
              Case("token ids", "highest id", j({**base, "prompt": [vocab - 1]}), expect=SERVE)]
    return cases


def credentials(base: dict, key: str) -> list[Case]:
    body = j(base)
    values: dict[str, str | bytes | None] = {
        "missing": None, "empty": "", "Bearer": "Bearer", "Basic": "Basic eDp5",
        "Basic with a qbt key": "Basic " + key, "not qbt": "Bearer sk-abc", "qbt_ only": "Bearer qbt_",
        "unknown qbt key": "Bearer qbt_" + "u" * 40, "lower-case scheme, unknown key": "bearer qbt_" + "l" * 40, "10 KB key": "Bearer qbt_" + "k" * 10_000,
        "non-ASCII key": "Bearer qbt_ключ".encode(), "latin-1 bytes": b"Bearer qbt_\xff\xfe",
        "valid key + garbage": f"Bearer {key} extra", "tab": f"Bearer\t{key}x",
    }
    cases = []
    for name, value in values.items():
        headers = [("content-type", "application/json")] + ([("authorization", value)] if value is not None else [])
        cases.append(Case("credentials", name, body, headers=headers, codes=AUTH))
    cases.append(Case("credentials", "Bearer and spaces", codes=AUTH, raw=[  # httpx will not send the spaces
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer   \r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)]))
    cases += [Case("credentials", "GET /v1/models without a key", method="GET", path="/v1/models", headers=[],
                   codes=AUTH),
              Case("credentials", "GET /v1/models, unknown key", method="GET", path="/v1/models",
                   headers=[("authorization", "Bearer qbt_" + "m" * 40)], codes=AUTH)]
    return cases


def routes(base: dict, key: str) -> list[Case]:
    body = j(base)
    cases = [Case("route", f"{m} {p}", body, method=m, path=p, codes=("not_found",))
             for m, p in (("GET", "/v1/nothing"), ("POST", "/v1/chat/completion"), ("POST", "/v1/embeddings"),
                          ("GET", "/"), ("POST", "/v1"), ("GET", "/admin"), ("POST", "/v1/completions/x"))]
    cases += [Case("method", f"{m} {p}", body, method=m, path=p, codes=INVALID)
              for m, p in (("GET", "/v1/completions"), ("PUT", "/v1/completions"), ("DELETE", "/v1/completions"),
                           ("PATCH", "/v1/completions"), ("OPTIONS", "/v1/completions"), ("POST", "/v1/models"),
                           ("DELETE", "/v1/models"), ("POST", "/health"))]
    # Below the service: the HTTP parser refuses unknown methods, Serve's router a target that is not a path.
    cases += [Case("method", "FOO /v1/completions", body, method="FOO", expect=HTTP_LAYER),
              Case("path", "* (not a path)", expect=HTTP_LAYER, raw=[request("POST", "*", key, body)])]
    cases.append(Case("route", "POST /v1/completions/ (trailing slash)", body, path="/v1/completions/", expect=ANY))
    # Dot segments and encodings httpx would normalise: sent raw. The service may route them or refuse them.
    for path in ("/v1/../v1/completions", "/%2e%2e/v1/completions", "/v1/%2e%2e/v1/completions",
                 "/v1/completions/..", "//v1/completions", "/v1//completions", "/v1/completions%00",
                 "/../../../../etc/passwd", "/v1/%63ompletions", "/v1/completions?model=x%00",
                 "http://evil.example/v1/completions"):
        cases.append(Case("path", path, expect=ANY, raw=[request("POST", path, key, body)]))
    return cases


def request(method: str, path: str, key: str, body: bytes, length: int | None = None, extra: bytes = b"") -> bytes:
    size = len(body) if length is None else length
    return (f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {key}\r\nContent-Length: {size}\r\n").encode() + extra + b"\r\n" + body


def framing(base: dict, key: str) -> list[Case]:
    """What the HTTP server itself answers (without the service's envelope), trickled bodies, a client gone."""
    body = j(base)
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {key}\r\n"
            ).encode()
    chunked = head + b"Transfer-Encoding: chunked\r\n\r\n"
    cases = [Case("http framing", name, expect=HTTP_LAYER, raw=[raw]) for name, raw in {
        "garbage request line": b"GARBAGE\r\n\r\n",
        "Content-Length abc": head + b"Content-Length: abc\r\n\r\n" + body,
        "Content-Length -1": head + b"Content-Length: -1\r\n\r\n" + body,
        "two Content-Lengths": head + b"Content-Length: 2\r\nContent-Length: 30\r\n\r\n" + body,
        "Content-Length and chunked": head + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "header without a colon": head + b"NoColonHere\r\n\r\n",
        "100 KB header": head + b"X-Big: " + b"b" * 100_000 + b"\r\n\r\n",
        "bad chunk size": chunked + b"zz\r\n" + body + b"\r\n0\r\n\r\n",
        "NUL in the Authorization header": request("POST", "/v1/completions", key + "\x00", body),
    }.items()]
    cases += [
        Case("http framing", "chunked body", expect=SERVE,
             raw=[chunked + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"]),
        Case("http framing", "2.1 MB declared, never sent", codes=INVALID,
             raw=[request("POST", "/v1/completions", key, b"", length=2_100_000)]),
        Case("http framing", "2.1 MB chunked", codes=INVALID,
             raw=[chunked] + [b"100000\r\n" + b"x" * 0x100000 + b"\r\n"] * 3 + [b"0\r\n\r\n"]),
        Case("header", "10 KB x-request-id", body, expect=SERVE, headers=auth(key, ("x-request-id", "r" * 10_000))),
        Case("header", "non-ASCII x-request-id", body, expect=SERVE,
             headers=auth(key, ("x-request-id", "ид".encode()))),
        Case("header", "garbage traceparent", body, expect=SERVE, headers=auth(key, ("traceparent", "00-zz-zz-zz"))),
        Case("header", "8 KB traceparent", body, expect=SERVE, headers=auth(key, ("traceparent", "0" * 8000))),
        Case("header", "200 extra headers", body, expect=SERVE,
             headers=auth(key, *[(f"x-h{i}", "v") for i in range(200)])),
        Case("content type", "missing", body, expect=ANY, headers=[("authorization", f"Bearer {key}")]),
        Case("content type", "text/plain", body, expect=ANY, headers=auth(key, ("content-type", "text/plain"))),
        Case("content type", "form", body, expect=ANY,
             headers=auth(key, ("content-type", "application/x-www-form-urlencoded"))),
        Case("content type", "multipart", body, expect=ANY,
             headers=auth(key, ("content-type", "multipart/form-data; boundary=x"))),
        Case("content type", "8 KB", body, expect=ANY, headers=auth(key, ("content-type", "a/" + "b" * 8000))),
        # The body-read deadline (body_read_s, 3 s in this tier) answers a client that sends a little and stalls.
        Case("trickle", "5 bytes then a stall", codes=INVALID, timeout=20,
             raw=[request("POST", "/v1/completions", key, body[:5], length=len(body)), 15.0]),
        Case("trickle", "headers then a stall", codes=INVALID, timeout=20,
             raw=[request("POST", "/v1/completions", key, b"", length=len(body)), 15.0]),
        Case("trickle", "a byte a second, chunked", codes=INVALID, timeout=20,
             raw=[chunked] + [x for b in body[:10] for x in (b"1\r\n" + bytes([b]) + b"\r\n", 1.0)]),
        Case("gone", "half a body, then the client closes", expect=NO_ANSWER, timeout=1,
             raw=[request("POST", "/v1/completions", key, body[:10], length=len(body))]),
    ]
    return cases


def auth(key: str, *headers: tuple[str, str | bytes]) -> list[tuple[str, str | bytes]]:
    return [("content-type", "application/json"), ("authorization", f"Bearer {key}"), *headers]
