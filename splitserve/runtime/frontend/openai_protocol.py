"""The OpenAI wire format for /v1/completions and /v1/chat/completions: requests, responses, stream chunks.

Each request class also knows how its endpoint turns into work (prompt token ids, SamplingParams) and how
its answers are shaped, so the HTTP layer handles both endpoints with one code path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, field_validator, model_serializer

from splitserve.core.request import SamplingParams
from splitserve.model.tokenizer import Tokenizer


class InvalidRequest(Exception):
    """Well-formed JSON that cannot be served as asked: HTTP 400 naming the offending field."""

    def __init__(self, message: str, param: str | None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


def check_text(text: str, param: str, tokenizer: Tokenizer, max_model_len: int) -> None:
    """400 for text that is not valid Unicode, or too long to fit the context whatever it encodes to."""
    try:
        nbytes = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidRequest(f"{param}: not valid Unicode text ({exc.reason} at character {exc.start})", param) from exc
    limit = max_model_len * tokenizer.max_token_bytes
    if nbytes > limit:
        raise InvalidRequest(
            f"{param}: {nbytes:,} bytes of text cannot fit the {max_model_len:,}-token context "
            f"(a token of this model covers at most {tokenizer.max_token_bytes} bytes)",
            param, "context_length_exceeded",
        )


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# --- requests ---------------------------------------------------------------------------------------

class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """Fields shared by both endpoints. Extensions beyond OpenAI: top_k, stop_token_ids, ignore_eos."""

    # Strict: "10" is not a number. A client sending it has a bug that silent coercion would hide.
    # Unknown fields are ignored, as OpenAI clients send options (user, metadata, ...) that change nothing here.
    model_config = ConfigDict(strict=True)

    prompt_param: ClassVar[str]
    id_prefix: ClassVar[str]

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1, description="0 or -1: no top-k cut")
    # The range a torch generator accepts as a seed.
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        # An empty stop string matches before any text: every answer would be empty.
        if stop == "" or (isinstance(stop, list) and "" in stop):
            raise ValueError("stop strings must not be empty")
        return stop

    @field_validator("stop_token_ids")
    @classmethod
    def _non_negative_ids(cls, ids: list[int] | None) -> list[int] | None:
        if ids and min(ids) < 0:
            raise ValueError("token ids must be non-negative")
        return ids

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def requested_max_tokens(self) -> tuple[str, int | None]:
        """(field name, value) of the output-length limit the client set, if any."""
        return "max_tokens", self.max_tokens

    def prompt_token_ids(self, tokenizer: Tokenizer, max_model_len: int) -> list[int]:
        """The prompt as token ids. Text is checked first, so the work done for a request is bounded by the
        context length, not by what a client sends: it must be valid Unicode (no lone surrogates, which JSON
        escapes can carry), and it must be short enough to possibly fit the context."""
        raise NotImplementedError

    def sampling_params(
        self, num_prompt_tokens: int, max_model_len: int, vocab_size: int, default_max_tokens: int
    ) -> SamplingParams:
        """The engine's settings for this request, once the prompt's length is known."""
        max_tokens = resolve_max_tokens(
            self.requested_max_tokens(), self.prompt_param, num_prompt_tokens, max_model_len, default_max_tokens
        )
        stop_ids = tuple(self.stop_token_ids or ())
        if stop_ids and max(stop_ids) >= vocab_size:
            raise InvalidRequest(f"stop_token_ids: ids must be below the vocabulary size {vocab_size}", "stop_token_ids")
        top_k = self.top_k or 0
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            # A cut at or beyond the vocabulary keeps every token: the same as no cut, and safe for topk().
            top_k=0 if top_k < 0 or top_k >= vocab_size else top_k,
            seed=self.seed,
            stop_token_ids=stop_ids,
            ignore_eos=self.ignore_eos,
        )

    def response(
        self, meta: ResponseMeta, text: str, finish_reason: str, usage: Usage, token_ids: list[int] | None = None
    ) -> BaseModel:
        raise NotImplementedError

    def opening_chunk(self, meta: ResponseMeta) -> BaseModel | None:
        """A chunk streamed before any text, if the endpoint has one."""
        return None

    def chunk(self, meta: ResponseMeta, text: str, finish_reason: str | None) -> BaseModel:
        raise NotImplementedError

    def usage_chunk(self, meta: ResponseMeta, usage: Usage) -> BaseModel:
        raise NotImplementedError


def resolve_max_tokens(
    requested: tuple[str, int | None], prompt_param: str, num_prompt_tokens: int, max_model_len: int, default: int
) -> int:
    """The output-token limit: as requested if it fits the context, else a 400; when omitted, `default`
    capped to what the prompt leaves of the context."""
    room = max_model_len - num_prompt_tokens
    if room <= 0:
        raise InvalidRequest(
            f"{prompt_param}: the prompt has {num_prompt_tokens} tokens, leaving no room to generate in this "
            f"model's context of {max_model_len} tokens",
            prompt_param,
            "context_length_exceeded",
        )
    param, value = requested
    if value is None:
        return min(default, room)
    if value > room:
        raise InvalidRequest(
            f"{param}: {value} tokens plus the prompt's {num_prompt_tokens} exceed this model's context of "
            f"{max_model_len} tokens; at most {room} can be generated",
            param,
            "context_length_exceeded",
        )
    return value


class CompletionRequest(GenerationRequest):
    prompt_param: ClassVar[str] = "prompt"
    id_prefix: ClassVar[str] = "cmpl-"

    prompt: str | list[int] = Field(min_length=1, description="text, or token ids; one prompt per request")
    logprobs: int | None = None
    return_token_ids: bool = Field(False, description="extension: also return the generated token ids")

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and any(isinstance(p, (str, list)) for p in prompt):
            raise ValueError("a list of prompts is not supported: send one prompt per request")
        if not isinstance(prompt, (str, list)):
            raise ValueError("must be a string or a list of token ids")
        return prompt

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, logprobs: int | None) -> None:
        if logprobs is not None:
            raise ValueError("logprobs are not supported")

    def prompt_token_ids(self, tokenizer: Tokenizer, max_model_len: int) -> list[int]:
        if isinstance(self.prompt, str):
            check_text(self.prompt, "prompt", tokenizer, max_model_len)
            return tokenizer.encode(self.prompt, add_special_tokens=True)
        if max(self.prompt) >= tokenizer.vocab_size or min(self.prompt) < 0:
            raise InvalidRequest(f"prompt: token ids must be in [0, {tokenizer.vocab_size})", "prompt")
        return list(self.prompt)

    def response(
        self, meta: ResponseMeta, text: str, finish_reason: str, usage: Usage, token_ids: list[int] | None = None
    ) -> CompletionResponse:
        ids = token_ids if self.return_token_ids else None
        return CompletionResponse(
            id=meta.id, created=meta.created, model=meta.model,
            choices=[CompletionChoice(text=text, finish_reason=finish_reason, token_ids=ids)], usage=usage,
        )

    def chunk(self, meta: ResponseMeta, text: str, finish_reason: str | None) -> CompletionResponse:
        return CompletionResponse(
            id=meta.id, created=meta.created, model=meta.model,
            choices=[CompletionChoice(text=text, finish_reason=finish_reason)],
        )

    def usage_chunk(self, meta: ResponseMeta, usage: Usage) -> CompletionResponse:
        return CompletionResponse(id=meta.id, created=meta.created, model=meta.model, choices=[], usage=usage)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def as_template_input(self) -> dict[str, str]:
        return {"role": self.role, "content": self.text()}


class ChatCompletionRequest(GenerationRequest):
    prompt_param: ClassVar[str] = "messages"
    id_prefix: ClassVar[str] = "chatcmpl-"

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | int | None) -> None:
        if value not in (None, False):
            raise ValueError("logprobs are not supported")

    def requested_max_tokens(self) -> tuple[str, int | None]:
        # max_completion_tokens is OpenAI's successor to max_tokens: it wins when both are set.
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens

    def prompt_token_ids(self, tokenizer: Tokenizer, max_model_len: int) -> list[int]:
        for i, m in enumerate(self.messages):
            check_text(m.text(), f"messages[{i}].content", tokenizer, max_model_len)
        check_text("".join(m.text() for m in self.messages), "messages", tokenizer, max_model_len)
        try:
            text = tokenizer.apply_chat_template([m.as_template_input() for m in self.messages], add_generation_prompt=True)
        except Exception as exc:  # templates raise on conversations they reject (e.g. roles not alternating)
            raise InvalidRequest(f"messages: cannot apply the chat template: {exc}", "messages") from exc
        # The template writes the special tokens (BOS included) itself.
        return tokenizer.encode(text, add_special_tokens=False)

    def response(
        self, meta: ResponseMeta, text: str, finish_reason: str, usage: Usage, token_ids: list[int] | None = None
    ) -> ChatCompletionResponse:
        return ChatCompletionResponse(
            id=meta.id, created=meta.created, model=meta.model,
            choices=[ChatChoice(message=AssistantMessage(content=text), finish_reason=finish_reason)], usage=usage,
        )

    def opening_chunk(self, meta: ResponseMeta) -> ChatCompletionChunk:
        return self._chunk(meta, [ChatChunkChoice(delta=DeltaMessage(role="assistant", content=""))])

    def chunk(self, meta: ResponseMeta, text: str, finish_reason: str | None) -> ChatCompletionChunk:
        return self._chunk(meta, [ChatChunkChoice(delta=DeltaMessage(content=text or None), finish_reason=finish_reason)])

    def usage_chunk(self, meta: ResponseMeta, usage: Usage) -> ChatCompletionChunk:
        return self._chunk(meta, [], usage)

    @staticmethod
    def _chunk(meta: ResponseMeta, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=meta.id, created=meta.created, model=meta.model, choices=choices, usage=usage)


# --- responses --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ResponseMeta:
    """What every response and chunk of one request repeats."""

    id: str
    created: int  # unix seconds
    model: str


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
        )


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: None = None
    token_ids: list[int] | None = None  # only when the request asked for return_token_ids

    @model_serializer(mode="wrap")
    def _omit_absent_token_ids(self, handler: SerializerFunctionWrapHandler) -> dict:
        data = handler(self)
        if data.get("token_ids") is None:
            data.pop("token_ids", None)
        return data


class CompletionResponse(BaseModel):
    """A whole answer, and also each streamed chunk (OpenAI uses one shape for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _omit_unset(self) -> dict[str, str]:
        # OpenAI's deltas carry only what changed: {"content": "..."} or {} on the final chunk.
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "splitserve"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
