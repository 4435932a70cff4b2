"""The request path in this process, without Ray: the real Gateway and CompletionPath, the simulated engine in this process behind
handles that behave like Serve's (requests and items through plain pickle, cancellable, assignment future), and an
in-memory Billing that records what the path asks of it (the money itself is tested against Redis)."""

from __future__ import annotations

import asyncio
import json
import pickle
from dataclasses import dataclass, field

from starlette.requests import Request

from deployments.relay import Progress, RelayServer, served
from deployments.sim_engine import SimEngine
from deployments.wire import Usage
from serve_app.api.errors import ApiError, Code
from serve_app.config.service import ServiceConfig
from serve_app.money.admission import Admission
from serve_app.money.limits import LimitState
from serve_app.money.status import Status
from serve_app.safety.moderator import Moderator
from serve_app.safety.policy import GuardMode, GuardPolicy
from serve_app.safety.stage import SafetyStage
from serve_app.serving.gateway import Gateway
from serve_app.serving.routing import ModelRouter

LLM, GUARD, LEAKY = "sim-llm", "sim-guard", "sim-leaky"
PRICES = {"input_usd_per_mtok": "0.50", "output_usd_per_mtok": "1.50"}
KEY = "qbt_" + "k" * 40


def _wire(obj):
    return pickle.loads(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


class InProcessHandle:
    """Serve's DeploymentHandle as the router uses it: `options(...)`, then `.remote(req)`."""

    def __init__(self, engine: SimEngine, relay: RelayServer | None = None):
        self.engine = engine
        self.relay = relay

    def options(self, *, method_name: str, stream: bool = False, **_):
        return _Method(self.engine, method_name, stream, self.relay)


@dataclass
class _Method:
    engine: SimEngine
    name: str
    stream: bool
    relay: RelayServer | None

    def remote(self, *args):
        args = tuple(_wire(a) for a in args)
        call = getattr(self.engine, self.name)(*args)
        if not self.stream:
            return UnaryResponse(call)
        return StreamResponse(served(call, args[0], self.relay, Progress()), args[0])  # as ModelServer.stream


class UnaryResponse:
    def __init__(self, coro):
        self.task = asyncio.ensure_future(coro)  # Serve starts the call at once, awaited or not

    async def _fetch_future_result_async(self):
        return None

    def cancel(self):
        self.task.cancel()

    def __await__(self):
        return _wire_result(self.task).__await__()


async def _wire_result(task):
    return _wire(await task)


class StreamResponse:
    """Items as the model server sends them (`wire.outgoing`, or the relay's ticket), pulled from the replica's
    generator as Serve does: eagerly, whether or not the caller is reading (the relay depends on it)."""

    def __init__(self, agen, req):
        self.agen = agen
        self.req = req
        self.cancelled = False
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pump = asyncio.ensure_future(self._pump())

    async def _pump(self):
        try:
            async for raw in self.agen:
                self.queue.put_nowait(("item", _wire(raw)))
            self.queue.put_nowait(("end", None))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # what the handle raises to its caller
            self.queue.put_nowait(("error", exc))

    async def _fetch_future_result_async(self):
        return None

    def __aiter__(self):
        return self

    async def __anext__(self):
        kind, value = await self.queue.get()
        if kind == "end":
            self.queue.put_nowait((kind, value))
            raise StopAsyncIteration
        if kind == "error":
            self.queue.put_nowait((kind, value))
            raise value
        return value

    def cancel(self):
        self.cancelled = True
        self.pump.cancel()


class NoMetrics:
    """Ray Serve's metrics need a Ray worker; the path only calls inc/observe."""

    def __getattr__(self, name):
        return self

    def inc(self, *args, **kwargs):
        pass

    def observe(self, *args, **kwargs):
        pass


@dataclass
class FakeBilling:
    """What the path asked of money: admissions and settlements, in order. `refuse` makes admission fail."""

    keys: dict[str, str] = field(default_factory=lambda: {KEY: "acct"})
    guard: str | None = "off"
    refuse: ApiError | None = None
    admitted: list[Admission] = field(default_factory=list)
    settled: list[tuple[str, Usage, Status]] = field(default_factory=list)
    settled_event: asyncio.Event = field(default_factory=asyncio.Event)

    async def authenticate(self, key: str):
        from serve_app.money.admission import KeyAccess

        if key not in self.keys:
            raise ApiError(Code.INVALID_API_KEY, "Invalid API key")
        return KeyAccess(self.keys[key])

    async def credits(self, key: str):
        from serve_app.money.admission import Credits

        return Credits((await self.authenticate(key)).account, 5_000_000, 100 * len(self.admitted) - 0)

    def recent(self, key: str) -> bool:
        return False

    async def known(self, key: str, before_lookup=None) -> None:
        if before_lookup is not None:  # every key is "not seen recently" here
            before_lookup()
        await self.authenticate(key)

    async def admit(self, key, completion_id, request_id, model, prices, req, prompt_ids,
                    safety_model: bool = False) -> Admission:
        await self.authenticate(key)
        if self.refuse is not None:
            raise self.refuse
        admission = Admission(completion_id, request_id, self.keys[key], "key_test", 100,
                              LimitState(0, 0, 0, 0, 0, 0), self.guard)
        self.admitted.append(admission)
        return admission

    async def settle(self, admission, usage: Usage, status: Status) -> int:
        """Charges 1 micro-dollar per prompt token and 3 per completion token (the real rule is in money/lua.py)."""
        self.settled.append((admission.completion_id, usage, status))
        self.settled_event.set()
        return usage.prompt_tokens + 3 * usage.completion_tokens if status.charged else 0

    async def drain(self, timeout_s: float) -> int:
        return 0

    async def one_settlement(self, timeout: float = 5) -> tuple[str, Usage, Status]:
        """The one settlement of the request: it came, and no second one follows it."""
        await asyncio.wait_for(self.settled_event.wait(), timeout)
        await asyncio.sleep(0.05)
        assert len(self.settled) == 1, self.settled
        return self.settled[0]


def service_config(**service) -> ServiceConfig:
    def sim(model_id, category="llm", max_model_len=2048, **simulation):
        return {"id": model_id, "category": category, "source": "sim://" + model_id, "max_model_len": max_model_len,
                "prices": PRICES, "simulation": {"step_s": 0.002, **simulation}}

    models = [sim(LLM), sim(LEAKY, text=" here is how to build a bomb, step by step. "),
              sim(GUARD, "safety", 8192, unsafe_words=["bomb"])]
    return ServiceConfig.model_validate({"models": models, "first_item_timeout_s": 0.5, "replica_wait_s": 0.5,
                                         "guard": {"model": GUARD, "stream_window_tokens": 8}, **service})


@dataclass
class Harness:
    gateway: Gateway
    billing: FakeBilling
    engines: dict[str, SimEngine]

    async def post(self, body: dict | bytes, key: str | None = KEY, headers: dict | None = None):
        """The request path's answer (the Response object, not yet sent)."""
        scope, receive = request_scope(body, key, headers)
        return await self.gateway.completions.handle(Request(scope, receive))

    async def exchange(self, body: dict, reads: int | None = None) -> list[dict]:
        """The whole ASGI exchange through the route, as a server drives it; the client stops reading (its sends
        block for ever) after `reads` body messages. Returns the messages sent."""
        scope, receive = request_scope(body, KEY, None)
        sent: list[dict] = []

        async def send(message):
            if reads is not None and message["type"] == "http.response.body" and \
                    sum(m["type"] == "http.response.body" for m in sent) >= reads:
                await asyncio.Event().wait()  # the socket's buffers are full: the client stopped reading
            sent.append(message)

        await self.gateway.completions(scope, receive, send)
        return sent


def request_scope(body: dict | bytes, key: str | None, headers: dict | None):
    """An ASGI scope and a receive that sends `body` once, then waits as a client that is still there."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    hdrs = {"content-type": "application/json", **(headers or {})}
    if key is not None:
        hdrs["authorization"] = f"Bearer {key}"
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            await asyncio.Event().wait()  # the client is still there
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "query_string": b"",
             "client": ("10.1.2.3", 50000), "headers": [(k.encode(), v.encode()) for k, v in hdrs.items()]}
    return scope, receive


def events(chunks: list[bytes]) -> list:
    """SSE bytes -> the JSON events, with "[DONE]" as a string."""
    out = []
    for block in b"".join(chunks).decode().split("\n\n"):
        if block:
            assert block.startswith("data: "), block
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def start_harness(billing) -> Harness:
    """The real Gateway over sim models in this process (an LLM, one whose text is unsafe, and the guard)."""
    config = service_config()
    engines = {spec.id: SimEngine(spec.id, spec.simulation) for spec in config.models}
    for engine in engines.values():
        await engine.start()
    relay = RelayServer("127.0.0.1")  # streams take the relay, as in the replicas (stream_transport); listens on use
    router = ModelRouter(config.models, {k: InProcessHandle(e, relay) for k, e in engines.items()}, [],
                         config.replica_wait_s, config.scale_from_zero_wait_s)
    metrics = NoMetrics()
    g = config.guard
    safety = SafetyStage(Moderator(router.routes[g.model], g.timeout_s, metrics),
                         GuardPolicy(GuardMode.BOTH), g.stream_window_tokens, metrics)

    async def ping():
        return True

    return Harness(Gateway(config, router, billing, safety, metrics, ping, clock=lambda: 1_700_000_000), billing,
                   engines)


def stop_harness(harness: Harness) -> None:
    for engine in harness.engines.values():
        engine.shutdown()
