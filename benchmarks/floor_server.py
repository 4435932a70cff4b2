"""The gateway benchmark's floor: a bare Starlette/uvicorn SSE server fed by the same simulated engine and framing
as the gateway (`SimEngine`, `CompletionFrame`), in one process, with no Serve, Redis, authentication or handle
hop. What the gateway spends per event above this is its own cost.

    .venv/bin/python -m benchmarks.floor_server PORT
"""

from __future__ import annotations

import contextlib
import json
import sys
import uuid

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from deployments.sim_engine import SimConfig, SimEngine
from deployments.sim_tokenizer import sim_tokenizer
from deployments.wire import GenerationRequest
from serve_app.api.encoding import DONE, CompletionFrame, dumps

MODEL = "qbt-sim-llm"
engine = SimEngine(MODEL, SimConfig())
tokenizer = sim_tokenizer()


async def completions(request: Request) -> Response:
    body = json.loads(await request.body())
    prompt = body["prompt"]
    ids = tokenizer.encode(prompt)
    frame = CompletionFrame("cmpl-" + uuid.uuid4().hex, 0, MODEL, True)
    req = GenerationRequest(request_id=frame.completion_id, prompts=[ids], prompt_texts=[prompt], sampling={},
                            max_tokens=body["max_tokens"])
    if not body.get("stream"):
        choices, usage = await engine.complete(req)
        return Response(dumps(frame.obj(choices, usage.as_dict())), media_type="application/json")

    async def events():
        usage = None
        async for item in engine.stream(req):
            usage = item.usage
            yield frame.chunk(item.choices)
        yield frame.usage_chunk(usage.as_dict())
        yield DONE

    return StreamingResponse(events(), media_type="text/event-stream")


async def health(request: Request) -> Response:
    return Response(b"ok")


@contextlib.asynccontextmanager
async def lifespan(app):
    await engine.start()
    yield
    engine.shutdown()


app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]), Route("/health", health)],
                lifespan=lifespan)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
