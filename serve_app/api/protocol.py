"""Pydantic models of the OpenAI legacy completions contract: where every request field is validated.

Strict types (no "16" for 16, no 1 for true) as OpenAI's API does; unknown fields are refused with their name as
`param`, so that a typo in a passthrough parameter is not silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, model_validator

from serve_app.api.errors import ApiError, invalid

INT64 = 2**63
MAX_PROMPTS = 128
MAX_CHOICES = 128
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the legacy endpoint; every reader uses `CompletionRequest.max_tokens_or_default`

TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]
Prompt = StrictStr | Annotated[list[StrictStr], Field(min_length=1)] | TokenIds | Annotated[
    list[TokenIds], Field(min_length=1)]
Unit = Annotated[float, Field(ge=0.0, le=1.0)]
NonEmpty = Annotated[StrictStr, Field(min_length=1)]  # a stop string or a bad word ("" is refused by vLLM)
TOKEN_ID_DIGITS = 10  # a logit_bias key: ASCII digits, no longer than any vocabulary's ids need
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
M = TypeVar("M", bound=BaseModel)
FIELD_NAMES: dict[type, set[str]] = {}  # a request model -> every field name its nested models use (chat's)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: StrictBool | None = None
    include_obfuscation: StrictBool | None = None
    continuous_usage_stats: StrictBool | None = None  # vLLM's: every chunk carries the usage so far


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: exactly one constraint on what the model may write."""

    model_config = ConfigDict(strict=True, extra="forbid")
    json_: dict[str, Any] | StrictStr | None = Field(default=None, alias="json")
    regex: StrictStr | None = None
    choice: Annotated[list[StrictStr], Field(min_length=1)] | None = None
    grammar: StrictStr | None = None
    json_object: StrictBool | None = None

    @model_validator(mode="after")
    def _one(self) -> StructuredOutputs:
        if sum(v is not None for v in (self.json_, self.regex, self.choice, self.grammar, self.json_object)) != 1:
            raise invalid("structured_outputs takes exactly one of json, regex, choice, grammar, json_object",
                          "structured_outputs")
        return self

    def engine(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


class SamplingFields(BaseModel):
    """The sampling fields completions and chat share, with vLLM's extra sampling parameters (the seed's
    passthrough): one definition, one mapping onto SamplingParams."""

    model_config = ConfigDict(strict=True, extra="forbid")

    model: StrictStr
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None  # vLLM samples from a nonempty nucleus
    n: Annotated[StrictInt, Field(ge=1, le=MAX_CHOICES)] | None = 1
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    stop: NonEmpty | Annotated[list[NonEmpty], Field(max_length=4)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[StrictStr, Annotated[float, Field(ge=-100, le=100)]] | None = None
    seed: Annotated[StrictInt, Field(ge=-INT64, lt=INT64)] | None = None
    user: StrictStr | None = None

    # vLLM extra sampling parameters, passed through to SamplingParams.
    top_k: Annotated[StrictInt, Field(ge=-1, lt=INT64)] | None = None
    min_p: Unit | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=2.0)] | None = None
    min_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    ignore_eos: StrictBool | None = None
    stop_token_ids: list[Annotated[StrictInt, Field(ge=0)]] | None = None
    include_stop_str_in_output: StrictBool | None = None
    skip_special_tokens: StrictBool | None = None
    spaces_between_special_tokens: StrictBool | None = None
    allowed_token_ids: Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)] | None = None
    bad_words: list[NonEmpty] | None = None
    structured_outputs: StructuredOutputs | None = None
    return_token_ids: StrictBool | None = None  # choices carry `token_ids` (and `prompt_token_ids`)
    # Only for models whose engine schedules by priority (lower runs first).
    priority: Annotated[StrictInt, Field(ge=-INT64, lt=INT64)] | None = None
    prompt_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None  # per prompt token, on the first chunk

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.continuous_usage_stats)

    def _check_sampling(self, max_tokens: int | None) -> None:
        """The checks across fields; `max_tokens`: what the engine will be given, when known before tokenizing."""
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options can only be set when stream is true", "stream_options")
        if self.logit_bias:
            for key in self.logit_bias:
                if not (key.isascii() and key.isdigit() and len(key) <= TOKEN_ID_DIGITS):
                    raise invalid(f"logit_bias keys must be token ids, got {key!r}", "logit_bias")
        if self.min_tokens and max_tokens is not None and self.min_tokens > max_tokens:
            raise invalid("min_tokens must be less than or equal to max_tokens", "min_tokens")

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def sampling(self) -> dict[str, Any]:
        """The fields that map one-to-one onto vLLM's SamplingParams, only where the client set them."""
        fields = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "logit_bias", "top_k",
                  "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
                  "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens",
                  "allowed_token_ids", "bad_words")
        out = {f: getattr(self, f) for f in fields if getattr(self, f) is not None}
        if self.structured_outputs is not None:
            out["structured_outputs"] = self.structured_outputs.engine()
        if self.stop is not None:
            out["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return out


class CompletionRequest(SamplingFields):
    """`POST /v1/completions`."""

    prompt: Prompt
    suffix: StrictStr | None = None
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = DEFAULT_MAX_TOKENS
    best_of: Annotated[StrictInt, Field(ge=1, le=20)] | None = None
    logprobs: Annotated[StrictInt, Field(ge=0, le=5)] | None = None
    echo: StrictBool | None = False

    @model_validator(mode="after")
    def _consistent(self) -> CompletionRequest:
        self._check_sampling(self.max_tokens_or_default)
        if self.echo and self.suffix is not None:  # the echo would be the fill-in-the-middle template's markup
            raise invalid("echo cannot be combined with suffix", "echo")
        if self.best_of is not None and self.best_of < self.choices_per_prompt:
            raise invalid("best_of must be greater than or equal to n", "best_of")
        if self.stream and self.best_of is not None and self.best_of > self.choices_per_prompt:
            raise invalid("best_of greater than n cannot be streamed", "best_of")
        return self

    @property
    def candidates_per_prompt(self) -> int:
        """Sequences generated per prompt: best_of when it asks for more than n."""
        return max(self.best_of or 1, self.choices_per_prompt)

    @property
    def max_tokens_or_default(self) -> int:
        """`max_tokens: null` means the default, as OpenAI's API does."""
        return self.max_tokens if self.max_tokens is not None else DEFAULT_MAX_TOKENS


def parse_completion_request(payload: Any) -> CompletionRequest:
    return parse_request(CompletionRequest, payload)


def parse_request(model: type[M], payload: Any) -> M:
    """The body as `model`, or the contract's 400 naming the first field that is wrong."""
    if not isinstance(payload, dict):
        raise invalid("The request body must be a JSON object", None)
    try:
        return model.model_validate(payload)
    except ApiError:
        raise
    except ValidationError as exc:
        raise _from_validation(exc, model) from None


def _from_validation(exc: ValidationError, model: type[BaseModel]) -> ApiError:
    first = exc.errors(include_url=False)[0]
    nested = first.get("ctx", {}).get("error")
    if isinstance(nested, ApiError):
        return nested
    loc = [str(p) for p in first["loc"] if not isinstance(p, int)]
    # Union members show up in `loc` as type names (for example `list[int]`); keep only the field path.
    path = [p for p in loc if p in FIELD_NAMES.get(model, model.model_fields) or p in StreamOptions.model_fields
            or p in StructuredOutputs.model_fields or p == "json"]
    if first["type"] == "extra_forbidden" and loc:
        path.append(loc[-1])
    param = ".".join(path) if path else (loc[0] if loc else None)
    if first["type"] == "extra_forbidden":
        return invalid(f"Unrecognized request argument supplied: {param}", param)
    if first["type"] == "missing":
        return invalid(f"Missing required parameter: {param}", param)
    return invalid(f"Invalid value for '{param}': {first['msg']}", param)
