"""The engine's greedy output equals Hugging Face transformers' on the same weights, through continuous
batching, prefix-cache hits, chunked prefill and preemption, with every block given back afterwards."""

from __future__ import annotations

import random
import time

import pytest
import torch

from splitserve.core.request import SamplingParams
from splitserve.model.loader import load_model
from splitserve.runtime.worker.engine import Engine, EngineConfig
from tests.greedy import assert_greedy_match, ref_greedy
from tests.tiny_models import make_tiny_checkpoint

MAX_NEW = 10


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("gqa"), heads=4, kv_heads=2, layers=2, seed=3)


@pytest.fixture(scope="module")
def hf(checkpoint):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_model(checkpoint)


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, vocab) for _ in range(40)]
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in (1, 2, 7, 16, 17, 33, 61)]
    # Prefix sharing: these hit blocks cached by each other (and by earlier runs).
    prompts += [shared + [rng.randrange(3, vocab) for _ in range(k)] for k in (0, 1, 9, 24)]
    return prompts


@pytest.fixture(scope="module")
def references(hf, loaded):
    return {tuple(p): ref_greedy(hf, p, MAX_NEW) for p in _prompts(loaded.config.vocab_size)}


def run_engine(engine: Engine, prompts: list[list[int]], stagger: bool = False) -> list[list[int]]:
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    outs: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    while pending or engine.has_work():
        # Staggered arrivals join a batch already decoding: continuous batching, not static batches.
        for i, p in pending[: 2 if stagger else len(pending)]:
            engine.add_request(f"r{i}", p, params, time.monotonic())
        pending = pending[2:] if stagger else []
        for o in engine.step(time.monotonic()):
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
    return [outs[f"r{i}"] for i in range(len(prompts))]


@pytest.mark.parametrize(
    "cfg",
    [
        EngineConfig(block_size=1, num_blocks=2048, max_model_len=128),
        EngineConfig(block_size=16, num_blocks=128, max_model_len=128),
        EngineConfig(block_size=32, num_blocks=64, max_model_len=128),
        EngineConfig(block_size=16, num_blocks=128, max_model_len=128, enable_chunked_prefill=True, max_num_batched_tokens=24),
        EngineConfig(block_size=4, num_blocks=40, max_model_len=128, max_num_seqs=8),  # forces preemption
        EngineConfig(block_size=16, num_blocks=128, max_model_len=128, enable_prefix_caching=False),
    ],
    ids=["bs1", "bs16", "bs32", "chunked", "preempt", "no-prefix-cache"],
)
def test_greedy_matches_transformers(loaded, references, cfg):
    engine = Engine(loaded, cfg)
    prompts = _prompts(loaded.config.vocab_size)
    for stagger in (False, True):  # the second pass hits the prefix cache the first one filled
        outs = run_engine(engine, prompts, stagger)
        for p, ours in zip(prompts, outs):
            ref_tokens, ref_logits = references[tuple(p)]
            assert_greedy_match(ours, ref_tokens, ref_logits)
        assert engine.pool.num_free_blocks == engine.pool.num_blocks
    if cfg.enable_prefix_caching:
        assert engine.scheduler.prefix_hit_tokens > 0
    if cfg.num_blocks == 40:
        assert engine.scheduler.num_preemptions > 0


def test_seeded_sampling_is_reproducible_and_abort_frees_blocks(loaded):
    engine = Engine(loaded, EngineConfig(block_size=16, num_blocks=64, max_model_len=128))
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    texts = []
    for run in range(2):
        engine.add_request(f"s{run}", [5, 6, 7, 8], params, 0.0)
        # Different company in the batch must not change a seeded request's tokens.
        engine.add_request(f"noise{run}", list(range(3, 3 + 5 * (run + 1))), SamplingParams(max_tokens=3, temperature=1.0), 0.0)
        out: list[int] = []
        while engine.has_work():
            for o in engine.step(0.0):
                if o.request_id == f"s{run}":
                    out += o.new_token_ids
        texts.append(out)
    assert texts[0] == texts[1] and len(texts[0]) == 12
    engine.add_request("gone", list(range(3, 40)), params, 0.0)
    engine.step(0.0)
    assert engine.pool.num_free_blocks < engine.pool.num_blocks
    final = engine.abort("gone")
    assert final.finished and final.finish_reason == "abort"
    assert engine.pool.num_free_blocks == engine.pool.num_blocks
