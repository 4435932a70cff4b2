"""Traces with the OpenTelemetry SDK: one trace per request, across the Serve handle into the model replica.

The generation and the guard's checks follow the OpenTelemetry GenAI semantic conventions (the inference span
`{gen_ai.operation.name} {gen_ai.request.model}`, the guardrail span `apply_guardrail {component}`), so GenAI-aware
backends read them as they are. No span carries text: prompts, messages and completions are never recorded (the
conventions' opt-in `gen_ai.input.messages` and `gen_ai.output.messages` stay off); only ids, counts, the sampling
numbers, finish reasons and the guard's verdicts.
"""

from __future__ import annotations

import json
import os

_tracer = None
PROVIDER = "qubittron"  # gen_ai.provider.name: the service its clients call (the conventions allow a custom value)
SAMPLING = {f: "gen_ai.request." + f for f in ("temperature", "top_p", "top_k", "frequency_penalty",
                                               "presence_penalty", "seed")}


def tracer():
    """The OpenTelemetry tracer, with the exporter chosen by the standard `OTEL_TRACES_EXPORTER` (`otlp`, `console`
    or `none`, the default; `OTEL_EXPORTER_OTLP_*` configure OTLP). With none, spans are non-recording no-ops."""
    global _tracer
    if _tracer is None:
        from opentelemetry import trace

        exporter = os.environ.get("OTEL_TRACES_EXPORTER", "none").split(",")[0].strip().lower()
        if exporter not in ("", "none"):
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            provider = TracerProvider(resource=Resource.create(
                {"service.name": os.environ.get("OTEL_SERVICE_NAME", "qubittron-serve")}))
            provider.add_span_processor(BatchSpanProcessor(_exporter(exporter)))
            trace.set_tracer_provider(provider)
        _tracer = trace.get_tracer("qubittron-serve")
    return _tracer


def _exporter(name: str):
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(formatter=lambda span: span.to_json(indent=None) + "\n")
    if name == "otlp":
        if os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf") == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        return OTLPSpanExporter()
    raise ValueError(f"OTEL_TRACES_EXPORTER={name!r}: use otlp, console or none")


def context_from(carrier) -> object:
    """A W3C `traceparent` (from a client's headers, or from the ingress across the Serve handle)."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract(carrier=carrier)


def carrier_of(span) -> dict[str, str]:
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    out: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(out, context=trace.set_span_in_context(span))
    return out


def child(name: str, parent, client: bool = False, **attributes):
    """A span under `parent` (a span), for work that ends elsewhere than it starts; `client`: a call to another
    deployment (the model's, the guard's)."""
    from opentelemetry import trace

    kind = trace.SpanKind.CLIENT if client else trace.SpanKind.INTERNAL
    return tracer().start_span(name, context=trace.set_span_in_context(parent), kind=kind,
                               attributes=attributes or None)


async def traced(span, awaitable):
    """Awaits inside `span`, ending it however the work ends."""
    try:
        return await awaitable
    finally:
        span.end()


def generation(parent, gen, model: str, stream: bool):
    """The generation span (the ingress calling the model's deployment), named and described as the GenAI
    conventions' inference span, with what the request asked for; `generation_ended` adds what it got."""
    operation = "chat" if gen.chat else "text_completion"
    attributes = {"gen_ai.operation.name": operation, "gen_ai.provider.name": PROVIDER,
                  "gen_ai.request.model": model, "gen_ai.response.model": model, "gen_ai.response.id": gen.request_id,
                  "gen_ai.request.max_tokens": gen.max_tokens, "gen_ai.request.stream": stream}
    attributes.update((name, gen.sampling[f]) for f, name in SAMPLING.items() if f in gen.sampling)
    if gen.n != 1:
        attributes["gen_ai.request.choice.count"] = gen.n
    return child(f"{operation} {model}", parent, client=True, **attributes)


def generation_ended(span, usage, status, ending, record) -> None:
    """Once per request, at its settlement: the tokens it was billed, how its choices finished (`ending`: the
    choices returned, or a stream's last item) and, for a stream, the time from the request's arrival to its first
    chunk. Ends the span."""
    if span.is_recording():
        attributes = {"gen_ai.usage.input_tokens": usage.prompt_tokens,
                      "gen_ai.usage.output_tokens": usage.completion_tokens, "qbt.status": status.value}
        reasons = finish_reasons(ending)
        if status.value == "output_filtered" and "content_filter" not in reasons:
            reasons.append("content_filter")  # a stream the output guard cut: its endings left the gate, not the engine
        if reasons:
            attributes["gen_ai.response.finish_reasons"] = reasons
        if record.stream and record.first_token is not None:
            attributes["gen_ai.response.time_to_first_chunk"] = record.first_token - record.started
        if status.code is not None:
            attributes["error.type"] = status.code
            _failed(span, status.code)
        span.set_attributes(attributes)
    span.end()


def finish_reasons(ending) -> list[str]:
    """The finish reasons in the choices returned (a list of choices) or in a stream's last item (its choices, or
    the JSON the replica rendered them to): once per request, never per item. A stream's choices that ended before
    its last item (n > 1) are not in it."""
    choices = getattr(ending, "choices", ending) or []
    if getattr(ending, "rendered", None) is not None:
        choices = json.loads(ending.rendered)
    return [c["finish_reason"] for c in choices if c.get("finish_reason")]


def guardrail(parent, source: str, component: str):
    """A check of the safety guard (a call to the guard model's deployment) as the GenAI conventions' guardrail span:
    `source` is `input` (the prompt) or `output` (the response); `component`, the guard model."""
    return child(f"apply_guardrail {component}", parent, client=True, **{
        "gen_ai.operation.name": "apply_guardrail", "gen_ai.provider.name": PROVIDER,
        "gen_ai.guardrail.component.name": component, "gen_ai.guardrail.source": source})


async def judged(span, awaitable, decision):
    """Awaits a guard check inside its `guardrail` span and records what was decided: `decision(result)` gives
    (blocked, the guard's verdict or None). The result is the stage's action (`blocked` or `passed`); the verdict's
    safety and categories go in its reason and in one `gen_ai.guardrail.result` event per category."""
    try:
        result = await awaitable
    except Exception as exc:
        span.set_attribute("error.type", type(exc).__name__)
        _failed(span, type(exc).__name__)
        raise
    else:
        if span.is_recording():
            blocked, verdict = decision(result)
            span.set_attributes({"gen_ai.guardrail.result.type": "action",
                                 "gen_ai.guardrail.result.value": "blocked" if blocked else "passed"})
            if verdict is not None:
                categories = ", ".join(verdict.categories)
                span.set_attribute("gen_ai.guardrail.result.reason",
                                   f"{verdict.safety}: {categories}" if categories else verdict.safety)
                for category in verdict.categories or (None,):
                    event = {"gen_ai.guardrail.result.type": "safety", "gen_ai.guardrail.result.value": verdict.safety}
                    if category is not None:
                        event["gen_ai.guardrail.risk.category"] = category
                    span.add_event("gen_ai.guardrail.result", event)
        return result
    finally:
        span.end()


def _failed(span, description: str) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_status(Status(StatusCode.ERROR, description))
