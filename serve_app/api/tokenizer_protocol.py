"""vLLM's tokenizer endpoints' request and response shapes (`POST /tokenize`, `POST /detokenize`): a prompt, or
chat messages rendered with the model's template; token ids back to text."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

from serve_app.api.chat_protocol import Message, check_message
from serve_app.api.errors import invalid
from serve_app.api.protocol import FIELD_NAMES, parse_request

MAX_DETOKENIZE = 1_000_000


class TokenizeRequest(BaseModel):
    """vLLM's TokenizeCompletionRequest (`prompt`) or TokenizeChatRequest (`messages`), one model for both."""

    model_config = ConfigDict(strict=True, extra="forbid")
    model: StrictStr
    prompt: StrictStr | None = None
    messages: Annotated[list[Message], Field(min_length=1)] | None = None
    add_special_tokens: StrictBool | None = None  # default: True for a prompt, False for messages (as vLLM)
    add_generation_prompt: StrictBool = True
    return_token_strs: StrictBool = False

    @model_validator(mode="after")
    def _one_form(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise invalid("Send either prompt or messages", "prompt")
        for m in self.messages or ():
            check_message(m)
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    model: StrictStr
    tokens: Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(max_length=MAX_DETOKENIZE)]


FIELD_NAMES[TokenizeRequest] = {*TokenizeRequest.model_fields, *Message.model_fields}


def parse_tokenize(payload: Any) -> TokenizeRequest:
    return parse_request(TokenizeRequest, payload)


def parse_detokenize(payload: Any) -> DetokenizeRequest:
    return parse_request(DetokenizeRequest, payload)
