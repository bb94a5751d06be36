"""The bundled SmolLM2-135M-Instruct GGUF against transformers' own GGUF loader, which dequantizes the same weights."""

from __future__ import annotations

import pytest
import torch
import transformers

from splitserve.model.batch import SeqInput, build_forward_batch
from splitserve.model.kv_cache import PagedKVCache
from splitserve.model.loader import LoadedModel, bundled_gguf_path, load_model
from tests.greedy import assert_greedy_match, greedy, ref_greedy

CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish.",
]
TEXTS = [
    "Hello world",
    " leading space and trailing space ",
    "12345 + 678 = 13023; 3.14159, 1e-5, 0x1F, 1,000,000",
    "  two  spaces\t\ttabs\n\n\nnewlines   \r\n",
    "Caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \u4e2d\u6587 \u0440\u0443\u0441\u0441\u043a\u0438\u0439 \U0001f600\u2764\ufe0f\U0001f468\u200d\U0001f469\u200d\U0001f467",
    "def f(x):\n    return x**2  # square\n\nclass A:\n\tpass\n",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "I'm you're they'll we've He'd DON'T",
    "\uff46\uff55\uff4c\uff4c\uff57\uff49\uff44\uff54\uff48\u00bd\u2460\u00b2",
    "",
    " ",
]


@pytest.fixture(scope="module")
def ours() -> LoadedModel:
    return load_model()


@pytest.fixture(scope="module")
def ref() -> torch.nn.Module:
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF model")
    path = bundled_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def ref_tokenizer():
    path = bundled_gguf_path()
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def chat_ids(loaded: LoadedModel, question: str) -> list[int]:
    tok = loaded.tokenizer
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": question}]))


def test_config_and_name(ours):
    c = ours.config
    assert ours.name == "SmolLM2-135M-Instruct"
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
    assert c.tie_word_embeddings and c.vocab_size == 49152


@torch.no_grad()
def test_logits_match_transformers(ours, ref):
    for prompt in [chat_ids(ours, CHATS[0]), ours.tokenizer.encode("The quick brown fox jumps over")]:
        cache = PagedKVCache(ours.config, 8, 16, torch.float32, "cpu")
        batch = build_forward_batch([SeqInput(prompt, 0, list(range(8)), True)], 16, "cpu")
        batch.logits_indices = torch.arange(len(prompt))
        expected = ref(torch.tensor([prompt])).logits[0]
        got = ours.model(batch, cache)
        torch.testing.assert_close(got, expected, atol=1e-4 * float(expected.abs().max()), rtol=0)


def test_greedy_32_tokens_match_generate(ours, ref):
    prompts = [chat_ids(ours, q) for q in CHATS]
    for prompt, got in zip(prompts, greedy(ours, prompts, 32)):
        expected, logits = ref_greedy(ref, prompt, 32)
        assert_greedy_match(got, expected, logits)


def test_knows_the_capital_of_france(ours):
    [tokens] = greedy(ours, [chat_ids(ours, CHATS[0])], 12)
    assert "Paris" in ours.tokenizer.decode(tokens)


def test_tokenizer_matches_transformers(ours, ref_tokenizer):
    tok = ours.tokenizer
    assert tok.vocab_size == len(ref_tokenizer)
    assert (tok.bos_token_id, tok.eos_token_ids, tok.add_bos_token) == (1, frozenset({2}), False)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref_tokenizer.encode(text), text
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == ref_tokenizer.decode(ids, skip_special_tokens=skip)
    # Random ids: special tokens anywhere, and bytes that do not form whole UTF-8 characters.
    ids = torch.randint(0, tok.vocab_size, (500,), generator=torch.Generator().manual_seed(0)).tolist()
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == ref_tokenizer.decode(ids, skip_special_tokens=skip)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi \U0001f600"}]
    for gen in (True, False):
        expected = ref_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert tok.apply_chat_template(messages, add_generation_prompt=gen) == expected


def test_numerals_are_isolated_before_byte_level_bpe(ours):
    """SmolLM2 was trained with every numeral (\\p{N}) split off first, as llama.cpp's "smollm" pre-tokenizer and
    SmolLM2's own tokenizer.json do. transformers' GGUF loader skips that split, so it alone differs where a space
    precedes a non-ASCII numeral: " \u00b2" is ["\u0120", "\u00c2\u00b2"] here and ["\u0120\u00c2", "\u00b2"] there."""
    tok = ours.tokenizer
    assert [tok.backend.id_to_token(i) for i in tok.encode(" \u00b2 12")] == ["\u0120", "\u00c2\u00b2", "\u0120", "1", "2"]
