"""Tiny random Hugging Face checkpoints for tests and benchmarks: real file formats, a real tokenizer, seconds to make.

    path = make_tiny_checkpoint(tmp_path / "tiny", arch="qwen2")
    loaded = splitserve.model.loader.load_model(path)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BOS, EOS = "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Varied enough text (words, code, digits, punctuation, a little unicode) to learn a few hundred merges.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs into the forest.",
    "Paris is the capital of France. Berlin is the capital of Germany. Rome is the capital of Italy.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "for (int i = 0; i < 10; i++) { printf(\"%d\\n\", i * i); }",
    "In 1969, 3 astronauts flew 384,400 km to the Moon and back in 8 days, 3 hours and 18 minutes.",
    "Language models predict the next token. A tokenizer splits text into tokens; a model scores them.",
    "Caf\u00e9, na\u00efve, r\u00e9sum\u00e9, \u00fcber, stra\u00dfe, \u65e5\u672c\u8a9e, \u4e2d\u6587, \u0440\u0443\u0441\u0441\u043a\u0438\u0439, emoji \U0001f600 and \u2764\ufe0f.",
    "Prefill computes the whole prompt at once; decode produces one token per step for each request.",
    "import torch\nx = torch.randn(4, 8)\nprint(x.sum(dim=-1).mean())\n",
    "Once upon a time, there was a little robot who wanted to learn how to paint the sunset over the sea.",
]


def make_tiny_checkpoint(
    path: str | Path,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 384,
    tie: bool = True,
    arch: str = "llama",
    rope_scaling: dict | None = None,
    seed: int = 0,
) -> Path:
    """Write a random checkpoint (config.json, model.safetensors, tokenizer.json, tokenizer_config.json) to `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
    from transformers import Qwen2Config, Qwen2ForCausalLM

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(vocab)
    tokenizer.save(str(path / "tokenizer.json"))
    config_cls, model_cls = classes[arch]
    config = config_cls(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=tie,
        rope_theta=10000.0,
        rope_scaling=rope_scaling,
        # Wider than the usual 0.02 so logits are spread out and greedy choices are not near-ties.
        initializer_range=0.15,
        bos_token_id=tokenizer.token_to_id(BOS),
        eos_token_id=tokenizer.token_to_id(EOS),
        pad_token_id=tokenizer.token_to_id("<|endoftext|>"),
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    # transformers starts norms at 1 and biases at 0; randomise them so loading them wrong cannot go unseen.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": BOS,
                "eos_token": EOS,
                "pad_token": "<|endoftext|>",
                "add_bos_token": False,
                "chat_template": CHAT_TEMPLATE,
            },
            indent=2,
        )
    )
    return path


def _train_tokenizer(vocab: int) -> Tokenizer:
    """A GPT-2 style byte-level BPE with exactly `vocab` tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    # A small corpus runs out of merges before a large vocab is full; reserved tokens fill it, as Llama 3 does.
    missing = vocab - tok.get_vocab_size()
    if missing < 0:
        raise ValueError(f"vocab {vocab} is smaller than the byte alphabet plus special tokens")
    tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    return tok
