"""Pydantic models of OpenAI's chat completions contract (`POST /v1/chat/completions`): where every chat field is
validated. The sampling fields are completions' own (`SamplingFields`); what chat adds is here: messages, the
`logprobs`/`top_logprobs` pair, `max_completion_tokens`, `response_format`. Tool calling is not offered: `tools`,
`functions` and tool turns are refused with a 400 that says so."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, StrictInt, StrictStr, model_validator

from serve_app.api.errors import invalid
from serve_app.api.protocol import FIELD_NAMES, SamplingFields, parse_request

MAX_MESSAGES = 1024
MAX_TOP_LOGPROBS = 20
ROLES = ("system", "developer", "user", "assistant")
NO_TOOLS = "Tool calling is not supported by this service (see the README); send no `{}`."


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # non-text parts are refused by name below
    type: StrictStr
    text: StrictStr | None = None


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    role: StrictStr
    content: StrictStr | Annotated[list[ContentPart], Field(min_length=1)] | None = None
    name: StrictStr | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: StrictStr | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content or [])


class JsonSchema(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)
    name: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    description: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class ChatCompletionRequest(SamplingFields):
    """`POST /v1/chat/completions`."""

    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None  # deprecated by OpenAI; max_completion_tokens wins
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool | None = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    _max_tokens: int | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        self._check_sampling(self.max_completion_tokens or self.max_tokens)
        for field in ("tools", "functions"):
            if getattr(self, field):
                raise invalid(NO_TOOLS.format(field), field)
        for field in ("tool_choice", "function_call"):
            if getattr(self, field) not in (None, "none"):
                raise invalid(NO_TOOLS.format(field), field)
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs requires logprobs to be true", "top_logprobs")
        for m in self.messages:
            check_message(m)
        if not any(m.role in ("user", "system", "developer") for m in self.messages):
            raise invalid("messages must contain at least one user, system or developer message", "messages")
        rf = self.response_format
        if rf is not None and rf.type != "text" and self.structured_outputs is not None:
            raise invalid("Set either response_format or structured_outputs, not both", "structured_outputs")
        if rf is not None and rf.type == "json_schema" and (rf.json_schema is None or rf.json_schema.schema_ is None):
            raise invalid("response_format of type json_schema needs json_schema.schema", "response_format")
        return self

    @property
    def candidates_per_prompt(self) -> int:
        return self.choices_per_prompt

    @property
    def logprobs_count(self) -> int | None:
        """vLLM's `logprobs`: the alternatives per token (the sampled one always comes too)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def resolve_max_tokens(self, prompt_tokens: int, max_model_len: int) -> int:
        """Unset, the reply may run to the end of the context, as OpenAI's and vLLM's chat do; the reservation
        then covers that much."""
        self._max_tokens = self.requested_max_tokens or max(max_model_len - prompt_tokens, 1)
        if self.min_tokens and self.min_tokens > self._max_tokens:
            raise invalid(f"min_tokens ({self.min_tokens}) is more than this prompt leaves of the model's context "
                          f"({self._max_tokens} tokens)", "min_tokens")
        return self._max_tokens

    @property
    def max_tokens_or_default(self) -> int:
        if self._max_tokens is None:
            raise RuntimeError("resolve_max_tokens first: chat's default depends on the prompt's length")
        return self._max_tokens

    def sampling(self) -> dict[str, Any]:
        out = super().sampling()
        rf = self.response_format
        # Compact JSON by default (`ModelSpec.engine_kwargs`: vLLM reads that per engine).
        if rf is not None and rf.type == "json_object":
            out["structured_outputs"] = {"json_object": True}
        elif rf is not None and rf.type == "json_schema":
            out["structured_outputs"] = {"json": rf.json_schema.schema_}
        return out


def check_message(m: Message) -> None:
    if m.role in ("tool", "function") or m.tool_calls or m.tool_call_id:
        raise invalid(NO_TOOLS.format("tool messages"), "messages")
    if m.role not in ROLES:
        raise invalid(f"Invalid value for 'messages.role': {m.role!r}; expected one of {', '.join(ROLES)}",
                      "messages.role")
    if m.content is None:
        raise invalid(f"A {m.role} message needs content", "messages.content")
    for part in m.content if isinstance(m.content, list) else ():
        if part.type != "text" or part.text is None or part.model_extra:
            raise invalid(f"Only text content parts are supported, got a part of type {part.type!r}",
                          "messages.content")


FIELD_NAMES[ChatCompletionRequest] = {*ChatCompletionRequest.model_fields, *Message.model_fields,
                                      *ResponseFormat.model_fields, *JsonSchema.model_fields, "schema"}


def parse_chat_request(payload: Any) -> ChatCompletionRequest:
    return parse_request(ChatCompletionRequest, payload)
