"""The OpenAI wire format for /v1/completions and /v1/chat/completions: requests, responses, stream chunks.

Each request class also knows how its endpoint turns into work (prompt token ids, SamplingParams) and how
its answers are shaped, so the HTTP layer handles both endpoints with one code path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, field_validator, model_serializer, model_validator

from splitserve.core.request import GrammarSpec, SamplingParams
from splitserve.model.tokenizer import Tokenizer
from splitserve.runtime.engine_client import TokenLogprobs
from splitserve.runtime.frontend.logprobs import ChatLogprobs, CompletionLogprobs, TokenText
from splitserve.runtime.frontend.structured_output import InvalidGrammar, ResponseFormat, StructuredOutputs, grammar_spec

# OpenAI's bound on top_logprobs (and vLLM's default); each costs a top-k over the vocabulary per token.
MAX_TOP_LOGPROBS = 20
# Choices one request may ask for (n, best_of, times the prompts of a list): each is a sequence in the engine.
MAX_CHOICES = 16


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
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="choices per prompt; they share the prompt's KV blocks")
    user: str | None = Field(None, description="an end-user id; accepted, not used")
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = Field(None, description="vLLM's extension: json, regex, grammar, choice")
    guided_json: dict[str, Any] | str | None = Field(None, description="vLLM's extension: a JSON schema")
    guided_regex: str | None = Field(None, description="vLLM's extension: output matches this regex")
    guided_grammar: str | None = Field(None, description="vLLM's extension: an EBNF grammar")
    guided_choice: list[str] | None = Field(None, description="vLLM's extension: output is one of these strings")

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

    def prompts(self, tokenizer: Tokenizer, max_model_len: int) -> list[list[int]]:
        """The prompt(s) as token ids. Text is checked first, so the work done for a request is bounded by the
        context length, not by what a client sends: it must be valid Unicode (no lone surrogates, which JSON
        escapes can carry), and it must be short enough to possibly fit the context."""
        raise NotImplementedError

    @property
    def num_candidates(self) -> int:
        """Sequences generated per prompt (best_of may ask for more than the n returned)."""
        return self.n

    @property
    def num_logprobs(self) -> int | None:
        """Top alternatives to report per token; None: no logprobs."""
        return None

    def grammar(self) -> GrammarSpec | None:
        guided = {f: getattr(self, f) for f in ("guided_json", "guided_regex", "guided_grammar", "guided_choice")}
        try:
            spec = grammar_spec(self.response_format, self.structured_outputs, guided)
        except InvalidGrammar as exc:
            raise InvalidRequest(str(exc), exc.param) from exc
        if spec is not None and self.ignore_eos:
            # The grammar ends the output with EOS; ignoring it would run on past the grammar's end.
            raise InvalidRequest("ignore_eos: cannot be combined with structured output", "ignore_eos")
        return spec

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
            grammar=self.grammar(),
            # best_of ranks candidates by their tokens' logprobs: ask for them even if the client does not.
            logprobs=self.num_logprobs if self.num_logprobs is not None or self.num_candidates == self.n else 0,
        )

    def response(self, meta: ResponseMeta, choices: list[Choice], usage: Usage, token_text: TokenText) -> BaseModel:
        raise NotImplementedError

    def opening_chunk(self, meta: ResponseMeta, index: int) -> BaseModel | None:
        """A chunk streamed before any text of choice `index`, if the endpoint has one."""
        return None

    def chunk(self, meta: ResponseMeta, piece: Choice, token_text: TokenText) -> BaseModel:
        """A streamed piece of one choice: its new text, logprobs of its new tokens, and finish reason."""
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

    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        min_length=1, description="text, token ids, or a list of either (one set of choices per prompt)"
    )
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES, description="candidates per prompt; the n most likely are returned")
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="per token: its logprob and the top-k alternatives'")
    echo: Literal[False] = Field(False, description="not supported: the answer never repeats the prompt")
    return_token_ids: bool = Field(False, description="extension: also return the generated token ids")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, prompt: Any) -> Any:
        if not isinstance(prompt, (str, list)):
            raise ValueError("must be a string, a list of token ids, or a list of strings or of token-id lists")
        if isinstance(prompt, list) and any(isinstance(p, (list, str)) and len(p) == 0 for p in prompt):
            raise ValueError("a prompt in the list is empty")
        return prompt

    @property
    def num_candidates(self) -> int:
        return self.best_of or self.n

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    def check_choices(self) -> None:
        """400 for choices that cannot be served as asked."""
        if self.best_of is not None and self.best_of < self.n:
            raise InvalidRequest(f"best_of: must be at least n ({self.n})", "best_of")
        if self.best_of is not None and self.best_of > self.n and self.stream:
            raise InvalidRequest("best_of: cannot be streamed (candidates are ranked when they are complete)", "best_of")
        num_prompts = len(self.prompt) if isinstance(self.prompt, list) and isinstance(self.prompt[0], (str, list)) else 1
        if num_prompts * self.num_candidates > MAX_CHOICES:
            raise InvalidRequest(
                f"prompt: {num_prompts} prompts x {self.num_candidates} choices exceed {MAX_CHOICES} sequences per request",
                "prompt",
            )

    def prompts(self, tokenizer: Tokenizer, max_model_len: int) -> list[list[int]]:
        self.check_choices()
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self._one(self.prompt, "prompt", tokenizer, max_model_len)]
        return [self._one(p, f"prompt[{i}]", tokenizer, max_model_len) for i, p in enumerate(self.prompt)]

    @staticmethod
    def _one(prompt: str | list[int], param: str, tokenizer: Tokenizer, max_model_len: int) -> list[int]:
        if isinstance(prompt, str):
            check_text(prompt, param, tokenizer, max_model_len)
            return tokenizer.encode(prompt, add_special_tokens=True)
        if max(prompt) >= tokenizer.vocab_size or min(prompt) < 0:
            raise InvalidRequest(f"{param}: token ids must be in [0, {tokenizer.vocab_size})", "prompt")
        return list(prompt)

    def response(self, meta: ResponseMeta, choices: list[Choice], usage: Usage, token_text: TokenText) -> CompletionResponse:
        return CompletionResponse(
            id=meta.id, created=meta.created, model=meta.model, usage=usage,
            choices=[
                CompletionChoice(
                    index=c.index, text=c.text, finish_reason=c.finish_reason,
                    token_ids=c.token_ids if self.return_token_ids else None,
                    logprobs=CompletionLogprobs.of(c.token_ids, c.logprobs, token_text) if c.logprobs is not None else None,
                )
                for c in choices
            ],
        )

    def chunk(self, meta: ResponseMeta, piece: Choice, token_text: TokenText) -> CompletionResponse:
        lps = CompletionLogprobs.of(piece.token_ids, piece.logprobs, token_text) if piece.logprobs is not None else None
        return CompletionResponse(
            id=meta.id, created=meta.created, model=meta.model,
            choices=[CompletionChoice(index=piece.index, text=piece.text, finish_reason=piece.finish_reason, logprobs=lps)],
        )

    def usage_chunk(self, meta: ResponseMeta, usage: Usage) -> CompletionResponse:
        return CompletionResponse(id=meta.id, created=meta.created, model=meta.model, choices=[], usage=usage)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[dict[str, Any]] | None = Field(None, description="an assistant's earlier tool calls, for the template")
    tool_call_id: str | None = Field(None, description="the call a tool message answers")

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        # Only an assistant turn that called tools may come without content (OpenAI's rule too).
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content: required (only an assistant message with tool_calls may omit it)")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def as_template_input(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls is not None:
            msg["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        return msg


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(strict=True)
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["function"]
    function: FunctionDefinition


class ChatCompletionRequest(GenerationRequest):
    prompt_param: ClassVar[str] = "messages"
    id_prefix: ClassVar[str] = "chatcmpl-"

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = Field(False, description="each output token's logprob")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="with logprobs: the top-k alternatives per token")
    tools: list[Tool] | None = Field(None, description="rendered with the model's chat template; 400 if the template takes none")
    tool_choice: Literal["none", "auto"] | None = Field(None, description="none or auto: the model answers in text")

    @property
    def num_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs: needs logprobs set to true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> tuple[str, int | None]:
        # max_completion_tokens is OpenAI's successor to max_tokens: it wins when both are set.
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens

    def prompts(self, tokenizer: Tokenizer, max_model_len: int) -> list[list[int]]:
        for i, m in enumerate(self.messages):
            check_text(m.text(), f"messages[{i}].content", tokenizer, max_model_len)
        check_text("".join(m.text() for m in self.messages), "messages", tokenizer, max_model_len)
        tools = None
        if self.tools:
            if not tokenizer.chat_template_takes_tools:
                raise InvalidRequest(
                    "tools: this model's chat template has no place for tools, so the model cannot be told about "
                    "them; send the request without tools", "tools",
                )
            tools = [t.model_dump(exclude_none=True) for t in self.tools]
        try:
            text = tokenizer.apply_chat_template(
                [m.as_template_input() for m in self.messages], add_generation_prompt=True, tools=tools
            )
        except Exception as exc:  # templates raise on conversations they reject (e.g. roles not alternating)
            raise InvalidRequest(f"messages: cannot apply the chat template: {exc}", "messages") from exc
        # The template writes the special tokens (BOS included) itself.
        return [tokenizer.encode(text, add_special_tokens=False)]

    def response(self, meta: ResponseMeta, choices: list[Choice], usage: Usage, token_text: TokenText) -> ChatCompletionResponse:
        return ChatCompletionResponse(
            id=meta.id, created=meta.created, model=meta.model, usage=usage,
            choices=[
                ChatChoice(
                    index=c.index, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason or "stop",
                    logprobs=ChatLogprobs.of(c.token_ids, c.logprobs, token_text) if c.logprobs is not None else None,
                )
                for c in choices
            ],
        )

    def opening_chunk(self, meta: ResponseMeta, index: int) -> ChatCompletionChunk:
        return self._chunk(meta, [ChatChunkChoice(index=index, delta=DeltaMessage(role="assistant", content=""))])

    def chunk(self, meta: ResponseMeta, piece: Choice, token_text: TokenText) -> ChatCompletionChunk:
        lps = ChatLogprobs.of(piece.token_ids, piece.logprobs, token_text) if piece.logprobs is not None else None
        delta = DeltaMessage(content=piece.text or None)
        return self._chunk(meta, [ChatChunkChoice(index=piece.index, delta=delta, finish_reason=piece.finish_reason, logprobs=lps)])

    def usage_chunk(self, meta: ResponseMeta, usage: Usage) -> ChatCompletionChunk:
        return self._chunk(meta, [], usage)

    @staticmethod
    def _chunk(meta: ResponseMeta, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=meta.id, created=meta.created, model=meta.model, choices=choices, usage=usage)


# --- responses --------------------------------------------------------------------------------------

@dataclass
class Choice:
    """One choice's answer, or a streamed piece of it: text, the tokens it came from and their logprobs
    (None unless the client asked)."""

    index: int
    text: str
    finish_reason: str | None
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None


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
    logprobs: CompletionLogprobs | None = None
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
    logprobs: ChatLogprobs | None = None


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
    logprobs: ChatLogprobs | None = None


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
