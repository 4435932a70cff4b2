"""What the fault tier needs around a running stack: streaming load that tallies what each client received (by its
own `x-request-id`), a probe that times recovery, and the money invariants checked after every fault."""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field

import httpx
import psutil

from serve_app.money import keyspace
from tests.support import lua_cost

MODEL = "qbt-sim-llm"
PROMPT = "Once upon a time"
INPUT_MICROS, OUTPUT_MICROS = 500_000, 1_500_000  # the sim model's prices in cluster/catalog.yaml (sim profile)


@dataclass
class Sent:
    """One request as its client saw it. The sim tokenizer is byte-level: one token per byte of text received."""

    request_id: str
    key: str
    received: int = 0
    outcome: str = "pending"  # done | in_band_error | http_<status> | the client's exception (ReadError, ...)


@dataclass
class Load:
    """`concurrency` clients streaming `max_tokens` each, in threads, until stopped."""

    base_url: str
    keys: list[str]
    concurrency: int = 12
    max_tokens: int = 120
    sent: list[Sent] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        for i in range(self.concurrency):
            t = threading.Thread(target=self._client, args=(self.keys[i % len(self.keys)],), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> list[Sent]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in self._threads), "a load client did not finish"
        return self.sent

    def _client(self, key: str) -> None:
        with httpx.Client(base_url=self.base_url, timeout=httpx.Timeout(30, connect=5)) as http:
            while not self._stop.is_set():
                s = Sent("fault-" + uuid.uuid4().hex, key)
                self.sent.append(s)
                try:
                    self._one(http, s)
                except httpx.HTTPError as exc:  # named, for the README's "what the client sees"
                    s.outcome = "done_then_" + type(exc).__name__ if s.outcome == "done" else type(exc).__name__
                    time.sleep(0.2)

    def _one(self, http: httpx.Client, s: Sent) -> None:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": self.max_tokens, "stream": True}
        with http.stream("POST", "/v1/completions", json=body,
                         headers={"Authorization": f"Bearer {s.key}", "x-request-id": s.request_id}) as res:
            if res.status_code != 200:
                s.outcome = f"http_{res.status_code}"
                res.read()
                time.sleep(0.2)
                return
            for line in res.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    s.outcome = "done" if s.outcome == "pending" else s.outcome
                    return
                event = json.loads(data)
                if "error" in event:
                    s.outcome = "in_band_error"
                    continue
                s.received += sum(len(c["text"].encode()) for c in event["choices"])


def serve_process(stack, title: str) -> psutil.Process:
    """One of our Serve replicas, found in the launcher's process tree by its Ray process title."""
    seen = []
    for p in stack.descendants():
        try:
            line = " ".join(p.cmdline())
        except psutil.NoSuchProcess:
            continue
        if title in line:
            return p
        seen.append(line[:80])
    raise AssertionError(f"no {title} process under the launcher; saw {seen}")


def time_to_serve(base_url: str, key: str, since: float, timeout: float = 120) -> float:
    """Seconds from `since` (monotonic) until a request is answered 200 again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            res = httpx.post(base_url + "/v1/completions", timeout=10, headers={"Authorization": f"Bearer {key}"},
                             json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2})
            if res.status_code == 200:
                return time.monotonic() - since
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"not served again within {timeout} s")


@dataclass
class Report:
    """The invariants after a fault; `lost_micros` and `unbilled` are the targets (0)."""

    fault: str
    requests: int
    received_tokens: int
    outcomes: dict[str, int]
    recovery_s: float | None
    lost_micros: int = 0  # what clients received and nobody paid for, plus any balance/ledger disagreement
    unbilled: int = 0  # requests whose client received tokens without a ledger row charging them
    most_unbilled_tokens: int = 0  # the largest shortfall of one request (received minus charged)
    overcharged: int = 0  # requests charged more than one cost of their tokens, or with a repeated row
    balance_vs_ledger_micros: int = 0
    reservations_left: int = 0
    stream_length: int = 0

    def row(self) -> dict:
        return self.__dict__


def balances(r, accounts: list[str]) -> dict[str, int]:
    return {a: int(r.hget(keyspace.account_record(a), "balance")) for a in accounts}


def settle_quietly(r, accounts: list[str], base_url: str, key: str, timeout: float = 60) -> int:
    """Waits until nothing is reserved (settlements landed, expired reservations reconciled by later admissions,
    which a probe request triggers); returns what is still reserved."""
    deadline = time.monotonic() + timeout
    while True:
        reserved = sum(int(r.hget(keyspace.account_record(a), "reserved") or 0) for a in accounts)
        if reserved == 0 and r.zcard(keyspace.RESERVATION_EXPIRY) == 0 or time.monotonic() > deadline:
            return reserved + r.zcard(keyspace.RESERVATION_EXPIRY)
        try:
            httpx.post(base_url + "/v1/completions", timeout=10, headers={"Authorization": f"Bearer {key}"},
                       json={"model": MODEL, "prompt": "x", "max_tokens": 1})
        except httpx.HTTPError:
            pass
        time.sleep(1)


def exported(base_url: str, retain_rows: int, timeout: float = 60) -> dict:
    """Waits until the exporter has moved every ledger row to the database and trimmed the stream to what it
    retains (health reports its backlog)."""
    deadline = time.monotonic() + timeout
    lag: dict | str = "unknown"
    while time.monotonic() < deadline:
        try:
            lag = httpx.get(base_url + "/health", timeout=10).json().get("ledger_export", "unavailable")
            if isinstance(lag, dict) and lag["unexported"] == 0 and lag["stream_length"] <= retain_rows:
                return lag
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"the ledger export did not catch up within {timeout} s: {lag}")


def check(fault: str, r, db, before: dict[str, int], sent: list[Sent], recovery_s: float | None,
          reservations_left: int) -> Report:
    """Money after the fault, from the SQL ledger (the system of record): the balance moved by exactly the ledger's
    sum; every token a client received is on its request's rows; no request is charged twice (one row of each kind,
    together never more than one cost of their tokens; a completed stream charged exactly what it received)."""
    for _ in range(10):  # a late settlement lands between the reads: read again
        after = balances(r, list(before))
        rows = [row for account in before for row in db.rows(account)]
        if balances(r, list(before)) == after:
            break
        time.sleep(0.5)
    by_request: dict[str, list[dict]] = {}
    for row in rows:
        by_request.setdefault(row["request_id"], []).append(row)
    report = Report(fault, len(sent), sum(s.received for s in sent), {}, recovery_s,
                    reservations_left=reservations_left, stream_length=r.xlen(keyspace.LEDGER))
    for request_id, charged in by_request.items():
        kinds = [row["status"] == "expired" for row in charged]
        prompt, completion = sum(x["prompt_tokens"] for x in charged), sum(x["completion_tokens"] for x in charged)
        if kinds.count(True) > 1 or kinds.count(False) > 1 or \
                sum(x["cost_micros"] for x in charged) > lua_cost(r, prompt, completion, INPUT_MICROS, OUTPUT_MICROS):
            report.overcharged += 1
    for s in sent:
        report.outcomes[s.outcome] = report.outcomes.get(s.outcome, 0) + 1
        charged = by_request.get(s.request_id, [])
        tokens = sum(row["completion_tokens"] for row in charged)
        if s.outcome == "done" and tokens != s.received:
            report.overcharged += tokens > s.received
        if not s.received:
            continue
        if tokens < s.received:
            report.unbilled += 1
            report.most_unbilled_tokens = max(report.most_unbilled_tokens, s.received - tokens)
            prompt = charged[0]["prompt_tokens"] if charged else len(PROMPT.encode())
            report.lost_micros += (lua_cost(r, prompt, s.received, INPUT_MICROS, OUTPUT_MICROS)
                                   - sum(row["cost_micros"] for row in charged))
    moved = sum(before[a] - after[a] for a in before)
    report.balance_vs_ledger_micros = moved - sum(row["cost_micros"] for row in rows)
    report.lost_micros += abs(report.balance_vs_ledger_micros)
    return report
