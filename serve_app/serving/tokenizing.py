"""`POST /tokenize` and `POST /detokenize`: the model's own tokenizer (the one the ingress meters with), for a key,
free of charge, limited per key (`tokenizer_rpm`), one call at a time in a thread of their own (others get 429),
with the body-read deadline of the paid paths. Chat messages are rendered with the template chat completions
use, so a count here is the prompt_tokens a chat request will be billed."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from starlette.requests import Request
from starlette.responses import Response

from serve_app.api.encoding import dumps
from serve_app.api.errors import ApiError, Code, invalid
from serve_app.api.http import JSON, error_response, read_json
from serve_app.api.throttle import AuthFailures, TokenizerCalls
from serve_app.api.tokenizer_protocol import parse_detokenize, parse_tokenize
from serve_app.money import keys
from serve_app.money.billing import Billing
from deployments.tokenizers import is_mistral
from serve_app.serving.access import authenticated_key
from serve_app.serving.prompts import chat_prompt
from serve_app.serving.routing import ModelRouter


# Their own thread, never the paid path's (`prompts.tokenize_async`): free calls cannot delay a customer's prompt.
_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qbt-tokenizer-api")


def _answered(work, body) -> bytes:
    return dumps(work(body))


class TokenizerRoutes:
    def __init__(self, router: ModelRouter, billing: Billing, auth_failures: AuthFailures, calls: TokenizerCalls,
                 max_body_bytes: int, body_read_s: float = 30):
        self.router = router
        self.billing = billing
        self.auth_failures = auth_failures
        self.calls = calls
        self.max_body_bytes = max_body_bytes
        self.body_read_s = body_read_s
        self._busy = asyncio.Lock()

    async def tokenize(self, request: Request) -> Response:
        return await self._answer(request, self._tokenize)

    async def detokenize(self, request: Request) -> Response:
        return await self._answer(request, self._detokenize)

    async def _answer(self, request: Request, work) -> Response:
        try:
            digest = keys.key_hash((await authenticated_key(request, self.billing, self.auth_failures))[0])
            self.calls.check(digest)
            self.calls.count(digest)
            async with asyncio.timeout(self.body_read_s):
                body = await read_json(request, self.max_body_bytes)
            if self._busy.locked():  # free work never queues behind itself: one at a time, the others retry
                raise ApiError(Code.RATE_LIMIT_EXCEEDED, "The tokenizer is busy; retry shortly.",
                               headers={"Retry-After": "1"})
            async with self._busy:
                return Response(await asyncio.get_running_loop().run_in_executor(_worker, _answered, work, body),
                                media_type=JSON)
        except TimeoutError:
            return error_response(invalid(f"The request body did not arrive within {self.body_read_s:g} s.", None))
        except ApiError as exc:
            return error_response(exc)

    def _tokenize(self, body) -> dict:
        req = parse_tokenize(body)
        route = self.router.route(req.model, chat=req.messages is not None)
        tok = route.tokenizer
        if req.messages is not None:
            ids, text = chat_prompt(tok, req.messages, route.spec.id, req.add_generation_prompt)
            if req.add_special_tokens and not is_mistral(tok):  # as vLLM's: the template's own, and these again
                ids = tok.encode(text, add_special_tokens=True)
        else:
            add = True if req.add_special_tokens is None else req.add_special_tokens
            ids = tok.encode(req.prompt, add_special_tokens=add)
        return {"count": len(ids), "max_model_len": route.spec.max_model_len, "tokens": ids,
                "token_strs": tok.convert_ids_to_tokens(ids) if req.return_token_strs else None}

    def _detokenize(self, body) -> dict:
        req = parse_detokenize(body)
        route = self.router.route(req.model)
        vocab = len(route.tokenizer)
        bad = next((t for t in req.tokens if t >= vocab), None)
        if bad is not None:
            raise invalid(f"Token id {bad} is outside the model's vocabulary (size {vocab})", "tokens")
        return {"prompt": route.tokenizer.decode(req.tokens)}
