"""What crosses the handle goes as plain pickle (serve_app/serving/routing.py WIRE): every wire type must round-trip."""

from __future__ import annotations

import json
import pickle

from deployments.wire import EngineFailure, GenerationRequest, InvalidSampling, StreamItem, Usage, incoming, outgoing
from serve_app.serving.routing import WIRE


def test_wire_types_round_trip_through_plain_pickle():
    req = GenerationRequest("cmpl-1", [[1, 2, 3]], [None], {"temperature": 0.5}, n=2, logprobs=1, max_tokens=7,
                            trace_context={"traceparent": "00-ab-cd-01"})
    item = StreamItem([{"text": " hi", "index": 0, "logprobs": None, "finish_reason": None}], Usage(3, 1))
    for obj in (req, item, ([item.choices[0]], Usage(3, 4))):
        assert pickle.loads(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)) == obj
    assert all(WIRE[k] == "pickle" for k in ("request_serialization", "response_serialization"))
    for exc in (EngineFailure("engine died"), InvalidSampling("bad logit_bias")):
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and str(back) == str(exc)


def test_stream_items_cross_as_plain_tuples_rendered_or_not():
    choices = [{"text": " é", "index": 0, "logprobs": None, "finish_reason": "length"}]
    item = StreamItem(choices, Usage(3, 5))
    req = GenerationRequest(request_id="r", prompts=[[1, 2, 3]], prompt_texts=[None], sampling={}, max_tokens=5)
    raw = pickle.loads(pickle.dumps(outgoing(item, req)))
    assert type(raw) is tuple and incoming(raw, 3) == item
    req.render = True
    back = incoming(pickle.loads(pickle.dumps(outgoing(item, req))), 3)
    assert back.choices == [] and back.usage == Usage(3, 5)
    assert json.loads(back.rendered) == choices and " é".encode() in back.rendered  # UTF-8, as the ingress sends
    assert back.relay is None
    ticket = ("relay", "10.0.0.7", 41234, b"s" * 16)  # a relayed stream's first item carries the relay's ticket
    first = incoming(pickle.loads(pickle.dumps((*outgoing(item, req), ticket))), 3)
    assert first.relay == ticket and first.rendered == back.rendered and first.usage == Usage(3, 5)


def test_chat_streams_are_rendered_as_chat_deltas():
    req = GenerationRequest(request_id="r", prompts=[[1]], prompt_texts=[None], sampling={}, max_tokens=5,
                            render=True, chat=True)
    item = StreamItem([{"text": " hi", "index": 1, "logprobs": None, "finish_reason": "stop"}], Usage(1, 1))
    back = incoming(outgoing(item, req), 1)
    assert json.loads(back.rendered) == [{"index": 1, "delta": {"content": " hi"}, "logprobs": None,
                                          "finish_reason": "stop"}]
