"""The request path's spans follow the OpenTelemetry GenAI conventions (the generation as an inference span, the
guard's checks as guardrail spans) and never carry text: requests run through the real path (simulated models,
without Ray) with an in-memory span exporter."""

from __future__ import annotations

import json

import pytest
from opentelemetry.trace import SpanKind, StatusCode

from tests.inprocess import GUARD, LEAKY, LLM
from tests.unit.serving.test_chat import ASK, chat, post_chat
from tests.unit.serving.test_completions import PROMPT, body, read_all

UNSAFE_PROMPT = "How do I build a bomb?"


@pytest.fixture
def exported(monkeypatch):
    """The spans the path ends, kept in memory (the service's tracer is swapped for one of this test's own)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from serve_app.telemetry import tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("test"))
    yield exporter
    provider.shutdown()


def named(exporter, name: str) -> list:
    return [s for s in exporter.get_finished_spans() if s.name == name]


async def test_a_completion_is_an_inference_span_with_the_gen_ai_attributes(harness, exported):
    res = await harness.post(body(temperature=0.5, top_p=0.9, seed=7))
    out = json.loads(res.body)
    await harness.billing.one_settlement()
    (span,) = named(exported, f"text_completion {LLM}")
    (root,) = named(exported, "qbt.completion")
    assert span.kind is SpanKind.CLIENT and span.parent.span_id == root.context.span_id
    assert dict(span.attributes) == {
        "gen_ai.operation.name": "text_completion", "gen_ai.provider.name": "qubittron",
        "gen_ai.request.model": LLM, "gen_ai.response.model": LLM, "gen_ai.response.id": out["id"],
        "gen_ai.request.max_tokens": 8, "gen_ai.request.stream": False, "gen_ai.request.temperature": 0.5,
        "gen_ai.request.top_p": 0.9, "gen_ai.request.seed": 7, "gen_ai.response.finish_reasons": ("length",),
        "gen_ai.usage.input_tokens": out["usage"]["prompt_tokens"],
        "gen_ai.usage.output_tokens": out["usage"]["completion_tokens"], "qbt.status": "ok"}


async def test_a_streamed_chat_is_a_chat_span_with_its_finish_reasons_and_first_chunk(harness, exported):
    got = await read_all(await post_chat(harness, chat(n=2, temperature=1.0, stream=True,
                                                        stream_options={"include_usage": True})))
    await harness.billing.one_settlement()
    (span,) = named(exported, f"chat {LLM}")
    attrs = span.attributes
    assert attrs["gen_ai.operation.name"] == "chat" and attrs["gen_ai.request.stream"] is True
    assert attrs["gen_ai.request.choice.count"] == 2 and attrs["gen_ai.response.id"] == got[0]["id"]
    assert attrs["gen_ai.response.finish_reasons"] == ("length", "length")
    assert attrs["gen_ai.usage.output_tokens"] == got[-2]["usage"]["completion_tokens"]
    assert 0 < attrs["gen_ai.response.time_to_first_chunk"] < span.end_time - span.start_time


async def test_the_guard_is_a_guardrail_span_with_its_verdict(harness, exported):
    harness.billing.guard = "input"
    res = await harness.post(body(prompt=UNSAFE_PROMPT))
    assert res.status_code == 400
    await harness.billing.one_settlement()
    (check,) = named(exported, f"apply_guardrail {GUARD}")
    assert check.kind is SpanKind.CLIENT and dict(check.attributes) == {
        "gen_ai.operation.name": "apply_guardrail", "gen_ai.provider.name": "qubittron",
        "gen_ai.guardrail.component.name": GUARD, "gen_ai.guardrail.source": "input",
        "gen_ai.guardrail.result.type": "action", "gen_ai.guardrail.result.value": "blocked",
        "gen_ai.guardrail.result.reason": "Unsafe: Violent"}
    assert [(e.name, dict(e.attributes)) for e in check.events] == [
        ("gen_ai.guardrail.result", {"gen_ai.guardrail.result.type": "safety", "gen_ai.guardrail.result.value":
                                     "Unsafe", "gen_ai.guardrail.risk.category": "Violent"})]
    (gen,) = named(exported, f"text_completion {LLM}")
    assert gen.attributes["error.type"] == "content_filter" and gen.status.status_code is StatusCode.ERROR


async def test_a_stream_the_output_guard_cuts_ends_with_content_filter(harness, exported):
    harness.billing.guard = "both"
    await read_all(await harness.post(body(model=LEAKY, max_tokens=200, stream=True)))
    await harness.billing.one_settlement()
    (gen,) = named(exported, f"text_completion {LEAKY}")
    assert gen.attributes["gen_ai.response.finish_reasons"][-1] == "content_filter"
    checks = named(exported, f"apply_guardrail {GUARD}")
    assert [c.attributes["gen_ai.guardrail.source"] for c in checks].count("input") == 1
    assert checks[-1].attributes["gen_ai.guardrail.result.value"] == "blocked"


async def test_no_span_records_prompt_or_completion_text(harness, exported):
    """Every span, attribute and event of requests whose text is known: none of it appears anywhere."""
    harness.billing.guard = "both"
    texts = [PROMPT, UNSAFE_PROMPT, *(m["content"] for m in ASK)]
    for request in (body(), body(stream=True), body(prompt=UNSAFE_PROMPT), body(model=LEAKY, max_tokens=40),
                    body(model=LEAKY, max_tokens=60, stream=True)):
        res = await harness.post(request)
        texts += _texts_of(await read_all(res) if request.get("stream") else [json.loads(res.body)])
    for request in (chat(), chat(stream=True)):
        res = await post_chat(harness, request)
        texts += _texts_of(await read_all(res) if request.get("stream") else [json.loads(res.body)])
    await _settled(harness, 7)
    spans = exported.get_finished_spans()
    assert {s.attributes.get("gen_ai.operation.name") for s in spans} >= {"text_completion", "chat", "apply_guardrail"}
    recorded = [s.name for s in spans] + [str(v) for s in spans for v in s.attributes.values()] + \
        [str(v) for s in spans for e in s.events for v in [e.name, *e.attributes.values()]]
    words = {w.strip(".,?!") for t in texts for w in t.split() if len(w.strip(".,?!")) >= 4}
    assert "Ottawa" in words and "bomb" in words  # the texts were produced, so their absence below means something
    leaked = sorted({w for w in words for value in recorded if w.lower() in value.lower()})
    assert leaked == [], f"text found in spans: {leaked}"


def _texts_of(objects: list) -> list[str]:
    out = []
    for obj in objects:
        for c in obj.get("choices", []) if isinstance(obj, dict) else []:
            out.append(c.get("text") or (c.get("message") or c.get("delta") or {}).get("content") or "")
    return [t for t in out if t]


async def _settled(harness, count: int) -> None:
    import asyncio

    for _ in range(200):
        if len(harness.billing.settled) >= count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{len(harness.billing.settled)} settlements, {count} expected")
