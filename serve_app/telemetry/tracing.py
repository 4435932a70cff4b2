"""Traces with the OpenTelemetry SDK: one trace per request, across the Serve handle into the model replica."""

from __future__ import annotations

import os

_tracer = None


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


def child(name: str, parent, **attributes):
    """A span under `parent` (a span), for work that ends elsewhere than it starts."""
    from opentelemetry import trace

    return tracer().start_span(name, context=trace.set_span_in_context(parent), attributes=attributes or None)


async def traced(span, awaitable):
    """Awaits inside `span`, ending it however the work ends."""
    try:
        return await awaitable
    finally:
        span.end()
