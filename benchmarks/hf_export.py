"""The bundled SmolLM2 GGUF as a plain fp32 Hugging Face directory, so vLLM and splitserve load identical weights.

vLLM needs a Hugging Face directory; splitserve serves the same one with `--model DIR`. transformers' GGUF loader
dequantises the Q4_1 tensors, but transformers 5 refuses `save_pretrained` on a GGUF-loaded model, so a plain model
is rebuilt from its config (without `quantization_config`), given the loaded state dict, and saved with the
tokenizer as fp32 safetensors.

    python -m benchmarks.hf_export [--out DIR]     (default: results/hf/SmolLM2-135M-Instruct; reused when present)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from splitserve.model.loader import BUNDLED_NAME, bundled_gguf_path

DEFAULT_DIR = Path("results/hf") / BUNDLED_NAME


def export(out: Path = DEFAULT_DIR) -> Path:
    """`out`, holding the fp32 checkpoint; built only when its config.json is missing."""
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = bundled_gguf_path()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # The tied lm_head may be absent from the GGUF-loaded state dict; anything else missing is a broken export.
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"export lost tensors: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_DIR)
    print(export(ap.parse_args().out))


if __name__ == "__main__":
    main()
