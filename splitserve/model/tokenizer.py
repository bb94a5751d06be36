"""Text <-> token ids, chat templates and streaming detokenization, on the `tokenizers` library (no transformers).

BOS policy: `encode` asks the backend for no special tokens and prepends BOS itself when the model adds one
and the text does not already start with it. So a chat template that writes the BOS into the text (Llama 3)
does not get a second one.
"""

from __future__ import annotations

import functools

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Iterable

import gguf
import jinja2
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from splitserve.model.gguf_file import gguf_eos_ids, gguf_field

# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) -> splits before byte-level BPE, as llama.cpp does them.
_GPT2_SPLIT = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BYTES_ONLY = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
_DIGITS_THEN_GPT2 = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _GPT2_SPLIT])
_PRE_TOKENIZERS = {
    "default": _GPT2_SPLIT,
    "gpt-2": _GPT2_SPLIT,
    "smollm": _DIGITS_THEN_GPT2,
    "starcoder": _DIGITS_THEN_GPT2,
    "refact": _DIGITS_THEN_GPT2,
    "llama-bpe": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_REGEX), "isolated"), _BYTES_ONLY]),
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


class Tokenizer:
    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: Iterable[int | None],
        add_bos_token: bool,
        chat_template: str | None,
    ) -> None:
        self.backend = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        # The first eos id is the tokenizer's own: templates see it as `eos_token`.
        eos = [i for i in dict.fromkeys(eos_token_ids) if i is not None]
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        self._eos_token_id = eos[0] if eos else None
        self.add_bos_token = add_bos_token and bos_token_id is not None
        self.chat_template = chat_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """An upper bound on the UTF-8 bytes of text one token covers: the longest vocabulary entry. Text of
        more than `n x max_token_bytes` bytes cannot encode to n tokens or fewer, so an oversized prompt is
        refused without tokenizing it. (Byte-level and byte-fallback entries are spelled with at least
        one byte per byte they stand for, so the bound only errs on the generous side.)"""
        return max((len(t.encode("utf-8", "surrogatepass")) for t in self.backend.get_vocab(with_added_tokens=True)), default=1)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        """Render the model's jinja chat template (sandboxed). Content given as OpenAI text parts is joined first."""
        if self._template is None:
            raise ValueError("this model's tokenizer has no chat template")
        messages = [{**m, "content": _text_content(m.get("content"))} for m in messages]
        return self._template.render(
            messages=messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._token(self.bos_token_id),
            eos_token=self._token(self._eos_token_id),
        )

    @property
    def chat_template_takes_tools(self) -> bool:
        """Whether the chat template renders a `tools` list (templates that do name the variable)."""
        return self.chat_template is not None and "tools" in self.chat_template

    @cached_property
    def _template(self) -> jinja2.Template | None:
        if self.chat_template is None:
            return None
        # The same environment transformers renders in, so templates behave alike.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise_template_error
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.chat_template)

    def _token(self, token_id: int | None) -> str:
        return "" if token_id is None else self.backend.id_to_token(token_id)

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """tokenizer.json, plus tokenizer_config.json, chat_template.jinja and the eos ids of config.json and
        generation_config.json where present (Llama 3 lists its end-of-turn ids only in the latter)."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        tc = _read_json(path / "tokenizer_config.json")

        def token_id(entry: str | dict | None) -> int | None:
            content = entry.get("content") if isinstance(entry, dict) else entry
            return None if content is None else backend.token_to_id(content)

        bos = token_id(tc.get("bos_token"))
        eos = [token_id(tc.get("eos_token"))]
        for name in ("config.json", "generation_config.json"):
            value = _read_json(path / name).get("eos_token_id")
            eos += value if isinstance(value, list) else [value]
        # Without the flag, the post-processor tells whether BOS is added (Llama 3's tokenizer.json does it there).
        add_bos = tc.get("add_bos_token", backend.encode("", add_special_tokens=True).ids[:1] == [bos])
        return cls(
            backend,
            bos_token_id=bos,
            eos_token_ids=eos,
            add_bos_token=bool(add_bos),
            chat_template=_hf_chat_template(path, tc),
        )

    @classmethod
    def from_gguf(cls, reader: gguf.GGUFReader) -> Tokenizer:
        """A byte-level BPE (GPT-2 style) from the vocabulary, merges and token types llama.cpp stores."""
        kind = gguf_field(reader, "tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"unsupported GGUF tokenizer {kind!r}: only byte-level BPE ('gpt2') is supported")
        pre = gguf_field(reader, "tokenizer.ggml.pre", "default")
        if pre not in _PRE_TOKENIZERS:
            raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}: supported are {', '.join(_PRE_TOKENIZERS)}")
        tokens = gguf_field(reader, "tokenizer.ggml.tokens")
        merges = [tuple(m.split(" ", 1)) for m in gguf_field(reader, "tokenizer.ggml.merges")]
        backend = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
        backend.pre_tokenizer = _PRE_TOKENIZERS[pre]
        backend.decoder = decoders.ByteLevel()
        # Control and user-defined tokens must match whole in the text, not be split by BPE.
        types = gguf_field(reader, "tokenizer.ggml.token_type", [])
        backend.add_special_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL])
        backend.add_tokens(
            [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
        )
        return cls(
            backend,
            bos_token_id=gguf_field(reader, "tokenizer.ggml.bos_token_id"),
            eos_token_ids=gguf_eos_ids(reader),
            add_bos_token=bool(gguf_field(reader, "tokenizer.ggml.add_bos_token", False)),
            chat_template=gguf_field(reader, "tokenizer.chat_template"),
        )


class IncrementalDetokenizer:
    """Streams text for a growing token list, never emitting half a UTF-8 character (uses prefix/read offsets like vLLM/TGI).

    Each step decodes a short window of tokens twice, with and without the new ones, and emits the difference:
    the window keeps context such as a leading space that a token on its own would decode differently.
    """

    # Tokens of the prompt kept as context for the first generated ones (vLLM uses the same).
    _PROMPT_CONTEXT = 5

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.token_ids = list(prompt_token_ids or [])
        self.read_offset = len(self.token_ids)  # tokens up to here have been emitted as text
        self.prefix_offset = max(self.read_offset - self._PROMPT_CONTEXT, 0)  # the window starts here

    def add(self, token_ids: list[int]) -> str:
        self.token_ids.extend(token_ids)
        decode = self.tokenizer.decode
        emitted = decode(self.token_ids[self.prefix_offset : self.read_offset])
        text = decode(self.token_ids[self.prefix_offset :])
        # A trailing U+FFFD is a UTF-8 character still missing bytes: wait for the next token.
        if len(text) <= len(emitted) or text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return text[len(emitted) :]


def _text_content(content: object) -> object:
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if part.get("type") == "text")
    return content


def _raise_template_error(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _hf_chat_template(path: Path, tokenizer_config: dict) -> str | None:
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: the "default" one is the chat template
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template
