"""Standard telemetry on the real engine: vLLM's own engine metrics reach Ray's Prometheus export under the names
vLLM's and Ray's stock dashboards read (`ray_vllm_*`, labelled with the served model's name), and the generation's
span carries the GenAI conventions' attributes, never the text."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.e2e.test_observability import spans_of
from tests.support import MODEL, scrape, value

pytestmark = pytest.mark.e2e


def test_vllm_engine_metrics_after_a_completion(stack, client):
    client.completions.create(model=MODEL, prompt="The capital of Canada is", max_tokens=4, temperature=0)
    names = ["ray_vllm_num_requests_running", "ray_vllm_num_requests_waiting", "ray_vllm_kv_cache_usage_perc",
             "ray_vllm_generation_tokens_total", "ray_vllm_prompt_tokens_total",
             "ray_vllm_time_to_first_token_seconds_bucket", "ray_vllm_e2e_request_latency_seconds_bucket"]
    text = scrape(stack, names)
    deadline = time.monotonic() + 60
    while value(text, "ray_vllm_generation_tokens_total", model_name=MODEL) <= 0 and time.monotonic() < deadline:
        time.sleep(2)  # Ray exports application metrics on an interval
        text = scrape(stack, names)
    assert value(text, "ray_vllm_generation_tokens_total", model_name=MODEL) > 0
    assert value(text, "ray_vllm_prompt_tokens_total", model_name=MODEL) > 0
    assert value(text, "ray_vllm_time_to_first_token_seconds_count", model_name=MODEL) >= 1
    running = [line for line in text.splitlines() if line.startswith("ray_vllm_num_requests_running{")]
    assert any(f'model_name="{MODEL}"' in line for line in running)
    assert "ray_qbt_engine_running_requests" not in text  # the project's own engine gauges are gone


def test_a_chat_generation_span_has_the_gen_ai_attributes_and_no_text(stack, customer):
    trace_id = "5cf92f3577b34da6a3ce929d0e0e4737"
    question = "What is the capital of Canada?"
    res = httpx.post(stack.base_url + "/v1/chat/completions", timeout=60,
                     headers={"Authorization": f"Bearer {customer.key}",
                              "traceparent": f"00-{trace_id}-00f067aa0ba902b8-01"},
                     json={"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": 16,
                           "temperature": 0})
    out = res.json()
    answer = out["choices"][0]["message"]["content"]
    spans = spans_of(stack, trace_id, {f"chat {MODEL}", "qbt.engine"})
    attrs = spans[f"chat {MODEL}"]["attributes"]
    assert attrs["gen_ai.operation.name"] == "chat" and attrs["gen_ai.request.model"] == MODEL
    assert attrs["gen_ai.response.id"] == out["id"]
    assert attrs["gen_ai.response.finish_reasons"] == [out["choices"][0]["finish_reason"]]
    assert attrs["gen_ai.usage.input_tokens"] == out["usage"]["prompt_tokens"]
    assert attrs["gen_ai.usage.output_tokens"] == out["usage"]["completion_tokens"]
    recorded = json.dumps(list(spans.values()))
    assert answer.strip() and answer.strip() not in recorded and question not in recorded


def test_a_stream_after_its_first_token_goes_on_the_relay(stack, client):
    """The default transport (`stream_transport: relay`): the rest of a stream leaves the replica on the relay's
    socket, and the client still gets every token, in order, with the usage."""
    stream = client.completions.create(model=MODEL, prompt="The capital of Canada is", max_tokens=24,
                                       temperature=0, stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 24 and "".join(c.choices[0].text for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices]) == 24  # every token reached the client, one chunk each
    name = "ray_qbt_engine_relayed_streams_total"
    deadline = time.monotonic() + 60
    while value(exported := scrape(stack, [name]), name, model=MODEL) <= 0 and time.monotonic() < deadline:
        time.sleep(2)
    assert value(exported, name, model=MODEL) >= 1
