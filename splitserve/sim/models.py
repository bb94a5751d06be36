"""Model presets for the planner: exact shapes by name, or any Hugging Face config.json.

Presets copy the published config.json of each model (Hugging Face hub, the repository named in `source`);
only what sets FLOPs and bytes is given. The description itself is `core.model_spec.ModelSpec`.
"""

from __future__ import annotations

import json
from pathlib import Path

from splitserve.core.model_spec import ModelSpec
from splitserve.sim.hardware import PresetError


def _m(name: str, h: int, inter: int, layers: int, heads: int, kv: int, vocab: int, tie: bool, max_pos: int,
       source: str, head_dim: int = 128) -> ModelSpec:
    return ModelSpec(name=name, hidden_size=h, intermediate_size=inter, num_layers=layers, num_heads=heads,
                     num_kv_heads=kv, head_dim=head_dim, vocab_size=vocab, tie_word_embeddings=tie,
                     max_position_embeddings=max_pos, source=source)


MODELS: dict[str, ModelSpec] = {
    "llama-3.1-8b": _m("Llama-3.1-8B", 4096, 14336, 32, 32, 8, 128256, False, 131072, "meta-llama/Llama-3.1-8B"),
    "llama-3.1-70b": _m("Llama-3.1-70B", 8192, 28672, 80, 64, 8, 128256, False, 131072, "meta-llama/Llama-3.1-70B"),
    "llama-3.1-405b": _m("Llama-3.1-405B", 16384, 53248, 126, 128, 8, 128256, False, 131072, "meta-llama/Llama-3.1-405B"),
    "qwen3-32b": _m("Qwen3-32B", 5120, 25600, 64, 64, 8, 151936, False, 40960, "Qwen/Qwen3-32B"),
    "mistral-7b": _m("Mistral-7B-v0.3", 4096, 14336, 32, 32, 8, 32768, False, 32768, "mistralai/Mistral-7B-v0.3"),
    "smollm2-135m": _m("SmolLM2-135M", 576, 1536, 30, 9, 3, 49152, True, 8192, "HuggingFaceTB/SmolLM2-135M", head_dim=64),
}


def _normalise(name: str) -> str:
    key = name.strip().lower().rsplit("/", 1)[-1]
    for suffix in ("-instruct", "-it"):
        key = key.removesuffix(suffix)
    return {"llama-3-70b": "llama-3.1-70b", "llama-3-8b": "llama-3.1-8b", "mistral-7b-v0.3": "mistral-7b",
            "mistral-7b-v0.1": "mistral-7b", "smollm2-135m": "smollm2-135m"}.get(key, key)


def model(name_or_path: str) -> ModelSpec:
    """A preset by name (case-insensitive; `meta-llama/Llama-3.1-70B-Instruct` works), or a path to a
    config.json or to a directory holding one."""
    p = Path(name_or_path)
    if p.is_dir():
        p = p / "config.json"
    if p.is_file():
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PresetError(f"cannot read {p}: {e}") from None
        if not isinstance(d, dict):
            raise PresetError(f"{p}: not a JSON object")
        try:
            return ModelSpec.from_hf_config(d, name=p.parent.name or str(p))
        except (ValueError, TypeError) as e:
            raise PresetError(f"{p}: {e}") from None
    key = _normalise(name_or_path)
    if key in MODELS:
        return MODELS[key]
    raise PresetError(f"unknown model {name_or_path!r}; presets: {', '.join(MODELS)}, or a path to a Hugging Face config.json")
