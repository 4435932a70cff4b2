"""How the hostile tier talks to the stack and judges each answer: requests sent as given (httpx with bytes, or raw
bytes on a socket when even httpx would tidy them: dot segments, broken framing, trickled bodies), and the rules
every answer must keep: never a 5xx, never a traceback, a 4xx always in the seed's error envelope with a known code.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field

import httpx

from serve_app.api.errors import TYPES, Code

CODES = {c.value: c for c in Code}
TRACE_MARKS = (b"Traceback", b'File "')
REFUSE, SERVE, ANY, HTTP_LAYER, NO_ANSWER = "refuse", "serve", "any", "http", "no_answer"


@dataclass
class Case:
    """One hostile input. `expect`: REFUSE (a 4xx in the envelope, with one of `codes` if given), SERVE (200),
    ANY (an answer below 400, or a 4xx in the envelope), HTTP_LAYER (framing the HTTP server itself refuses, in
    its own words: any answer but a 5xx, or the connection closed), NO_ANSWER (the client goes away; only the
    logs can tell). `raw`: bytes for a socket, a
    list of bytes and pauses (seconds) between them."""

    group: str
    name: str
    body: bytes | None = None
    expect: str = REFUSE
    codes: tuple[str, ...] = ()
    method: str = "POST"
    path: str = "/v1/completions"
    headers: list[tuple[str, str | bytes]] | None = None  # None: JSON content type and the tier's valid key
    raw: list[bytes | float] | None = None
    timeout: float = 30


@dataclass
class Answer:
    status: int | None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    error: str | None = None  # the client's exception when there was no answer
    seconds: float = 0.0


def send(client: httpx.Client, base_url: str, key: str, case: Case) -> Answer:
    started = time.monotonic()
    if case.raw is not None:
        answer = raw_exchange(base_url, case.raw, case.timeout)
    else:
        headers = case.headers if case.headers is not None else [
            ("content-type", "application/json"), ("authorization", f"Bearer {key}")]
        try:
            res = client.request(case.method, base_url + case.path, content=case.body, headers=headers,
                                 timeout=case.timeout)
            answer = Answer(res.status_code, {k.lower(): v for k, v in res.headers.items()}, res.content)
        except httpx.HTTPError as exc:
            answer = Answer(None, error=type(exc).__name__)
    answer.seconds = time.monotonic() - started
    return answer


def raw_exchange(base_url: str, parts: list[bytes | float], timeout: float) -> Answer:
    """Sends `parts` from a thread (pausing at floats) while reading the answer, so that a server answering before
    the body is all sent is still heard. The request should ask for `Connection: close`."""
    host, port = base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.settimeout(timeout)
    done = threading.Event()

    def sender():
        try:
            for part in parts:
                if isinstance(part, float):
                    if done.wait(part):
                        return
                else:
                    sock.sendall(part)
        except OSError:
            pass  # the server answered and closed while we were still sending: what it said is read below

    t = threading.Thread(target=sender, daemon=True)
    t.start()
    data = b""
    try:
        while not _complete(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        if not data:
            sock.close()
            return Answer(None, error=type(exc).__name__)
    finally:
        done.set()
        sock.close()
    t.join(timeout=5)
    return parse_response(data) if data else Answer(None, error="closed without an answer")


def _complete(data: bytes) -> bool:
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return len(rest) >= int(value)
        if name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
            return rest.endswith(b"0\r\n\r\n")
    return False


def parse_response(data: bytes) -> Answer:
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        return Answer(None, body=data[:2000], error=f"not HTTP: {data[:60]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.decode("latin-1").strip().lower()] = value.decode("latin-1").strip()
    if "chunked" in headers.get("transfer-encoding", ""):
        body = b""
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            body, rest = body + rest[:size], rest[size + 2:]
        rest = body
    return Answer(status, headers, rest)


def envelope_problem(answer: Answer, codes: tuple[str, ...] = ()) -> str | None:
    """None when the body is the seed's error envelope with a known code (of `codes`, if given). Fields beside the
    four are allowed: the guard's verdict on `content_filter`, the amounts on `insufficient_funds`."""
    try:
        err = json.loads(answer.body)["error"]
        keys = set(err)
    except (ValueError, KeyError, TypeError):
        return f"not the error envelope: {answer.body[:200]!r}"
    if not {"message", "type", "param", "code"} <= keys:
        return f"envelope fields {sorted(keys)}"
    code = CODES.get(err["code"])
    if code is None:
        return f"unknown code {err['code']!r}"
    if err["type"] != TYPES[code] or not isinstance(err["message"], str) or not err["message"]:
        return f"type {err['type']!r} for code {code.value}, message {err['message']!r}"
    if codes and code.value not in codes:
        return f"code {code.value}, expected one of {codes}"
    if not answer.headers.get("content-type", "").startswith("application/json"):
        return f"content-type {answer.headers.get('content-type')!r}"
    return None


def has_traceback(answer: Answer) -> bool:
    return any(mark in answer.body for mark in TRACE_MARKS)


def judge(case: Case, answer: Answer) -> str | None:
    """What is wrong with the answer, or None. A 5xx or a traceback is always wrong, whatever the case expects."""
    status = answer.status
    if status is not None and status >= 500:
        return f"5xx: {status} {answer.body[:300]!r}"
    if has_traceback(answer):
        return f"traceback in the response: {answer.body[:300]!r}"
    if case.expect == NO_ANSWER:
        return None
    if status is None:
        return None if case.expect == HTTP_LAYER else f"no answer ({answer.error})"
    if case.expect == HTTP_LAYER:
        return None
    if case.expect == SERVE:
        return None if status == 200 else f"status {status}, expected 200: {answer.body[:300]!r}"
    if case.expect == ANY and status < 400:
        return None
    if not 400 <= status < 500:
        return f"status {status}, expected a 4xx: {answer.body[:200]!r}"
    return envelope_problem(answer, case.codes)


def record(case: Case, answer: Answer, problem: str | None) -> dict:
    return {"group": case.group, "name": case.name, "status": answer.status, "error": answer.error,
            "seconds": round(answer.seconds, 3), "problem": problem, "code": _code(answer)}


def _code(answer: Answer) -> str | None:
    try:
        return json.loads(answer.body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
