"""Our Llama-family forward against transformers on tiny random checkpoints: logits and greedy tokens.

The paged runs mix, in each ForwardBatch, prompt chunks (fresh and continuing) with decode steps of other
sequences, through shuffled (non-contiguous) block tables.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from splitserve.model.batch import SeqInput, build_forward_batch
from splitserve.model.kv_cache import PagedKVCache
from splitserve.model.llama import LlamaModel
from splitserve.model.loader import LoadedModel, load_model
from tests.greedy import assert_greedy_match, greedy, ref_greedy
from tests.tiny_models import make_tiny_checkpoint

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
VARIANTS = {
    "llama-gqa-tied": dict(),
    "llama-mha-untied": dict(heads=4, kv_heads=4, tie=False),
    "llama-mqa-odd-sizes": dict(hidden=72, heads=6, kv_heads=1, intermediate=100, layers=3),
    "qwen2-bias": dict(arch="qwen2", tie=False),
    "mistral": dict(arch="mistral", heads=8, kv_heads=2),
    "llama3-rope": dict(rope_scaling=LLAMA3_ROPE),
    "linear-rope": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def models(request, tmp_path_factory) -> tuple[LoadedModel, torch.nn.Module]:
    path = make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), **VARIANTS[request.param])
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return load_model(path), ref


def random_tokens(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def ref_logits(ref: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    return ref(torch.tensor([tokens])).logits[0]


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(ours, ref, atol=1e-4 * float(ref.abs().max()), rtol=0)


@pytest.mark.parametrize("length", [1, 2, 17, 64])
def test_prefill_logits_at_every_position(models, length):
    ours, ref = models
    tokens = random_tokens(length, ours.config.vocab_size, seed=length)
    cache = PagedKVCache(ours.config, num_blocks=8, block_size=16, dtype=torch.float32, device="cpu")
    batch = build_forward_batch([SeqInput(tokens, 0, [5, 2, 7, 0], True)], 16, "cpu")
    batch.logits_indices = torch.arange(length)
    assert_logits_close(ours.model(batch, cache), ref_logits(ref, tokens))


class PagedRun:
    """Feeds sequences through a shared cache, teacher-forced: each sequence joins at its arrival step, sends
    its prompt in chunks of `chunk` tokens, then one token per step; all live sequences share every batch."""

    def __init__(
        self, model: LlamaModel, block_size: int, seqs: list[list[int]], prompt_lens: list[int], device: str = "cpu"
    ) -> None:
        self.model, self.block_size, self.seqs, self.prompt_lens = model, block_size, seqs, prompt_lens
        self.device = device
        needs = [math.ceil(len(s) / block_size) for s in seqs]
        pool = list(range(sum(needs) + 3))
        random.Random(block_size).shuffle(pool)
        self.tables = [[pool.pop() for _ in range(n)] for n in needs]
        self.cache = PagedKVCache(model.config, len(pool) + sum(needs), block_size, torch.float32, device)

    def run(self, chunk: int, arrivals: list[int]) -> list[dict[int, torch.Tensor]]:
        """Logits per sequence, keyed by the position of the token they follow."""
        done = [0] * len(self.seqs)
        logits: list[dict[int, torch.Tensor]] = [{} for _ in self.seqs]
        step = 0
        while any(d < len(s) for d, s in zip(done, self.seqs)):
            inputs, owners = [], []
            for i, seq in enumerate(self.seqs):
                if arrivals[i] > step or done[i] == len(seq):
                    continue
                n = min(chunk, self.prompt_lens[i] - done[i]) if done[i] < self.prompt_lens[i] else 1
                inputs.append(SeqInput(seq[done[i] : done[i] + n], done[i], self.tables[i], True))
                owners.append((i, done[i] + n - 1))
                done[i] += n
            if inputs:
                out = self.model(build_forward_batch(inputs, self.block_size, self.device), self.cache).cpu()
                assert out.shape == (len(inputs), self.model.config.vocab_size)
                for row, (i, pos) in enumerate(owners):
                    logits[i][pos] = out[row]
            step += 1
        return logits


def check_paged_run(ours: LoadedModel, ref: torch.nn.Module, block_size: int, chunk: int, device: str) -> None:
    prompt_lens, decode_steps = [1, 9, 40, 23], 6
    seqs = [random_tokens(n + decode_steps, ours.config.vocab_size, seed=100 + n) for n in prompt_lens]
    run = PagedRun(ours.model, block_size, seqs, prompt_lens, device)
    got = run.run(chunk, arrivals=[0, 0, 1, 3])
    for seq, logits in zip(seqs, got):
        expected = ref_logits(ref, seq)
        positions = sorted(logits)
        assert positions[-decode_steps:] == list(range(len(seq) - decode_steps, len(seq)))
        assert_logits_close(torch.stack([logits[p] for p in positions]), expected[positions])


@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("chunk", [7, 1000], ids=["chunked", "whole"])
def test_paged_mixed_batches_match_reference(models, block_size, chunk):
    check_paged_run(*models, block_size, chunk, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_paged_mixed_batches_on_cuda(models):
    ours, ref = models
    ours.model.cuda()
    try:
        check_paged_run(ours, ref, 16, 7, "cuda")
    finally:
        ours.model.cpu()


def test_greedy_16_tokens_match_generate(models):
    ours, ref = models
    prompts = [random_tokens(n, ours.config.vocab_size, seed=n) for n in (3, 30)]
    for prompt, got in zip(prompts, greedy(ours, prompts, 16)):
        expected, logits = ref_greedy(ref, prompt, 16)
        assert_greedy_match(got, expected, logits)


def test_bfloat16_tracks_float32(models):
    ours, ref = models
    tokens = random_tokens(20, ours.config.vocab_size, seed=7)
    expected = ref_logits(ref, tokens)[-1]
    bf16 = LlamaModel(ours.config).to(torch.bfloat16)
    bf16.load_state_dict(ours.model.state_dict())
    cache = PagedKVCache(ours.config, 4, 16, torch.bfloat16, "cpu")
    got = bf16(build_forward_batch([SeqInput(tokens, 0, [3, 1], True)], 16, "cpu"), cache)[0]
    assert got.dtype == torch.float32
    assert float((got - expected).abs().max()) < 0.05 * float(expected.abs().max())
