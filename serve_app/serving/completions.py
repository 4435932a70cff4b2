"""The request path of `/v1/completions` and `/v1/chat/completions`, read top to bottom in `CompletionPath.handle`:
authenticate and validate, route, tokenize, admit (one Redis trip); the input guard runs beside generation; tokens
stream (through the output gate); the request settles (one Redis trip), and its cost is in the usage. A plain
object built from its collaborators, so it runs without Ray; what differs between the two endpoints is in
`endpoints.py`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from deployments.relay import ticket_of
from deployments.wire import GenerationRequest, StreamItem, Usage
from serve_app.api.encoding import DONE, CompletionFrame, dumps, event
from serve_app.api.errors import ApiError, Code, invalid, upstream
from serve_app.api.http import JSON, error_response, read_json
from serve_app.api.throttle import AuthFailures, client_address
from serve_app.config.service import Category
from serve_app.money import keys
from serve_app.money.admission import Admission
from serve_app.money.billing import Billing
from serve_app.money.status import Status
from serve_app.safety.policy import GuardMode
from serve_app.safety.stage import Gate, SafetyStage, Screening
from serve_app.money.units import micros_to_cost
from serve_app.serving.endpoints import Completions
from serve_app.serving.model_stream import abandon, first_item, next_item
from serve_app.serving.relaying import relayed
from serve_app.serving.routing import ModelRoute, ModelRouter
from serve_app.telemetry.metrics import IngressMetrics, RequestRecord, record_request
from serve_app.telemetry.tracing import carrier_of, child, context_from, generation, generation_ended, traced, tracer

log = logging.getLogger("qbt.completions")
SETTLE_WAIT_S = 3.0  # how long a response waits for its settlement before answering anyway
ENDING_S = SETTLE_WAIT_S + 10  # what the request bound leaves, at least, for settling and the last sends


@dataclass(slots=True)
class Outcome:
    """How a request ended, for its ledger row. `status` stays None until an ending is reached; a request left
    without one (cancelled: the client went away) is settled as DISCONNECTED for what was produced."""

    usage: Usage
    status: Status | None = None
    ending: Any = None  # the choices returned, or a stream's last item: the trace's finish reasons


@dataclass(slots=True)
class Call:
    """One admitted request on its way through the path."""

    route: ModelRoute
    gen: GenerationRequest
    frame: CompletionFrame
    admission: Admission
    screening: Screening
    limit_headers: dict[str, str]
    record: RequestRecord
    span: Any
    bound: asyncio.Timeout | None = None
    gen_span: Any = None
    streaming: bool = False  # the stream's events have started (their own ending settles them)

    def start_generation(self) -> None:
        """The generation span, whose context crosses the Serve handle into the model replica."""
        self.gen_span = generation(self.span, self.gen, self.route.spec.id, self.record.stream)
        self.gen.trace_context = carrier_of(self.gen_span)

    def headers(self) -> dict[str, str]:
        """The rate-limit and guard headers, and OpenAI's `openai-processing-ms`: the time until the response
        started (for a stream, until its first item was in)."""
        elapsed = int((time.monotonic() - self.record.started) * 1000)
        return {**self.limit_headers, **self.screening.headers, "openai-processing-ms": str(elapsed)}


class CompletionPath:
    def __init__(self, router: ModelRouter, billing: Billing, safety: SafetyStage, metrics: IngressMetrics, *,
                 max_body_bytes: int, first_item_timeout_s: float, max_request_s: float = 900,
                 body_read_s: float = 30, max_sequences: int = 256, clock: Callable[[], float] = time.time,
                 auth_failures: AuthFailures | None = None, endpoint=Completions, stream_relay: bool = False):
        self.endpoint, self.stream_relay = endpoint, stream_relay
        self.router = router
        self.billing = billing
        self.safety = safety
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.first_item_timeout_s = first_item_timeout_s
        self.max_request_s = max_request_s
        self.body_read_s = body_read_s
        self.max_sequences = max_sequences
        self.clock = clock
        self.auth_failures = auth_failures or AuthFailures()
        self._background: set[asyncio.Task] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The route: the whole exchange, sending included, is bounded by `max_request_s`, so that no request (a
        client that stops reading among them) outlives its reservation's lease. One timer per request, none per
        token. Past the bound, a request that has not answered yet gets a 502 and pays nothing; a stream is cut off
        (in-band ending if its client still reads) and pays what was produced once text had left (TIMED_OUT)."""
        response = None
        try:
            async with asyncio.timeout(self.max_request_s) as bound:
                response = await self.handle(Request(scope, receive), bound)
                await response(scope, receive, send)
        except TimeoutError:
            error = upstream(f"The request did not finish within the service's limit of {self.max_request_s:g} s.")
            if response is None:
                await error_response(error)(scope, receive, send)
            elif isinstance(response, StreamingResponse):  # a client still reading gets the in-band ending
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1):
                        await send({"type": "http.response.body", "body": event(error.envelope()) + DONE,
                                    "more_body": False})
        finally:
            if isinstance(response, EventStream):
                if not response.call.streaming:  # cut off before its events started: their ending never runs
                    response.stream.cancel()
                    self._disconnected(response.call, Outcome(response.first.usage))
                await response.body_iterator.aclose()  # settles a stream cut off while it waited on the client

    async def handle(self, request: Request, bound: asyncio.Timeout | None = None) -> Response:
        endpoint = self.endpoint
        completion_id = endpoint.id_prefix + uuid.uuid4().hex
        request_id = request.headers.get("x-request-id", completion_id)[:128]
        record = RequestRecord(request_id, completion_id, "unknown")
        root = tracer().start_span("qbt.completion", context=context_from(request.headers),
                                   attributes={"qbt.request_id": request_id, "qbt.completion_id": completion_id})
        address = client_address(request.scope)
        try:
            key = keys.bearer_key(request.headers.get("authorization"))
            # An unknown key is refused before its body is read; an address that keeps sending unknown keys is
            # refused before even the lookup (a key seen recently passes: customers behind the same address).
            await self.billing.known(key, lambda: self.auth_failures.check(address))
            req = endpoint.parse(await self._body(request))
            route = self.router.route(req.model, chat=endpoint.chat)
            route.check_priority(req.priority)
            record.model, record.stream = route.spec.id, bool(req.stream)
            prompts = await endpoint.prompts(req, route)
            if len(prompts.ids) * req.candidates_per_prompt > self.max_sequences:
                raise invalid(f"This request asks for {len(prompts.ids) * req.candidates_per_prompt} sequences "
                              f"(prompts x max(n, best_of)); at most {self.max_sequences} are allowed.", "n")
            admission = await traced(child("qbt.admission", root), self.billing.admit(
                key, completion_id, request_id, route.spec.id, route.spec.prices, req, prompts.ids,
                safety_model=route.spec.category is Category.SAFETY))
        except ApiError as exc:
            if exc.code is Code.INVALID_API_KEY:
                self.auth_failures.failed(address)
            record_request(self.metrics, record, Status.REFUSED.value, exc.code.value, 0, 0, None)
            root.set_attribute("qbt.status", exc.code.value)
            root.end()
            return error_response(exc)
        record.account, record.key_id = admission.account, admission.key_id
        policy = self.safety.policy(admission.guard, moderated=route.spec.category is not Category.SAFETY)
        texts = endpoint.guard_texts(req, prompts, route.tokenizer) if policy.mode is not GuardMode.OFF else []
        gen = endpoint.generation(completion_id, req, prompts)
        gen.render = not policy.mode.checks_output  # no output gate reads the choices: the replica renders them
        gen.relay = gen.render and self.stream_relay  # and sends them as bytes on a socket (deployments/relay.py)
        call = Call(route, gen, endpoint.frame(completion_id, int(self.clock()), route.spec.id, req), admission,
                    self.safety.screen(policy, texts, req.choices_per_prompt, root, completion_id),
                    admission.limits.headers(), record, root, bound)
        if (unjudged := self.safety.unjudged(policy, endpoint.logprobs(req), req.prompt_logprobs)) is not None:
            return await self._refuse(call, Outcome(Usage(prompt_tokens=call.gen.prompt_tokens)), unjudged)
        if req.stream:
            return await self._stream(call)
        return await self._complete(call)

    async def _body(self, request: Request):
        """The JSON body, read within `body_read_s`: a client that trickles its body does not hold a request."""
        try:
            async with asyncio.timeout(self.body_read_s):
                return await read_json(request, self.max_body_bytes)
        except TimeoutError:
            raise invalid(f"The request body did not arrive within {self.body_read_s:g} s.", None) from None

    async def _complete(self, call: Call) -> Response:
        outcome = Outcome(Usage(prompt_tokens=call.gen.prompt_tokens))
        call.start_generation()
        response = None
        try:
            response = call.route.complete.remote(call.gen)
            refused = await call.screening.input_verdict()
            if refused is not None:
                response.cancel()
                return await self._refuse(call, outcome, refused)
            await call.route.assigned(response)
            choices, outcome.usage = await response
            call.record.mark_first_token()
            choices = await call.screening.moderate(choices)
            outcome.status, outcome.ending = Status.OK, choices
        except Exception as exc:
            return await self._refuse(call, outcome, call.route.failure(exc))
        finally:
            if outcome.status is None:
                if response is not None:
                    response.cancel()
                self._disconnected(call, outcome)
        charged = await self._settle(call, outcome)
        return Response(dumps(call.frame.obj(choices, usage_with_cost(outcome.usage, charged))),
                        headers=call.headers(), media_type=JSON)

    async def _refuse(self, call: Call, outcome: Outcome, error: ApiError) -> Response:
        call.screening.cancel()
        outcome.status = Status.of(error.code)
        await self._settle(call, outcome)
        return error_response(error, call.headers())

    async def _stream(self, call: Call) -> Response:
        """Waits for the first item and the input verdict, so that a failure or refusal before any byte is a plain
        HTTP error, and no token leaves before the input guard has passed the prompt."""
        call.start_generation()
        outcome = Outcome(Usage(prompt_tokens=call.gen.prompt_tokens))
        first = stream = None
        try:
            stream = call.route.stream.remote(call.gen)
            await call.route.assigned(stream)
            first = await self._first_unless_refused(call, stream)
            refused = await call.screening.input_verdict()
            if first is not None:
                call.gen_span.add_event("first_token")
                call.record.mark_first_token()
        except asyncio.CancelledError:
            if stream is not None:
                stream.cancel()
            self._disconnected(call, outcome)
            raise
        except Exception as exc:
            refused = call.route.failure(exc)
        if refused is not None:
            if stream is not None:
                stream.cancel()
            return await self._refuse(call, outcome, refused)
        return EventStream(self._events(call, stream, first, call.screening.gate()), call, stream, first,
                           headers=call.headers())

    async def _first_unless_refused(self, call: Call, stream) -> StreamItem | None:
        """The first item; None when the input guard refuses before it comes, so that the refused prompt's
        generation is cancelled at once and costs the engine no more than the guard's latency."""
        check = call.screening.input_check
        if check is not None and check.done() and await call.screening.input_verdict() is not None:
            return None
        if check is None or check.done():  # nothing to race: no task of its own
            return await first_item(stream, call.gen.prompt_tokens, self.first_item_timeout_s)
        first = asyncio.ensure_future(first_item(stream, call.gen.prompt_tokens, self.first_item_timeout_s))
        try:
            await asyncio.wait((first, check), return_when=asyncio.FIRST_COMPLETED)
            if not first.done() and await call.screening.input_verdict() is not None:
                abandon(first)
                return None
            return await first
        except BaseException:
            abandon(first)
            raise

    async def _events(self, call: Call, stream, first: StreamItem, gate: Gate | None):
        """Where tokens leave for the client. Errors after the first byte go in-band: an error event, then [DONE]."""
        call.streaming = True
        frame = call.frame
        outcome = Outcome(first.usage)
        received = call.admission  # `.delivered`: what the client has received (the lease checkpoints it)
        prompt_tokens = first.usage.prompt_tokens
        received.delivered = Usage(prompt_tokens=prompt_tokens)
        error = None
        try:
            if (opening := frame.opening(Usage(prompt_tokens).as_dict())) is not None:
                yield opening
            item = first
            while item is not None:
                outcome.usage, outcome.ending = item.usage, item
                usage = item.usage.as_dict() if frame.continuous_usage else None
                if gate is None:
                    yield frame.rendered_chunk(item.rendered, usage) if item.rendered is not None else \
                        frame.chunk(item.choices, usage)
                    received.delivered = item.usage
                else:
                    if released := await gate.feed(item.choices, item.usage.completion_tokens):
                        yield frame.chunk(released, usage)
                        received.delivered = item.usage
                    if gate.blocked:
                        break
                if item.relay is not None:  # the rest comes as bytes on the relay's socket
                    async for ready in relayed(ticket_of(item.relay), frame, outcome, received, prompt_tokens):
                        yield ready
                    break
                item = await next_item(stream, prompt_tokens, None)
            if gate is not None and (released := await gate.finish(outcome.usage.completion_tokens)):
                yield frame.chunk(released, outcome.usage.as_dict() if frame.continuous_usage else None)
            outcome.status = Status.OUTPUT_FILTERED if gate is not None and gate.blocked else Status.OK
        except Exception as exc:
            error = call.route.failure(exc)
            outcome.status = Status.of(error.code)
            if received.delivered.completion_tokens:  # text reached the client before the failure: it pays for it
                outcome.status, outcome.usage = Status.INTERRUPTED, received.delivered
        finally:
            if outcome.status is not Status.OK:
                stream.cancel()
            if outcome.status is None:
                self._disconnected(call, outcome)
        charged = await self._settle(call, outcome)
        if error is not None:
            yield event(error.envelope())
        elif frame.include_usage:
            yield frame.usage_chunk(usage_with_cost(outcome.usage, charged))
        yield DONE

    async def _settle(self, call: Call, outcome: Outcome) -> int | None:
        """Settles in a task of its own: cancelling the request (the client gone mid-settlement) cannot stop it.
        The response waits for it a few seconds at most; during a Redis outage it goes on retrying after the
        response has gone (and `drain` waits for it when the ingress stops). The ending is decided: from here the
        request bound only limits the sends left, so it cannot turn a settled request into an error. Returns the
        micro-dollars charged, as the ledger row has them (None while the settlement is still retrying)."""
        if call.bound is not None and not call.bound.expired():
            with contextlib.suppress(RuntimeError):  # the bound's scope already ended (a finalized stream)
                call.bound.reschedule(max(call.bound.when() or 0, asyncio.get_running_loop().time() + ENDING_S))
        try:
            return await asyncio.wait_for(asyncio.shield(self._settlement(call, outcome)), SETTLE_WAIT_S)
        except TimeoutError:
            log.warning("settlement of %s still retrying; answering without waiting", call.admission.completion_id)
            return None

    async def drain(self, timeout_s: float) -> int:
        """Waits for the settlements still running (the ingress is stopping); returns how many did not finish."""
        pending = set(self._background)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=timeout_s)
        return len(pending)

    def _settlement(self, call: Call, outcome: Outcome) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(self._settle_now(call, outcome))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _settle_now(self, call: Call, outcome: Outcome) -> int | None:
        usage = outcome.usage
        if call.gen_span is not None:
            generation_ended(call.gen_span, usage, outcome.status, outcome.ending, call.record)
        charged = await traced(child("qbt.settle", call.span),
                               self.billing.settle(call.admission, usage, outcome.status))
        call.span.set_attribute("qbt.status", outcome.status.value)
        call.span.end()
        record_request(self.metrics, call.record, outcome.status.value, outcome.status.code, usage.prompt_tokens,
                       usage.completion_tokens, charged)
        return charged

    def _disconnected(self, call: Call, outcome: Outcome) -> None:
        """The client went away (or the request ran out of time): settles what was produced, outside the cancelled
        request's scope, so neither can skip the ledger."""
        if call.bound is not None and call.bound.expired():  # a 502 or a cut-off stream: paid only if text left
            received = call.admission.delivered
            outcome.status = Status.TIMED_OUT if received and received.completion_tokens else Status.UPSTREAM_ERROR
        else:
            outcome.status = Status.DISCONNECTED
        call.screening.cancel()
        self._settlement(call, outcome)


class EventStream(StreamingResponse):
    """A stream's response, with its request: one cut off before its events started is still settled."""

    def __init__(self, events, call: Call, stream, first: StreamItem, headers: dict[str, str]):
        super().__init__(events, headers=headers, media_type="text/event-stream")
        self.call, self.stream, self.first = call, stream, first


def usage_with_cost(usage: Usage, charged: int | None) -> dict:
    """The usage object, with `cost`: USD, exact to the micro-dollar, the ledger row's amount (left out only while
    a settlement is still retrying, when it is not known yet)."""
    out: dict[str, Any] = usage.as_dict()
    if charged is not None:
        out["cost"] = micros_to_cost(charged)
    return out
