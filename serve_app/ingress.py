"""The ingress deployment: the HTTP contract, and the request path read top to bottom in `completions`:
authenticate and validate, route, tokenize, admit (one Redis trip), generate, stream, settle (one Redis trip).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ray import serve
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route as HttpRoute

from deployments.wire import GenerationRequest, InvalidSampling, StreamItem, Usage
from serve_app import auth, store
from serve_app.admission import Admission, Admitter, Prices
from serve_app.catalog import Category, ModelSpec, ServiceConfig
from serve_app.errors import ApiError, Code, invalid, upstream
from serve_app.guard import GuardError, GuardMode, GuardPolicy, Moderator, StreamGate, moderate_choices
from serve_app.ledger import Ledger, Settlement
from serve_app.prompts import Prompts, tokenize
from serve_app.protocol import CompletionRequest, parse_completion_request
from serve_app.router import Route, Router
from serve_app.sse import DONE, CompletionFrame, dumps, event
from serve_app.telemetry import (IngressMetrics, RequestRecord, carrier_of, child, configure_logging, context_from,
                                 record_request, tracer)

log = logging.getLogger("qbt.ingress")
JSON = "application/json"


CHARGED = ("ok", "disconnected", "output_filtered")


@dataclass(slots=True)
class Outcome:
    """How a request ended, for its ledger row: statuses in CHARGED pay for the tokens produced, others nothing."""

    usage: Usage
    status: str = "disconnected"


@dataclass(slots=True)
class Call:
    """One admitted request on its way through the path."""

    route: Route
    gen: GenerationRequest
    frame: CompletionFrame
    admission: Admission
    headers: dict
    policy: GuardPolicy
    record: RequestRecord
    span: Any
    texts: list[str] = field(default_factory=list)
    input_check: asyncio.Task | None = None
    gen_span: Any = None

    def start_generation(self) -> None:
        """The generation span, whose context crosses the Serve handle into the model replica."""
        self.gen_span = child("qbt.generate", self.span, model=self.route.spec.id)
        self.gen.trace_context = carrier_of(self.gen_span)


@serve.deployment
@serve.ingress()
class Ingress:
    def __init__(self, config: dict, handles: dict):
        configure_logging()
        self.config = ServiceConfig.model_validate(config)
        self.router = Router(self.config.models, handles, self.config.catalog_models, self.config.replica_wait_s,
                             self.config.scale_from_zero_wait_s)
        self.redis = store.async_client(self.config.redis_url)
        self.admitter = Admitter(self.redis, self.config.default_rpm, self.config.default_tpm,
                                 self.config.reservation_ttl_s)
        self.ledger = Ledger(self.redis)
        self.metrics = IngressMetrics()
        self.moderator, self.default_policy = None, GuardPolicy()
        if self.config.guard is not None:
            g = self.config.guard
            self.moderator = Moderator(self.router.routes[g.model], g.timeout_s, self.metrics)
            self.default_policy = GuardPolicy(GuardMode(g.default_mode), g.block_controversial, g.fail_open)
        self._background: set[asyncio.Task] = set()
        self._created = int(time.time())

    def __serve_build_asgi_app__(self):
        return Starlette(
            routes=[HttpRoute("/v1/completions", self.completions, methods=["POST"]),
                    HttpRoute("/v1/models", self.models, methods=["GET"]),
                    HttpRoute("/health", self.health, methods=["GET"])],
            exception_handlers={HTTPException: _http_exception, Exception: _unexpected})

    async def completions(self, request: Request) -> Response:
        """The request path: authenticate and validate, route, tokenize, admit; then the input guard runs beside
        generation, tokens stream (through the output guard), and the request settles."""
        completion_id = "cmpl-" + uuid.uuid4().hex
        request_id = request.headers.get("x-request-id", completion_id)[:128]
        record = RequestRecord(request_id, completion_id, "unknown")
        root = tracer().start_span("qbt.completion", context=context_from(request.headers),
                                   attributes={"qbt.request_id": request_id, "qbt.completion_id": completion_id})
        try:
            key = auth.bearer_key(request.headers.get("authorization"))
            req = parse_completion_request(await read_json(request, self.config.max_body_bytes))
            route = self.router.route(req.model)
            record.model, record.stream = route.spec.id, bool(req.stream)
            prompts = tokenize(req, route.spec, route.tokenizer)
            admission = await self._traced(child("qbt.admission", root), self.admitter.admit(
                auth.key_hash(key), completion_id, request_id, route.spec.id,
                Prices(route.spec.prices.input_micros, route.spec.prices.output_micros),
                prompts.tokens, max_completion_tokens(req, prompts)))
        except ApiError as exc:
            record_request(self.metrics, record, "refused", exc.code.value, 0, 0, None)
            root.set_attribute("qbt.status", exc.code.value)
            root.end()
            return error_response(exc)
        record.account, record.key_id = admission.account, admission.key_id
        call = Call(route, generation_request(completion_id, req, prompts),
                    CompletionFrame(completion_id, int(time.time()), route.spec.id, req.include_usage),
                    admission, admission.limits.headers(), self._policy(admission, route), record, root)
        if call.policy.mode is not GuardMode.OFF:
            call.texts = prompt_texts(prompts, route.tokenizer)
        if call.policy.mode.checks_input:
            call.input_check = asyncio.create_task(
                self._traced(child("qbt.guard.input", root), self.moderator.check_prompts(call.texts)))
        if req.stream:
            return await self._stream(call)
        return await self._complete(call)

    def _policy(self, admission: Admission, route: Route) -> GuardPolicy:
        """The key's policy over the config's; calls to a safety model itself are not moderated."""
        if self.moderator is None or route.spec.category is Category.SAFETY:
            return GuardPolicy()
        return GuardPolicy.parse(admission.guard, self.default_policy)

    async def _input_verdict(self, call: Call) -> ApiError | None:
        """The input guard's answer, awaited only once generation has been started beside it."""
        if call.input_check is None:
            return None
        try:
            found = await call.input_check
        except GuardError as exc:
            return self._guard_failed(call, exc)
        self.metrics.guard_verdicts.inc(tags={"direction": "input",
                                              "verdict": "Safe" if found is None else found[1].safety})
        if found is None or not found[1].blocks(call.policy):
            return None
        index, verdict = found
        return ApiError(Code.CONTENT_FILTER, f"The prompt was refused by the safety guard ({verdict.safety}: "
                        f"{', '.join(verdict.categories)}).", "prompt",
                        detail={"guard": {**verdict.as_dict(), "prompt_index": index}})

    def _guard_failed(self, call: Call, exc: GuardError) -> ApiError | None:
        log.warning("guard failed for %s: %s", call.admission.completion_id, exc)
        if call.policy.fail_open:
            call.headers["x-qbt-guard"] = "unavailable"
            return None
        return upstream("The safety guard is unavailable; the request was not served. Retry shortly.")

    async def _complete(self, call: Call) -> Response:
        outcome = Outcome(Usage(prompt_tokens=call.gen.prompt_tokens))
        call.start_generation()
        response = call.route.complete.remote(call.gen)
        try:
            refused = await self._input_verdict(call)
            if refused is not None:
                response.cancel()
                return await self._refuse(call, outcome, refused)
            await call.route.assigned(response)
            choices, outcome.usage = await response
            call.record.mark_first_token()
            outcome.status = "ok"
            if call.policy.mode.checks_output:
                try:
                    choices = await self._traced(child("qbt.guard.output", call.span), moderate_choices(
                        self.moderator, call.texts, call.gen.n, choices, call.policy))
                except GuardError as exc:
                    if (refused := self._guard_failed(call, exc)) is not None:
                        return await self._refuse(call, outcome, refused)
        except Exception as exc:
            return await self._refuse(call, outcome, classify(exc, call.route.spec))
        finally:
            if outcome.status == "disconnected":
                response.cancel()
                self._settle_later(call, outcome)
        await self._settle(call, outcome)
        return Response(dumps(call.frame.obj(choices, outcome.usage.as_dict())), headers=call.headers,
                        media_type=JSON)

    async def _refuse(self, call: Call, outcome: Outcome, error: ApiError) -> Response:
        if call.input_check is not None:
            call.input_check.cancel()
        outcome.status = error.code.value
        await self._settle(call, outcome)
        return error_response(error, call.headers)

    async def _stream(self, call: Call) -> Response:
        """Waits for the first item and the input verdict, so that a failure or refusal before any byte is a plain
        HTTP error, and no token leaves before the input guard has passed the prompt."""
        call.start_generation()
        stream = call.route.stream.remote(call.gen)
        outcome = Outcome(Usage(prompt_tokens=call.gen.prompt_tokens))
        try:
            await call.route.assigned(stream)
            first = await asyncio.wait_for(stream.__anext__(), self.config.first_item_timeout_s)
            call.gen_span.add_event("first_token")
            refused = await self._input_verdict(call)
            call.record.mark_first_token()
        except asyncio.CancelledError:
            stream.cancel()
            self._settle_later(call, outcome)
            raise
        except Exception as exc:
            refused = classify(exc, call.route.spec)
        if refused is not None:
            stream.cancel()
            return await self._refuse(call, outcome, refused)
        gate = None
        if call.policy.mode.checks_output:
            gate = StreamGate(self.moderator, call.texts, call.gen.n, call.policy,
                              self.config.guard.stream_window_tokens)
        return StreamingResponse(self._events(call, stream, first, gate), headers=call.headers,
                                 media_type="text/event-stream")

    async def _events(self, call: Call, stream, first: StreamItem, gate: StreamGate | None):
        frame = call.frame
        outcome = Outcome(first.usage)
        error = None
        try:
            item = first
            while item is not None:
                outcome.usage = item.usage
                if gate is None:
                    yield frame.chunk(item.choices)
                else:
                    gate.add(item.choices)
                    if gate.due(item.usage.completion_tokens) and (released := await self._traced(
                            child("qbt.guard.output", call.span), gate.release(item.usage.completion_tokens))):
                        yield frame.chunk(released)
                    if gate.blocked is not None:
                        break
                item = await anext(stream, None)
            if gate is not None and gate.blocked is None and (released := await self._traced(
                    child("qbt.guard.output", call.span), gate.release(outcome.usage.completion_tokens))):
                yield frame.chunk(released)
            outcome.status = "output_filtered" if gate is not None and gate.blocked is not None else "ok"
        except Exception as exc:
            error = classify(exc, call.route.spec)
            outcome.status = error.code.value
        finally:
            if outcome.status in ("disconnected", "output_filtered") or error is not None:
                stream.cancel()
            if outcome.status == "disconnected":
                self._settle_later(call, outcome)
        await self._settle(call, outcome)
        if error is not None:
            yield event(error.envelope())
        elif frame.include_usage:
            yield frame.usage_chunk(outcome.usage.as_dict())
        yield DONE

    async def _settle(self, call: Call, outcome: Outcome) -> None:
        usage = outcome.usage
        if call.gen_span is not None:
            call.gen_span.set_attribute("qbt.completion_tokens", usage.completion_tokens)
            call.gen_span.end()
        charged = await self._traced(child("qbt.settle", call.span), self.ledger.settle(Settlement(
            call.admission.completion_id, usage.prompt_tokens, usage.completion_tokens, outcome.status,
            charge=outcome.status in CHARGED)))
        call.span.set_attribute("qbt.status", outcome.status)
        call.span.end()
        code = None if outcome.status in CHARGED else outcome.status
        record_request(self.metrics, call.record, outcome.status, code, usage.prompt_tokens,
                       usage.completion_tokens, charged)

    @staticmethod
    async def _traced(span, awaitable):
        """Awaits inside `span`, ending it however the work ends."""
        try:
            return await awaitable
        finally:
            span.end()

    def _settle_later(self, call: Call, outcome: Outcome) -> None:
        """Settles outside the cancelled request's scope, so a disconnect cannot skip the ledger."""
        task = asyncio.get_running_loop().create_task(self._settle(call, outcome))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def models(self, request: Request) -> Response:
        try:
            await self.admitter.authenticate(auth.key_hash(auth.bearer_key(request.headers.get("authorization"))))
        except ApiError as exc:
            return error_response(exc)
        data = [{"id": r.spec.id, "object": "model", "created": self._created, "owned_by": "qubittron",
                 "category": r.spec.category.value, "max_model_len": r.spec.max_model_len}
                for r in self.router.routes.values() if r.spec.completions]
        return Response(dumps({"object": "list", "data": data}), media_type=JSON)

    async def health(self, request: Request) -> Response:
        """200 only when every model deployment answers its engine health check and Redis answers. Models that
        scale from zero are not probed (a probe would wake them) and show as `on_demand`."""
        names = [n for n, r in self.router.routes.items() if not r.spec.scales_from_zero]
        checks = [self.router.routes[n].health.remote() for n in names]
        checks.append(self.redis.ping())
        results = await asyncio.gather(*(asyncio.wait_for(_awaitable(c), self.config.health_timeout_s)
                                         for c in checks), return_exceptions=True)
        status = {n: "ok" if not isinstance(r, BaseException) else "unavailable" for n, r in zip(names, results)}
        status["redis"] = "ok" if not isinstance(results[-1], BaseException) else "unavailable"
        healthy = all(v == "ok" for v in status.values())
        status.update({n: "on_demand" for n, r in self.router.routes.items() if r.spec.scales_from_zero})
        return Response(dumps({"status": "ok" if healthy else "unavailable", "components": status}),
                        status_code=200 if healthy else 503, media_type=JSON)


async def _awaitable(x):
    return await x


def max_completion_tokens(req: CompletionRequest, prompts: Prompts) -> int:
    """The worst case the reservation covers: every candidate of every prompt runs to max_tokens."""
    candidates = max(req.best_of or 1, req.choices_per_prompt)
    return (req.max_tokens if req.max_tokens is not None else 16) * candidates * len(prompts.ids)


def prompt_texts(prompts: Prompts, tokenizer) -> list[str]:
    """What the guard reads: the prompt text, or token-id prompts decoded."""
    return [t if t is not None else tokenizer.decode(ids, skip_special_tokens=True)
            for t, ids in zip(prompts.texts, prompts.ids)]


def generation_request(request_id: str, req: CompletionRequest, prompts: Prompts) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id, prompts=prompts.ids, prompt_texts=prompts.texts, sampling=req.sampling(),
        n=req.choices_per_prompt, best_of=req.best_of, logprobs=req.logprobs, echo=bool(req.echo),
        max_tokens=req.max_tokens if req.max_tokens is not None else 16)


async def read_json(request: Request, limit: int):
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise invalid(f"The request body is larger than {limit} bytes", None)
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise invalid(f"The request body is larger than {limit} bytes", None)
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise invalid("The request body is not valid JSON", None) from None


def classify(exc: BaseException, spec: ModelSpec) -> ApiError:
    """An exception from the model's deployment as the contract's error."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InvalidSampling):
        return invalid(str(exc).splitlines()[0][:500], None)
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return upstream(f"The model '{spec.id}' did not start answering in time.")
    log.error("upstream failure for %s: %s", spec.id, exc)
    return upstream(f"The model '{spec.id}' is unavailable or failed ({type(exc).__name__}).")


def error_response(exc: ApiError, headers: dict | None = None) -> Response:
    """Serve (its proxy, or the ingress replica's own HTTP server) adds `x-request-id` (the client's own, or one it
    generates) to every response."""
    out = dict(headers or {})
    out.update(exc.headers)
    return Response(exc.body(), status_code=exc.status, headers=out, media_type=JSON)


async def _http_exception(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 405:
        return Response(ApiError(Code.INVALID_REQUEST, f"Method {request.method} is not allowed on "
                                 f"{request.url.path}").body(), status_code=405, media_type=JSON)
    return error_response(ApiError(Code.NOT_FOUND, f"No route {request.method} {request.url.path}"))


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s", request.url.path)
    return error_response(upstream("The service failed to handle the request; retry it."))
