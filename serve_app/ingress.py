"""The ingress deployment: the HTTP contract, and the request path read top to bottom in `completions`:
authenticate and validate, route, tokenize, admit (one Redis trip), generate, stream, settle (one Redis trip).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass

from ray import serve
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route as HttpRoute

from deployments.wire import GenerationRequest, InvalidSampling, StreamItem, Usage
from serve_app import auth, store
from serve_app.admission import Admission, Admitter, Prices
from serve_app.catalog import ServiceConfig
from serve_app.errors import ApiError, Code, invalid, upstream
from serve_app.ledger import Ledger, Settlement
from serve_app.prompts import Prompts, tokenize
from serve_app.protocol import CompletionRequest, parse_completion_request
from serve_app.router import Route, Router
from serve_app.sse import DONE, CompletionFrame, dumps, event
from serve_app.telemetry import configure_logging

log = logging.getLogger("qbt.ingress")
JSON = "application/json"


@dataclass(slots=True)
class Outcome:
    usage: Usage
    status: str = "disconnected"


@serve.deployment
@serve.ingress()
class Ingress:
    def __init__(self, config: dict, handles: dict):
        configure_logging()
        self.config = ServiceConfig.model_validate(config)
        self.router = Router(self.config.models, handles)
        self.redis = store.async_client(self.config.redis_url)
        self.admitter = Admitter(self.redis, self.config.default_rpm, self.config.default_tpm,
                                 self.config.reservation_ttl_s)
        self.ledger = Ledger(self.redis)
        self._background: set[asyncio.Task] = set()
        self._created = int(time.time())

    def __serve_build_asgi_app__(self):
        return Starlette(
            routes=[HttpRoute("/v1/completions", self.completions, methods=["POST"]),
                    HttpRoute("/v1/models", self.models, methods=["GET"]),
                    HttpRoute("/health", self.health, methods=["GET"])],
            exception_handlers={HTTPException: _http_exception, Exception: _unexpected})

    async def completions(self, request: Request) -> Response:
        completion_id = "cmpl-" + uuid.uuid4().hex
        request_id = request.headers.get("x-request-id", completion_id)[:128]
        try:
            key = auth.bearer_key(request.headers.get("authorization"))
            req = parse_completion_request(await read_json(request, self.config.max_body_bytes))
            route = self.router.route(req.model)
            prompts = tokenize(req, route.spec, route.tokenizer)
            admission = await self.admitter.admit(
                auth.key_hash(key), completion_id, request_id, route.spec.id,
                Prices(route.spec.prices.input_micros, route.spec.prices.output_micros),
                prompts.tokens, max_completion_tokens(req, prompts))
        except ApiError as exc:
            return error_response(exc)
        gen = generation_request(completion_id, req, prompts)
        frame = CompletionFrame(completion_id, int(time.time()), route.spec.id, req.include_usage)
        headers = admission.limits.headers()
        if req.stream:
            return await self._stream(route, gen, frame, admission, headers)
        return await self._complete(route, gen, frame, admission, headers)

    async def _complete(self, route: Route, gen: GenerationRequest, frame: CompletionFrame,
                        admission: Admission, headers: dict) -> Response:
        outcome = Outcome(Usage(prompt_tokens=sum(len(p) for p in gen.prompts)))
        try:
            choices, outcome.usage = await route.complete.remote(gen)
            outcome.status = "ok"
        except Exception as exc:
            error = classify(exc, route.spec.id)
            outcome.status = error.code.value
            await self._settle(admission, outcome)
            return error_response(error, headers)
        finally:
            if outcome.status == "disconnected":
                self._settle_later(admission, outcome)
        await self._settle(admission, outcome)
        return Response(dumps(frame.obj(choices, outcome.usage.as_dict())), headers=headers, media_type=JSON)

    async def _stream(self, route: Route, gen: GenerationRequest, frame: CompletionFrame, admission: Admission,
                      headers: dict) -> Response:
        """Waits for the first item so that a failure before any byte is a plain HTTP error."""
        stream = route.stream.remote(gen)
        try:
            first = await asyncio.wait_for(stream.__anext__(), self.config.first_item_timeout_s)
        except (Exception, asyncio.CancelledError) as exc:
            stream.cancel()
            error = classify(exc, route.spec.id)
            outcome = Outcome(Usage(prompt_tokens=sum(len(p) for p in gen.prompts)), error.code.value)
            if isinstance(exc, asyncio.CancelledError):
                outcome.status = "disconnected"
                self._settle_later(admission, outcome)
                raise
            await self._settle(admission, outcome)
            return error_response(error, headers)
        return StreamingResponse(self._events(route, stream, first, frame, admission), headers=headers,
                                 media_type="text/event-stream")

    async def _events(self, route: Route, stream, first: StreamItem, frame: CompletionFrame,
                      admission: Admission):
        outcome = Outcome(first.usage)
        error = None
        try:
            yield frame.chunk(first.choices)
            async for item in stream:
                outcome.usage = item.usage
                yield frame.chunk(item.choices)
            outcome.status = "ok"
        except Exception as exc:
            error = classify(exc, route.spec.id)
            outcome.status = error.code.value
        finally:
            if outcome.status == "disconnected":
                stream.cancel()
                self._settle_later(admission, outcome)
        await self._settle(admission, outcome)
        if error is not None:
            yield event(error.envelope())
        elif frame.include_usage:
            yield frame.usage_chunk(outcome.usage.as_dict())
        yield DONE

    async def _settle(self, admission: Admission, outcome: Outcome) -> None:
        await self.ledger.settle(Settlement(
            admission.completion_id, outcome.usage.prompt_tokens, outcome.usage.completion_tokens, outcome.status,
            charge=outcome.status in ("ok", "disconnected")))

    def _settle_later(self, admission: Admission, outcome: Outcome) -> None:
        """Settles outside the cancelled request's scope, so a disconnect cannot skip the ledger."""
        task = asyncio.get_running_loop().create_task(self._settle(admission, outcome))
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
        """200 only when every model deployment answers its engine health check and Redis answers."""
        names = list(self.router.routes)
        checks = [self.router.routes[n].health.remote() for n in names]
        checks.append(self.redis.ping())
        results = await asyncio.gather(*(asyncio.wait_for(_awaitable(c), self.config.health_timeout_s)
                                         for c in checks), return_exceptions=True)
        status = {n: "ok" if not isinstance(r, BaseException) else "unavailable" for n, r in zip(names, results)}
        status["redis"] = "ok" if not isinstance(results[-1], BaseException) else "unavailable"
        healthy = all(v == "ok" for v in status.values())
        return Response(dumps({"status": "ok" if healthy else "unavailable", "components": status}),
                        status_code=200 if healthy else 503, media_type=JSON)


async def _awaitable(x):
    return await x


def max_completion_tokens(req: CompletionRequest, prompts: Prompts) -> int:
    """The worst case the reservation covers: every candidate of every prompt runs to max_tokens."""
    candidates = max(req.best_of or 1, req.choices_per_prompt)
    return (req.max_tokens if req.max_tokens is not None else 16) * candidates * len(prompts.ids)


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


def classify(exc: BaseException, model: str) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InvalidSampling):
        return invalid(str(exc).splitlines()[0][:500], None)
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return upstream(f"The model '{model}' did not start answering in time.")
    log.error("upstream failure for %s: %s", model, exc)
    return upstream(f"The model '{model}' is unavailable or failed ({type(exc).__name__}).")


def error_response(exc: ApiError, headers: dict | None = None) -> Response:
    """Serve's proxy adds `x-request-id` (the client's own, or one it generates) to every response."""
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
