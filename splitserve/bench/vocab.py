"""Which token ids a generated prompt may use: the target's vocabulary minus its special tokens.

Prompts go out as token-id lists, so only the vocabulary's size and its special ids matter: any other id is
one prompt token, exactly. The tokenizer is read with the engine's own loader, so bench and server agree.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


class VocabError(Exception):
    """No usable tokenizer for the target; the message says what to pass."""


@dataclass(frozen=True)
class Vocab:
    size: int
    special_ids: frozenset[int]
    source: str


def load_vocab(path: str | Path) -> Vocab:
    """From a Hugging Face model dir (tokenizer.json) or a .gguf file."""
    # Imported here: the engine's modules pull in torch, which only this step needs.
    from splitserve.model.gguf_file import open_gguf
    from splitserve.model.tokenizer import Tokenizer

    p = Path(path)
    try:
        if p.suffix == ".gguf" and p.is_file():
            tok = Tokenizer.from_gguf(open_gguf(p))
        elif (p / "tokenizer.json").is_file():
            tok = Tokenizer.from_hf_dir(p)
        else:
            raise VocabError(f"no tokenizer at {p}: expected a model dir with tokenizer.json, or a .gguf file")
    except (ValueError, OSError) as e:
        raise VocabError(f"cannot read the tokenizer at {p}: {e}") from None
    special = {i for i, t in tok.backend.get_added_tokens_decoder().items() if t.special}
    special |= tok.eos_token_ids | ({tok.bos_token_id} if tok.bos_token_id is not None else set())
    rows = _embedding_rows(p)
    return Vocab(min(tok.vocab_size, rows or tok.vocab_size), frozenset(special), str(p))


def find_vocab(model: str, tokenizer: str | None) -> Vocab:
    """--tokenizer if given; else the served model's name as a local path, a Hugging Face cache entry, or
    splitserve's bundled model."""
    if tokenizer is not None:
        return load_vocab(tokenizer)
    for candidate in (Path(model), *_hf_cache_snapshots(model), *_bundled(model)):
        try:
            return load_vocab(candidate)
        except VocabError:
            continue
    raise VocabError(f"cannot find a tokenizer for model {model!r}; pass --tokenizer PATH (model dir or .gguf)")


def _embedding_rows(path: Path) -> int | None:
    """A checkpoint's embedding can be smaller than its tokenizer (ids past it would crash the model)."""
    config = path / "config.json"
    return json.loads(config.read_text()).get("vocab_size") if config.is_file() else None


def _hf_cache_snapshots(model: str) -> list[Path]:
    hub = os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
    snapshots = Path(hub) / f"models--{model.replace('/', '--')}" / "snapshots"
    return sorted(snapshots.iterdir()) if snapshots.is_dir() else []


def _bundled(model: str) -> list[Path]:
    from splitserve.model.loader import BUNDLED_NAME, bundled_gguf_path

    if model != BUNDLED_NAME:
        return []
    try:
        return [bundled_gguf_path()]
    except FileNotFoundError:
        return []
